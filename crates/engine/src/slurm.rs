//! The Slurm executor: worker requests as `sbatch` array jobs on a cluster
//! whose nodes share the project's filesystem.
//!
//! Each request gets its own folder, `artifacts/.slurm/<stage>-<key>/`, that
//! only its job writes: the request, the job's build folder `out/`, its
//! summary, and an exit record the job script writes last (so a job's
//! outcome never depends on catching it in `squeue`). The engine moves `out/`
//! into its own build folder and commits it as for a local run; the store's
//! lock and commit stay on the submitting machine, so no lock has to work
//! across hosts. A rerun finds a job that finished while the engine was away
//! by its exit record and adopts it, and waits for one still queued.
//! A reaper process, in its own process group, `scancel`s every job of the
//! run when the engine's end of a pipe closes without a goodbye: Ctrl-C, a
//! kill, a crash.

mod detached;
pub use detached::detached_jobs;

use super::executor::{worker_binary, Executor};
use super::worker::{WorkerOutput, WorkerRequest};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_yaml::Value as Y;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a job asks Slurm for; unset fields are left to the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub partition: Option<String>,
    pub cpus: Option<u32>,
    /// As sbatch takes it: `16G`, `4000M`.
    pub mem: Option<String>,
    /// GPUs per job (`--gres=gpu:N`).
    pub gpus: Option<u32>,
    /// As sbatch takes it: `2:00:00`, `1-00:00:00`.
    pub time: Option<String>,
    pub account: Option<String>,
    /// Further sbatch flags, as given (`--qos=long`, `--constraint=a100`).
    #[serde(default)]
    pub extra: Vec<String>,
}

impl Resources {
    /// `self`, with `over`'s fields where set.
    fn overlay(&self, over: &Resources) -> Resources {
        Resources {
            partition: over.partition.clone().or_else(|| self.partition.clone()),
            cpus: over.cpus.or(self.cpus),
            mem: over.mem.clone().or_else(|| self.mem.clone()),
            gpus: over.gpus.or(self.gpus),
            time: over.time.clone().or_else(|| self.time.clone()),
            account: over.account.clone().or_else(|| self.account.clone()),
            extra: self.extra.iter().chain(&over.extra).cloned().collect(),
        }
    }

    fn sbatch_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        let mut opt = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                a.push(format!("--{flag}={v}"));
            }
        };
        opt("partition", self.partition.clone());
        opt("cpus-per-task", self.cpus.map(|c| c.to_string()));
        opt("mem", self.mem.clone());
        opt("gres", self.gpus.filter(|&g| g > 0).map(|g| format!("gpu:{g}")));
        opt("time", self.time.clone());
        opt("account", self.account.clone());
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// pipeline.yaml's `slurm:` section. Not part of any stage key: where a
/// request runs never changes what it computes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    /// For every job.
    #[serde(default)]
    pub default: Resources,
    /// For a search's trials (over `default`).
    #[serde(default)]
    pub trial: Resources,
    /// Per stage, by its name in pipeline.yaml (over `default`).
    #[serde(default)]
    pub stages: BTreeMap<String, Resources>,
    /// Stages that run in the engine (ingest, normalise, ...) to submit as
    /// jobs as well; by default they stay on the submitting machine.
    #[serde(default)]
    pub submit: Vec<String>,
    /// First wait between polls, in seconds; it grows to 15 s while nothing changes.
    #[serde(default = "default_poll")]
    pub poll_seconds: f64,
}

fn default_poll() -> f64 {
    2.0
}

/// Built-in defaults per kind of job: a stage gets more than a trial.
fn builtin(trial: bool) -> Resources {
    match trial {
        true => Resources { cpus: Some(1), mem: Some("4G".into()), time: Some("4:00:00".into()), ..Default::default() },
        false => Resources { cpus: Some(2), mem: Some("8G".into()), time: Some("24:00:00".into()), ..Default::default() },
    }
}

impl SlurmConfig {
    pub fn parse(value: &Y, place: &str) -> Result<Self> {
        let c: SlurmConfig = serde_yaml::from_value(value.clone()).map_err(|e| anyhow!("{place}: {e}"))?;
        if !(c.poll_seconds > 0.0) {
            bail!("{place}.poll_seconds: must be above 0");
        }
        Ok(c)
    }

    /// The resources of a job for `req`.
    pub fn resources(&self, req: &WorkerRequest) -> Resources {
        let trial = req.trial;
        let base = builtin(trial).overlay(&self.default);
        match trial {
            true => base.overlay(&self.trial),
            false => self.stages.get(&req.label).map(|r| base.overlay(r)).unwrap_or(base),
        }
    }
}

/// Where a request's job keeps its files.
struct JobDir(PathBuf);

