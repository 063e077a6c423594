//! The Slurm executor on a real single-node cluster (tests/slurm/with_cluster.sh,
//! which `make test` wraps the libtorch tests in): the same keys and bytes as
//! a local run, trials as one array job, a cancelled trial named and rerun
//! alone, jobs cancelled with a killed engine, and a job that finished while
//! the engine was away adopted, not rerun.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

mod common;
use common::{overlap, span, SIDE_BY_SIDE};

fn liverseg() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_liverseg-torch")).with_file_name("liverseg")
}

/// A small pipeline with a search (2 trials at once), training and evaluation.
fn pipeline(trial_epochs: u32, train_epochs: u32) -> String {
    format!(
        r#"
data: {{source: synthetic, synthetic_cases: 12, synthetic_size: 64, synthetic_slices: 10}}
stages:
  ingest: {{}}
  normalise: {{deps: [ingest], params: {{size: 64}}}}
  split: {{deps: [normalise]}}
  augment: {{deps: [normalise, split], params: {{copies: 1}}}}
  tune:
    deps: [normalise, split, augment]
    params: {{strategies: [random], budget: 2, batch: 2, parallel: 2, trial_epochs: {trial_epochs}, trial_max_slices: 48, trial_encoder: resnet18, seed: 1, prune: none}}
  train:
    deps: [normalise, split, augment, tune]
    params: {{encoder: resnet18, epochs: {train_epochs}, batch_size: 8, threads: 2, seed: 3, patience: 100}}
  evaluate:
    deps: [ingest, normalise, split, train]
    params: {{split: val}}
slurm:
  default: {{mem: 3G}}
  trial: {{cpus: 1, mem: 3G}}
  submit: [normalise]
  poll_seconds: 0.5
"#
    )
}

fn project(name: &str, yaml: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), yaml).unwrap();
    dir
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(liverseg()).args(args).current_dir(dir).output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "liverseg {args:?}: {stderr}");
    stderr
}

fn spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(liverseg()).args(args).current_dir(dir).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

