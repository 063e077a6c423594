//! How stored uint8 slices become model input: the fixed /255 of the
//! window (or 8-bit export), or one of nnU-Net's two z-scoring schemes.
//! - `percentile` (nnU-Net's non-CT scheme, for 8-bit exports whose window
//!   is unknown): each image clipped to its own 0.5–99.5 percentiles and
//!   z-scored with its own mean and std;
//! - `ct` (nnU-Net's CT scheme): clipped to the 0.5–99.5 percentiles of the
//!   training split's liver pixels and z-scored with their mean and std,
//!   computed once in training and stored in the model card;
//! - `nyul` (Nyúl and Udupa's histogram standardisation): each image's body
//!   landmarks (its 1st, 10th, ..., 90th, 99th percentiles) mapped piecewise
//!   linearly onto the training images' mean landmarks, so that an export's
//!   monotone mapping (window, gamma, contrast) largely cancels.
//! Z-scoring is invariant to the window's linear map, so the uint8 values of
//! a windowed slice give the same input as the HU they came from (up to the
//! window's clipping and its 256 levels).

pub use crate::InputScheme as Scheme;
use serde::{Deserialize, Serialize};

/// The scheme with its statistics, as the model card stores it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "scheme", rename_all = "snake_case")]
pub enum InputScaling {
    /// value / 255.
    #[default]
    Fixed,
    /// Per image: clip to its `lo_pct`..`hi_pct` percentiles, z-score.
    Percentile { lo_pct: f64, hi_pct: f64 },
    /// Clip to `clip` (uint8 units), subtract `mean`, divide by `std`.
    Ct { clip: [f32; 2], mean: f32, std: f32 },
    /// Per image: its body landmarks at `LANDMARKS` mapped piecewise linearly
    /// onto `standard` (the training images' mean, on a 0..1 scale).
    Nyul { standard: [f32; LANDMARK_COUNT] },
}

/// Nyúl's landmark percentiles: the ends and the deciles.
pub const LANDMARKS: [f64; LANDMARK_COUNT] = [1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0];
pub const LANDMARK_COUNT: usize = 11;

/// Standardised values beyond the landmarks are clipped this far outside
/// 0..1: the clipped-black background of one export must not become a far
/// outlier of another's.
const NYUL_MARGIN: f32 = 0.2;

/// What one image's values become.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IntensityMap {
    Affine(Affine),
    /// Through the knots (`from` rising), extended by the end segments,
    /// clipped to `NYUL_MARGIN` outside the standard scale.
    Piecewise {
        from: [f32; LANDMARK_COUNT],
        to: [f32; LANDMARK_COUNT],
    },
}

impl IntensityMap {
    pub fn apply(&self, v: f32) -> f32 {
        match self {
            IntensityMap::Affine(a) => a.apply(v),
            IntensityMap::Piecewise { from, to } => {
                let k = from[1..LANDMARK_COUNT - 1].iter().take_while(|&&x| x <= v).count();
                let t = (v - from[k]) / (from[k + 1] - from[k]);
                (to[k] + t * (to[k + 1] - to[k])).clamp(to[0] - NYUL_MARGIN, to[LANDMARK_COUNT - 1] + NYUL_MARGIN)
            }
        }
    }
}

/// value ↦ (clamp(value, lo, hi) − offset) / divisor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub lo: f32,
    pub hi: f32,
    pub offset: f32,
    pub divisor: f32,
}

impl Affine {
    pub fn apply(&self, v: f32) -> f32 {
        (v.clamp(self.lo, self.hi) - self.offset) / self.divisor
    }
}

/// nnU-Net's percentiles for both schemes.
pub const PERCENTILES: (f64, f64) = (0.5, 99.5);

const FIXED: Affine = Affine { lo: f32::NEG_INFINITY, hi: f32::INFINITY, offset: 0.0, divisor: 255.0 };

