//! The engine's promises: caching by content, partial reruns, atomic
//! artifacts, locking, verification, lineage and clear config errors.

mod common;
use common::*;

#[test]
fn second_run_runs_nothing_and_param_changes_rerun_only_downstream() {
    let dir = project("engine_cache", DATA_PIPELINE);
    let (ran, _) = run_json(&dir, &[]);
    assert_eq!(ran, ["ingest", "normalise", "split", "augment"]);
    let (ran, reused) = run_json(&dir, &[]);
    assert!(ran.is_empty(), "second run ran {ran:?}");
    assert_eq!(reused.len(), 4);

    // A middle stage's param: that stage and downstream only.
    let (ran, reused) = run_json(&dir, &["-P", "split.seed=7"]);
    assert_eq!(ran, ["split", "augment"]);
    assert_eq!(reused, ["ingest", "normalise"]);
    // Reverting reuses the earlier artifacts.
    let (ran, _) = run_json(&dir, &[]);
    assert!(ran.is_empty(), "revert ran {ran:?}");
    let status = ok(&dir, &["status"]);
    assert_eq!(status.matches(" fresh ").count(), 4, "{status}");
    // A change not yet run: status names the param, and the upstream for downstream stages.
    let status = ok(&dir, &["status", "-P", "split.seed=9"]);
    assert!(status.contains("param split.seed: 7 -> 9"), "status explains why:\n{status}");
    assert!(status.lines().any(|l| l.starts_with("augment") && l.contains("stale") && l.contains("upstream split changed")), "{status}");

    // Number spellings and key order do not change keys.
    let (ran, _) = run_json(&dir, &["-P", "split.fractions=[0.7, 0.16, 0.14]", "-P", "augment.rotation_deg=15.0"]);
    assert!(ran.is_empty(), "same values spelled differently ran {ran:?}");
}

#[test]
fn raw_files_touch_versus_content_change() {
    let dir = project(
        "engine_raw",
        r#"
data: {source: nifti, root: raw}
stages:
  ingest: {}
  normalise: {deps: [ingest], params: {size: 32}}
"#,
    );
    ok(&dir, &["synth", "raw", "--cases", "2", "--size", "32", "--slices", "4"]);
    // An uncompressed copy, so one byte of voxel data can change without breaking the file.
    let nii = liverseg_imaging::nifti::read(&dir.join("raw/volume-1.nii.gz")).unwrap();
    let hu: Vec<i16> = nii.volume.data.iter().map(|&v| v as i16).collect();
    std::fs::remove_file(dir.join("raw/volume-1.nii.gz")).unwrap();
    let path = dir.join("raw/volume-1.nii");
    liverseg_imaging::nifti::write_u8_or_i16(&path, nii.volume.dims, &nii.volume.affine, liverseg_imaging::nifti::VoxelData::I16(&hu), None).unwrap();
    let (ran, _) = run_json(&dir, &[]);
    assert_eq!(ran, ["ingest", "normalise"]);

    // Touch: mtime changes, content does not.
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    drop(f);
    let (ran, _) = run_json(&dir, &[]);
    assert!(ran.is_empty(), "touch reran {ran:?}");

    // One byte of content.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let (ran, _) = run_json(&dir, &[]);
    assert_eq!(ran, ["ingest", "normalise"]);
    let status = ok(&dir, &["status"]);
    assert!(status.contains("fresh"));
}

