//! The tune stage end to end with tiny trials: cached trials are reused,
//! a larger budget runs only the new trials, a killed study resumes,
//! pruning stops trials, and a bad search space names its key.

use std::path::{Path, PathBuf};
use std::process::Command;

fn liverseg() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_liverseg-torch")).with_file_name("liverseg")
}

fn project(name: &str, tune: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = format!(
        "data: {{source: synthetic, synthetic_cases: 10, synthetic_size: 32, synthetic_slices: 6}}\nstages:\n  ingest: {{}}\n  normalise: {{deps: [ingest], params: {{size: 32}}}}\n  split: {{deps: [normalise]}}\n  augment: {{deps: [normalise, split], params: {{copies: 1}}}}\n  tune:\n    deps: [normalise, split, augment]\n    params: {tune}\n"
    );
    std::fs::write(dir.join("pipeline.yaml"), yaml).unwrap();
    dir
}

const BASE: &str = "strategies: [random], trial_encoder: resnet18, trial_max_slices: 16, threads: 1";

fn summary(dir: &Path, extra: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    let mut args = vec!["run", "tune", "-q"];
    args.extend_from_slice(extra);
    let out = Command::new(liverseg()).args(&args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(liverseg()).args(["lineage", "tune"]).args(extra).current_dir(dir).output().unwrap();
    assert!(out.status.success());
    let tune = std::fs::read_dir(dir.join("artifacts/tune")).unwrap().flatten().map(|e| e.path()).max_by_key(|p| std::fs::metadata(p.join("manifest.json")).unwrap().modified().unwrap()).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(tune.join("manifest.json")).unwrap()).unwrap();
    m["metrics"].as_object().unwrap().clone()
}

#[test]
fn trials_are_cached_extended_resumed_and_pruned() {
    let dir = project("tune_cache", &format!("{{{BASE}, trial_epochs: 2, budget: 2, prune: none}}"));
    let s = summary(&dir, &[]);
    assert_eq!((s["trials_run"].as_u64(), s["trials_reused"].as_u64()), (Some(2), Some(0)));
    // Raising the budget runs only the new trial.
    let s = summary(&dir, &["-P", "tune.budget=3"]);
    assert_eq!((s["trials_run"].as_u64(), s["trials_reused"].as_u64()), (Some(1), Some(2)));

    // Kill a study after its first new trial finished: the rerun reuses it.
    let mut child = Command::new(liverseg()).args(["run", "tune", "-q", "-P", "tune.budget=5"]).current_dir(&dir).spawn().unwrap();
    let trials = dir.join("artifacts/tune+trial");
    let count = || std::fs::read_dir(&trials).map(|d| d.flatten().filter(|e| e.path().join("manifest.json").is_file()).count()).unwrap_or(0);
    let t0 = std::time::Instant::now();
    while count() < 4 && t0.elapsed().as_secs() < 600 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let s = summary(&dir, &["-P", "tune.budget=5"]);
    assert_eq!(s["trials_reused"].as_u64(), Some(4), "{s:?}");
    assert_eq!(s["trials_run"].as_u64(), Some(1), "{s:?}");

    // Median pruning stops some trials early, and they are recorded as pruned.
    let pruned = project("tune_prune", &format!("{{{BASE}, budget: 5, objective: val_loss, prune: median, prune_startup: 1, prune_warmup: 0, trial_epochs: 3}}"));
    let s = summary(&pruned, &[]);
    assert!(s["trials_pruned"].as_u64().unwrap() >= 1, "{s:?}");
    let t = liverseg_engine::tables::read_parquet(&std::fs::read_dir(pruned.join("artifacts/tune")).unwrap().flatten().next().unwrap().path().join("trials.parquet")).unwrap();
    let epochs: Vec<u64> = t.column("epochs_run").unwrap().u64().unwrap().iter().map(|v| v.unwrap()).collect();
    let flags: Vec<bool> = t.column("pruned").unwrap().bool().unwrap().iter().map(|v| v.unwrap()).collect();
    for (e, p) in epochs.iter().zip(&flags) {
        if *p {
            assert!(*e < 3, "a pruned trial stops early");
        } else {
            assert_eq!(*e, 3, "a trial that is not pruned runs every epoch");
        }
    }
    // Trial params are typed columns: lr a float, batch size an integer.
    assert_eq!(t.column("param_lr").unwrap().dtype(), &polars::prelude::DataType::Float64);
    assert_eq!(t.column("param_batch_size").unwrap().dtype(), &polars::prelude::DataType::Int64);
    assert_eq!(t.column("param_optimizer").unwrap().dtype(), &polars::prelude::DataType::String);
}

