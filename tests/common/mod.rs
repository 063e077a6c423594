//! Helpers for the integration tests: throwaway projects and CLI runs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_liverseg"))
}

/// A fresh project folder under target/ (kept on failure for inspection).
pub fn project(name: &str, pipeline: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), pipeline).unwrap();
    dir
}

pub fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin()).args(args).current_dir(dir).output().expect("liverseg runs")
}

/// Run and insist on success; returns stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(out.status.success(), "liverseg {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run and insist on failure; returns stderr.
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(!out.status.success(), "liverseg {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// (ran, reused) stage names from `run --json`.
pub fn run_json(dir: &Path, extra: &[&str]) -> (Vec<String>, Vec<String>) {
    let mut args = vec!["run", "--json", "-q"];
    args.extend_from_slice(extra);
    let out = ok(dir, &args);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("run --json prints JSON");
    let names = |k: &str| v[k].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect();
    (names("ran"), names("reused"))
}

pub fn shared_data() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if p.is_dir() {
        Some(p.canonicalize().unwrap())
    } else {
        eprintln!("SKIPPED: ../shared/data is absent; the real-data checks need it (see README)");
        None
    }
}

/// A small data-only pipeline over synthetic phantoms.
pub const DATA_PIPELINE: &str = r#"
data:
  source: synthetic
  synthetic_cases: 10
  synthetic_size: 32
  synthetic_slices: 6
stages:
  ingest: {}
  normalise:
    deps: [ingest]
    params: {size: 32}
  split:
    deps: [normalise]
  augment:
    deps: [normalise, split]
    params: {copies: 1}
"#;

/// Complete artifact directories of a stage.
pub fn artifacts_of(dir: &Path, stage: &str) -> Vec<PathBuf> {
    let d = dir.join("artifacts").join(stage);
    let Ok(rd) = std::fs::read_dir(&d) else {
        return vec![];
    };
    rd.flatten().map(|e| e.path()).filter(|p| p.join("manifest.json").is_file()).collect()
}
