//! Every command with its output piped into a reader that has gone away
//! (`liverseg params | head -1`): it ends quietly with exit 0, never with a
//! broken-pipe panic.

mod common;
use common::*;
use std::process::{Command, Stdio};

/// Run with stdout a pipe whose reading end is closed before anything is written.
fn into_closed_pipe(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut child = Command::new(bin()).args(args).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn every_command_survives_a_closed_pipe() {
    let dir = project("cli_pipe", DATA_PIPELINE);
    ok(&dir, &["run", "-q"]);
    let norm = artifacts_of(&dir, "normalise").pop().unwrap();
    let index = norm.join("index.parquet");
    let mut commands: Vec<Vec<&str>> = vec![
        vec!["params"],
        vec!["params", "--markdown"],
        vec!["dag"],
        vec!["dag", "--dot"],
        vec!["status"],
        vec!["status", "--json"],
        vec!["run", "--json", "-q"],
        vec!["stage", "split", "-q"],
        vec!["lineage", "split.train_cases"],
        vec!["lineage", index.to_str().unwrap()],
        vec!["path", "normalise"],
        vec!["verify"],
        vec!["gc"],
        vec!["synth", "phantoms", "--cases", "1", "--size", "32", "--slices", "2"],
        vec!["--help"],
        vec!["--version"],
        vec!["run", "--help"],
    ];
    // The model tools run in the worker, when it is built beside the engine.
    let worker_built = bin().with_file_name("liverseg-torch").is_file();
    if worker_built {
        commands.push(vec!["model", "summary", "--size", "64"]);
        commands.push(vec!["model", "names"]);
    } else {
        eprintln!("SKIPPED model commands: the liverseg-torch worker is not built");
    }
    for args in &commands {
        for _ in 0..3 {
            let out = into_closed_pipe(&dir, args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!err.contains("panicked"), "liverseg {args:?} panicked:\n{err}");
            assert_eq!(out.status.code(), Some(0), "liverseg {args:?}: {err}");
        }
    }
}

/// `--pipeline`, `-P` and `-q` work before the subcommand as after it
/// (`liverseg --pipeline msd.yaml run`, as the README says).
#[test]
fn pipeline_options_go_before_or_after_the_command() {
    let dir = project("cli_global", DATA_PIPELINE);
    std::fs::rename(dir.join("pipeline.yaml"), dir.join("other.yaml")).unwrap();
    let before = ok(&dir, &["--pipeline", "other.yaml", "-q", "-P", "split.seed=5", "run", "split", "--json"]);
    assert!(before.contains("\"ran\":[\"ingest\""), "{before}");
    let after = ok(&dir, &["run", "split", "--json", "--pipeline", "other.yaml", "-q", "-P", "split.seed=5"]);
    assert!(after.contains("\"ran\":[]"), "the same run, so nothing is left to run: {after}");
    let moved = ok(&dir, &["--pipeline", "other.yaml", "status", "-P", "split.seed=6"]);
    assert!(moved.contains("split.seed"), "{moved}");
}

/// docs/params.md is `liverseg params --markdown` under its header: a param
/// added or changed in the code without `make docs` fails here.
#[test]
fn the_params_reference_is_current() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/params.md")).unwrap();
    let generated = ok(root, &["params", "--markdown"]);
    let body = doc.split_once("checks this file is current.\n").map(|(_, b)| b).expect("docs/params.md lost its header; run `make docs`");
    assert!(body == generated, "docs/params.md differs from `liverseg params --markdown`: run `make docs`");
    // The README stays an entry, and names no key table of its own.
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.lines().count() <= 160, "README.md has {} lines", readme.lines().count());
    assert!(readme.contains("docs/params.md") && !readme.contains("| `data.source` |"));
}

/// `run --detach` without a cluster executor: one clear error before
/// anything runs (a local run has nothing to detach from).
#[test]
fn detach_needs_a_cluster_executor() {
    let dir = project("cli_detach", DATA_PIPELINE);
    let err = fails(&dir, &["run", "--detach"]);
    assert!(err.contains("run --detach submits stages as cluster jobs") && err.contains("executor: slurm"), "{err}");
    assert!(!dir.join("artifacts/ingest").exists(), "nothing ran");
}
