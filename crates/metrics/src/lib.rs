//! Segmentation metrics as MONAI and nnU-Net define them.
//!
//! - Overlap metrics come from binary confusion counts. When their
//!   denominator is zero (prediction and truth both empty, or nothing
//!   predicted for precision) they are NaN, as in nnU-Net: a correctly empty
//!   slice is not a perfect score, and means skip it.
//! - HD95 follows MONAI's `HausdorffDistanceMetric(percentile=95)`: surface
//!   voxels are a mask minus its erosion (6-connectivity, the border counting
//!   as background), each surface voxel's distance to the other surface comes
//!   from an exact Euclidean distance transform in the voxel spacing, and the
//!   result is the larger of the two directed 95th percentiles (linear
//!   interpolation). Where exactly one mask is empty, the distance is the
//!   diagonal of the grid (MONAI would give infinity); both empty is NaN.

mod distance;
mod intensity;

pub use distance::{edt_squared, surface};
pub use intensity::{IntensityHistogram, INTENSITY_SHIFT_WARN};

/// Binary (background/liver) confusion counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Confusion {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub tn: u64,
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        f64::NAN
    } else {
        num as f64 / den as f64
    }
}

impl Confusion {
    /// Counts from predicted and true 0/1 masks of the same length.
    pub fn from_masks(pred: &[u8], truth: &[u8]) -> Self {
        let mut c = Confusion::default();
        for (&p, &t) in pred.iter().zip(truth) {
            match (p > 0, t > 0) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                (false, false) => c.tn += 1,
            }
        }
        c
    }

    pub fn add(&mut self, o: &Confusion) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
        self.tn += o.tn;
    }

    pub fn total(&self) -> u64 {
        self.tp + self.fp + self.fn_ + self.tn
    }

    /// Prediction and truth both empty: overlap metrics are undefined.
    pub fn both_empty(&self) -> bool {
        self.tp + self.fp + self.fn_ == 0
    }

    pub fn pixel_accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.total())
    }

    /// Liver IoU, TP / (TP + FP + FN); NaN when both are empty.
    pub fn liver_iou(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp + self.fn_)
    }

    /// Background IoU; NaN when the image is all liver in both.
    pub fn background_iou(&self) -> f64 {
        ratio(self.tn, self.tn + self.fp + self.fn_)
    }

    /// Mean IoU over background and liver, as the study reports it (the
    /// mean of the classes that are defined).
    pub fn miou(&self) -> f64 {
        nan_mean(&[self.liver_iou(), self.background_iou()])
    }

    /// Dice of the liver, 2TP / (2TP + FP + FN); NaN when both are empty.
    pub fn dice(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }

    /// TP / (TP + FP); NaN when nothing is predicted.
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// TP / (TP + FN); NaN when the truth is empty.
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
}

/// The mean of the finite values (NaN when there are none).
pub fn nan_mean(values: &[f64]) -> f64 {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        f64::NAN
    } else {
        finite.iter().sum::<f64>() / finite.len() as f64
    }
}

/// How a case's HD95 was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hd95Rule {
    /// Both surfaces exist: the MONAI definition.
    Measured,
    /// Exactly one mask is empty: the grid's diagonal.
    OneEmpty,
    /// Both masks are empty: NaN.
    BothEmpty,
}

/// A case's HD95 and the rule that produced it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hd95 {
    pub value: f64,
    pub rule: Hd95Rule,
}

/// HD95 of two masks on one grid, `dims` = [z, y, x] (z = 1 for one image),
/// `spacing` in the same order.
pub fn hd95(pred: &[u8], truth: &[u8], dims: [usize; 3], spacing: [f64; 3]) -> Hd95 {
    // Both surfaces lie in the bounding box of the two masks, and so does the
    // nearest surface voxel of every surface voxel: the box is enough.
    let Some((mut lo, mut hi)) = bounding_box(pred, truth, dims) else {
        return Hd95 { value: f64::NAN, rule: Hd95Rule::BothEmpty };
    };
    // An axis of the grid stays an axis of the box (a background layer
    // changes no surface and no distance).
    for k in 0..3 {
        if dims[k] > 1 && hi[k] - lo[k] == 1 {
            if hi[k] < dims[k] {
                hi[k] += 1
            } else {
                lo[k] -= 1
            }
        }
    }
    let cdims = [hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]];
    let crop = |m: &[u8]| -> Vec<u8> {
        let mut out = Vec::with_capacity(cdims.iter().product());
        for z in lo[0]..hi[0] {
            for y in lo[1]..hi[1] {
                let row = (z * dims[1] + y) * dims[2];
                out.extend_from_slice(&m[row + lo[2]..row + hi[2]]);
            }
        }
        out
    };
    let (sp, st) = (surface(&crop(pred), cdims), surface(&crop(truth), cdims));
    let full = diagonal(dims, spacing);
    let dims = cdims;
    let (np_, nt) = (sp.iter().any(|&b| b), st.iter().any(|&b| b));
    match (np_, nt) {
        (false, false) => Hd95 { value: f64::NAN, rule: Hd95Rule::BothEmpty },
        (true, false) | (false, true) => Hd95 { value: full, rule: Hd95Rule::OneEmpty },
        (true, true) => {
            let to_truth = directed(&sp, &st, dims, spacing);
            let to_pred = directed(&st, &sp, dims, spacing);
            Hd95 { value: percentile(&to_truth, 95.0).max(percentile(&to_pred, 95.0)), rule: Hd95Rule::Measured }
        }
    }
}

