//! `run --detach`: submit what is left as chained cluster jobs and return.
//!
//! Stages the engine runs itself run first, where their upstreams allow (a
//! search waits for its trials here: its sampler needs each result). Every
//! worker stage after them goes as a job that the cluster starts once its
//! upstream jobs succeeded (`--dependency=afterok`); it reads their build
//! folders, which each job describes with a manifest of its own. Engine
//! stages after a job (a report) are left. Nothing enters the store until a
//! later `run` waits for the jobs and commits them, checked as any run's are.

use super::pipeline::ResolvedStage;
use super::runner::{Engine, Found, Planned};
use super::stage::Placement;
use super::store::{now_unix, utc_string, Artifact, Manifest};
use super::worker::WorkerRequest;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

#[derive(Debug, Default, serde::Serialize)]
pub struct DetachReport {
    /// Stages brought up to date here (reused, pulled or run).
    pub done: Vec<String>,
    /// Stages submitted: (stage, job id, the job ids it waits for).
    pub submitted: Vec<(String, String, Vec<String>)>,
    /// Engine stages after a submitted job: the collecting `run` runs them.
    pub left: Vec<String>,
}

/// A stage submitted by this detach: its job, and its build as its
/// dependents read it.
struct Submitted {
    job: String,
    build: Artifact,
}

impl Engine<'_> {
    /// Bring up here what needs no job, submit the rest as chained jobs,
    /// and return without waiting for them.
    pub fn run_detached(&self, target: Option<&str>) -> Result<DetachReport> {
        if !self.executor.is_remote() {
            bail!("run --detach submits stages as cluster jobs: it needs `executor: slurm` (or --executor slurm)");
        }
        let stages: Vec<&ResolvedStage> = match target {
            Some(t) => self.pipeline.ancestors_and_self(t)?,
            None => self.pipeline.stages.iter().collect(),
        };
        let planned = self.plan_for_run(&stages)?;
        let lock = self.store.lock()?;
        if self.executor.detached_pending() {
            bail!("the jobs of an earlier `run --detach` are not collected yet; `liverseg status` shows them and `liverseg run` waits for them and commits them");
        }
        let mut here: BTreeSet<&str> = BTreeSet::new();
        for s in &stages {
            let fresh = matches!(self.find(&s.name, &planned[&s.name].key)?, Found::Fresh(_));
            if fresh || (!self.goes_as_job(s)? && s.deps.iter().all(|d| here.contains(d.as_str()))) {
                here.insert(&s.name);
            }
        }
        let first: Vec<&ResolvedStage> = stages.iter().copied().filter(|s| here.contains(s.name.as_str())).collect();
        self.run_scheduled(&first, &planned, &lock)?;
        let mut report = DetachReport { done: first.iter().map(|s| s.name.clone()).collect(), ..Default::default() };
        let mut submitted: BTreeMap<String, Submitted> = BTreeMap::new();
        for s in stages.iter().filter(|s| !here.contains(s.name.as_str())) {
            let blocked = s.deps.iter().any(|d| !here.contains(d.as_str()) && !submitted.contains_key(d));
            if blocked || !self.goes_as_job(s)? {
                report.left.push(s.name.clone());
                continue;
            }
            let (req, after) = self.detached_request(s, &planned[&s.name], &submitted)?;
            let (job, out) = self.executor.detach(&req, &after).with_context(|| format!("cannot submit `{}`", s.name))?;
            let manifest = req.manifest.clone().context("a detached request carries its manifest")?;
            self.say(&format!("submitted {:<8} {}  (Slurm job {job}{})", s.name, planned[&s.name].key, if after.is_empty() { String::new() } else { format!(", after {}", after.join(", ")) }));
            report.submitted.push((s.name.clone(), job.clone(), after));
            let build = Artifact { stage: s.name.clone(), key: planned[&s.name].key.clone(), dir: out, manifest, manifest_blake3: String::new() };
            submitted.insert(s.name.clone(), Submitted { job, build });
        }
        Ok(report)
    }

    /// Whether `s` runs as a worker request (on a cluster, a job).
    fn goes_as_job(&self, s: &ResolvedStage) -> Result<bool> {
        let placement = self.stage_impl(&s.uses)?.info().placement;
        Ok(placement == Placement::Worker || self.pipeline.slurm.submit.contains(&s.name))
    }

    /// The request of a detached stage (its upstreams from the store or from
    /// the builds of jobs submitted before it), and the jobs it waits for.
    fn detached_request(&self, s: &ResolvedStage, p: &Planned, submitted: &BTreeMap<String, Submitted>) -> Result<(WorkerRequest, Vec<String>)> {
        let imp = self.stage_impl(&s.uses)?;
        let mut upstream = BTreeMap::new();
        let mut provisional = BTreeMap::new();
        let mut after = Vec::new();
        for (d, key) in &p.upstream {
            let name = s.upstream_name(d).to_owned();
            let dir = match submitted.get(d) {
                Some(sub) => {
                    after.push(sub.job.clone());
                    provisional.insert(name.clone(), key.clone());
                    sub.build.dir.clone()
                }
                None => match self.find(d, key)? {
                    Found::Fresh(a) => a.dir,
                    _ => bail!("upstream artifact {d}@{key} is not in the store"),
                },
            };
            upstream.insert(name, dir);
        }
        let placeholder: PathBuf = self.store.root.join(".tmp").join(format!("{}-{}-detached", s.name, p.key));
        let manifest = Manifest {
            stage: s.name.clone(),
            key: p.key.clone(),
            version: imp.info().version,
            params: serde_json::to_value(&s.params.keyed(imp.unkeyed_params()).0)?,
            effective_params: None,
            upstream: p.upstream.clone(),
            outputs: BTreeMap::new(),
            raw_inputs: Vec::new(),
            started_unix: now_unix(),
            finished_unix: 0.0,
            started_utc: utc_string(now_unix()),
            duration_s: 0.0,
            liverseg_version: env!("CARGO_PKG_VERSION").to_owned(),
            metrics: Default::default(),
            children: BTreeMap::new(),
        };
        let req = WorkerRequest {
            stage: imp.info().name.to_owned(),
            label: s.name.clone(),
            trial: false,
            key: p.key.clone(),
            params: s.params.0.clone(),
            summary_path: super::worker::beside(&placeholder, "summary.json"),
            out_dir: placeholder,
            scratch_dir: self.store.scratch_dir(&s.name, &p.key),
            upstream,
            raw_files: p.raw_files(),
            project_root: self.pipeline.root.clone(),
            store_root: self.store.root.clone(),
            show_progress: false,
            cpus: None,
            part: None,
            manifest: Some(manifest),
            provisional,
        };
        Ok((req, after))
    }
}