impl JobDir {
    fn request(&self) -> PathBuf {
        self.0.join("request.json")
    }
    fn out(&self) -> PathBuf {
        self.0.join("out")
    }
    fn summary(&self) -> PathBuf {
        self.0.join("summary.json")
    }
    /// Written by the job script as its last act: `<exit code> <job id>`.
    fn exit(&self) -> PathBuf {
        self.0.join("exit")
    }
    /// Written by the engine after submitting: the job id and its log.
    fn job(&self) -> PathBuf {
        self.0.join("job.json")
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct JobRecord {
    /// `<array job id>_<task>`.
    id: String,
    log: PathBuf,
}

pub struct Slurm {
    config: SlurmConfig,
    /// `artifacts/.slurm`.
    root: PathBuf,
    reaper: Mutex<Option<Reaper>>,
    /// Every job this run waits on, by id, with its last state: stages
    /// waiting side by side share one `status.json`.
    states: Mutex<BTreeMap<String, serde_json::Value>>,
    /// One squeue answer for every stage waiting side by side.
    queue: Mutex<SharedQueue>,
}

/// squeue's last answer, shared: a waiting stage asks anew only when the
/// answer is older than the shortest poll or lacks one of its arrays, and
/// then asks for every array any stage waits on. A thousand stages waiting
/// at once make one call per poll, not one each.
#[derive(Default)]
struct SharedQueue {
    /// Arrays some stage waits on, with how many stages wait on each.
    open: BTreeMap<String, usize>,
    /// When it was asked, for which arrays, and what it said.
    last: Option<(Instant, std::collections::BTreeSet<String>, Arc<Queue>)>,
    /// When squeue last failed, and how: shared like an answer, so that
    /// stages waiting behind a hung call do not each hang in turn.
    failed: Option<(Instant, String)>,
}

/// Keeps a stage's arrays in the shared query while it waits on them.
struct Watching<'a> {
    queue: &'a Mutex<SharedQueue>,
    arrays: Vec<String>,
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for a in &self.arrays {
            if let Some(n) = q.open.get_mut(a) {
                *n -= 1;
                if *n == 0 {
                    q.open.remove(a);
                }
            }
        }
    }
}

impl Slurm {
    pub fn new(config: SlurmConfig, store_root: &Path) -> Result<Self> {
        // The project's own paths must mean the same on every node.
        let root = std::path::absolute(store_root.join(".slurm")).context("cannot resolve the store's path")?;
        Ok(Slurm { config, root, reaper: Mutex::new(None), states: Mutex::new(BTreeMap::new()), queue: Mutex::new(SharedQueue::default()) })
    }

    fn job_dir(&self, req: &WorkerRequest) -> JobDir {
        let part = req.part.map(|k| format!("-part{k}")).unwrap_or_default();
        JobDir(self.root.join(format!("{}-{}{part}", req.stage, req.key)))
    }

    /// Submit the requests as array jobs of at most the cluster's
    /// MaxArraySize tasks each. When `parallel` throttles, each array waits
    /// for the one before (`--dependency=afterany`), so the throttle holds
    /// over all of them. If any array is refused, those already submitted
    /// are cancelled: one error, nothing left running.
    fn submit_all(&self, reqs: &[(&WorkerRequest, JobDir)], parallel: usize) -> Result<Vec<JobRecord>> {
        let size = max_array_size()?;
        let chain = parallel.max(1) < reqs.len() && reqs.len() > size;
        let mut records: Vec<JobRecord> = Vec::with_capacity(reqs.len());
        let mut arrays: Vec<String> = Vec::new();
        for chunk in reqs.chunks(size) {
            let after = if chain { arrays.last().map(|id| format!("afterany:{id}")) } else { None };
            match self.submit(chunk, parallel, after, true) {
                Ok(r) => {
                    arrays.push(array_id(&r[0].id).to_owned());
                    records.extend(r);
                }
                Err(e) => {
                    if !arrays.is_empty() {
                        let _ = Command::new("scancel").args(&arrays).status();
                    }
                    let n = reqs.len();
                    return Err(e.context(format!("{n} request(s) in {} array(s) of at most {size} (MaxArraySize); none left queued", n.div_ceil(size))));
                }
            }
        }
        Ok(records)
    }

