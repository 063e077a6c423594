//! The worker protocol. A stage placed in the worker runs as `liverseg-torch
//! stage REQUEST.json`: the request names the stage, its key, params, build
//! folder and upstream artifacts; the worker writes the stage's summary
//! beside the build folder. The same file is what a cluster job runs.

use super::executor::{Executor, Local};
use super::params::Params;
use super::stage::{RawFile, Stage, StageContext, StageInfo, Summary};
use super::store::{now_unix, utc_string, Artifact, Manifest, Store};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize, Clone)]
pub struct WorkerRequest {
    pub stage: String,
    /// The stage's name in pipeline.yaml (an instance such as `baseline`),
    /// for job names and per-stage cluster resources.
    #[serde(default)]
    pub label: String,
    /// A search trial (cluster jobs take the trial resources).
    #[serde(default)]
    pub trial: bool,
    pub key: String,
    pub params: BTreeMap<String, serde_json::Value>,
    pub out_dir: PathBuf,
    pub scratch_dir: PathBuf,
    pub upstream: BTreeMap<String, PathBuf>,
    pub raw_files: Vec<RawFile>,
    pub project_root: PathBuf,
    /// The artifact store the upstream artifacts live in.
    pub store_root: PathBuf,
    pub show_progress: bool,
    /// Where the worker writes the stage's summary metrics (JSON).
    pub summary_path: PathBuf,
    /// CPU threads for a stage that declares none (`threads: 0`) when it
    /// shares this machine with siblings (parallel trials). A Slurm job's
    /// allocation wins over it; never part of a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<usize>,
    /// Which of the stage's parts this request builds, alone, into `out_dir`
    /// (None: the whole stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<usize>,
    /// A detached job's manifest, less what its run gives (outputs, metrics,
    /// times): the worker completes it into its build folder, so that the
    /// jobs after it read that build as an artifact before any commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
    /// Upstreams that are such builds, by name, with the key each must
    /// have: no index vouches for them, so every file is re-hashed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provisional: BTreeMap<String, String>,
}

/// Set by the local executor from `WorkerRequest::cpus`.
pub const CPUS_ENV: &str = "LIVERSEG_CPUS";

/// CPU threads for a worker whose stage declares none: the Slurm job's
/// allocation (`SLURM_CPUS_PER_TASK`, else the CPUs the job may run on),
/// else the share the engine gave (`LIVERSEG_CPUS`); None: libtorch's default.
/// Never the engine host's core count, which says nothing about a job's node.
pub fn allocated_threads() -> Option<usize> {
    let from_env = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<usize>().ok()).filter(|&n| n > 0);
    if let Some(n) = from_env("SLURM_CPUS_PER_TASK") {
        return Some(n);
    }
    if std::env::var_os("SLURM_JOB_ID").is_some() {
        return std::thread::available_parallelism().ok().map(|n| n.get());
    }
    from_env(CPUS_ENV)
}

impl WorkerRequest {
    /// The request for `ctx`'s stage, building into `ctx.out_dir`.
    pub fn for_stage(ctx: &StageContext) -> Self {
        WorkerRequest {
            stage: ctx.stage.name.to_owned(),
            label: ctx.instance.to_owned(),
            trial: false,
            key: ctx.key.to_owned(),
            params: ctx.params.0.clone(),
            out_dir: ctx.out_dir.to_path_buf(),
            scratch_dir: ctx.scratch_dir.clone(),
            upstream: ctx.upstream.iter().map(|(k, a)| (k.clone(), a.dir.clone())).collect(),
            raw_files: ctx.raw_files.to_vec(),
            project_root: ctx.project_root.to_path_buf(),
            store_root: ctx.store.root.clone(),
            show_progress: ctx.show_progress,
            summary_path: beside(ctx.out_dir, "summary.json"),
            cpus: None,
            part: ctx.part,
            manifest: None,
            provisional: BTreeMap::new(),
        }
    }