impl InputScaling {
    /// The map for one image (its own statistics for `percentile` and `nyul`).
    pub fn map(&self, image: &[u8]) -> IntensityMap {
        match *self {
            InputScaling::Fixed => IntensityMap::Affine(FIXED),
            InputScaling::Percentile { lo_pct, hi_pct } => {
                let h = Histogram::of(image.iter().copied());
                let (lo, hi) = (h.percentile(lo_pct), h.percentile(hi_pct));
                let (mean, std) = h.clipped_mean_std(lo, hi);
                IntensityMap::Affine(Affine { lo, hi, offset: mean, divisor: std.max(1e-8) })
            }
            InputScaling::Ct { clip, mean, std } => IntensityMap::Affine(Affine { lo: clip[0], hi: clip[1], offset: mean, divisor: std.max(1e-8) }),
            // An image without a body to take landmarks from (blank) stays /255.
            InputScaling::Nyul { standard } => body_landmarks(image).map_or(IntensityMap::Affine(FIXED), |from| IntensityMap::Piecewise { from, to: standard }),
        }
    }

    /// The card's statistics for `scheme`: `foreground` (the training
    /// split's liver pixels) is read only by `ct`, `images` (the training
    /// slices) only by `nyul`.
    pub fn fit<'a>(scheme: Scheme, foreground: impl Iterator<Item = u8>, images: impl Iterator<Item = &'a [u8]>) -> anyhow::Result<Self> {
        let (lo_pct, hi_pct) = PERCENTILES;
        Ok(match scheme {
            Scheme::Fixed => InputScaling::Fixed,
            Scheme::Percentile => InputScaling::Percentile { lo_pct, hi_pct },
            Scheme::Nyul => InputScaling::Nyul { standard: standard_landmarks(images)? },
            Scheme::Ct => {
                let h = Histogram::of(foreground);
                if h.total == 0 {
                    anyhow::bail!("input_scaling ct: the training split has no liver pixels to take statistics from");
                }
                let clip = [h.percentile(lo_pct), h.percentile(hi_pct)];
                let (mean, std) = h.clipped_mean_std(clip[0], clip[1]);
                InputScaling::Ct { clip, mean, std }
            }
        })
    }

    /// The scheme in words, for the report (uint8 units turned back into
    /// HU with `window` where the data were windowed CT).
    pub fn describe(&self, window: Option<(f64, f64)>) -> String {
        let hu = |v: f32| window.map_or(format!("{v:.1}"), |(lo, hi)| format!("{:.1} HU", lo + v as f64 / 255.0 * (hi - lo)));
        let hu_scale = |v: f32| window.map_or(format!("{v:.2}"), |(lo, hi)| format!("{:.1} HU", v as f64 / 255.0 * (hi - lo)));
        match *self {
            InputScaling::Fixed => "fixed: window (or 8-bit) mapped to [0, 1]".into(),
            InputScaling::Percentile { lo_pct, hi_pct } => format!("percentile: each image clipped to its {lo_pct}–{hi_pct} percentiles and z-scored (nnU-Net's non-CT scheme)"),
            InputScaling::Ct { clip, mean, std } => {
                format!("ct: clipped to [{}, {}] (training liver 0.5–99.5 percentiles), z-scored with mean {} and std {} (nnU-Net's CT scheme)", hu(clip[0]), hu(clip[1]), hu(mean), hu_scale(std))
            }
            InputScaling::Nyul { standard } => {
                let deciles: Vec<String> = standard.iter().map(|v| format!("{v:.3}")).collect();
                format!("nyul: each image's body percentiles 1, 10, ..., 90, 99 mapped piecewise linearly onto the training mean [{}] (Nyúl–Udupa histogram standardisation)", deciles.join(", "))
            }
        }
    }
}