    /// Submit the requests as one array job, after `dependency` (sbatch's
    /// form, `afterok:12:13`) if given, watched by the reaper if `reap`;
    /// returns the job records.
    fn submit(&self, reqs: &[(&WorkerRequest, JobDir)], parallel: usize, dependency: Option<String>, reap: bool) -> Result<Vec<JobRecord>> {
        let first = reqs[0].0;
        let batch = self.root.join("batches").join(batch_name(reqs.iter().map(|r| r.0)));
        std::fs::create_dir_all(&batch).with_context(|| format!("cannot create {}", batch.display()))?;
        let write = |name: &str, text: String| std::fs::write(batch.join(name), text).with_context(|| format!("cannot write {}", batch.join(name).display()));
        write("label", first.label.clone())?;
        write("requests.txt", reqs.iter().map(|(_, d)| format!("{}\n", d.0.display())).collect())?;
        let script = batch.join("job.sh");
        write("job.sh", job_script(&worker_binary()?, &batch.join("requests.txt")))?;
        let mut cmd = Command::new("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--job-name=liverseg-{}", first.label))
            .arg(format!("--array=0-{}%{}", reqs.len() - 1, parallel.max(1)))
            .arg(format!("--output={}/slurm-%A_%a.log", escape_percent(&batch.display().to_string())))
            .arg(format!("--chdir={}", std::path::absolute(&first.project_root)?.display()))
            .args(self.config.resources(first).sbatch_args())
            .args(dependency.into_iter().flat_map(|d| [format!("--dependency={d}"), "--kill-on-invalid-dep=yes".to_owned()]))
            .arg(&script);
        let out = cmd.output().context("cannot run sbatch (is Slurm installed and SLURM_CONF set?)")?;
        if !out.status.success() {
            std::fs::remove_dir_all(&batch).ok();
            bail!("sbatch refused the job for `{}`: {}", first.label, String::from_utf8_lossy(&out.stderr).trim());
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or("").to_owned();
        if id.is_empty() {
            bail!("sbatch gave no job id for `{}`", first.label);
        }
        if reap {
            self.reaper()?.as_mut().context("no job reaper")?.watch(&id)?;
        }
        let mut records = Vec::new();
        for (i, (_, dir)) in reqs.iter().enumerate() {
            let record = JobRecord { id: format!("{id}_{i}"), log: batch.join(format!("slurm-{id}_{i}.log")) };
            std::fs::write(dir.job(), serde_json::to_vec(&record)?).with_context(|| format!("cannot write {}", dir.job().display()))?;
            records.push(record);
        }
        Ok(records)
    }

    fn reaper(&self) -> Result<std::sync::MutexGuard<'_, Option<Reaper>>> {
        let mut guard = self.reaper.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(Reaper::start(&self.root)?);
        }
        Ok(guard)
    }

    /// A request's folder, ready for a new job: the request with its paths
    /// pointing into it.
    fn prepare(&self, req: &WorkerRequest) -> Result<(WorkerRequest, JobDir)> {
        let dir = self.job_dir(req);
        if dir.0.exists() {
            std::fs::remove_dir_all(&dir.0).with_context(|| format!("cannot clear {}", dir.0.display()))?;
        }
        std::fs::create_dir_all(dir.out()).with_context(|| format!("cannot create {}", dir.out().display()))?;
        let mut job = req.clone();
        job.out_dir = dir.out();
        job.summary_path = dir.summary();
        job.show_progress = false;
        std::fs::write(dir.request(), serde_json::to_vec_pretty(&absolute_paths(job.clone())?)?).with_context(|| format!("cannot write {}", dir.request().display()))?;
        Ok((job, dir))
    }

    /// The job's build, moved to where the engine builds `req`, and its summary.
    fn collect(&self, req: &WorkerRequest, dir: &JobDir) -> Result<WorkerOutput> {
        if req.out_dir.exists() {
            std::fs::remove_dir_all(&req.out_dir).with_context(|| format!("cannot clear {}", req.out_dir.display()))?;
        }
        std::fs::rename(dir.out(), &req.out_dir).with_context(|| format!("cannot move {} to {}", dir.out().display(), req.out_dir.display()))?;
        std::fs::rename(dir.summary(), &req.summary_path).with_context(|| format!("the job wrote no summary at {}", dir.summary().display()))?;
        let out = req.take_output();
        std::fs::remove_dir_all(&dir.0).ok();
        out
    }
}

/// A stable name for a batch of requests.
fn batch_name<'a>(reqs: impl Iterator<Item = &'a WorkerRequest>) -> String {
    let mut h = blake3::Hasher::new();
    let mut first = String::new();
    for r in reqs {
        if first.is_empty() {
            first = r.label.replace('/', "_");
        }
        h.update(r.key.as_bytes());
        if let Some(k) = r.part {
            h.update(format!("part{k}").as_bytes());
        }
    }
    format!("{first}-{}", &h.finalize().to_hex()[..12])
}

/// The request with every path absolute, as a job on another node needs it.
fn absolute_paths(mut r: WorkerRequest) -> Result<WorkerRequest> {
    let abs = |p: &Path| std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()));
    r.out_dir = abs(&r.out_dir)?;
    r.scratch_dir = abs(&r.scratch_dir)?;
    r.summary_path = abs(&r.summary_path)?;
    r.project_root = abs(&r.project_root)?;
    r.store_root = abs(&r.store_root)?;
    for p in r.upstream.values_mut() {
        *p = abs(p)?;
    }
    Ok(r)
}

