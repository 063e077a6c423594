//! Binary (background/liver) confusion counts and the metrics derived from them.

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Confusion {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub tn: u64,
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

    pub fn pixel_accuracy(&self) -> f64 {
        (self.tp + self.tn) as f64 / self.total().max(1) as f64
    }

    /// Liver IoU; 1 when both prediction and truth are empty.
    pub fn liver_iou(&self) -> f64 {
        let d = self.tp + self.fp + self.fn_;
        if d == 0 { 1.0 } else { self.tp as f64 / d as f64 }
    }

    pub fn background_iou(&self) -> f64 {
        let d = self.tn + self.fp + self.fn_;
        if d == 0 { 1.0 } else { self.tn as f64 / d as f64 }
    }

    /// Mean IoU over background and liver, as the study reports it.
    pub fn miou(&self) -> f64 {
        (self.liver_iou() + self.background_iou()) / 2.0
    }

    /// Dice of the liver; 1 when both are empty.
    pub fn dice(&self) -> f64 {
        let d = 2 * self.tp + self.fp + self.fn_;
        if d == 0 { 1.0 } else { 2.0 * self.tp as f64 / d as f64 }
    }

    pub fn precision(&self) -> f64 {
        let d = self.tp + self.fp;
        if d == 0 { 1.0 } else { self.tp as f64 / d as f64 }
    }

    pub fn recall(&self) -> f64 {
        let d = self.tp + self.fn_;
        if d == 0 { 1.0 } else { self.tp as f64 / d as f64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_squares() {
        // Two 4×4 squares in 10×10, offset by 2 columns: overlap 4×2 = 8.
        let mut a = vec![0i64; 100];
        let mut b = vec![0i64; 100];
        for y in 2..6 {
            for x in 2..6 {
                a[y * 10 + x] = 1;
                b[y * 10 + x + 2] = 1;
            }
        }
        let a: Vec<u8> = a.iter().map(|&v| v as u8).collect();
        let b: Vec<u8> = b.iter().map(|&v| v as u8).collect();
        let c = Confusion::from_masks(&a, &b);
        assert_eq!((c.tp, c.fp, c.fn_, c.tn), (8, 8, 8, 76));
        assert!((c.dice() - 0.5).abs() < 1e-12);
        assert!((c.liver_iou() - 8.0 / 24.0).abs() < 1e-12);
        assert!((c.background_iou() - 76.0 / 92.0).abs() < 1e-12);
        assert!((c.pixel_accuracy() - 0.84).abs() < 1e-12);
        let empty = Confusion { tn: 100, ..Default::default() };
        assert_eq!(empty.dice(), 1.0);
    }
}

/// The 95th percentile of the symmetric surface distances between two 2D
/// masks (rows×cols), in units of `spacing` (row, col). Both empty: 0;
/// exactly one empty: None (undefined).
pub fn surface_distances(pred: &[u8], truth: &[u8], rows: usize, cols: usize, spacing: (f64, f64)) -> Option<Vec<f64>> {
    let border = |m: &[u8]| -> Vec<(usize, usize)> {
        let mut pts = Vec::new();
        for r in 0..rows {
            for c in 0..cols {
                if m[r * cols + c] == 0 {
                    continue;
                }
                let edge = r == 0 || c == 0 || r == rows - 1 || c == cols - 1 || m[(r - 1) * cols + c] == 0 || m[(r + 1) * cols + c] == 0 || m[r * cols + c - 1] == 0 || m[r * cols + c + 1] == 0;
                if edge {
                    pts.push((r, c));
                }
            }
        }
        pts
    };
    let (a, b) = (border(pred), border(truth));
    match (a.is_empty(), b.is_empty()) {
        (true, true) => return Some(Vec::new()),
        (true, false) | (false, true) => return None,
        _ => {}
    }
    let nearest = |from: &[(usize, usize)], to: &[(usize, usize)]| -> Vec<f64> {
        from.iter()
            .map(|&(r, c)| {
                to.iter()
                    .map(|&(r2, c2)| {
                        let dr = (r as f64 - r2 as f64) * spacing.0;
                        let dc = (c as f64 - c2 as f64) * spacing.1;
                        dr * dr + dc * dc
                    })
                    .fold(f64::INFINITY, f64::min)
                    .sqrt()
            })
            .collect()
    };
    let mut d = nearest(&a, &b);
    d.extend(nearest(&b, &a));
    Some(d)
}

/// Linear-interpolated percentile (0..100) of unsorted values.
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
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = liverseg_rng::Rng::new(seed);
    let means: Vec<f64> = (0..resamples)
        .map(|_| (0..values.len()).map(|_| values[rng.below(values.len())]).sum::<f64>() / values.len() as f64)
        .collect();
    (percentile(&means, 2.5), percentile(&means, 97.5))
}

#[cfg(test)]
mod surface_tests {
    use super::*;

    #[test]
    fn hd95_of_offset_squares() {
        // 4×4 squares offset by 2 columns. By hand: A's border is 12 pixels;
        // its columns 4-5 coincide with B's border (distance 0) except A's
        // inner-right pixels, and its left column lies 2 px from B's.
        let (rows, cols) = (10, 10);
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 100];
        for y in 2..6 {
            for x in 2..6 {
                a[y * cols + x] = 1;
                b[y * cols + x + 2] = 1;
            }
        }
        let d = surface_distances(&a, &b, rows, cols, (1.0, 1.0)).unwrap();
        // The largest distance is 2 px (A's left column to B), and the 95th
        // percentile of the 24 distances is that maximum.
        assert_eq!(d.len(), 24);
        assert!((d.iter().cloned().fold(0.0, f64::max) - 2.0).abs() < 1e-9);
        assert!((percentile(&d, 95.0) - 2.0).abs() < 1e-9);
        assert_eq!(surface_distances(&vec![0; 100], &vec![0; 100], rows, cols, (1.0, 1.0)).unwrap().len(), 0);
        assert!(surface_distances(&a, &vec![0; 100], rows, cols, (1.0, 1.0)).is_none());
        // Spacing scales distances.
        let d2 = surface_distances(&a, &b, rows, cols, (1.0, 0.5)).unwrap();
        assert!((percentile(&d2, 95.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn bootstrap_brackets_the_mean() {
        let v: Vec<f64> = (0..30).map(|i| 0.8 + 0.01 * (i % 10) as f64).collect();
        let (lo, hi) = bootstrap_ci(&v, 1000, 3);
        let m = v.iter().sum::<f64>() / v.len() as f64;
        assert!(lo < m && m < hi && hi - lo < 0.05);
    }
}
