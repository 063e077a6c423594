//! Hand-computed cases for every definition, and the distance transform
//! against brute force.

use super::*;

fn square(rows: usize, cols: usize, r: std::ops::Range<usize>, c: std::ops::Range<usize>) -> Vec<u8> {
    let mut m = vec![0u8; rows * cols];
    for y in r {
        for x in c.clone() {
            m[y * cols + x] = 1;
        }
    }
    m
}

#[test]
fn overlap_metrics_of_offset_squares() {
    // Two 4×4 squares in 10×10, offset by 2 columns: overlap 4×2 = 8.
    let (a, b) = (square(10, 10, 2..6, 2..6), square(10, 10, 2..6, 4..8));
    let c = Confusion::from_masks(&a, &b);
    assert_eq!((c.tp, c.fp, c.fn_, c.tn), (8, 8, 8, 76));
    assert!((c.dice() - 0.5).abs() < 1e-12);
    assert!((c.liver_iou() - 8.0 / 24.0).abs() < 1e-12);
    assert!((c.background_iou() - 76.0 / 92.0).abs() < 1e-12);
    assert!((c.pixel_accuracy() - 0.84).abs() < 1e-12);
    assert!((c.precision() - 0.5).abs() < 1e-12 && (c.recall() - 0.5).abs() < 1e-12);
}

#[test]
fn empty_masks_are_nan_not_perfect() {
    let both_empty = Confusion { tn: 100, ..Default::default() };
    assert!(both_empty.both_empty());
    for v in [both_empty.dice(), both_empty.liver_iou(), both_empty.precision(), both_empty.recall()] {
        assert!(v.is_nan());
    }
    assert_eq!(both_empty.miou(), 1.0, "mIoU is the mean of the classes present: background only");
    // Nothing predicted: precision is undefined, recall 0.
    let missed = Confusion { fn_: 5, tn: 95, ..Default::default() };
    assert!(missed.precision().is_nan());
    assert_eq!((missed.recall(), missed.dice()), (0.0, 0.0));
    assert!(nan_mean(&[1.0, f64::NAN, 0.5]) == 0.75 && nan_mean(&[f64::NAN]).is_nan());
}

#[test]
fn hd95_of_offset_squares_and_the_empty_rules() {
    let (a, b) = (square(10, 10, 2..6, 2..6), square(10, 10, 2..6, 4..8));
    // Every surface pixel of either square is within 2 px of the other's
    // surface, and the left column of A (and right of B) is exactly 2 px away.
    let h = hd95(&a, &b, [1, 10, 10], [1.0, 1.0, 1.0]);
    assert_eq!(h.rule, Hd95Rule::Measured);
    assert!((h.value - 2.0).abs() < 1e-9, "{h:?}");
    // Spacing scales distances along its axis: columns at 0.5 mm.
    let h = hd95(&a, &b, [1, 10, 10], [1.0, 1.0, 0.5]);
    assert!((h.value - 1.0).abs() < 1e-9, "{h:?}");
    let empty = vec![0u8; 100];
    let one = hd95(&a, &empty, [1, 10, 10], [1.0, 2.0, 3.0]);
    assert_eq!(one.rule, Hd95Rule::OneEmpty);
    assert!((one.value - (20.0f64.powi(2) + 30.0f64.powi(2)).sqrt()).abs() < 1e-9, "the image's diagonal: {one:?}");
    let none = hd95(&empty, &empty, [1, 10, 10], [1.0, 1.0, 1.0]);
    assert!(none.rule == Hd95Rule::BothEmpty && none.value.is_nan());
}

#[test]
fn hd95_in_3d_matches_across_slices() {
    // A 3-slice cube against the same cube shifted one slice up: in 3D the
    // nearest surface voxel is on the neighbouring slice (2.5 mm away).
    let dims = [6, 8, 8];
    let mut a = vec![0u8; 6 * 64];
    let mut b = vec![0u8; 6 * 64];
    for z in 1..4 {
        for y in 2..6 {
            for x in 2..6 {
                a[(z * 8 + y) * 8 + x] = 1;
                b[((z + 1) * 8 + y) * 8 + x] = 1;
            }
        }
    }
    let h = hd95(&a, &b, dims, [2.5, 1.0, 1.0]);
    assert_eq!(h.rule, Hd95Rule::Measured);
    assert!((h.value - 2.5).abs() < 1e-9, "{h:?}");
}

#[test]
fn slice_cases_pool_and_charge_a_missed_slice_its_diagonal() {
    let (a, b) = (square(10, 10, 2..6, 2..6), square(10, 10, 2..6, 4..8));
    let empty = vec![0u8; 100];
    // One matched slice: as a single image.
    let h = hd95_slices(&[(&a, &b, 10, 10)], (1.0, 1.0));
    assert!((h.value - 2.0).abs() < 1e-9);
    // Plus a slice whose liver was missed: its 12 truth-surface pixels are
    // charged the slice diagonal (√200), which dominates the 95th percentile
    // of truth → prediction (12 of 24 pooled distances).
    let h = hd95_slices(&[(&a, &b, 10, 10), (&empty, &b, 10, 10)], (1.0, 1.0));
    assert_eq!(h.rule, Hd95Rule::Measured);
    assert!((h.value - 200f64.sqrt()).abs() < 1e-9, "{h:?}");
    // A false positive on a liver-free slice costs the same way.
    let h = hd95_slices(&[(&a, &b, 10, 10), (&a, &empty, 10, 10)], (1.0, 1.0));
    assert!((h.value - 200f64.sqrt()).abs() < 1e-9, "{h:?}");
    // Slices empty on both sides add nothing.
    let h = hd95_slices(&[(&a, &b, 10, 10), (&empty, &empty, 10, 10)], (1.0, 1.0));
    assert!((h.value - 2.0).abs() < 1e-9);
    let h = hd95_slices(&[(&empty, &empty, 10, 10)], (1.0, 1.0));
    assert_eq!(h.rule, Hd95Rule::BothEmpty);
    let h = hd95_slices(&[(&empty, &b, 10, 10)], (0.5, 0.5));
    assert_eq!((h.rule, h.value), (Hd95Rule::OneEmpty, 50f64.sqrt()));
}