/// An image's landmarks over its body: the pixels above its minimum (the
/// clipped-black background of a windowed export is not anatomy). None for
/// an image with too few such pixels or no spread between its ends.
fn body_landmarks(image: &[u8]) -> Option<[f32; LANDMARK_COUNT]> {
    let min = *image.iter().min()?;
    let h = Histogram::of(image.iter().copied().filter(|&v| v > min));
    if h.total < 16 {
        return None;
    }
    let mut marks = LANDMARKS.map(|p| h.percentile(p));
    if marks[LANDMARK_COUNT - 1] - marks[0] < 1.0 {
        return None;
    }
    // Ties (a plateau in the histogram) become a tiny rise, so every segment has a slope.
    for k in 1..LANDMARK_COUNT {
        marks[k] = marks[k].max(marks[k - 1] + 1e-3);
    }
    Some(marks)
}

/// The mean over `images` of each one's landmarks, its ends mapped onto 0..1.
fn standard_landmarks<'a>(images: impl Iterator<Item = &'a [u8]>) -> anyhow::Result<[f32; LANDMARK_COUNT]> {
    let (mut sum, mut n) = ([0f64; LANDMARK_COUNT], 0usize);
    for marks in images.filter_map(body_landmarks) {
        let (lo, hi) = (marks[0] as f64, marks[LANDMARK_COUNT - 1] as f64);
        sum.iter_mut().zip(marks).for_each(|(s, m)| *s += (m as f64 - lo) / (hi - lo));
        n += 1;
    }
    if n == 0 {
        anyhow::bail!("input_scaling nyul: no training slice has a body to take landmarks from");
    }
    Ok(sum.map(|s| (s / n as f64) as f32))
}

/// Counts of the 256 uint8 values.
struct Histogram {
    counts: [u64; 256],
    total: u64,
}

impl Histogram {
    fn of(values: impl Iterator<Item = u8>) -> Self {
        let mut counts = [0u64; 256];
        values.for_each(|v| counts[v as usize] += 1);
        Histogram { total: counts.iter().sum(), counts }
    }

