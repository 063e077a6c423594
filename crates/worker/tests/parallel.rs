//! The scheduler runs independent stages side by side: with `-j 4`,
//! tune.train and tune.baseline, then train and baseline, overlap in time
//! (by their manifests), and the store holds the same bytes as a `-j 1` run,
//! timing aside, with 1 and with 2 threads per stage.

use liverseg_engine::tables::{parquet_metadata, read_parquet};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{overlap, span, SIDE_BY_SIDE};

fn liverseg() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_liverseg-torch")).with_file_name("liverseg")
}

/// A fresh project run with `-j jobs` (a progress line every second while
/// stages run side by side); the project and what the run printed.
fn run_with(name: &str, threads: usize, jobs: usize) -> (PathBuf, String) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), SIDE_BY_SIDE.replace("THREADS", &threads.to_string())).unwrap();
    let out = Command::new(liverseg()).args(["run", "-j", &jobs.to_string()]).env("LIVERSEG_PROGRESS_EVERY", "1").current_dir(&dir).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "run -j {jobs}: {log}");
    (dir, log)
}

/// A name for run time, not for what was computed.
fn is_timing(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    name.contains("seconds") || name.ends_with("_per_s") || ["started_unix", "finished_unix", "started_utc", "duration_s"].contains(&last)
}

/// JSON without timing keys (and without output hashes, which cover timing columns).
fn without_timing(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| !is_timing(k));
            if let Some(serde_json::Value::Object(outputs)) = m.get_mut("outputs") {
                outputs.values_mut().for_each(|o| *o = serde_json::Value::Null);
            }
            m.values_mut().for_each(without_timing);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(without_timing),
        _ => {}
    }
}

/// Every artifact file of a store, as comparable text: tables without
/// timing columns, JSON without timing keys, anything else by its hash.
fn store_contents(dir: &Path) -> BTreeMap<String, String> {
    let root = dir.join("artifacts");
    let files = walkdir::WalkDir::new(&root).into_iter().flatten().filter(|e| e.file_type().is_file());
    files
        .filter_map(|e| {
            let rel = e.path().strip_prefix(&root).unwrap().to_string_lossy().into_owned();
            if rel.split('/').any(|c| c.starts_with('.')) {
                return None;
            }
            let text = match e.path().extension().and_then(|x| x.to_str()) {
                Some("parquet") => {
                    let df = read_parquet(e.path()).unwrap();
                    let timing: Vec<String> = df.get_column_names().iter().map(|c| c.to_string()).filter(|c| is_timing(c)).collect();
                    format!("{:?}\n{:?}", df.drop_many(timing), parquet_metadata(e.path()).unwrap())
                }
                Some("json") => {
                    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
                    without_timing(&mut v);
                    v.to_string()
                }
                _ => blake3::hash(&std::fs::read(e.path()).unwrap()).to_hex().to_string(),
            };
            Some((rel, text))
        })
        .collect()
}

#[test]
fn independent_stages_overlap_and_give_the_same_bytes() {
    for threads in [1, 2] {
        let (one, one_log) = run_with(&format!("parallel_t{threads}_j1"), threads, 1);
        let (four, four_log) = run_with(&format!("parallel_t{threads}_j4"), threads, 4);
        assert!(!one_log.contains("still running"), "one stage at a time shows its own progress: {one_log}");
        let shown: std::collections::BTreeSet<&str> = four_log.lines().filter(|l| l.contains("] still running after")).filter_map(|l| l.split(']').next()).collect();
        assert!(shown.len() >= 2, "side by side, each running stage has a progress line: {four_log}");
        for (a, b) in [("tune.train", "tune.baseline"), ("train", "baseline")] {
            assert!(!overlap(&one, a, b), "threads {threads}: {a} and {b} overlapped under -j 1");
            assert!(overlap(&four, a, b), "threads {threads}: {a} and {b} did not overlap under -j 4: {:?} {:?}", span(&four, a), span(&four, b));
        }
        let (x, y) = (store_contents(&one), store_contents(&four));
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "threads {threads}: the same artifacts");
        let differ: Vec<&String> = x.keys().filter(|k| x[*k] != y[*k]).collect();
        assert!(differ.is_empty(), "threads {threads}: -j 1 and -j 4 differ in {differ:?}");
        assert!(x.keys().any(|k| k.ends_with("model.safetensors")), "models are compared");
    }
}

/// `threads: 0` is resolved where a trial runs, never written into its key:
/// two trials side by side on this machine get half its cores each.
#[test]
fn trial_threads_come_from_the_share_not_the_key() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("parallel_threads");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pipeline = SIDE_BY_SIDE.replace("threads: THREADS}", "threads: 0, batch: 2, parallel: 2}").replace("THREADS", "1");
    std::fs::write(dir.join("pipeline.yaml"), pipeline).unwrap();
    let out = Command::new(liverseg()).args(["run", "-q", "tune.train"]).env_remove("SLURM_CPUS_PER_TASK").env_remove("SLURM_JOB_ID").current_dir(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let share = (std::thread::available_parallelism().unwrap().get() / 2).max(1);
    let trials: Vec<PathBuf> = std::fs::read_dir(dir.join("artifacts/tune.train+trial")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(trials.len(), 2);
    for t in trials {
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(t.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(m["params"]["threads"], 0, "the key holds what was declared: {}", m["params"]);
        assert_eq!(m["metrics"]["cpu_threads"].as_u64(), Some(share as u64), "{}", m["metrics"]);
    }
}

/// Cross-validation folds are independent units: with `-j 2` the two folds
/// train side by side (each its own worker), with `-j 1` one after another
/// in one worker, and the ensemble is the same bytes either way.
#[test]
fn folds_run_side_by_side_and_give_the_same_bytes() {
    let folds = |name: &str, jobs: usize| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pipeline = SIDE_BY_SIDE.replace("deps: [normalise, split, augment, tune.train], params: {", "deps: [normalise, split, augment], params: {folds: 2, ").replace("THREADS", "1");
        std::fs::write(dir.join("pipeline.yaml"), pipeline).unwrap();
        let out = Command::new(liverseg()).args(["run", "train", "-j", &jobs.to_string()]).current_dir(&dir).output().unwrap();
        assert!(out.status.success(), "run train -j {jobs}: {}", String::from_utf8_lossy(&out.stderr));
        let key = std::fs::read_dir(dir.join("artifacts/train")).unwrap().flatten().next().unwrap().path();
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(key.join("manifest.json")).unwrap()).unwrap();
        let span = |k: usize| (m["metrics"][format!("fold{k}.started_unix")].as_f64().unwrap(), m["metrics"][format!("fold{k}.finished_unix")].as_f64().unwrap());
        let ((s0, e0), (s1, e1)) = (span(0), span(1));
        (dir, s0 < e1 && s1 < e0)
    };
    let (one, overlapped) = folds("folds_j1", 1);
    assert!(!overlapped, "-j 1: the folds overlapped");
    let (two, overlapped) = folds("folds_j2", 2);
    assert!(overlapped, "-j 2: the folds did not overlap");
    let (x, y) = (store_contents(&one), store_contents(&two));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "the same artifacts");
    assert!(x.keys().any(|k| k.ends_with("folds/fold1/model.safetensors")), "{:?}", x.keys());
    let differ: Vec<&String> = x.keys().filter(|k| x[*k] != y[*k]).collect();
    assert!(differ.is_empty(), "-j 1 and -j 2 differ in {differ:?}");
}
