//! Looking across runs: two runs of a small pipeline that differ in the
//! learning rate, committed to git, compared with `exp show`, `metrics
//! diff`, `params diff` (by key, stage and HEAD~1) and `plots diff`
//! (rendered in headless Chromium).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn liverseg() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_liverseg-torch")).with_file_name("liverseg")
}

const PIPELINE: &str = r#"
data: {source: synthetic, synthetic_cases: 10, synthetic_size: 64, synthetic_slices: 8}
stages:
  ingest: {}
  normalise: {deps: [ingest], params: {size: 64}}
  split: {deps: [normalise]}
  augment: {deps: [normalise, split], params: {copies: 1}}
  train:
    deps: [normalise, split, augment]
    params: {encoder: resnet18, epochs: 2, batch_size: 8, lr: 1.0e-3, threads: 2, seed: 3}
  evaluate: {deps: [ingest, normalise, split, train], params: {split: val}}
"#;

fn liverseg_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(liverseg()).args(args).current_dir(dir).output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = liverseg_in(dir, args);
    assert!(out.status.success(), "liverseg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git").args(["-c", "user.name=test", "-c", "user.email=test@example.org"]).args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn runs_are_compared_by_key_stage_and_revision() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("experiments");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), PIPELINE).unwrap();
    git(&dir, &["init", "-q"]);
    git(&dir, &["add", "pipeline.yaml"]);
    git(&dir, &["commit", "-qm", "lr 1e-3"]);
    ok(&dir, &["run", "-q"]);
    std::fs::write(dir.join("pipeline.yaml"), PIPELINE.replace("lr: 1.0e-3", "lr: 5.0e-3")).unwrap();
    git(&dir, &["commit", "-qam", "lr 5e-3"]);
    ok(&dir, &["run", "-q"]);

    // exp show: both runs, the differing param as a column, metrics beside it.
    let rows: serde_json::Value = serde_json::from_str(&ok(&dir, &["exp", "show", "--stage", "train", "--json"])).unwrap();
    let lrs: Vec<f64> = rows.as_array().unwrap().iter().map(|r| r["param.lr"].as_f64().unwrap()).collect();
    assert_eq!(lrs, [1e-3, 5e-3], "{rows}");
    assert!(rows[0]["val_dice"].is_number());
    // By default one row per recorded run, over the whole pipeline: upstream params as columns.
    let md = ok(&dir, &["exp", "show", "--metrics", "dice_per_case", "--md", "--sort", "evaluate.train.dice_per_case"]);
    assert!(md.starts_with("| run | finished (UTC) | param.train.lr | evaluate.train.dice_per_case"), "{md}");
    assert!(md.contains("| run-1 |") && md.contains("| run-2 |"), "{md}");
    assert_eq!(liverseg_in(&dir, &["metrics", "diff", "run-1", "run-2"]).status.code(), Some(1));
    // Keys print as short unique prefixes, which the diffs take; too short a prefix says so.
    let text = ok(&dir, &["exp", "show", "--stage", "train"]);
    let short = text.lines().nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    assert_eq!(short.len(), 8, "{text}");
    assert_eq!(liverseg_in(&dir, &["params", "diff", &short, "train"]).status.code(), Some(1));
    let err = liverseg_in(&dir, &["params", "diff", &short[..3], "train"]);
    assert!(String::from_utf8_lossy(&err.stderr).contains("a key prefix needs at least 4 characters"), "{}", String::from_utf8_lossy(&err.stderr));

    // metrics diff HEAD~1 HEAD: both Dice values and the delta; exit 1 as they differ.
    let out = liverseg_in(&dir, &["metrics", "diff", "HEAD~1", "HEAD", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let diff: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dice = diff.as_array().unwrap().iter().find(|r| r["name"] == "train.dice_per_case").expect("Dice per case differs");
    let (a, b) = (dice["HEAD~1"].as_f64().unwrap(), dice["HEAD"].as_f64().unwrap());
    let delta: f64 = dice["change"].as_str().unwrap().parse().unwrap();
    assert!((b - a - delta).abs() < 1e-3, "{dice}");

    // params diff by revision, and by artifact key; nothing differs from itself (exit 0).
    let out = liverseg_in(&dir, &["params", "diff", "HEAD~1", "HEAD"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("train") && l.contains("lr") && l.contains("0.001") && l.contains("0.005")), "{text}");
    let keys: Vec<String> = rows.as_array().unwrap().iter().map(|r| r["key"].as_str().unwrap().to_owned()).collect();
    let by_key = liverseg_in(&dir, &["params", "diff", &keys[0][..8], &keys[1]]);
    assert_eq!(by_key.status.code(), Some(1));
    assert_eq!(liverseg_in(&dir, &["metrics", "diff", "train", "train"]).status.code(), Some(0));
    assert_eq!(liverseg_in(&dir, &["metrics", "diff", "no-such-run"]).status.code(), Some(2));

    // plots diff: one page, rendered with every image decoding.
    ok(&dir, &["plots", "diff", "HEAD~1", "HEAD", "-o", "plots.html"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/scripts/render_report.sh");
    let out = Command::new("bash").arg(&script).arg(dir.join("plots.html")).arg(dir.join("plots.png")).output().unwrap();
    match out.status.code() {
        Some(2) => eprintln!("SKIPPED plots render: {}", String::from_utf8_lossy(&out.stderr).trim()),
        _ => assert!(out.status.success(), "plots render: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    }
    let html = std::fs::read_to_string(dir.join("plots.html")).unwrap();
    assert_eq!(html.matches("<img").count(), 3, "loss and Dice curves, and the model's Dice per case");
}