/// The array job's script: task i runs the i-th request, then records its
/// exit code beside it (written to a temporary name and renamed, so a
/// reader never sees half a record).
fn job_script(worker: &Path, list: &Path) -> String {
    format!(
        r#"#!/bin/bash
# liverseg: one worker request per array task.
dir=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {list})
[ -n "$dir" ] || {{ echo "liverseg: no request for task $SLURM_ARRAY_TASK_ID in "{list} >&2; exit 2; }}
{worker} stage "$dir/request.json"
rc=$?
printf '%s %s_%s\n' "$rc" "$SLURM_ARRAY_JOB_ID" "$SLURM_ARRAY_TASK_ID" > "$dir/exit.tmp" && mv "$dir/exit.tmp" "$dir/exit"
exit $rc
"#,
        list = shell_quote(&list.display().to_string()),
        worker = shell_quote(&worker.display().to_string())
    )
}

/// `s` as one word to a POSIX shell, whatever it holds: single-quoted, each
/// `'` closed, escaped and reopened. No expansion happens inside.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// sbatch's `--output` expands `%` patterns; `%%` is a literal `%`.
fn escape_percent(s: &str) -> String {
    s.replace('%', "%%")
}

/// The array job of a task id `<array>_<task>`.
fn array_id(task: &str) -> &str {
    task.split('_').next().unwrap_or(task)
}

/// `MaxArraySize` from `scontrol show config` (tasks 0..size-1 fit one
/// array), read once; Slurm's default, 1001, where scontrol cannot tell.
fn max_array_size() -> Result<usize> {
    static SIZE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let size = *SIZE.get_or_init(|| {
        let out = Command::new("scontrol").args(["show", "config"]).output().ok()?;
        parse_max_array_size(&String::from_utf8_lossy(&out.stdout))
    });
    match size.unwrap_or(1001) {
        0 => bail!("this cluster takes no job arrays (MaxArraySize = 0 in `scontrol show config`); liverseg submits its requests as arrays"),
        n => Ok(n),
    }
}

fn parse_max_array_size(config: &str) -> Option<usize> {
    config.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "MaxArraySize").then(|| v.trim().parse().ok())?
    })
}

/// A job's exit code from its record, if it has written one.
fn exit_code(dir: &JobDir) -> Option<i32> {
    let text = std::fs::read_to_string(dir.exit()).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Where a job stands, as Slurm and its exit record tell.
#[derive(Debug, Clone, PartialEq)]
enum State {
    Pending,
    Running,
    Exited(i32),
    /// Gone from the queue without an exit record: Slurm's final state.
    Ended(String),
}

/// squeue's answer: (state, reason) by array task id.
type Queue = BTreeMap<String, (String, String)>;

/// Array tasks in the queue: (state, reason) by id (`squeue -r`).
fn queue(ids: &[&str]) -> Result<Queue> {
    let jobs: Vec<&str> = ids.iter().map(|id| array_id(id)).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let out = Command::new("squeue").args(["-h", "-r", "-o", "%i %T %r", "-j", &jobs.join(",")]).output().context("cannot run squeue")?;
    // squeue calls a job it no longer knows an error; that is an empty queue
    // for us. Any other failure (a controller that does not answer) says
    // nothing about the jobs.
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !stderr.contains("Invalid job id") {
        bail!("squeue failed ({}): {}", out.status, stderr.trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_owned(), (w.next()?.to_owned(), w.next().unwrap_or("").to_owned())))
        })
        .collect())
}

/// How long squeue may fail in a row before the run gives up waiting.
const SQUEUE_PATIENCE: Duration = Duration::from_secs(1800);

/// Reasons a pending job waits for something that will never come: the
/// request exceeds what the partition has, or names what does not exist.
const HOPELESS: &[&str] = &["PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit", "InvalidAccount", "InvalidQOS", "QOSMaxCpuPerJobLimit", "QOSMaxMemoryPerJob"];