#[test]
fn verify_names_a_tampered_file_and_lineage_reaches_the_source() {
    let dir = project("engine_verify", DATA_PIPELINE);
    ok(&dir, &["run", "-q"]);
    assert!(ok(&dir, &["verify"]).contains("ok: 4 artifacts verified"));
    let norm = artifacts_of(&dir, "normalise").pop().unwrap();
    let lineage = ok(&dir, &["lineage", "split.train_cases"]);
    assert!(lineage.starts_with("split.train_cases = 7"), "{lineage}");
    for stage in ["split @", "normalise @", "ingest @", "params:"] {
        assert!(lineage.contains(stage), "lineage lacks {stage}:\n{lineage}");
    }
    // augment reads normalise directly and through split: each artifact is
    // printed once, the second path names it as a reference.
    let lineage = ok(&dir, &["lineage", "augment"]);
    for stage in ["augment", "split", "normalise", "ingest"] {
        let printed = lineage.lines().filter(|l| l.trim_start().starts_with(&format!("{stage} @")) && !l.ends_with("(see above)")).count();
        assert_eq!(printed, 1, "{stage} printed {printed} times:\n{lineage}");
    }
    assert_eq!(lineage.matches("(see above)").count(), 1, "{lineage}");
    let by_path = ok(&dir, &["lineage", norm.join("index.parquet").to_str().unwrap()]);
    assert!(by_path.starts_with("normalise @"), "{by_path}");
    // The table itself carries its provenance.
    let meta = liverseg_engine::tables::parquet_metadata(&norm.join("index.parquet")).unwrap();
    assert_eq!(meta["liverseg.stage"], "normalise");
    assert!(meta["liverseg.upstream"].contains("ingest"));
    arrow_readers_see_the_provenance(&norm.join("index.parquet"));

    let target = norm.join("data.safetensors");
    let mut bytes = std::fs::read(&target).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&target, bytes).unwrap();
    let err = fails(&dir, &["verify"]);
    let out = String::from_utf8_lossy(&run(&dir, &["verify"]).stdout).into_owned();
    assert!(out.contains("data.safetensors: content changed"), "{out}");
    assert!(err.contains("1 problem(s)"), "{err}");
    // status says so, lineage refuses nothing it can check cheaply, and
    // `verify --repair` sets it aside so the next run rebuilds it.
    ok(&dir, &["verify", "--repair"]);
    assert!(ok(&dir, &["status"]).lines().any(|l| l.starts_with("normalise") && l.contains("missing")));
    let (ran, _) = run_json(&dir, &[]);
    assert_eq!(ran, ["normalise"], "the rebuilt normalise is byte-identical, so nothing downstream reruns");
    assert!(ok(&dir, &["verify"]).contains("ok: 4 artifacts verified"));
    // An edited manifest: status says damaged, verify fails, a run rebuilds it.
    let split = artifacts_of(&dir, "split").pop().unwrap();
    let m = split.join("manifest.json");
    let text = std::fs::read_to_string(&m).unwrap().replace("\"train_cases\": 7", "\"train_cases\": 8");
    std::fs::write(&m, text).unwrap();
    assert!(ok(&dir, &["status"]).lines().any(|l| l.starts_with("split") && l.contains("damaged") && l.contains("edited")));
    let err = fails(&dir, &["lineage", "split.train_cases"]);
    assert!(err.contains("damaged"), "{err}");
    fails(&dir, &["verify"]);
    let (ran, _) = run_json(&dir, &[]);
    assert_eq!(ran, ["split"]);
    // A folder without a manifest fails verify; a leftover build exits 3.
    std::fs::create_dir_all(dir.join("artifacts/split/junk")).unwrap();
    assert!(String::from_utf8_lossy(&run(&dir, &["verify"]).stdout).contains("junk: no manifest"));
    std::fs::remove_dir_all(dir.join("artifacts/split/junk")).unwrap();
    std::fs::create_dir_all(dir.join("artifacts/.tmp/split-x-1")).unwrap();
    assert_eq!(run(&dir, &["verify"]).status.code(), Some(3));
}

