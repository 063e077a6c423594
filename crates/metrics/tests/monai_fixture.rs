//! HD95 against MONAI's own value on the same masks and spacing
//! (tests/fixtures/monai_hd95.json, written by bench/monai_hd95_fixture.py
//! with monai.metrics.compute_hausdorff_distance, percentile=95).

use liverseg_metrics::{hd95, Hd95Rule};

/// Run lengths (zeros first) back to a 0/1 mask.
fn unrle(runs: &[serde_json::Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        out.extend(std::iter::repeat_n((i % 2) as u8, r.as_u64().unwrap() as usize));
    }
    out
}

#[test]
fn hd95_equals_monai() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/monai_hd95.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let spacing: Vec<f64> = case["spacing"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        // 2D cases are one-slice grids.
        let (dims, sp) = match shape[..] {
            [y, x] => ([1, y, x], [1.0, spacing[0], spacing[1]]),
            [z, y, x] => ([z, y, x], [spacing[0], spacing[1], spacing[2]]),
            _ => panic!("{name}: shape {shape:?}"),
        };
        let (pred, truth) = (unrle(case["pred"].as_array().unwrap()), unrle(case["truth"].as_array().unwrap()));
        assert_eq!(pred.len(), dims.iter().product::<usize>(), "{name}");
        let got = hd95(&pred, &truth, dims, sp);
        let want = case["hd95"].as_f64().unwrap();
        assert_eq!(got.rule, Hd95Rule::Measured, "{name}");
        // MONAI computes in float32.
        assert!((got.value - want).abs() <= 1e-5 * want.max(1.0), "{name}: liverseg {} vs MONAI {want}", got.value);
    }
}