/// A finished job's state, from `scontrol` (kept a few minutes after the
/// end), else `sacct` where accounting storage is configured.
fn final_state(id: &str) -> String {
    let scontrol = |id: &str| Command::new("scontrol").args(["show", "job", id]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let state = |text: &str| text.split_whitespace().find_map(|w| w.strip_prefix("JobState=")).map(str::to_owned);
    if let Some(s) = state(&scontrol(id)) {
        return s;
    }
    // A task cancelled before its array was split has no record of its own:
    // the array's is its when the array holds that one task.
    let array = scontrol(array_id(id));
    if array.lines().filter(|l| l.starts_with("JobId=")).count() == 1 {
        if let Some(s) = state(&array) {
            return s;
        }
    }
    let sacct = Command::new("sacct").args(["-n", "-X", "-P", "-o", "State", "-j", id]).output();
    if let Ok(out) = sacct {
        if let Some(s) = String::from_utf8_lossy(&out.stdout).lines().next().map(str::trim).filter(|s| !s.is_empty()) {
            return s.split_whitespace().next().unwrap_or(s).to_owned();
        }
    }
    "UNKNOWN (no longer in squeue, scontrol or sacct)".into()
}

/// The jobs of a run in progress and where they stood at its last poll:
/// (stage, job id, state); empty when no run holds the store.
pub fn jobs_of_running_run(store: &super::store::Store) -> Vec<(String, String, String)> {
    if !store.locked_by_another().unwrap_or(false) {
        return Vec::new();
    }
    let rows: Vec<serde_json::Value> = std::fs::read(store.root.join(".slurm/status.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let field = |r: &serde_json::Value, k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    rows.iter().map(|r| (field(r, "stage"), field(r, "job"), field(r, "state"))).collect()
}

/// Where this run's jobs stand, for `liverseg status` (`.slurm/status.json`).
fn write_status(root: &Path, all: &Mutex<BTreeMap<String, serde_json::Value>>, jobs: &[(String, JobDir, JobRecord)], states: &[State]) {
    let mut all = all.lock().unwrap_or_else(|e| e.into_inner());
    for ((label, _, rec), st) in jobs.iter().zip(states) {
        let state = match st {
            State::Pending => "PENDING".to_owned(),
            State::Running => "RUNNING".to_owned(),
            State::Exited(0) => "COMPLETED".to_owned(),
            State::Exited(rc) => format!("FAILED (exit {rc})"),
            State::Ended(s) => s.clone(),
        };
        all.insert(rec.id.clone(), serde_json::json!({"stage": label, "job": rec.id, "state": state}));
    }
    let rows: Vec<&serde_json::Value> = all.values().collect();
    let tmp = root.join("status.json.tmp");
    if std::fs::write(&tmp, serde_json::to_vec_pretty(&rows).unwrap_or_default()).is_ok() {
        std::fs::rename(&tmp, root.join("status.json")).ok();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    if all.is_empty() {
        format!("(no log at {})", path.display())
    } else {
        all[start..].join("\n    ")
    }
}

impl Slurm {
    /// Wait for every job; their states when done.
    fn wait(&self, jobs: &[(String, JobDir, JobRecord)]) -> Result<Vec<State>> {
        let mut states: Vec<State> = vec![State::Pending; jobs.len()];
        let bar = super::progress::bar(jobs.len() as u64, "slurm jobs", true);
        let mut poll = self.config.poll_seconds;
        let mut missing_since: BTreeMap<usize, Instant> = BTreeMap::new();
        let mut squeue_failing: Option<Instant> = None;
        let _watching = self.watch(jobs.iter().map(|(_, _, rec)| array_id(&rec.id)));
        let mut first_look = true;
        let mut first_write = true;
        loop {
            let before = states.clone();
            for (state, (_, dir, _)) in states.iter_mut().zip(jobs) {
                if let (State::Pending | State::Running, Some(rc)) = (&*state, exit_code(dir)) {
                    *state = State::Exited(rc);
                }
            }
            let open: Vec<usize> = (0..jobs.len()).filter(|&i| matches!(states[i], State::Pending | State::Running)).collect();
            let ids: Vec<&str> = open.iter().map(|&i| jobs[i].2.id.as_str()).collect();
            // The first look is at the exit records only: jobs just submitted
            // are queued, and by the next poll the stages submitted beside
            // this one are watched too, so that one squeue answers them all.
            let queued = if ids.is_empty() || first_look { None } else { self.ask_queue(&ids, &mut squeue_failing)? };
            first_look = false;
            for &i in &open {
                let (_, _, rec) = &jobs[i];
                let Some(queued) = &queued else { continue };
                match queued.get(&rec.id).map(|(s, r)| (s.as_str(), r.as_str())) {
                    Some(("PENDING", reason)) if HOPELESS.contains(&reason) => {
                        let _ = Command::new("scancel").arg(&rec.id).status();
                        states[i] = State::Ended(format!("PENDING ({reason}: the cluster cannot give it what it asks for; see slurm: in pipeline.yaml), cancelled"));
                    }
                    Some(("PENDING" | "CONFIGURING", _)) => states[i] = State::Pending,
                    Some(_) => states[i] = State::Running,
                    // Out of the queue, no exit record yet: give a shared
                    // filesystem a few seconds to show it before deciding.
                    None => {
                        let since = *missing_since.entry(i).or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(10) {
                            states[i] = State::Ended(final_state(&rec.id));
                        }
                    }
                }
            }
            let done = states.iter().filter(|s| matches!(s, State::Exited(_) | State::Ended(_))).count();
            let running = states.iter().filter(|s| **s == State::Running).count();
            bar.set_position(done as u64);
            bar.set_message(format!("{} pending, {running} running, {done} done", jobs.len() - done - running));
            // Rewritten only on a change: thousands of waiting trials would
            // otherwise cost a full rewrite per poll.
            if states != before || first_write {
                write_status(&self.root, &self.states, jobs, &states);
                first_write = false;
            }
            if done == jobs.len() {
                break;
            }
            poll = if states == before { (poll * 1.5).min(15.0) } else { self.config.poll_seconds };
            if squeue_failing.is_some() {
                poll = poll.max(2.0);
            }
            std::thread::sleep(Duration::from_secs_f64(if missing_since.is_empty() { poll } else { poll.min(2.0) }));
        }
        bar.finish_and_clear();
        Ok(states)
    }

    /// The queue, or None while squeue fails (a stalled controller): retried
    /// at the next poll, never read as the jobs' end, and an error only after
    /// `SQUEUE_PATIENCE` of failures in a row. The jobs stay queued then; a
    /// rerun adopts them.
    fn ask_queue(&self, ids: &[&str], failing: &mut Option<Instant>) -> Result<Option<Arc<Queue>>> {
        match self.shared_queue(ids) {
            Ok(q) => {
                if failing.take().is_some() {
                    eprintln!("squeue answers again");
                }
                Ok(Some(q))
            }
            Err(e) => {
                let since = *failing.get_or_insert_with(|| {
                    eprintln!("warning: {e:#}; retrying (the jobs are not taken as ended)");
                    Instant::now()
                });
                if since.elapsed() > SQUEUE_PATIENCE {
                    bail!("squeue has failed for {} s ({e:#}); Slurm job(s) {} may still run: a rerun adopts them", since.elapsed().as_secs(), ids.join(", "));
                }
                Ok(None)
            }
        }
    }

    /// Add `arrays` to the shared query until the guard drops.
    fn watch<'a>(&self, arrays: impl Iterator<Item = &'a str>) -> Watching<'_> {
        let arrays: Vec<String> = arrays.map(str::to_owned).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for a in &arrays {
            *q.open.entry(a.clone()).or_default() += 1;
        }
        Watching { queue: &self.queue, arrays }
    }

    /// The queue for `ids`: the last shared answer (or failure) while it is
    /// fresh and covers them, else one squeue call for every watched array.
    /// The lock is held over the call, so stages polling together make one.
    fn shared_queue(&self, ids: &[&str]) -> Result<Arc<Queue>> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = |at: &Instant| at.elapsed().as_secs_f64() < self.config.poll_seconds;
        if let Some((at, why)) = &q.failed {
            if fresh(at) {
                bail!("{why}");
            }
        }
        let want: std::collections::BTreeSet<String> = ids.iter().map(|id| array_id(id).to_owned()).collect();
        if let Some((at, asked, answer)) = &q.last {
            if fresh(at) && want.is_subset(asked) {
                return Ok(Arc::clone(answer));
            }
        }
        let all: std::collections::BTreeSet<String> = q.open.keys().cloned().chain(want).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        match queue(&refs) {
            Ok(answer) => {
                let answer = Arc::new(answer);
                q.failed = None;
                q.last = Some((Instant::now(), all, Arc::clone(&answer)));
                Ok(answer)
            }
            Err(e) => {
                q.failed = Some((Instant::now(), format!("{e:#}")));
                Err(e)
            }
        }
    }

    /// Jobs left by an earlier run for these requests: finished (adopt it),
    /// still queued (wait for it), or neither (None: submit anew). One
    /// squeue call for all of them, however many.
    fn earlier_jobs(&self, reqs: &[WorkerRequest]) -> Vec<Option<(JobDir, JobRecord, bool)>> {
        let recorded: Vec<Option<(JobDir, JobRecord, bool)>> = reqs
            .iter()
            .map(|req| {
                let dir = self.job_dir(req);
                let record: JobRecord = serde_json::from_slice(&std::fs::read(dir.job()).ok()?).ok()?;
                let finished = exit_code(&dir) == Some(0) && dir.out().is_dir();
                Some((dir, record, finished))
            })
            .collect();
        let open: Vec<&str> = recorded.iter().flatten().filter(|(_, _, finished)| !finished).map(|(_, r, _)| r.id.as_str()).collect();
        let queued = if open.is_empty() { BTreeMap::new() } else { queue(&open).unwrap_or_default() };
        recorded.into_iter().map(|r| r.filter(|(_, rec, finished)| *finished || queued.contains_key(&rec.id))).collect()
    }
}

impl Executor for Slurm {
    fn is_remote(&self) -> bool {
        true
    }

    fn run(&self, req: &WorkerRequest) -> Result<WorkerOutput> {
        self.run_batch(std::slice::from_ref(req), 1).pop().unwrap_or_else(|| Err(anyhow!("no result")))
    }

    fn detach(&self, req: &WorkerRequest, after: &[String]) -> Result<(String, PathBuf)> {
        self.submit_detached(req, after)
    }

    fn settle(&self) -> Result<()> {
        self.settle_detached()
    }

    fn detached_pending(&self) -> bool {
        self.has_detached()
    }

    fn has_job(&self, req: &WorkerRequest) -> bool {
        self.job_dir(req).job().is_file()
    }

    fn run_batch(&self, reqs: &[WorkerRequest], parallel: usize) -> Vec<Result<WorkerOutput>> {
        match self.run_all(reqs, parallel) {
            Ok(v) => v,
            Err(e) => {
                let msg = format!("{e:#}");
                reqs.iter().map(|_| Err(anyhow!("{msg}"))).collect()
            }
        }
    }
}

impl Slurm {
    fn run_all(&self, reqs: &[WorkerRequest], parallel: usize) -> Result<Vec<Result<WorkerOutput>>> {
        let (mut jobs, fresh) = self.adopt_or_prepare(reqs)?;
        if !fresh.is_empty() {
            let pairs: Vec<(&WorkerRequest, JobDir)> = fresh.iter().map(|(_, r, d)| (r, JobDir(d.0.clone()))).collect();
            let records = match self.submit_all(&pairs, parallel) {
                Ok(r) => r,
                Err(e) => {
                    // Nothing of this batch runs: leave no request folders behind.
                    for (_, _, dir) in &fresh {
                        std::fs::remove_dir_all(&dir.0).ok();
                    }
                    return Err(e);
                }
            };
            let arrays: std::collections::BTreeSet<&str> = records.iter().map(|r| array_id(&r.id)).collect();
            eprintln!("{}: submitted {} Slurm job(s) as array {}", reqs[0].label, records.len(), arrays.into_iter().collect::<Vec<_>>().join(", "));
            for ((i, req, dir), record) in fresh.into_iter().zip(records) {
                jobs[i] = Some((req.label.clone(), dir, record));
            }
        }
        let jobs: Vec<(String, JobDir, JobRecord)> = jobs.into_iter().map(|j| j.expect("every request has a job")).collect();
        let states = self.wait(&jobs)?;
        let logs: Vec<PathBuf> = jobs.iter().map(|(_, _, rec)| rec.log.clone()).collect();
        let results: Vec<Result<WorkerOutput>> = reqs.iter().zip(jobs.iter().zip(states)).map(|(req, ((label, dir, rec), state))| self.outcome(req, label, dir, rec, state)).collect();
        if results.iter().all(|r| r.is_ok()) {
            self.remove_old_batches(&reqs[0].label, &logs);
        }
        Ok(results)
    }

    /// Each request's job from an earlier run (adopted: finished or still
    /// queued), or a fresh folder for a new one: (jobs by request, fresh ones).
    #[allow(clippy::type_complexity)]
    fn adopt_or_prepare(&self, reqs: &[WorkerRequest]) -> Result<(Vec<Option<(String, JobDir, JobRecord)>>, Vec<(usize, WorkerRequest, JobDir)>)> {
        let mut jobs = Vec::new();
        let mut fresh = Vec::new();
        for (i, (req, earlier)) in reqs.iter().zip(self.earlier_jobs(reqs)).enumerate() {
            match earlier {
                Some((dir, record, finished)) => {
                    let how = if finished { "finished while liverseg was away; adopting it" } else { "still queued; waiting for it" };
                    eprintln!("{}: Slurm job {} of an earlier run {how}", req.label, record.id);
                    if !finished {
                        // Ours now: cancelled if this run dies, as its own jobs are.
                        self.reaper()?.as_mut().context("no job reaper")?.watch(&record.id)?;
                    }
                    jobs.push(Some((req.label.clone(), dir, record)));
                }
                None => {
                    let (job, dir) = self.prepare(req)?;
                    jobs.push(None);
                    fresh.push((i, job, dir));
                }
            }
        }
        Ok((jobs, fresh))
    }

    /// After a batch of `label` was collected in full: remove its earlier
    /// batch folders whose every request was collected too (no request
    /// folder left, so no job of theirs can still be waited for). The
    /// batches just used stay, with their logs, until the next success.
    fn remove_old_batches(&self, label: &str, logs: &[PathBuf]) {
        let keep: std::collections::BTreeSet<&Path> = logs.iter().filter_map(|l| l.parent()).collect();
        let Ok(entries) = std::fs::read_dir(self.root.join("batches")) else { return };
        for batch in entries.flatten().map(|e| e.path()) {
            let ours = std::fs::read_to_string(batch.join("label")).is_ok_and(|l| l == label);
            let is_plain_dir = std::fs::symlink_metadata(&batch).is_ok_and(|m| m.is_dir());
            if !ours || !is_plain_dir || keep.contains(batch.as_path()) {
                continue;
            }
            let Ok(list) = std::fs::read_to_string(batch.join("requests.txt")) else { continue };
            if list.lines().all(|dir| !Path::new(dir).exists()) {
                std::fs::remove_dir_all(&batch).ok();
            }
        }
    }

    fn outcome(&self, req: &WorkerRequest, label: &str, dir: &JobDir, rec: &JobRecord, state: State) -> Result<WorkerOutput> {
        match state {
            State::Exited(0) => self.collect(req, dir),
            State::Exited(rc) => bail!("{label}: Slurm job {} FAILED (exit code {rc}); last lines of {}:\n    {}", rec.id, rec.log.display(), tail(&rec.log, 15)),
            State::Ended(st) => bail!("{label}: Slurm job {} ended {st} without finishing; last lines of {}:\n    {}", rec.id, rec.log.display(), tail(&rec.log, 15)),
            State::Pending | State::Running => bail!("{label}: Slurm job {} still running", rec.id),
        }
    }
}

/// Cancels this run's jobs when the engine dies: a shell in its own process
/// group (so Ctrl-C does not reach it) reading a pipe from the engine; EOF
/// without a goodbye line means the engine is gone.
struct Reaper {
    child: Child,
}

impl Reaper {
    fn start(root: &Path) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
        let script = "jobs=''; while read -r line; do case $line in bye) exit 0;; *) jobs=\"$jobs $line\";; esac; done; [ -n \"$jobs\" ] && scancel $jobs 2>/dev/null; exit 0";
        let child =
            Command::new("bash").args(["-c", script]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0).spawn().context("cannot start the job reaper (bash)")?;
        std::fs::write(root.join("reaper.pid"), child.id().to_string()).ok();
        Ok(Reaper { child })
    }

    fn watch(&mut self, job: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("reaper has no stdin")?;
        writeln!(stdin, "{job}").context("cannot reach the job reaper")
    }
}