    /// Write the request beside its build folder; returns the file.
    pub fn write(&self) -> Result<PathBuf> {
        let path = beside(&self.out_dir, "request.json");
        std::fs::write(&path, serde_json::to_vec_pretty(self)?).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// What the worker wrote (and remove it).
    pub fn take_output(&self) -> Result<WorkerOutput> {
        let bytes = std::fs::read(&self.summary_path).with_context(|| format!("worker wrote no summary at {}", self.summary_path.display()))?;
        std::fs::remove_file(&self.summary_path).ok();
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not a worker summary", self.summary_path.display()))
    }
}

/// `dir.SUFFIX` beside the build folder `dir`. Not `with_extension`, which
/// cuts at the name's last dot: every build of `tune.train+trial-KEY-PID`
/// would share `tune.request.json`.
pub fn beside(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.as_os_str().to_os_string();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// What a worker hands back: the stage's summary, and the params it
/// actually used when they differ from the request's.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct WorkerOutput {
    pub summary: Summary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_params: Option<BTreeMap<String, serde_json::Value>>,
}

/// Run `ctx`'s stage in a worker through the pipeline's executor.
pub fn run_in_worker(ctx: &StageContext) -> Result<Summary> {
    let out = ctx.executor.run(&WorkerRequest::for_stage(ctx))?;
    if let Some(p) = out.effective_params {
        ctx.record_effective_params(Params(p));
    }
    Ok(out.summary)
}

/// Run `stage`'s parts (folders of `ctx`'s build) as requests of their own,
/// `at_once` at a time (on a cluster, one array), each part's threads
/// `cpus` when the stage declares none; then assemble them here. Every part
/// runs even when one fails, and each distinct error is named once.
pub fn run_parts(ctx: &StageContext, stage: &dyn Stage, parts: &[String], at_once: usize, cpus: Option<usize>) -> Result<Summary> {
    let mut reqs = Vec::with_capacity(parts.len());
    for (k, folder) in parts.iter().enumerate() {
        let out_dir = ctx.out_dir.join(folder);
        std::fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
        let mut req = WorkerRequest::for_stage(ctx);
        req.summary_path = beside(&out_dir, "summary.json");
        req.scratch_dir = ctx.scratch_dir.join(folder);
        req.out_dir = out_dir;
        req.part = Some(k);
        req.cpus = cpus;
        reqs.push(req);
    }
    if at_once > 1 {
        ctx.executor.label_output(true);
    }
    let mut summaries = Vec::with_capacity(parts.len());
    let mut failed: Vec<(String, String)> = Vec::new();
    for (folder, result) in parts.iter().zip(ctx.executor.run_batch(&reqs, at_once)) {
        match result {
            Ok(out) => {
                if let (Some(p), None) = (out.effective_params, ctx.effective()) {
                    ctx.record_effective_params(Params(p));
                }
                summaries.push(out.summary);
            }
            Err(e) => failed.push((folder.clone(), format!("{e:#}"))),
        }
    }
    if !failed.is_empty() {
        let n = failed.len();
        let lines: Vec<String> = group_errors(failed).into_iter().map(|(err, which)| format!("{}: {err}", which.join(", "))).collect();
        anyhow::bail!("{n} of {} part(s) of `{}` failed:\n  {}", parts.len(), ctx.instance, lines.join("\n  "));
    }
    stage.assemble(ctx, summaries)
}

/// Failures of independent requests (parts, trials) as (error, who failed
/// with it), each distinct error once, in the order first seen: a batch the
/// cluster refused fails every request alike, which a line each would bury.
pub fn group_errors(failed: Vec<(String, String)>) -> Vec<(String, Vec<String>)> {
    let mut by_error: Vec<(String, Vec<String>)> = Vec::new();
    for (who, error) in failed {
        match by_error.iter_mut().find(|(e, _)| *e == error) {
            Some((_, list)) => list.push(who),
            None => by_error.push((error, vec![who])),
        }
    }
    by_error
}

/// Worker side: rebuild the context from a request.
pub struct WorkerJob {
    pub req: WorkerRequest,
    pub params: Params,
    pub upstream: BTreeMap<String, Artifact>,
    store: Store,
    started: f64,
}

impl WorkerJob {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let req: WorkerRequest = serde_json::from_slice(&bytes).with_context(|| format!("{}: not a worker request", path.display()))?;
        let store = Store::new(req.store_root.clone());
        let mut upstream = BTreeMap::new();
        for (name, dir) in &req.upstream {
            // Checked here too: a job may start long after the engine looked.
            let a = Artifact::load(dir)?;
            let problems = match req.provisional.get(name) {
                Some(key) => super::store::check_build(&a, key),
                None => store.check(&a, super::store::Depth::Quick),
            };
            if !problems.is_empty() {
                let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
                anyhow::bail!("upstream artifact {}@{} is damaged ({}); nothing was run", a.stage, a.key, list.join("; "));
            }
            upstream.insert(name.clone(), a);
        }
        Ok(WorkerJob { params: Params(req.params.clone()), upstream, store, req, started: now_unix() })
    }

    pub fn context<'a>(&'a self, stage: &'static StageInfo) -> StageContext<'a> {
        static LOCAL: Local = Local::new();
        StageContext {
            stage,
            instance: if self.req.label.is_empty() { stage.name } else { &self.req.label },
            key: &self.req.key,
            params: &self.params,
            out_dir: &self.req.out_dir,
            scratch_dir: self.req.scratch_dir.clone(),
            upstream: self.upstream.clone(),
            raw_files: &self.req.raw_files,
            raw_bytes: None,
            project_root: &self.req.project_root,
            show_progress: self.req.show_progress,
            store: &self.store,
            lock: None,
            executor: &LOCAL as &dyn Executor,
            children: Default::default(),
            effective_params: Default::default(),
            part: self.req.part,
        }
    }

    /// Hand the stage's summary (and effective params) back to the engine;
    /// a detached job first describes its build with its manifest.
    pub fn finish(&self, ctx: &StageContext, summary: Summary) -> Result<()> {
        if let Some(template) = &self.req.manifest {
            self.write_manifest(template.clone(), ctx, &summary)?;
        }
        let out = WorkerOutput { summary, effective_params: ctx.effective().map(|p| p.0) };
        std::fs::write(&self.req.summary_path, serde_json::to_vec(&out)?).with_context(|| format!("cannot write {}", self.req.summary_path.display()))
    }

    /// The manifest the engine would write, into the build: the jobs after
    /// this one check the build against it. The engine's commit replaces it.
    fn write_manifest(&self, mut m: Manifest, ctx: &StageContext, summary: &Summary) -> Result<()> {
        m.effective_params = ctx.effective().map(|p| serde_json::to_value(&p.0)).transpose()?;
        m.metrics = summary.clone();
        m.started_unix = self.started;
        m.started_utc = utc_string(self.started);
        m.finished_unix = now_unix();
        m.duration_s = m.finished_unix - self.started;
        m.outputs = super::store::hash_tree(&self.req.out_dir, super::hash::hash_file)?;
        let path = self.req.out_dir.join(super::store::MANIFEST);
        std::fs::write(&path, serde_json::to_vec_pretty(&m)?).with_context(|| format!("cannot write {}", path.display()))
    }
}