/// `squeue` for every job: (id, state).
fn queue() -> Vec<(String, String)> {
    let out = Command::new("squeue").args(["-h", "-r", "-o", "%i %T"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_once(' ')).map(|(a, b)| (a.to_owned(), b.to_owned())).collect()
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out after {secs} s waiting for {what}; queue {:?}", queue());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every artifact file but the manifests (which hold times), by path under artifacts/.
fn store_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let root = dir.join("artifacts");
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(&root).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(&root).unwrap().to_string_lossy().into_owned();
        let hidden = rel.split('/').any(|c| c.starts_with('.'));
        if e.file_type().is_file() && !hidden && !rel.ends_with("manifest.json") {
            out.insert(rel, std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// Wall-clock columns, which differ between any two runs, local or not.
const TIMINGS: &[&str] = &["seconds", "train_images_per_s"];

/// The same table, value for value (NaN equal to NaN), timings aside.
fn same_tables(a: &Path, b: &Path) {
    let (x, y) = (liverseg_engine::tables::read_parquet(a).unwrap(), liverseg_engine::tables::read_parquet(b).unwrap());
    assert_eq!(x.get_column_names(), y.get_column_names(), "{}", a.display());
    for (c, d) in x.columns().iter().zip(y.columns()) {
        if TIMINGS.contains(&c.name().as_str()) {
            continue;
        }
        let same = match (c.f64(), d.f64()) {
            (Ok(p), Ok(q)) => p.len() == q.len() && p.iter().zip(q.iter()).all(|(u, v)| u.map(f64::to_bits) == v.map(f64::to_bits)),
            _ => c.as_materialized_series().equals_missing(d.as_materialized_series()),
        };
        assert!(same, "{}: column {} differs between the local and the Slurm run", a.display(), c.name());
    }
}

/// The same artifact files in both stores, and those `compared` picks the
/// same value for value (tables by column, results without their timing);
/// returns the compared paths.
fn same_store(local: &Path, cluster: &Path, compared: impl Fn(&str) -> bool) -> Vec<String> {
    let (a, b) = (store_files(local), store_files(cluster));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "the same stage keys and files");
    let picked: Vec<String> = a.keys().filter(|p| compared(p)).cloned().collect();
    for path in &picked {
        if path.ends_with(".parquet") {
            same_tables(&local.join("artifacts").join(path), &cluster.join("artifacts").join(path));
        } else if path.ends_with("result.json") {
            assert_eq!(without_seconds(&a[path]), without_seconds(&b[path]), "{path}");
        } else {
            assert!(a[path] == b[path], "{path} differs between {} and {}", local.display(), cluster.display());
        }
    }
    picked
}

fn without_seconds(json: &[u8]) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(json).unwrap();
    v.as_object_mut().unwrap().remove("seconds");
    v
}

#[test]
fn slurm_executor_on_a_real_cluster() {
    if std::env::var("LIVERSEG_SLURM_TEST").is_err() {
        let why = std::env::var("LIVERSEG_SLURM_SKIP").unwrap_or_else(|_| "no test cluster (run through tests/slurm/with_cluster.sh, as make test does)".into());
        eprintln!("SKIPPED the Slurm executor test: {why}");
        return;
    }
    same_keys_and_bytes_as_local();
    folds_go_as_one_array();
    hostile_project_paths_are_quoted();
    cancelled_trial_is_named_and_rerun_alone();
    killed_engine_cancels_its_jobs_and_finished_jobs_are_adopted();
    threads_come_from_the_allocation();
    a_stalled_controller_is_waited_out();
    requests_beyond_max_array_size_are_chunked();
    stages_waiting_side_by_side_share_squeue();
    detached_run_chains_jobs_and_a_later_run_collects();
    independent_stages_run_at_once_on_the_cluster();
}

/// A stand-in worker: writes a summary naming its array job and task.
const FAKE_WORKER: &str = "#!/bin/bash\nprintf '{\"summary\":{\"array\":\"%s\",\"task\":%s}}' \"$SLURM_ARRAY_JOB_ID\" \"$SLURM_ARRAY_TASK_ID\" > \"$(dirname \"$2\")/summary.json\"\n";

fn fake_requests(base: &Path, label: &str, n: usize) -> Vec<liverseg_engine::worker::WorkerRequest> {
    std::fs::create_dir_all(base.join("builds")).unwrap();
    (0..n)
        .map(|i| {
            let key = format!("{label}{i:06}");
            serde_json::from_value(serde_json::json!({
                "stage": "fake", "label": label, "trial": true, "key": key, "params": {}, "upstream": {}, "raw_files": [],
                "out_dir": base.join("builds").join(&key), "scratch_dir": base.join("scratch"),
                "summary_path": base.join("builds").join(format!("{key}.summary.json")),
                "project_root": base, "store_root": base.join("artifacts"), "show_progress": false
            }))
            .unwrap()
        })
        .collect()
}

/// 1,500 requests, more than the cluster's MaxArraySize (1001 by default),
/// run as arrays of at most that size; a refused submission is one error
/// per request with nothing left behind; a later success removes the
/// earlier, fully collected batch folders.
fn requests_beyond_max_array_size_are_chunked() {
    use liverseg_engine::executor::Executor;
    let base = project("slurm_chunks", "stages: {}\n");
    let worker = base.join("fake-worker.sh");
    std::fs::write(&worker, FAKE_WORKER).unwrap();
    std::fs::set_permissions(&worker, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = |trial: serde_json::Value| -> liverseg_engine::slurm::SlurmConfig { serde_json::from_value(serde_json::json!({"trial": trial, "poll_seconds": 0.5})).unwrap() };
    std::env::set_var(liverseg_engine::executor::WORKER_ENV, &worker);
    let size: usize = {
        let out = Command::new("scontrol").args(["show", "config"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().find_map(|l| l.split_once('=').filter(|(k, _)| k.trim() == "MaxArraySize").map(|(_, v)| v.trim().parse().unwrap())).unwrap()
    };
    assert!(size < 1500, "the test cluster's MaxArraySize is {size}");

    let refused = liverseg_engine::slurm::Slurm::new(config(serde_json::json!({"partition": "nowhere", "mem": "50M"})), &base.join("artifacts")).unwrap();
    let errors: Vec<String> = refused.run_batch(&fake_requests(&base, "refused", 1500), 1500).into_iter().map(|r| format!("{:#}", r.unwrap_err())).collect();
    assert!(errors.iter().all(|e| *e == errors[0]) && errors[0].contains("sbatch refused") && errors[0].contains("1500 request(s)"), "{}", errors[0]);
    let left: Vec<_> = std::fs::read_dir(base.join("artifacts/.slurm")).unwrap().flatten().map(|e| e.file_name()).filter(|n| n != "batches" && n != "reaper.pid").collect();
    assert!(left.is_empty(), "a refused submission left {left:?}");
    assert_eq!(std::fs::read_dir(base.join("artifacts/.slurm/batches")).map(|d| d.count()).unwrap_or(0), 0);

    let slurm = liverseg_engine::slurm::Slurm::new(config(serde_json::json!({"partition": "many", "cpus": 1, "mem": "50M"})), &base.join("artifacts")).unwrap();
    let early = slurm.run_batch(&fake_requests(&base, "many", 2), 2);
    assert!(early.iter().all(|r| r.is_ok()));
    let t0 = Instant::now();
    let results = slurm.run_batch(&fake_requests(&base, "many", 1500), 1500);
    eprintln!("1500 fake requests on the test cluster: {:.1} s", t0.elapsed().as_secs_f64());
    let mut arrays: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in results {
        let s = r.unwrap().summary;
        arrays.entry(s["array"].as_str().unwrap().to_owned()).or_default().push(s["task"].as_u64().unwrap());
    }
    assert_eq!(arrays.len(), 1500usize.div_ceil(size), "{:?}", arrays.keys());
    assert!(arrays.values().all(|t| t.len() <= size && t.iter().all(|&i| (i as usize) < size)));
    assert_eq!(arrays.values().map(Vec::len).sum::<usize>(), 1500);
    // The two-request batch was collected in full: removed after the next success.
    let batches: Vec<_> = std::fs::read_dir(base.join("artifacts/.slurm/batches")).unwrap().flatten().collect();
    assert_eq!(batches.len(), arrays.len(), "{batches:?}");
    std::env::remove_var(liverseg_engine::executor::WORKER_ENV);
}

fn same_keys_and_bytes_as_local() {
    let yaml = pipeline(1, 2);
    let (local, slurm) = (project("slurm_local", &yaml), project("slurm_cluster", &yaml));
    ok(&local, &["run", "-q"]);
    let log = ok(&slurm, &["run", "-q", "--executor", "slurm"]);
    assert!(log.contains("tune: submitted 2 Slurm job(s) as array"), "{log}");
    assert!(log.contains("normalise: submitted 1 Slurm job(s)"), "an engine stage listed in slurm.submit goes as a job: {log}");
    let files = same_store(&local, &slurm, |_| true);
    assert!(files.iter().any(|k| k.starts_with("train/") && k.ends_with("model.safetensors")));
    // Slurm's own record: the two trials are tasks 0 and 1 of one array job.
    let comp = std::fs::read_to_string(Path::new(&std::env::var("LIVERSEG_SLURM_STATE").unwrap()).join("jobcomp.log")).unwrap();
    let trials: Vec<&str> = comp.lines().filter(|l| l.contains("Name=liverseg-tune ")).collect();
    assert_eq!(trials.len(), 2, "{comp}");
    let array = |l: &str| l.split_whitespace().find_map(|w| w.strip_prefix("ArrayJobId=")).unwrap().to_owned();
    assert_eq!(array(trials[0]), array(trials[1]), "{comp}");
    assert!(trials.iter().all(|l| l.contains("JobState=COMPLETED")));
}

/// Cross-validation folds on a cluster: one array job with a task per fold,
/// the ensemble the same bytes as a local run's (folds one after another).
fn folds_go_as_one_array() {
    let yaml = pipeline(1, 1).replace("    deps: [normalise, split, augment, tune]\n", "    deps: [normalise, split, augment]\n").replace("seed: 3, patience: 100", "seed: 3, patience: 100, folds: 2");
    let (local, slurm) = (project("slurm_folds_local", &yaml), project("slurm_folds_cluster", &yaml));
    ok(&local, &["run", "train", "-q", "-j", "1"]);
    let log = ok(&slurm, &["run", "train", "-q", "--executor", "slurm"]);
    assert!(log.contains("train: submitted 2 Slurm job(s) as array"), "{log}");
    let train = same_store(&local, &slurm, |p| p.starts_with("train/"));
    assert!(train.iter().any(|k| k.ends_with("folds/fold1/model.safetensors")), "{train:?}");
    let comp = std::fs::read_to_string(Path::new(&std::env::var("LIVERSEG_SLURM_STATE").unwrap()).join("jobcomp.log")).unwrap();
    let folds: Vec<&str> = comp.lines().filter(|l| l.contains("Name=liverseg-train ") && l.contains("slurm_folds_cluster")).collect();
    let array = |l: &str| l.split_whitespace().find_map(|w| w.strip_prefix("ArrayJobId=")).unwrap_or("").to_owned();
    assert!(folds.len() == 2 && array(folds[0]) == array(folds[1]) && !array(folds[0]).is_empty(), "two tasks of one array: {comp}");
}

/// A project folder whose name holds a quote, a command substitution,
/// spaces and `%`: the job runs the worker on the right request, the
/// substitution never runs, and the exit record lands in the job's folder.
fn hostile_project_paths_are_quoted() {
    let parent = project("slurm_quoting", "");
    let dir = parent.join("p'$(touch pwned)' 100% \"x\"");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), pipeline(1, 1)).unwrap();
    let log = ok(&dir, &["run", "augment", "-q", "--executor", "slurm"]);
    assert!(log.contains("normalise: submitted 1 Slurm job(s)"), "{log}");
    assert_eq!(std::fs::read_dir(dir.join("artifacts/normalise")).unwrap().flatten().count(), 1, "the job's build was committed");
    let pwned: Vec<_> = walkdir::WalkDir::new(&parent).into_iter().flatten().filter(|e| e.file_name() == "pwned").map(|e| e.into_path()).collect();
    assert!(pwned.is_empty() && !Path::new("/pwned").exists(), "the command substitution ran: {pwned:?}");
    assert!(!Path::new("/exit").exists(), "an exit record escaped the job's folder");
    let logs: Vec<_> = walkdir::WalkDir::new(dir.join("artifacts/.slurm/batches")).into_iter().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".log")).collect();
    assert!(!logs.is_empty(), "sbatch --output with a `%` in the path wrote no log in the batch folder");
}

fn cancelled_trial_is_named_and_rerun_alone() {
    let dir = project("slurm_cancel", &pipeline(12, 2));
    ok(&dir, &["run", "augment", "-q"]);
    let child = spawn(&dir, &["run", "tune", "--executor", "slurm"]);
    wait_for("both trials to run", 120, || queue().iter().filter(|(_, s)| s == "RUNNING").count() == 2);
    let victim = queue().iter().map(|(id, _)| id.clone()).find(|id| id.ends_with("_1")).unwrap();
    assert!(Command::new("scancel").arg(&victim).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a cancelled trial must fail the run");
    assert!(stderr.contains("stage `tune` failed") && stderr.contains(&format!("Slurm job {victim} ended CANCELLED")), "{stderr}");
    let artifacts = |stage: &str| std::fs::read_dir(dir.join("artifacts").join(stage)).map(|d| d.flatten().count()).unwrap_or(0);
    assert_eq!(artifacts("tune"), 0, "no partial tune artifact");
    assert_eq!(artifacts("tune+trial"), 1, "the trial that finished is kept");
    let rerun = ok(&dir, &["run", "tune", "--executor", "slurm"]);
    assert!(rerun.contains("submitted 1 Slurm job(s)"), "only the cancelled trial is resubmitted:\n{rerun}");
    assert_eq!(artifacts("tune"), 1);
}

fn killed_engine_cancels_its_jobs_and_finished_jobs_are_adopted() {
    let dir = project("slurm_kill", &pipeline(1, 20));
    ok(&dir, &["run", "tune", "-q", "--executor", "slurm"]);
    // Killed while its job runs: the job is cancelled within seconds.
    let mut child = spawn(&dir, &["run", "train", "--executor", "slurm"]);
    wait_for("train to run", 120, || queue().iter().any(|(_, s)| s == "RUNNING"));
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("the killed engine's job to be cancelled", 15, || queue().is_empty());
    // A rerun that adopts a running job of a crashed engine watches it as its
    // own: killed in turn, it cancels that job too.
    orphan_a_running_job(&dir);
    let reaper_file = dir.join("artifacts/.slurm/reaper.pid");
    let crashed_reaper = std::fs::read_to_string(&reaper_file).unwrap();
    let mut adopter = spawn(&dir, &["run", "train", "--executor", "slurm"]);
    wait_for("the rerun to adopt the job", 60, || std::fs::read_to_string(&reaper_file).is_ok_and(|p| p != crashed_reaper));
    std::thread::sleep(Duration::from_secs(1));
    adopter.kill().unwrap();
    adopter.wait().unwrap();
    wait_for("the adopted job to be cancelled with its adopter", 15, || queue().is_empty());
    // A job that finished while no engine watched is adopted, not rerun.
    orphan_a_running_job(&dir);
    wait_for("the orphaned job to finish", 600, || queue().is_empty());
    let log = ok(&dir, &["run", "train", "--executor", "slurm"]);
    assert!(log.contains("finished while liverseg was away; adopting it") && !log.contains("submitted"), "{log}");
    assert_eq!(std::fs::read_dir(dir.join("artifacts/train")).unwrap().flatten().count(), 1);
}

/// The engine and its reaper gone at once (a crashed host) while train's
/// job runs: the job runs on.
fn orphan_a_running_job(dir: &Path) {
    let mut child = spawn(dir, &["run", "train", "--executor", "slurm"]);
    wait_for("train to run again", 120, || queue().iter().any(|(_, s)| s == "RUNNING"));
    let reaper: i32 = std::fs::read_to_string(dir.join("artifacts/.slurm/reaper.pid")).unwrap().trim().parse().unwrap();
    unsafe { libc::kill(reaper, libc::SIGKILL) };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!queue().is_empty(), "the job outlives a crashed engine");
}

/// A trial that declares no threads runs with its job's allocation
/// (`trial: {cpus: 1}`), not the engine host's cores, and its key keeps 0.
fn threads_come_from_the_allocation() {
    let dir = project("slurm_threads", &pipeline(1, 1).replace("parallel: 2", "parallel: 1"));
    ok(&dir, &["run", "tune", "-q", "--executor", "slurm"]);
    let trials: Vec<PathBuf> = std::fs::read_dir(dir.join("artifacts/tune+trial")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(trials.len(), 2);
    for t in trials {
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(t.join("manifest.json")).unwrap()).unwrap();
        assert_eq!((&m["params"]["threads"], m["metrics"]["cpu_threads"].as_u64()), (&serde_json::json!(0), Some(1)), "{}", t.display());
    }
}

/// Resumes slurmctld however the test ends.
struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// slurmctld stopped for 45 s while a job runs: squeue fails meanwhile,
/// which is retried and never read as the job's end; the run finishes.
fn a_stalled_controller_is_waited_out() {
    let dir = project("slurm_stall", &pipeline(1, 8));
    ok(&dir, &["run", "tune", "-q", "--executor", "slurm"]);
    let child = spawn(&dir, &["run", "train", "--executor", "slurm"]);
    wait_for("train to run", 120, || queue().iter().any(|(_, s)| s == "RUNNING"));
    let state = PathBuf::from(std::env::var("LIVERSEG_SLURM_STATE").unwrap());
    let ctld: i32 = std::fs::read_to_string(state.join("slurmctld.pid")).unwrap().trim().parse().unwrap();
    {
        let _stopped = Stopped(ctld);
        unsafe { libc::kill(ctld, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_secs(45));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("squeue failed") && stderr.contains("retrying"), "squeue never failed during the stall:\n{stderr}");
    assert_eq!(std::fs::read_dir(dir.join("artifacts/train")).unwrap().flatten().count(), 1);
}

/// Forty stages' jobs waited on side by side (each its own array, as the
/// scheduler submits independent stages) are watched with one squeue call
/// per poll between them, not one per stage per poll.
fn stages_waiting_side_by_side_share_squeue() {
    use liverseg_engine::executor::Executor;
    let base = project("slurm_shared_queue", "stages: {}\n");
    let worker = base.join("fake-worker.sh");
    std::fs::write(&worker, FAKE_WORKER).unwrap();
    std::fs::set_permissions(&worker, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let real = Command::new("bash").args(["-c", "command -v squeue"]).output().unwrap();
    let shims = base.join("shims");
    std::fs::create_dir_all(&shims).unwrap();
    let calls = base.join("squeue.calls");
    let shim = format!("#!/bin/sh\necho >> '{}'\nexec '{}' \"$@\"\n", calls.display(), String::from_utf8_lossy(&real.stdout).trim());
    std::fs::write(shims.join("squeue"), shim).unwrap();
    std::fs::set_permissions(shims.join("squeue"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = std::env::var("PATH").unwrap();
    std::env::set_var("PATH", format!("{}:{path}", shims.display()));
    std::env::set_var(liverseg_engine::executor::WORKER_ENV, &worker);
    // Each job holds its task a few seconds, so every stage sees several polls.
    let config: liverseg_engine::slurm::SlurmConfig = serde_json::from_value(serde_json::json!({"trial": {"partition": "many", "cpus": 1, "mem": "50M"}, "poll_seconds": 0.5})).unwrap();
    let slurm = liverseg_engine::slurm::Slurm::new(config, &base.join("artifacts")).unwrap();
    let reqs = fake_requests(&base, "side", 40);
    std::fs::write(&worker, FAKE_WORKER.replace("#!/bin/bash\n", "#!/bin/bash\nsleep 4\n")).unwrap();
    let t0 = Instant::now();
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = reqs.iter().map(|r| scope.spawn(|| slurm.run(r))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    std::env::set_var("PATH", path);
    std::env::remove_var(liverseg_engine::executor::WORKER_ENV);
    let arrays: std::collections::BTreeSet<String> = results.into_iter().map(|r| r.unwrap().summary["array"].as_str().unwrap().to_owned()).collect();
    assert_eq!(arrays.len(), 40, "each stage is its own array");
    let n = std::fs::read_to_string(&calls).unwrap_or_default().lines().count();
    eprintln!("40 stages waiting side by side for {secs:.1} s: {n} squeue call(s)");
    // Per stage, each would poll at least twice in 4 s (80 calls); shared,
    // about one call per 0.5 s poll of the whole wait.
    assert!(n as f64 <= 2.0 + 2.0 * secs / 0.5 && n < 40, "{n} squeue calls in {secs:.1} s");
}

/// `run --detach`: the engine runs the cheap stages itself, submits train,
/// then evaluate to start after it (`afterok`), and exits with both queued;
/// `status` lists them; a later `run` waits for them and commits them, with
/// the bytes of a local run. A detached chain whose first job is cancelled
/// is one error at collection, naming both jobs, and leaves nothing behind.
fn detached_run_chains_jobs_and_a_later_run_collects() {
    let yaml = pipeline(1, 1).replace("    deps: [normalise, split, augment, tune]\n", "    deps: [normalise, split, augment]\n").replace("  submit: [normalise]\n", "");
    let (local, slurm) = (project("slurm_detach_local", &yaml), project("slurm_detach_cluster", &yaml));
    ok(&local, &["run", "evaluate", "-q"]);
    let log = ok(&slurm, &["run", "evaluate", "--executor", "slurm", "--detach"]);
    let (train, evaluate) = (job_of_in(&log, "train"), job_of_in(&log, "evaluate"));
    assert!(log.contains(&format!("(Slurm job {evaluate}, after {train})")), "evaluate waits for train: {log}");
    assert!(queue().iter().any(|(id, _)| *id == evaluate), "the engine exited with evaluate still queued: {:?}", queue());
    let status = run(&slurm, &["status"]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains("Slurm jobs of the detached run") && shown.contains(&format!("job {evaluate}")), "{shown}");
    assert!(shown.lines().any(|l| l.starts_with("train") && l.contains("missing")), "nothing is committed before a run collects: {shown}");
    let collect = ok(&slurm, &["run", "evaluate", "-q", "--executor", "slurm"]);
    assert!(collect.contains("waiting for the 2 job(s) of the detached run") && collect.contains("adopting it") && !collect.contains("submitted"), "{collect}");
    let files = same_store(&local, &slurm, |p| p.starts_with("train/") || p.starts_with("evaluate/"));
    assert!(files.iter().any(|k| k.starts_with("evaluate/")), "{files:?}");
    // Slurm's own record: evaluate started once train had ended.
    let comp = std::fs::read_to_string(Path::new(&std::env::var("LIVERSEG_SLURM_STATE").unwrap()).join("jobcomp.log")).unwrap();
    let field = |id: &str, name: &str| {
        let array = id.split('_').next().unwrap();
        let line = comp.lines().find(|l| l.contains(&format!("ArrayJobId={array} "))).unwrap_or_else(|| panic!("job {id} not in {comp}"));
        line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))).unwrap().to_owned()
    };
    assert!(field(&evaluate, "StartTime") >= field(&train, "EndTime"), "{comp}");
    // A chain whose first job is cancelled: the job after it never runs.
    let log = ok(&slurm, &["run", "evaluate", "--executor", "slurm", "--detach", "-P", "train.epochs=2"]);
    let (train, evaluate) = (job_of_in(&log, "train"), job_of_in(&log, "evaluate"));
    assert!(Command::new("scancel").arg(&train).status().unwrap().success());
    let out = run(&slurm, &["run", "evaluate", "-q", "--executor", "slurm", "-P", "train.epochs=2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a cancelled detached job fails the collecting run: {stderr}");
    assert!(
        stderr.contains("2 of the 2 job(s) of the detached run did not finish")
            && stderr.contains(&format!("Slurm job {train} ended CANCELLED"))
            && stderr.contains(&format!("Slurm job {evaluate} ended")),
        "{stderr}"
    );
    assert!(!slurm.join("artifacts/.slurm/detached.json").exists(), "the record is gone: a rerun submits anew");
    assert!(queue().is_empty(), "{:?}", queue());
}

fn job_of_in(log: &str, stage: &str) -> String {
    let line = log.lines().find(|l| l.starts_with(&format!("submitted {stage} "))).unwrap_or_else(|| panic!("{stage} not submitted: {log}"));
    line.split("Slurm job ").nth(1).unwrap().split([',', ')']).next().unwrap().to_owned()
}

/// The scheduler on the cluster, with 1 and 2 threads per stage: under
/// `-j 4`, tune.train and tune.baseline, then train and baseline, overlap
/// (their manifests), train's and baseline's jobs ran at the same time
/// (Slurm's record), and the store equals a local `-j 1` run's, every
/// stage's artifact to the byte (each declares its threads).
fn independent_stages_run_at_once_on_the_cluster() {
    for threads in [1, 2] {
        let yaml = SIDE_BY_SIDE.replace("THREADS", &threads.to_string()) + "slurm: {default: {cpus: 1, mem: 2G}, trial: {cpus: 1, mem: 2G}, poll_seconds: 0.5}\n";
        let (local, cluster) = (project(&format!("slurm_side_local_t{threads}"), &yaml), project(&format!("slurm_side_cluster_t{threads}"), &yaml));
        ok(&local, &["run", "-q", "-j", "1"]);
        ok(&cluster, &["run", "-q", "-j", "4", "--executor", "slurm"]);
        for (a, b) in [("tune.train", "tune.baseline"), ("train", "baseline")] {
            assert!(overlap(&cluster, a, b), "threads {threads}: {a} and {b} did not overlap: {:?} {:?}", span(&cluster, a), span(&cluster, b));
        }
        let comp = std::fs::read_to_string(Path::new(&std::env::var("LIVERSEG_SLURM_STATE").unwrap()).join("jobcomp.log")).unwrap();
        let times = |name: &str| {
            let line = comp.lines().find(|l| l.contains(&format!("Name=liverseg-{name} ")) && l.contains(&format!("slurm_side_cluster_t{threads}"))).unwrap_or_else(|| panic!("no {name} job: {comp}"));
            let field = |f: &str| line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{f}="))).unwrap().to_owned();
            (field("SubmitTime"), field("EndTime"))
        };
        // Both jobs were in Slurm at once: the engine did not wait for one to
        // end before submitting the other. (Whether Slurm starts them in the
        // same second is its scheduler's business: train's job is submitted
        // only once tune.train is committed, a second or two on a busy
        // machine, hence baseline's longer training in SIDE_BY_SIDE.)
        let ((s1, e1), (s2, e2)) = (times("train"), times("baseline"));
        assert!(s1 <= e2 && s2 <= e1, "threads {threads}: train's and baseline's jobs were not in Slurm at once: {comp}");
        let files = same_store(&local, &cluster, |_| true);
        assert!(files.iter().any(|k| k.starts_with("baseline/") && k.ends_with("model.safetensors")), "{files:?}");
        assert!(files.iter().any(|k| k.starts_with("evaluate/") && k.ends_with("per_case.parquet")), "{files:?}");
    }
}