impl Drop for Reaper {
    /// A normal end: every job was waited for; the reaper leaves them be.
    fn drop(&mut self) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = writeln!(stdin, "bye");
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn job_script_paths_are_single_words_to_the_shell() {
        for path in ["/p'$(touch x)'/a b", "/100%/x", "/plain"] {
            let script = super::job_script(std::path::Path::new(path), std::path::Path::new(&format!("{path}/requests.txt")));
            let out = std::process::Command::new("bash").arg("-n").arg("-c").arg(&script).output().unwrap();
            assert!(out.status.success(), "{script}");
            let quoted = super::shell_quote(path);
            let echoed = std::process::Command::new("bash").arg("-c").arg(format!("printf %s {quoted}")).output().unwrap();
            assert_eq!(String::from_utf8_lossy(&echoed.stdout), path);
        }
    }

    use super::*;

    #[test]
    fn max_array_size_is_read_from_the_config() {
        let config = "Configuration data as of 2026-12-05T10:00:00\nMailProg                = /bin/mail\nMaxArraySize            = 1001\nMaxJobCount             = 10000\n";
        assert_eq!(parse_max_array_size(config), Some(1001));
        assert_eq!(parse_max_array_size("MaxArraySize = 4\n"), Some(4));
        assert_eq!(parse_max_array_size("MaxJobCount = 4\n"), None);
        assert_eq!(parse_max_array_size("MaxArraySize = lots\n"), None);
        assert_eq!(array_id("1234_56"), "1234");
    }