#[test]
fn killed_runs_leave_no_partial_artifact_and_concurrent_runs_stay_consistent() {
    let pipeline = DATA_PIPELINE.replace("synthetic_cases: 10", "synthetic_cases: 40").replace("synthetic_size: 32", "synthetic_size: 128").replace("synthetic_slices: 6", "synthetic_slices: 24");
    let dir = project("engine_kill", &pipeline);
    // Kill -9 repeatedly at different moments; the store never holds an artifact without a manifest.
    for delay_ms in [50u64, 150, 300] {
        let mut child = std::process::Command::new(bin()).args(["run", "-q"]).current_dir(&dir).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        for stage in ["ingest", "normalise", "split", "augment"] {
            if let Ok(rd) = std::fs::read_dir(dir.join("artifacts").join(stage)) {
                for e in rd.flatten() {
                    assert!(e.path().join("manifest.json").is_file(), "partial artifact {}", e.path().display());
                }
            }
        }
    }
    // Two runs at once: both succeed, the store verifies, and a third run has nothing to do.
    let a = std::process::Command::new(bin()).args(["run", "-q"]).current_dir(&dir).spawn().unwrap();
    let b = std::process::Command::new(bin()).args(["run", "-q"]).current_dir(&dir).spawn().unwrap();
    assert!(a.wait_with_output().unwrap().status.success());
    assert!(b.wait_with_output().unwrap().status.success());
    assert!(ok(&dir, &["verify"]).contains("ok: 4 artifacts"));
    let (ran, _) = run_json(&dir, &[]);
    assert!(ran.is_empty());
    assert!(!dir.join("artifacts/.tmp").exists() || std::fs::read_dir(dir.join("artifacts/.tmp")).unwrap().next().is_none());
}

