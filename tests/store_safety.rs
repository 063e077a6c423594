//! The store and the remote cannot be turned against the user: a crafted
//! remote never writes outside the store, a flipped byte anywhere is caught
//! before use, and gc, verify and repair never follow a symbolic link out.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every path under `dir` (following nothing) with its size and mtime.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    walkdir::WalkDir::new(dir).into_iter().flatten().filter_map(|e| e.metadata().ok().map(|m| (e.into_path(), (m.len(), m.modified().unwrap())))).collect()
}

/// The remote's manifest of `stage`, its path and its JSON.
fn remote_manifest(remote: &Path, stage: &str) -> (PathBuf, serde_json::Value) {
    let key = std::fs::read_dir(remote.join(stage)).unwrap().next().unwrap().unwrap().path();
    let path = key.join("manifest.json");
    let json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    (path, json)
}

#[test]
fn a_crafted_folder_remote_is_refused_and_writes_nothing_outside() {
    let outside = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("store_safety_outside");
    let _ = std::fs::remove_dir_all(&outside);
    let a = outside.join("a");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(a.join("pipeline.yaml"), DATA_PIPELINE).unwrap();
    let remote = outside.join("remote");
    let remote_arg = remote.to_str().unwrap();
    ok(&a, &["run", "-q"]);
    ok(&a, &["push", "--remote", remote_arg]);
    let (path, original) = remote_manifest(&remote, "split");
    let victim = outside.join("victim.txt");
    std::fs::write(&victim, "mine").unwrap();
    // The payload a crafted output would carry: its size and hash match, so
    // only the name can stop it.
    let payload = b"overwritten";
    let entry = serde_json::json!({"size": payload.len(), "blake3": blake3::hash(payload).to_hex().to_string()});
    let attacks: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>, &str)> = vec![
        ("relative escape", Box::new(|m| m["outputs"]["../../../../victim.txt"] = entry.clone()), "output `../../../../victim.txt` is a `..` component"),
        ("absolute path", Box::new(|m| m["outputs"][victim.to_str().unwrap()] = entry.clone()), "is an absolute path"),
        ("child key", Box::new(|m| m["children"] = serde_json::json!({"trial": ["../../../victim"]})), "child key `../../../victim` of kind `trial` is not a stage key"),
        ("child kind", Box::new(|m| m["children"] = serde_json::json!({"../..": ["0123456789abcdef0123"]})), "child kind `../..` is hidden"),
        ("forged params", Box::new(|m| m["params"]["seed"] = serde_json::json!(12345)), "declares inputs whose key is"),
    ];
    for (what, craft, want) in attacks {
        let mut m = original.clone();
        craft(&mut m);
        std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        for name in ["../../../../victim.txt", victim.to_str().unwrap()] {
            // Objects the crafted names point at, as an attacker would upload them.
            let _ = std::fs::write(path.parent().unwrap().join(name.trim_start_matches('/')), payload);
        }
        let b = outside.join(format!("b-{}", what.replace(' ', "-")));
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("pipeline.yaml"), DATA_PIPELINE).unwrap();
        let before = snapshot(&outside);
        let err = fails(&b, &["pull", "--remote", remote_arg]);
        assert!(err.contains(want) && err.contains("refusing"), "{what}: {err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "mine", "{what}");
        let after = snapshot(&outside);
        let changed: Vec<&PathBuf> = after.keys().filter(|p| !p.starts_with(b.join("artifacts")) && **p != b && before.get(*p) != after.get(*p)).collect();
        assert!(changed.is_empty(), "{what}: a pull changed files outside its store: {changed:?}");
        assert!(artifacts_of(&b, "split").is_empty(), "{what}: the refused artifact entered the store");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&original).unwrap()).unwrap();
}

/// Flip one byte of `path` and put its mtime back, as a careful tamperer would.
fn flip_keeping_mtime(path: &Path) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let mut b = std::fs::read(path).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x01;
    std::fs::write(path, b).unwrap();
    std::fs::File::options().write(true).open(path).unwrap().set_modified(mtime).unwrap();
}

