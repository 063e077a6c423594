//! The remote cache against a real S3 API: moto's server from .venv on
//! 127.0.0.1, started here and stopped after. Push then pull into an empty
//! store gives the same bytes and `verify` passes; a second push moves
//! nothing; a damaged remote object is refused, naming its key; interrupted
//! transfers resume; and `run --pull` in an empty clone runs no stage.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn liverseg() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_liverseg-torch")).with_file_name("liverseg")
}

fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
}

const PIPELINE: &str = r#"
data: {source: synthetic, synthetic_cases: 10, synthetic_size: 64, synthetic_slices: 8}
remote: s3://liverseg-test/cache
stages:
  ingest: {}
  normalise: {deps: [ingest], params: {size: 64}}
  split: {deps: [normalise]}
  augment: {deps: [normalise, split], params: {copies: 1}}
  tune:
    deps: [normalise, split, augment]
    params: {strategies: [random], budget: 2, trial_epochs: 1, trial_max_slices: 16, trial_encoder: resnet18, threads: 2}
  train:
    deps: [normalise, split, augment, tune]
    params: {encoder: resnet18, epochs: 1, batch_size: 8, threads: 2, seed: 3}
  evaluate: {deps: [ingest, normalise, split, train], params: {split: val}}
"#;

/// moto in server mode, stopped on drop.
struct S3 {
    child: Child,
    endpoint: String,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_s3() -> Option<S3> {
    let ok = Command::new(python()).args(["-c", "import moto.server, boto3"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED the S3 remote test: moto[server] is not in .venv (make test installs it)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(python()).args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let s3 = S3 { child, endpoint: format!("http://127.0.0.1:{port}") };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(60), "moto did not start on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    s3.boto("s3.create_bucket(Bucket='liverseg-test')");
    Some(s3)
}

impl S3 {
    /// Run a line of boto3 against the server (`s3` is the client).
    fn boto(&self, code: &str) -> String {
        let script =
            format!("import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\nr = {code}\nprint(r)", self.endpoint);
        let out = Command::new(python()).args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn liverseg(&self, dir: &Path, args: &[&str]) -> Output {
        Command::new(liverseg())
            .args(args)
            .current_dir(dir)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_ENDPOINT", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .output()
            .unwrap()
    }

    fn ok(&self, dir: &Path, args: &[&str]) -> String {
        let out = self.liverseg(dir, args);
        assert!(out.status.success(), "liverseg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn project(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), PIPELINE).unwrap();
    dir
}

/// Every file of the store's artifacts (manifests included), by path.
fn artifact_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let root = dir.join("artifacts");
    walkdir::WalkDir::new(&root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| {
            let rel = e.path().strip_prefix(&root).unwrap().to_string_lossy().into_owned();
            (!rel.split('/').any(|c| c.starts_with('.'))).then(|| (rel, std::fs::read(e.path()).unwrap()))
        })
        .collect()
}

#[test]
fn push_and_pull_through_s3() {
    let Some(s3) = start_s3() else { return };
    let a = project("remote_a");
    s3.ok(&a, &["run", "-q"]);
    let pushed = s3.ok(&a, &["push"]);
    assert!(pushed.starts_with("pushed 9 artifact(s)"), "7 stages and 2 trials: {pushed}");
    assert!(s3.ok(&a, &["push"]).starts_with("pushed 0 artifact(s), 0 file(s), 0 bytes"), "a second push moves nothing");

    // Into an empty clone: the same bytes, verify passes, and nothing is left to run.
    let b = project("remote_b");
    let pulled = s3.ok(&b, &["pull"]);
    assert!(pulled.starts_with("pulled 9 artifact(s)"), "7 stages and their 2 trials: {pulled}");
    assert_eq!(artifact_files(&a), artifact_files(&b), "pulled artifacts are byte-identical");
    s3.ok(&b, &["verify"]);
    assert!(s3.ok(&b, &["run", "--json", "-q"]).contains("\"ran\":[]"));

    // run --pull fetches instead of running.
    let c = project("remote_c");
    let report = s3.ok(&c, &["run", "--pull", "--json", "-q"]);
    assert!(report.contains("\"ran\":[]") && report.contains("\"pulled\":[\"ingest\""), "{report}");

    // A damaged remote object is refused, naming the artifact; nothing enters the store.
    let train_key = std::fs::read_dir(a.join("artifacts/train")).unwrap().next().unwrap().unwrap().file_name().into_string().unwrap();
    s3.boto(&format!("s3.put_object(Bucket='liverseg-test', Key='cache/train/{train_key}/model.safetensors', Body=b'not the weights')"));
    let d = project("remote_d");
    let out = s3.liverseg(&d, &["pull", "train"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("train@{train_key}")) && err.contains("is damaged"), "{err}");
    assert!(!d.join("artifacts/train").exists(), "a refused artifact never enters the store");

    // An interrupted pull resumes: files already staged and checked are kept.
    let e = project("remote_e");
    s3.ok(&e, &["pull", "split"]);
    let split_key = std::fs::read_dir(e.join("artifacts/split")).unwrap().next().unwrap().unwrap().file_name().into_string().unwrap();
    let staged = e.join(format!("artifacts/.pull/split-{split_key}"));
    std::fs::create_dir_all(&staged).unwrap();
    let split_files: Vec<PathBuf> = std::fs::read_dir(e.join("artifacts/split").join(&split_key)).unwrap().flatten().map(|f| f.path()).filter(|p| !p.ends_with("manifest.json")).collect();
    std::fs::copy(&split_files[0], staged.join(split_files[0].file_name().unwrap())).unwrap();
    std::fs::remove_dir_all(e.join("artifacts/split")).unwrap();
    std::fs::remove_file(e.join(format!("artifacts/.index/split/{split_key}"))).unwrap();
    let resumed = s3.ok(&e, &["pull", "split"]);
    assert!(resumed.contains("1 file(s) of an interrupted transfer kept"), "{resumed}");
    s3.ok(&e, &["verify"]);

    // An interrupted push resumes: objects already uploaded (no manifest yet) are kept.
    s3.boto(&format!("s3.delete_object(Bucket='liverseg-test', Key='cache/split/{split_key}/manifest.json')"));
    let again = s3.ok(&a, &["push", "split"]);
    assert!(again.starts_with("pushed 1 artifact(s), 0 file(s)") && again.contains("kept"), "{again}");

    crafted_manifests_are_refused(&s3, &a, &split_key);
    an_interrupted_pull_never_leaves_a_parent_without_its_trials(&s3, &a);
}

/// Replace the remote manifest of stage@key by `manifest` (a file).
fn upload_manifest(s3: &S3, stage: &str, key: &str, manifest: &Path) {
    s3.boto(&format!("s3.upload_file('{}', 'liverseg-test', 'cache/{stage}/{key}/manifest.json')", manifest.display()));
}

/// Over S3 too: names that would leave the store are refused before anything is written.
fn crafted_manifests_are_refused(s3: &S3, a: &Path, split_key: &str) {
    let original = a.join(format!("artifacts/split/{split_key}/manifest.json"));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&original).unwrap()).unwrap();
    let payload = b"escaped";
    let entry = serde_json::json!({"size": payload.len(), "blake3": blake3::hash(payload).to_hex().to_string()});
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let absolute = tmp.join("escaped-absolute.txt").display().to_string();
    let cases = [
        ("escape", "outputs", serde_json::json!({"../../../../escaped.txt": entry})),
        ("absolute", "outputs", serde_json::json!({ absolute.as_str(): entry })),
        ("child", "children", serde_json::json!({"trial": ["../../../escaped"]})),
    ];
    for (what, field, value) in cases {
        let mut crafted = m.clone();
        crafted[field] = value;
        let file = tmp.join(format!("crafted-{what}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(&crafted).unwrap()).unwrap();
        upload_manifest(s3, "split", split_key, &file);
        s3.boto(&format!("s3.put_object(Bucket='liverseg-test', Key='cache/split/{split_key}/../../../../escaped.txt', Body=b'escaped')"));
        let g = project(&format!("remote_crafted_{what}"));
        let out = s3.liverseg(&g, &["pull", "split"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("is unsafe") && err.contains("refusing"), "{what}: {err}");
        let escaped: Vec<PathBuf> = walkdir::WalkDir::new(&tmp).into_iter().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("escaped")).map(|e| e.into_path()).collect();
        assert!(escaped.is_empty(), "{what}: a pull wrote outside its store: {escaped:?}");
        assert!(!g.join("artifacts/split").exists(), "{what}");
    }
    upload_manifest(s3, "split", split_key, &original);
}

/// Trials are installed before their search: a pull cut off at a missing
/// trial leaves no tune artifact, and a later pull completes it; a trial
/// lost locally is fetched again even though its search is present.
fn an_interrupted_pull_never_leaves_a_parent_without_its_trials(s3: &S3, a: &Path) {
    let trials: Vec<String> = std::fs::read_dir(a.join("artifacts/tune+trial")).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
    assert_eq!(trials.len(), 2);
    s3.boto(&format!("s3.delete_object(Bucket='liverseg-test', Key='cache/tune+trial/{}/manifest.json')", trials[1]));
    let h = project("remote_h");
    let out = s3.liverseg(&h, &["pull", "tune"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("lists tune+trial@{}, which the remote lacks", trials[1])), "{err}");
    assert!(!h.join("artifacts/tune").exists(), "the search was installed without its trials");
    s3.ok(a, &["push", "tune"]);
    s3.ok(&h, &["pull", "tune"]);
    let count = || std::fs::read_dir(h.join("artifacts/tune+trial")).unwrap().flatten().count();
    assert_eq!((count(), std::fs::read_dir(h.join("artifacts/tune")).unwrap().count()), (2, 1));
    std::fs::remove_dir_all(h.join("artifacts/tune+trial").join(&trials[0])).unwrap();
    let again = s3.ok(&h, &["pull", "tune"]);
    assert!(again.starts_with("pulled 1 artifact(s)"), "{again}");
    assert_eq!(count(), 2);
    s3.ok(&h, &["verify"]);
}