#[test]
fn stage_command_and_gc() {
    let dir = project("engine_stage", DATA_PIPELINE);
    let err = fails(&dir, &["stage", "split"]);
    assert!(err.contains("upstream artifact normalise@") && err.contains("liverseg run normalise"), "{err}");
    ok(&dir, &["run", "-q"]);
    let out = run(&dir, &["stage", "split", "--force"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ran     split"));
    // An experiment (-P, named): gc keeps what any recorded run needs.
    let out = run(&dir, &["run", "-P", "augment.copies=2", "--name", "two-copies"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("recorded as run `two-copies`"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(fails(&dir, &["run", "--name", "../x"]).contains("run name `../x`"));
    let listed = ok(&dir, &["gc"]);
    assert!(listed.starts_with("nothing to collect"), "{listed}");
    ok(&dir, &["gc", "--apply"]);
    assert_eq!(artifacts_of(&dir, "augment").len(), 2, "gc --apply removed an experiment");
    // A stage run on its own with another param is recorded by no run: it goes, with its size.
    ok(&dir, &["stage", "split", "-P", "split.seed=99"]);
    let listed = ok(&dir, &["gc"]);
    assert!(listed.lines().next().is_some_and(|l| l.starts_with("would remove split/") && l.ends_with("KiB")), "{listed}");
    ok(&dir, &["gc", "--apply"]);
    // --workspace-only lets the experiment's augment go too, and says how much.
    let listed = ok(&dir, &["gc", "--workspace-only"]);
    assert!(listed.contains("would remove augment/") && listed.contains("1 artifact(s), "), "{listed}");
    ok(&dir, &["gc", "--apply", "--workspace-only"]);
    assert_eq!(artifacts_of(&dir, "augment").len(), 1);
    let dag = ok(&dir, &["dag", "--dot"]);
    assert!(dag.contains("\"split\" -> \"augment\""));
}

/// Stages an `external:` dataset needs (ingest, normalise, evaluate).
macro_rules! ext_stages {
    () => {
        "stages:\n  ingest: {}\n  normalise: {deps: [ingest]}\n  split: {deps: [normalise]}\n  augment: {deps: [normalise, split]}\n  train: {deps: [normalise, split, augment]}\n  evaluate: {deps: [ingest, normalise, split, train]}\n"
    };
}
const EXT_STAGES: &str = ext_stages!();
const EXT_STAGES_MISSING_SOURCE: &str = concat!("external:\n  site_b: {root: elsewhere}\n", ext_stages!());
const EXT_STAGES_BAD_KEY: &str = concat!("external:\n  site_b: {source: nifti, colour: red}\n", ext_stages!());
const EXT_STAGES_BAD_TYPE: &str = concat!("external:\n  site_b: {source: synthetic, synthetic_cases: many}\n", ext_stages!());

/// `external:` adds an ingest and a normalise instance per dataset, with the
/// pipeline's normalise params, and makes evaluate depend on them.
#[test]
fn external_datasets_become_stage_instances() {
    let yaml = format!("external:\n  site_b: {{source: synthetic, synthetic_cases: 3, synthetic_seed: 9}}\n{EXT_STAGES}");
    let dir = project("engine_external", &yaml);
    let dag = ok(&dir, &["dag", "-P", "normalise.size=64"]);
    assert!(dag.contains("normalise.site_b  <- ingest.site_b"), "{dag}");
    assert!(dag.contains("evaluate  <- ingest, normalise, split, train, ingest.site_b, normalise.site_b"), "{dag}");
    ok(&dir, &["run", "normalise.site_b", "-q", "-P", "normalise.size=64"]);
    let own = artifacts_of(&dir, "normalise.site_b");
    assert_eq!(own.len(), 1);
    let m = liverseg_engine::store::read_manifest(&own[0].join("manifest.json")).unwrap();
    assert_eq!(m.params["size"], 64, "the pipeline's normalise params, profile and -P included");
    let ingest = liverseg_engine::store::read_manifest(&artifacts_of(&dir, "ingest.site_b")[0].join("manifest.json")).unwrap();
    assert_eq!(ingest.params["data.synthetic_seed"], 9);
    assert_eq!(ingest.metrics["cases"], 3);
    // The main dataset was not touched.
    assert!(artifacts_of(&dir, "ingest").is_empty());
}

#[test]
fn bad_pipeline_files_get_one_clear_error() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("stages:\n  ingest: {}\n  bogus: {deps: [ingest]}\n", "unknown stage `bogus`", &[]),
        ("stages:\n  ingest: {}\n  normalise: {deps: [ingest, split]}\n  split: {deps: [normalise]}\n", "dependency cycle: normalise -> split -> normalise", &[]),
        ("stages:\n  normalise: {deps: [ingest]}\n", "upstream stage `ingest` is not in the pipeline", &[]),
        ("stages:\n  ingest: {}\n  normalise: {deps: [ingest], params: {size: big}}\n", "stages.normalise.params.size: expected an integer", &[]),
        ("stages:\n  ingest: {}\n", "unknown profile `fast`", &["--profile", "fast"]),
        ("stages:\n  ingest: {}\n", "has no parameter `nope`", &["-P", "ingest.nope=1"]),
        ("stages:\n  ingest: {}\n  normalise: {}\n", "deps must list it", &[]),
        ("stages: [oops\n", "not valid YAML", &[]),
        // `external:` datasets: each error names the entry and key.
        ("external: {b: {source: nifti}}\nstages:\n  ingest: {}\n", "external: no stage in the pipeline reads the extra datasets", &[]),
        (EXT_STAGES_MISSING_SOURCE, "external.site_b: needs `source`", &[]),
        (EXT_STAGES_BAD_KEY, "external.site_b.colour: not a dataset key", &[]),
        (EXT_STAGES_BAD_TYPE, "external.site_b.synthetic_cases: expected an integer", &[]),
    ];
    for (i, (yaml, want, extra)) in cases.iter().enumerate() {
        let dir = project(&format!("engine_badyaml_{i}"), yaml);
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        let err = fails(&dir, &args);
        assert!(err.contains(want), "case {i}: wanted `{want}` in:\n{err}");
        assert_eq!(err.lines().filter(|l| l.starts_with("error")).count(), 1, "one error:\n{err}");
    }
}

/// pyarrow takes a table's schema metadata from the footer's ARROW:schema,
/// not from the footer's key-value pairs: both must carry the provenance.
fn arrow_readers_see_the_provenance(table: &std::path::Path) {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let has_pyarrow = std::process::Command::new(&python).args(["-c", "import pyarrow"]).output().is_ok_and(|o| o.status.success());
    if !has_pyarrow {
        eprintln!("SKIPPED the pyarrow metadata check: pyarrow is not in .venv (make test installs it)");
        return;
    }
    let script = "import sys, pyarrow.parquet as pq\nt = pq.read_table(sys.argv[1])\nm = t.schema.metadata or {}\nprint(m.get(b'liverseg.stage', b'').decode(), t.num_rows)";
    let out = std::process::Command::new(&python).args(["-c", script]).arg(table).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    let rows = liverseg_engine::tables::read_parquet(table).unwrap().height();
    assert_eq!(printed.trim(), format!("normalise {rows}"), "pyarrow read {printed}");
}