/// HD95 of a case stored as separate 2D slices (not a contiguous volume): each
/// surface pixel is matched within its own slice, and where that slice has
/// no surface on the other side its distance is the slice's diagonal; the
/// directed distances of all slices are pooled. `slices` holds (pred, truth,
/// rows, cols); `spacing` is (row, col).
pub fn hd95_slices(slices: &[(&[u8], &[u8], usize, usize)], spacing: (f64, f64)) -> Hd95 {
    let (mut to_truth, mut to_pred) = (Vec::new(), Vec::new());
    let mut diag: f64 = 0.0;
    for &(pred, truth, rows, cols) in slices {
        let dims = [1, rows, cols];
        let sp3 = [1.0, spacing.0, spacing.1];
        let d = diagonal(dims, sp3);
        diag = diag.max(d);
        let (sp, st) = (surface(pred, dims), surface(truth, dims));
        let (np_, nt) = (sp.iter().any(|&b| b), st.iter().any(|&b| b));
        match (np_, nt) {
            (true, true) => {
                to_truth.extend(directed(&sp, &st, dims, sp3));
                to_pred.extend(directed(&st, &sp, dims, sp3));
            }
            (true, false) => to_truth.extend(std::iter::repeat_n(d, sp.iter().filter(|&&b| b).count())),
            (false, true) => to_pred.extend(std::iter::repeat_n(d, st.iter().filter(|&&b| b).count())),
            (false, false) => {}
        }
    }
    match (to_truth.is_empty(), to_pred.is_empty()) {
        (true, true) => Hd95 { value: f64::NAN, rule: Hd95Rule::BothEmpty },
        (true, false) | (false, true) => Hd95 { value: diag, rule: Hd95Rule::OneEmpty },
        (false, false) => Hd95 { value: percentile(&to_truth, 95.0).max(percentile(&to_pred, 95.0)), rule: Hd95Rule::Measured },
    }
}

/// The [lo, hi) voxel box holding every voxel of either mask.
fn bounding_box(a: &[u8], b: &[u8], dims: [usize; 3]) -> Option<([usize; 3], [usize; 3])> {
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        if x > 0 || y > 0 {
            let c = [i / (dims[1] * dims[2]), (i / dims[2]) % dims[1], i % dims[2]];
            for k in 0..3 {
                lo[k] = lo[k].min(c[k]);
                hi[k] = hi[k].max(c[k] + 1);
            }
        }
    }
    (hi[0] > 0).then_some((lo, hi))
}

/// A case's scores on its own grid.
#[derive(Debug, Clone)]
pub struct CaseMetrics {
    /// Each slice's counts, and their sum (what per-case Dice is computed from).
    pub per_slice: Vec<Confusion>,
    pub confusion: Confusion,
    pub hd95: Hd95,
    /// Voxels (or pixels) predicted and true, times the voxel volume.
    pub volume_pred: f64,
    pub volume_true: f64,
}

/// How a case's slices relate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CaseGeometry {
    /// A contiguous volume with spacing (slice, row, col): HD95 in 3D.
    Volume([f64; 3]),
    /// Separate 2D slices with (row, col) spacing: HD95 pooled over slices.
    Slices((f64, f64)),
}

/// Score a case: `pred` and `truth` are [n, h, w] 0/1 masks on the case's
/// grid. Dice per case comes from the counts summed over the whole case
/// (not a mean of slice scores); `voxel` is one voxel's volume in the
/// reported unit (ml, or 1 for pixels).
pub fn score_case(pred: &[u8], truth: &[u8], [n, h, w]: [usize; 3], geometry: CaseGeometry, voxel: f64) -> CaseMetrics {
    let plane = h * w;
    let per_slice: Vec<Confusion> = (0..n).map(|k| Confusion::from_masks(&pred[k * plane..(k + 1) * plane], &truth[k * plane..(k + 1) * plane])).collect();
    let mut confusion = Confusion::default();
    per_slice.iter().for_each(|c| confusion.add(c));
    let hd95 = match geometry {
        CaseGeometry::Volume(spacing) => hd95(pred, truth, [n, h, w], spacing),
        CaseGeometry::Slices(spacing) => {
            let slices: Vec<(&[u8], &[u8], usize, usize)> = (0..n).map(|k| (&pred[k * plane..(k + 1) * plane], &truth[k * plane..(k + 1) * plane], h, w)).collect();
            hd95_slices(&slices, spacing)
        }
    };
    let count = |m: &[u8]| m.iter().filter(|&&v| v > 0).count() as f64 * voxel;
    CaseMetrics { per_slice, confusion, hd95, volume_pred: count(pred), volume_true: count(truth) }
}

/// Distances from every voxel of surface `from` to the nearest voxel of surface `to`.
fn directed(from: &[bool], to: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let d2 = edt_squared(to, dims, spacing);
    from.iter().zip(&d2).filter(|(f, _)| **f).map(|(_, d)| d.sqrt()).collect()
}

/// The length of the grid's diagonal, in the units of `spacing` (axes of
/// size one are not axes: a single image's diagonal is 2D).
pub fn diagonal(dims: [usize; 3], spacing: [f64; 3]) -> f64 {
    (0..3).filter(|&i| dims[i] > 1).map(|i| (dims[i] as f64 * spacing[i]).powi(2)).sum::<f64>().sqrt()
}

/// Linear-interpolated percentile (0..100) of unsorted values, as numpy's
/// and torch's default.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Percentile bootstrap 95% CI of the mean, resampling cases.
pub fn bootstrap_ci(values: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    if values.is_empty() || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = liverseg_rng::Rng::new(seed);
    let means: Vec<f64> = (0..resamples).map(|_| (0..values.len()).map(|_| values[rng.below(values.len())]).sum::<f64>() / values.len() as f64).collect();
    (percentile(&means, 2.5), percentile(&means, 97.5))
}

#[cfg(test)]
mod tests;