/// Every kind of file in the store (tensors, tables, JSON), one at a time:
/// `status` calls its artifact damaged naming the file, and the next run
/// sets it aside and rebuilds it rather than using it.
#[test]
fn a_flipped_byte_in_any_store_file_is_caught_before_use() {
    let dir = project("store_flip", DATA_PIPELINE);
    ok(&dir, &["run", "-q"]);
    let files: Vec<(String, PathBuf)> = ["ingest", "normalise", "split", "augment"]
        .iter()
        .flat_map(|stage| {
            let a = artifacts_of(&dir, stage).pop().unwrap();
            walkdir::WalkDir::new(&a).into_iter().flatten().filter(|e| e.file_type().is_file() && e.file_name() != "manifest.json").map(move |e| (stage.to_string(), e.into_path()))
        })
        .collect();
    let kinds: std::collections::BTreeSet<String> = files.iter().filter_map(|(_, f)| f.extension().map(|e| e.to_string_lossy().into_owned())).collect();
    assert!(kinds.contains("safetensors") && kinds.contains("parquet"), "{kinds:?}");
    for (stage, file) in &files {
        let before = std::fs::read(file).unwrap();
        flip_keeping_mtime(file);
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let status = ok(&dir, &["status"]);
        let line = status.lines().find(|l| l.starts_with(&format!("{stage} "))).unwrap_or_default();
        assert!(line.contains("damaged") && line.contains(&name), "{}: status says\n{status}", file.display());
        let out = run(&dir, &["run", "--json", "-q"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["rebuilt_damaged"], serde_json::json!([stage]), "{}: {report}", file.display());
        assert_eq!(std::fs::read(file).unwrap(), before, "{}: rebuilt byte for byte", file.display());
    }
    ok(&dir, &["verify"]);
}

#[test]
fn gc_verify_and_repair_never_follow_a_symlink_out_of_the_store() {
    let dir = project("store_links", DATA_PIPELINE);
    ok(&dir, &["run", "-q"]);
    ok(&dir, &["run", "-q", "-P", "augment.copies=2"]);
    let outside = dir.join("outside");
    // A stage folder that is a link to a folder outside, holding what looks like an old artifact.
    let old_augment = artifacts_of(&dir, "augment").into_iter().find(|a| !std::fs::read_to_string(a.join("manifest.json")).unwrap().contains("\"copies\": 2")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let copy = outside.join(old_augment.file_name().unwrap());
    std::fs::rename(&old_augment, &copy).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("artifacts/linked")).unwrap();
    // `.damaged` pointing outside, and a link inside an artifact.
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("artifacts/.damaged")).unwrap();
    let split = artifacts_of(&dir, "split").pop().unwrap();
    std::os::unix::fs::symlink("/etc/hostname", split.join("sneaky.txt")).unwrap();

    ok(&dir, &["gc", "--apply", "-P", "augment.copies=2"]);
    assert!(copy.join("manifest.json").is_file(), "gc deleted through a linked stage folder");
    let out = run(&dir, &["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("artifacts/linked: a symbolic link") && stdout.contains("sneaky.txt: a symbolic link"), "{stdout}");
    // Repair refuses to move anything through the linked `.damaged`; with it gone, it moves the links themselves.
    let err = fails(&dir, &["verify", "--repair"]);
    assert!(err.contains(".damaged is a symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "repair wrote through the linked .damaged");
    std::fs::remove_file(dir.join("artifacts/.damaged")).unwrap();
    ok(&dir, &["verify", "--repair"]);
    assert!(copy.join("manifest.json").is_file(), "repair moved the link, not what it points to");
    ok(&dir, &["run", "-q", "-P", "augment.copies=2"]);
    ok(&dir, &["verify"]);
    // A pull leftover is reported, like a build's.
    std::fs::create_dir_all(dir.join("artifacts/.pull/split-0123")).unwrap();
    let out = run(&dir, &["verify"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains(".pull/split-0123: left over"));
}

/// Ingest's raw-file list lives beside its manifest (`raw_inputs.json`, an
/// output with its own size and hash), so a no-op need not parse it. A remote
/// that rewrites the list, its manifest entry updated to match, still cannot
/// pass off an artifact built from other files: the list must give the key.
#[test]
fn a_forged_raw_file_list_on_a_remote_is_refused() {
    let outside = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("store_safety_raw_list");
    let _ = std::fs::remove_dir_all(&outside);
    let a = outside.join("a");
    let pipeline = "data: {source: nifti, root: raw}\nstages:\n  ingest: {}\n";
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(a.join("pipeline.yaml"), pipeline).unwrap();
    ok(&a, &["synth", "raw", "--cases", "2", "--size", "32", "--slices", "4"]);
    ok(&a, &["run", "-q"]);
    let ingest = artifacts_of(&a, "ingest").pop().unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(ingest.join("raw_inputs.json")).unwrap()).unwrap();
    assert_eq!(list.len(), 4, "two volumes and two masks: {list:?}");
    let (_, local) = remote_manifest(&a.join("artifacts"), "ingest");
    assert!(local.get("raw_inputs").map_or(true, |r| r.as_array().is_some_and(|r| r.is_empty())), "the list is not in the manifest: {local}");

    let remote = outside.join("remote");
    let remote_arg = remote.to_str().unwrap();
    ok(&a, &["push", "--remote", remote_arg]);
    let (path, original) = remote_manifest(&remote, "ingest");
    let list_path = path.with_file_name("raw_inputs.json");
    let genuine = std::fs::read(&list_path).unwrap();
    let mut forged = list.clone();
    forged[0]["blake3"] = serde_json::json!(blake3::hash(b"another volume").to_hex().to_string());
    let bytes = serde_json::to_vec(&forged).unwrap();
    let cases: [(&str, bool, &str); 2] = [("list only", false, "is damaged"), ("list and manifest", true, "declares inputs whose key is")];
    for (what, update_manifest, want) in cases {
        std::fs::write(&list_path, &bytes).unwrap();
        let mut m = original.clone();
        if update_manifest {
            m["outputs"]["raw_inputs.json"] = serde_json::json!({"size": bytes.len(), "blake3": blake3::hash(&bytes).to_hex().to_string()});
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        let b = outside.join(format!("b-{}", what.replace(' ', "-")));
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("pipeline.yaml"), pipeline).unwrap();
        // A clone holding the same raw files: the pull is for their artifact.
        ok(&b, &["synth", "raw", "--cases", "2", "--size", "32", "--slices", "4"]);
        let err = fails(&b, &["pull", "--remote", remote_arg]);
        assert!(err.contains(want) && err.contains("ingest@"), "{what}: {err}");
        assert!(artifacts_of(&b, "ingest").is_empty(), "{what}: the forged artifact entered the store");
    }
    // The genuine list and manifest pull, and nothing is left to run.
    std::fs::write(&list_path, genuine).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&original).unwrap()).unwrap();
    let b = outside.join("b-list-and-manifest");
    ok(&b, &["pull", "--remote", remote_arg]);
    let (ran, _) = run_json(&b, &[]);
    assert!(ran.is_empty(), "the pulled ingest is the one its raw files key: ran {ran:?}");
}