#[test]
fn a_bad_search_space_names_the_key() {
    for (space, want) in [
        ("{lr: {log_uniform: [0, 0.1]}}", "tune.space.lr.log_uniform: values must be > 0"),
        ("{lr: {uniform: [0.1, 0.01]}}", "tune.space.lr.uniform: low (0.1) must be below high (0.01)"),
        ("{optimizer: {choice: []}}", "tune.space.optimizer.choice: empty choice"),
        ("{momentum_x: {choice: [1]}}", "tune.space.momentum_x: the train stage has no parameter"),
    ] {
        let dir = project("tune_bad", &format!("{{{BASE}, trial_epochs: 1, budget: 1, space: {space}}}"));
        let out = Command::new(liverseg()).args(["run", "tune", "-q"]).current_dir(&dir).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "wanted `{want}` in {err}");
    }
    // A Bayesian strategy needs trials beyond its random start-up ones.
    let dir = project("tune_bad", "{strategies: [bayes], trial_encoder: resnet18, trial_epochs: 1, budget: 3, startup: 3}");
    let out = Command::new(liverseg()).args(["run", "tune", "-q"]).current_dir(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tune.budget (3) must exceed tune.startup (3)"), "{err}");
}

/// Two trials at once under an instance name with a dot (`tune.train`):
/// each has its own request and summary beside its build folder, so both
/// finish, and the search equals the one run a trial at a time: the same
/// tune key (`parallel` is not in it), the same best.json byte for byte.
#[test]
fn parallel_trials_of_an_instance_each_have_their_own_request() {
    let yaml = |parallel: u32| {
        format!(
            "data: {{source: synthetic, synthetic_cases: 10, synthetic_size: 32, synthetic_slices: 6}}\nstages:\n  ingest: {{}}\n  normalise: {{deps: [ingest], params: {{size: 32}}}}\n  split: {{deps: [normalise]}}\n  augment: {{deps: [normalise, split], params: {{copies: 1}}}}\n  tune:\n    deps: [normalise, split, augment]\n    params: {{{BASE}, trial_epochs: 1, budget: 2, batch: 2, prune: none, parallel: {parallel}}}\n    foreach: {{train: {{}}}}\n"
        )
    };
    let mut bests = Vec::new();
    for parallel in [2, 1] {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tune_parallel_{parallel}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pipeline.yaml"), yaml(parallel)).unwrap();
        let out = Command::new(liverseg()).args(["run", "-q"]).current_dir(&dir).output().unwrap();
        assert!(out.status.success(), "tune.parallel={parallel}: {}", String::from_utf8_lossy(&out.stderr));
        let trials = std::fs::read_dir(dir.join("artifacts/tune.train+trial")).unwrap().flatten().count();
        assert_eq!(trials, 2, "tune.parallel={parallel}");
        let tune = std::fs::read_dir(dir.join("artifacts/tune.train")).unwrap().flatten().next().unwrap().path();
        bests.push((tune.file_name().unwrap().to_owned(), std::fs::read(tune.join("best.json")).unwrap()));
        // Asking for more at once changes no key: nothing is stale.
        let status = Command::new(liverseg()).args(["status", "-P", "tune.train.parallel=4"]).current_dir(&dir).output().unwrap();
        let status = String::from_utf8_lossy(&status.stdout);
        assert!(status.lines().all(|l| l.contains(" fresh ")), "{status}");
    }
    assert_eq!(bests[0], bests[1], "one or two trials at a time: the same key and best.json");
}

/// A declared param that tune replaces has no effect: `run` warns about the
/// -P that set it, `status` names what ran, `params diff` says "no effect".
#[test]
fn a_param_tune_replaces_is_reported_not_silently_ignored() {
    let dir = project("tune_replaces", &format!("{{{BASE}, trial_epochs: 1, budget: 2, prune: none, space: {{lr: {{log_uniform: [1.0e-3, 1.0e-2]}}}}}}"));
    let yaml =
        std::fs::read_to_string(dir.join("pipeline.yaml")).unwrap() + "  train:\n    deps: [normalise, split, augment, tune]\n    params: {encoder: resnet18, epochs: 1, threads: 1, lr: 1.0e-4}\n";
    std::fs::write(dir.join("pipeline.yaml"), yaml).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(liverseg()).args(["run", "train", "-q"]).args(extra).current_dir(&dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let key =
        || std::fs::read_to_string(dir.join("artifacts/train").read_dir().unwrap().flatten().max_by_key(|e| e.metadata().unwrap().modified().unwrap()).unwrap().path().join("manifest.json")).unwrap();
    let quiet = run(&[]);
    assert!(!quiet.contains("warning"), "{quiet}");
    let first: serde_json::Value = serde_json::from_str(&key()).unwrap();
    let err = run(&["-P", "train.lr=3e-4"]);
    assert!(err.contains("warning: -P train.lr=0.0003 had no effect: train ran with lr="), "{err}");
    let second: serde_json::Value = serde_json::from_str(&key()).unwrap();
    let used = second["effective_params"]["lr"].as_f64().unwrap();
    assert_eq!(first["effective_params"]["lr"].as_f64(), Some(used), "both ran tune's lr");

    let status = Command::new(liverseg()).args(["status", "-P", "train.lr=3e-4"]).current_dir(&dir).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.lines().any(|l| l.starts_with("train") && l.contains("ran with upstream-chosen lr=") && l.contains("(declared 3e-4)")), "{status}");
    let (a, b) = (first["key"].as_str().unwrap(), second["key"].as_str().unwrap());
    let diff = Command::new(liverseg()).args(["params", "diff", a, b]).current_dir(&dir).output().unwrap();
    let diff = String::from_utf8_lossy(&diff.stdout);
    assert!(diff.lines().any(|l| l.contains(" lr ") && l.contains("no effect: both ran")), "{diff}");
}
