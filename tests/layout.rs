//! The shape of the workspace, as the design promises it: the engine knows
//! no stage and no libtorch, and the engine binary never links libtorch.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every package the engine crate depends on, directly or not.
#[test]
fn the_engine_depends_on_no_stage_and_no_libtorch() {
    let toml = std::fs::read_to_string(root().join("crates/engine/Cargo.toml")).unwrap();
    for name in ["liverseg-stages", "liverseg-model", "tch", "torch-sys"] {
        assert!(!toml.lines().any(|l| l.trim_start().starts_with(name)), "crates/engine/Cargo.toml names {name}");
    }
    let out = Command::new(env!("CARGO")).args(["tree", "-p", "liverseg-engine", "-e", "normal", "--prefix", "none", "--offline"]).current_dir(root()).output().unwrap();
    assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    for name in ["liverseg-stages ", "liverseg-model ", "tch ", "torch-sys "] {
        assert!(!tree.lines().any(|l| l.starts_with(name)), "liverseg-engine depends on {name}:\n{tree}");
    }
}

/// The engine never names a stage: no stage's name appears in it as a string.
#[test]
fn the_engine_names_no_stage() {
    let stages = ["\"ingest\"", "\"normalise\"", "\"split\"", "\"augment\"", "\"tune\"", "\"train\"", "\"baseline\"", "\"evaluate\"", "\"report\""];
    for entry in walk(&root().join("crates/engine")) {
        let text = std::fs::read_to_string(&entry).unwrap();
        for s in stages {
            assert!(!text.contains(s), "{} names stage {s}", entry.display());
        }
    }
}

/// The engine binary starts in milliseconds because it does not load libtorch.
#[test]
fn the_engine_binary_does_not_link_libtorch() {
    let bin = env!("CARGO_BIN_EXE_liverseg");
    let out = Command::new("ldd").arg(bin).output().unwrap();
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !libs.is_empty(), "ldd {bin}");
    assert!(!libs.contains("libtorch") && !libs.contains("libc10"), "{bin} links libtorch:\n{libs}");
}

/// Each stage is one file under stages/: declaration, typed params, version, run.
#[test]
fn each_stage_is_one_file() {
    for stage in ["ingest", "normalise", "split", "augment", "tune", "train", "evaluate", "report"] {
        let text = std::fs::read_to_string(root().join(format!("stages/{stage}.rs"))).unwrap();
        for part in ["pub const VERSION", "params! {", "inputs:", "outputs:", "fn run(&self, ctx: &StageContext)"] {
            assert!(text.contains(part), "stages/{stage}.rs lacks `{part}`");
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs" || x == "toml") {
            out.push(p);
        }
    }
    out
}