    fn request(label: &str, trial: bool) -> WorkerRequest {
        serde_json::from_value(serde_json::json!({
            "stage": "fit", "label": label, "trial": trial, "key": "k", "params": {}, "out_dir": "o", "scratch_dir": "s",
            "upstream": {}, "raw_files": [], "project_root": ".", "store_root": "artifacts", "show_progress": false, "summary_path": "x"
        }))
        .unwrap()
    }

    /// Built-in defaults per kind, then `default`, then the trial's or the stage's own.
    #[test]
    fn resources_layer_and_become_sbatch_flags() {
        let yaml = "default: {partition: gpu, mem: 32G, extra: [--qos=long]}\ntrial: {cpus: 4, gpus: 1}\nstages: {second_model: {gpus: 2, time: '2:00:00'}}";
        let c = SlurmConfig::parse(&serde_yaml::from_str(yaml).unwrap(), "slurm").unwrap();
        let trial = c.resources(&request("search", true)).sbatch_args();
        assert_eq!(trial, ["--partition=gpu", "--cpus-per-task=4", "--mem=32G", "--gres=gpu:1", "--time=4:00:00", "--qos=long"]);
        let stage = c.resources(&request("second_model", false)).sbatch_args();
        assert_eq!(stage, ["--partition=gpu", "--cpus-per-task=2", "--mem=32G", "--gres=gpu:2", "--time=2:00:00", "--qos=long"]);
        let err = SlurmConfig::parse(&serde_yaml::from_str("default: {cpu: 4}").unwrap(), "p.yaml: slurm").unwrap_err();
        assert!(format!("{err:#}").contains("unknown field `cpu`"), "{err:#}");
    }
}
