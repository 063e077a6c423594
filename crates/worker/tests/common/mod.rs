//! What the scheduler tests share: a pipeline with independent stages, and
//! when each stage ran by its manifest.
#![allow(dead_code)]

use std::path::Path;

/// tune.train and tune.baseline, then train and baseline, depend only on
/// the data stages: each pair may run side by side. `THREADS` is each
/// stage's declared threads (evaluate's too, so that its scores are the
/// same bytes in a cluster's 1-CPU job as locally). baseline trains 3
/// epochs to train's 1: its search ends first (ResNet trials are cheaper),
/// so a 1-epoch baseline could end about when train starts (a cluster run
/// in CI: 1 s apart); 3 epochs keep it running well past that.
pub const SIDE_BY_SIDE: &str = r#"
data: {source: synthetic, synthetic_cases: 8, synthetic_size: 64, synthetic_slices: 6}
stages:
  ingest: {}
  normalise: {deps: [ingest], params: {size: 64}}
  split: {deps: [normalise]}
  augment: {deps: [normalise, split], params: {copies: 1}}
  tune:
    deps: [normalise, split, augment]
    foreach: {train: {arch: deeplabv3plus}, baseline: {arch: resnet}}
    params: {strategies: [random], budget: 2, trial_epochs: 1, trial_max_slices: 8, trial_encoder: resnet18, threads: THREADS}
  train: {deps: [normalise, split, augment, tune.train], params: {encoder: resnet18, epochs: 1, batch_size: 8, threads: THREADS, seed: 3}}
  baseline:
    deps: [normalise, split, augment, tune.baseline]
    params: {arch: resnet, encoder: resnet18, epochs: 3, batch_size: 8, threads: THREADS, seed: 3}
  evaluate: {deps: [ingest, normalise, split, train, baseline], params: {threads: THREADS, split: val, bootstrap: 100}}
"#;

/// (started, finished) of the one artifact of `stage`.
pub fn span(dir: &Path, stage: &str) -> (f64, f64) {
    let key = std::fs::read_dir(dir.join("artifacts").join(stage)).unwrap().flatten().next().unwrap().path();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(key.join("manifest.json")).unwrap()).unwrap();
    (m["started_unix"].as_f64().unwrap(), m["finished_unix"].as_f64().unwrap())
}

pub fn overlap(dir: &Path, a: &str, b: &str) -> bool {
    let ((s1, e1), (s2, e2)) = (span(dir, a), span(dir, b));
    s1 < e2 && s2 < e1
}