#[test]
fn distance_transform_equals_brute_force() {
    let dims = [5, 7, 9];
    let spacing = [2.0, 0.7, 1.3];
    let mut rng = liverseg_rng::Rng::new(11);
    let feature: Vec<bool> = (0..dims.iter().product::<usize>()).map(|_| rng.f64() < 0.04).collect();
    let d = edt_squared(&feature, dims, spacing);
    let coord = |i: usize| [i / 63, (i / 9) % 7, i % 9];
    for (i, &got) in d.iter().enumerate() {
        let c = coord(i);
        let want = (0..feature.len())
            .filter(|&j| feature[j])
            .map(|j| {
                let f = coord(j);
                (0..3).map(|k| ((c[k] as f64 - f[k] as f64) * spacing[k]).powi(2)).sum::<f64>()
            })
            .fold(f64::INFINITY, f64::min);
        assert!((got - want).abs() < 1e-6, "voxel {c:?}: {got} vs {want}");
    }
}

#[test]
fn surface_is_the_mask_minus_its_erosion() {
    // A 3×3 square in 5×5: everything but the centre is surface.
    let m = square(5, 5, 1..4, 1..4);
    let s = surface(&m, [1, 5, 5]);
    assert_eq!(s.iter().filter(|&&b| b).count(), 8);
    assert!(!s[2 * 5 + 2]);
    // At the grid's border the mask is surface (the border counts as outside).
    let full = vec![1u8; 9];
    assert_eq!(surface(&full, [1, 3, 3]).iter().filter(|&&b| b).count(), 8);
}

#[test]
fn bootstrap_brackets_the_mean() {
    let v: Vec<f64> = (0..30).map(|i| 0.8 + 0.01 * (i % 10) as f64).collect();
    let (lo, hi) = bootstrap_ci(&v, 1000, 3);
    let m = v.iter().sum::<f64>() / v.len() as f64;
    assert!(lo < m && m < hi && hi - lo < 0.05);
    assert!(bootstrap_ci(&v, 0, 3).0.is_nan());
}

/// A hand-made case of four slices: liver on slices 0-2, slice 3 liver-free.
/// The prediction matches slice 0, misses slice 1 entirely, is offset on
/// slice 2, and marks a false positive on the liver-free slice 3.
#[test]
fn a_case_is_scored_as_a_whole() {
    let (h, w) = (10, 10);
    let sq = |r: std::ops::Range<usize>, c: std::ops::Range<usize>| square(h, w, r, c);
    let empty = vec![0u8; 100];
    let truth: Vec<u8> = [sq(2..6, 2..6), sq(2..6, 2..6), sq(2..6, 2..6), empty.clone()].concat();
    let pred: Vec<u8> = [sq(2..6, 2..6), empty.clone(), sq(2..6, 4..8), sq(0..2, 0..2)].concat();
    let m = score_case(&pred, &truth, [4, h, w], CaseGeometry::Slices((1.0, 1.0)), 1.0);
    // Pooled counts: TP 16 + 0 + 8 + 0, FP 0 + 0 + 8 + 4, FN 0 + 16 + 8 + 0.
    assert_eq!((m.confusion.tp, m.confusion.fp, m.confusion.fn_), (24, 12, 24));
    let dice = 48.0 / (48.0 + 12.0 + 24.0);
    assert!((m.confusion.dice() - dice).abs() < 1e-12);
    // ... which is not the mean of the slices' Dice (1, 0, 0.5, 0).
    let slice_mean = nan_mean(&m.per_slice.iter().map(Confusion::dice).collect::<Vec<_>>());
    assert!((slice_mean - 0.375).abs() < 1e-12 && (slice_mean - dice).abs() > 0.1);
    assert_eq!((m.volume_pred, m.volume_true), (36.0, 48.0));
    // The missed slice and the false positive each charge their surface the
    // slice diagonal, which decides the 95th percentile.
    assert_eq!(m.hd95.rule, Hd95Rule::Measured);
    assert!((m.hd95.value - 200f64.sqrt()).abs() < 1e-9, "{:?}", m.hd95);
    // A case empty in both: NaN Dice and HD95, and counted as such.
    let none = score_case(&vec![0; 200], &vec![0; 200], [2, h, w], CaseGeometry::Volume([2.0, 1.0, 1.0]), 0.002);
    assert!(none.confusion.dice().is_nan() && none.hd95.value.is_nan() && none.hd95.rule == Hd95Rule::BothEmpty);
    // Liver missed in a whole volume: HD95 is the volume's diagonal, never null.
    let missed = score_case(&vec![0; 400], &truth, [4, h, w], CaseGeometry::Volume([2.0, 1.0, 1.0]), 0.002);
    assert_eq!(missed.hd95.rule, Hd95Rule::OneEmpty);
    assert!((missed.hd95.value - (64.0f64 + 100.0 + 100.0).sqrt()).abs() < 1e-9);
    assert!((missed.volume_true - 48.0 * 0.002).abs() < 1e-12);
}
