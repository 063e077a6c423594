//! How stored uint8 slices become model input: the fixed /255 of the
//! window (or 8-bit export), or one of nnU-Net's two z-scoring schemes.
//! - `percentile` (nnU-Net's non-CT scheme, for 8-bit exports whose window
//!   is unknown): each image clipped to its own 0.5–99.5 percentiles and
//!   z-scored with its own mean and std;
//! - `ct` (nnU-Net's CT scheme): clipped to the 0.5–99.5 percentiles of the
//!   training split's liver pixels and z-scored with their mean and std,
//!   computed once in training and stored in the model card.
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

impl InputScaling {
    /// The map for one image (its own statistics for `percentile`).
    pub fn affine(&self, image: &[u8]) -> Affine {
        match *self {
            InputScaling::Fixed => Affine { lo: f32::NEG_INFINITY, hi: f32::INFINITY, offset: 0.0, divisor: 255.0 },
            InputScaling::Percentile { lo_pct, hi_pct } => {
                let h = Histogram::of(image.iter().copied());
                let (lo, hi) = (h.percentile(lo_pct), h.percentile(hi_pct));
                let (mean, std) = h.clipped_mean_std(lo, hi);
                Affine { lo, hi, offset: mean, divisor: std.max(1e-8) }
            }
            InputScaling::Ct { clip, mean, std } => Affine { lo: clip[0], hi: clip[1], offset: mean, divisor: std.max(1e-8) },
        }
    }

    /// The card's statistics for `scheme`: `foreground` (the training
    /// split's liver pixels) is read only by `ct`.
    pub fn fit(scheme: Scheme, foreground: impl Iterator<Item = u8>) -> anyhow::Result<Self> {
        let (lo_pct, hi_pct) = PERCENTILES;
        Ok(match scheme {
            Scheme::Fixed => InputScaling::Fixed,
            Scheme::Percentile => InputScaling::Percentile { lo_pct, hi_pct },
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
        }
    }
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
            let a = per.affine(img);
            img.iter().map(|&v| a.apply(v as f32)).collect()
        };
        let (za, zb) = (z(&image), z(&narrower));
        let mean = za.iter().sum::<f32>() / za.len() as f32;
        let std = (za.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / za.len() as f32).sqrt();
        assert!(mean.abs() < 1e-4 && (std - 1.0).abs() < 1e-3, "mean {mean} std {std}");
        let worst = za.iter().zip(&zb).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 0.05, "another window's export gives other inputs (worst {worst})");
        assert_eq!(InputScaling::Fixed.affine(&image).apply(51.0), 0.2);
        let ct = InputScaling::fit(Scheme::Ct, image.iter().copied()).unwrap();
        let InputScaling::Ct { clip, mean, std } = ct else { panic!("{ct:?}") };
        assert!(clip[0] >= 20.0 && clip[1] <= 199.0 && mean > 100.0 && std > 40.0, "{ct:?}");
        assert!(InputScaling::fit(Scheme::Ct, std::iter::empty()).is_err());
        assert!(ct.describe(Some((-100.0, 400.0))).contains("HU"));
    }
}