    /// The `pct` percentile, linearly interpolated between order statistics
    /// (numpy's default).
    fn percentile(&self, pct: f64) -> f32 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = pct / 100.0 * (self.total - 1) as f64;
        let (below, frac) = (rank.floor() as u64, rank.fract());
        let value_at = |r: u64| {
            let mut seen = 0;
            for (v, &c) in self.counts.iter().enumerate() {
                seen += c;
                if seen > r {
                    return v as f64;
                }
            }
            255.0
        };
        let (a, b) = (value_at(below), value_at((below + 1).min(self.total - 1)));
        (a + (b - a) * frac) as f32
    }

    /// Mean and (population) std of the values clipped to [lo, hi].
    fn clipped_mean_std(&self, lo: f32, hi: f32) -> (f32, f32) {
        let n = self.total.max(1) as f64;
        let clipped = |v: usize| (v as f64).clamp(lo as f64, hi as f64);
        let mean = self.counts.iter().enumerate().map(|(v, &c)| c as f64 * clipped(v)).sum::<f64>() / n;
        let var = self.counts.iter().enumerate().map(|(v, &c)| c as f64 * (clipped(v) - mean).powi(2)).sum::<f64>() / n;
        (mean as f32, var.sqrt() as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpys_linear_rule() {
        // numpy.percentile(range(0, 200), [0.5, 99.5]) = [0.995, 198.005]
        let h = Histogram::of(0..200u8);
        assert!((h.percentile(0.5) - 0.995).abs() < 1e-4 && (h.percentile(99.5) - 198.005).abs() < 1e-3);
        assert_eq!(h.percentile(0.0), 0.0);
        assert_eq!(h.percentile(100.0), 199.0);
    }

    /// Per-image z-scoring gives mean 0 and std 1 inside the percentiles and
    /// undoes a different window's linear map; fixed is /255.
    #[test]
    fn schemes_z_score_and_survive_other_windows() {
        let image: Vec<u8> = (0..4096u32).map(|i| ((i * 7919) % 180 + 20) as u8).collect();
        let narrower: Vec<u8> = image.iter().map(|&v| (v as f32 * 0.5 + 40.0) as u8).collect();
        let per = InputScaling::Percentile { lo_pct: 0.5, hi_pct: 99.5 };
        let z = |img: &[u8]| -> Vec<f32> {
            let a = per.map(img);
            img.iter().map(|&v| a.apply(v as f32)).collect()
        };
        let (za, zb) = (z(&image), z(&narrower));
        let mean = za.iter().sum::<f32>() / za.len() as f32;
        let std = (za.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / za.len() as f32).sqrt();
        assert!(mean.abs() < 1e-4 && (std - 1.0).abs() < 1e-3, "mean {mean} std {std}");
        let worst = za.iter().zip(&zb).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 0.05, "another window's export gives other inputs (worst {worst})");
        assert_eq!(InputScaling::Fixed.map(&image).apply(51.0), 0.2);
        let ct = InputScaling::fit(Scheme::Ct, image.iter().copied(), std::iter::empty()).unwrap();
        let InputScaling::Ct { clip, mean, std } = ct else { panic!("{ct:?}") };
        assert!(clip[0] >= 20.0 && clip[1] <= 199.0 && mean > 100.0 && std > 40.0, "{ct:?}");
        assert!(InputScaling::fit(Scheme::Ct, std::iter::empty(), std::iter::empty()).is_err());
        assert!(ct.describe(Some((-100.0, 400.0))).contains("HU"));
    }

    /// A body on clipped black, as one export and as another's gamma and
    /// window (a monotone, non-linear remap): nyul gives both nearly the
    /// same input, closer than percentile's z-scores do (on their scale).
    #[test]
    fn nyul_undoes_a_monotone_remap() {
        let body = |i: u32| if i % 5 == 0 { 0u8 } else { ((i * 7919) % 200 + 30) as u8 };
        let image: Vec<u8> = (0..4096u32).map(body).collect();
        let other: Vec<u8> = image.iter().map(|&v| if v == 0 { 0 } else { (255.0 * (v as f32 / 255.0).powf(0.6) * 0.8 + 20.0) as u8 }).collect();
        let nyul = InputScaling::fit(Scheme::Nyul, std::iter::empty(), [image.as_slice()].into_iter()).unwrap();
        let InputScaling::Nyul { standard } = nyul else { panic!("{nyul:?}") };
        assert!(standard[0] == 0.0 && (standard[LANDMARK_COUNT - 1] - 1.0).abs() < 1e-6 && standard.windows(2).all(|w| w[0] < w[1]), "{standard:?}");
        let spread = |s: &InputScaling, img: &[u8]| -> Vec<f32> {
            let m = s.map(img);
            img.iter().map(|&v| m.apply(v as f32)).collect()
        };
        // Each scheme's difference between the two exports, over the body,
        // relative to the range its body inputs span.
        let relative = |s: &InputScaling| {
            let (a, b) = (spread(s, &image), spread(s, &other));
            let body: Vec<usize> = (0..image.len()).filter(|&i| image[i] > 0).collect();
            let range = body.iter().map(|&i| a[i]).fold(f32::MIN, f32::max) - body.iter().map(|&i| a[i]).fold(f32::MAX, f32::min);
            body.iter().map(|&i| (a[i] - b[i]).abs()).sum::<f32>() / body.len() as f32 / range
        };
        let (n, p) = (relative(&nyul), relative(&InputScaling::Percentile { lo_pct: 0.5, hi_pct: 99.5 }));
        assert!(n < 0.01 && n < p / 3.0, "nyul {n}, percentile {p}");
        // Background sits just below the scale, never far out; a blank image stays /255.
        let bg = nyul.map(&other).apply(0.0);
        assert!((-NYUL_MARGIN..0.0).contains(&bg), "{bg}");
        assert_eq!(nyul.map(&[7u8; 64]), IntensityMap::Affine(FIXED));
        assert!(InputScaling::fit(Scheme::Nyul, std::iter::empty(), [[0u8; 64].as_slice()].into_iter()).is_err());
        assert!(nyul.describe(None).starts_with("nyul"));
    }
}
