//! Runs the DAG: computes stage keys, reuses complete artifacts, runs the rest.

use super::executor::{Executor, Local};
use super::hash::{stage_key, KeyInputs};
use super::params::Params;
use super::pipeline::{ExecutorKind, Pipeline, ResolvedStage};
use super::scan::{RawList, Scanner};
use super::stage::{Placement, RawFile, Stage, StageContext, StageInfo, WARNINGS};
use super::store::{now_unix, utc_string, Artifact, Depth, Manifest, Store};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::time::Instant;

/// Memory for raw input files kept between planning and running a stage.
const RAW_BYTES_BUDGET: u64 = 256 << 20;

/// Where a run may fetch a missing artifact instead of computing it
/// (`run --pull` with a remote cache).
pub trait RemoteCache: Send + Sync {
    /// Fetch stage@key into `store` if the remote has it; true when it did.
    fn fetch(&self, store: &Store, stage: &str, key: &str, lock: &super::store::StoreLock) -> Result<bool>;
}

pub struct Engine<'r> {
    pub pipeline: Pipeline,
    pub registry: &'r [Box<dyn Stage>],
    pub store: Store,
    pub show_progress: bool,
    /// Where worker-placed stages and trials run.
    pub executor: Box<dyn Executor>,
    /// Re-hash every file of every artifact a run reuses or reads
    /// (`run --verify`, or `verify_on_use: true` in pipeline.yaml).
    pub verify_on_use: bool,
    /// Raw inputs read while planning a run, for the stages that read them.
    raw_bytes: super::hash::RawBytes,
    /// `run --pull`: missing artifacts come from here when it has them.
    pub remote: Option<Box<dyn RemoteCache>>,
    /// Stages run at once (`run -j N`); None: as many as the machine's cores
    /// allow for the stages' declared threads (unbounded on a cluster).
    pub jobs: Option<usize>,
}

/// A stage's key for the current pipeline, and the raw files it covers.
#[derive(Debug, Clone)]
pub struct Planned {
    pub key: String,
    pub upstream: BTreeMap<String, String>,
    /// The raw files in the key (a source stage's), compactly.
    pub raw: std::sync::Arc<RawList>,
}

impl Planned {
    /// The raw files, one record each (for a stage about to run).
    pub fn raw_files(&self) -> Vec<RawFile> {
        self.raw.to_raw_files()
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct RunReport {
    pub ran: Vec<String>,
    pub reused: Vec<String>,
    /// Stages whose artifact was damaged and was set aside and rebuilt.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rebuilt_damaged: Vec<String>,
    /// Stages fetched from the remote cache (`run --pull`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pulled: Vec<String>,
}

/// How `run` brought a stage up to date.
pub(crate) enum Outcome {
    Reused,
    Pulled,
    Ran,
}

enum Limit {
    Stages(usize),
    Cores(usize),
}

/// Stages running and what they claim.
struct Slots {
    limit: Limit,
    /// What each stage claims while it runs: under `-j`, one job per part
    /// it runs at once; else cores, its declared threads times its parts at
    /// once, at most every core.
    cost: BTreeMap<String, usize>,
    running: usize,
    in_use: usize,
}

impl Slots {
    fn capacity(&self) -> usize {
        match self.limit {
            Limit::Stages(n) | Limit::Cores(n) => n,
        }
    }
    /// Whether `stage` may start now. Alone it always may.
    fn fits(&self, stage: &str) -> bool {
        self.running == 0 || self.in_use.saturating_add(self.cost[stage]) <= self.capacity()
    }
    fn take(&mut self, stage: &str) {
        self.running += 1;
        self.in_use += self.cost[stage];
    }
    fn give_back(&mut self, stage: &str) {
        self.running -= 1;
        self.in_use -= self.cost[stage];
    }
    /// Whether two stages may ever run at once.
    fn concurrent(&self) -> bool {
        let mut costs: Vec<usize> = self.cost.values().copied().collect();
        costs.sort_unstable();
        costs.len() > 1 && costs[0].saturating_add(costs[1]) <= self.capacity()
    }
}

/// How a stage with parts runs them: how many at once (1: the whole stage
/// in one request, part after part) and each part's threads when the stage
/// declares none.
struct PartPlan {
    parts: Vec<String>,
    at_once: usize,
    cpus: Option<usize>,
}

/// How often the scheduler says which stages are running while several
/// run at once: `LIVERSEG_PROGRESS_EVERY` seconds, else a minute.
fn progress_every() -> std::time::Duration {
    let secs = std::env::var("LIVERSEG_PROGRESS_EVERY").ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0 && s.is_finite()).unwrap_or(60.0);
    std::time::Duration::from_secs_f64(secs)
}

/// This machine's cores, as the scheduler shares them.
fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// An artifact as a run finds it.
pub enum Found {
    Fresh(Artifact),
    /// Present but not to be trusted: set aside and rebuilt, never used.
    Damaged(Artifact, Vec<super::store::Problem>),
    Missing,
}

impl<'r> Engine<'r> {
    pub fn new(pipeline: Pipeline, registry: &'r [Box<dyn Stage>]) -> Self {
        let store = Store::new(pipeline.root.join("artifacts"));
        let verify_on_use = pipeline.verify_on_use;
        Engine { pipeline, registry, store, show_progress: true, executor: Box::new(Local::new()), verify_on_use, raw_bytes: super::hash::RawBytes::new(RAW_BYTES_BUDGET), remote: None, jobs: None }
    }

    /// Run worker requests where `kind` says (the pipeline's `executor:` unless overridden).
    pub fn use_executor(&mut self, kind: ExecutorKind) -> Result<()> {
        self.executor = match kind {
            ExecutorKind::Local => Box::new(Local::new()),
            ExecutorKind::Slurm => Box::new(super::slurm::Slurm::new(self.pipeline.slurm.clone(), &self.store.root)?),
        };
        Ok(())
    }

    pub fn stage_impl(&self, name: &str) -> Result<&dyn Stage> {
        super::config::find(self.registry, name)
    }

    /// Keys of `stages` (which must be closed under deps), in topological order.
    pub fn plan(&self, stages: &[&ResolvedStage]) -> Result<BTreeMap<String, Planned>> {
        self.plan_keeping(stages, None)
    }

    /// `plan` for stages about to run: the raw files read are kept for them.
    pub(crate) fn plan_for_run(&self, stages: &[&ResolvedStage]) -> Result<BTreeMap<String, Planned>> {
        self.plan_keeping(stages, Some(&self.raw_bytes))
    }

    /// `plan`, keeping the raw files it reads in `keep` (when about to run).
    fn plan_keeping(&self, stages: &[&ResolvedStage], keep: Option<&super::hash::RawBytes>) -> Result<BTreeMap<String, Planned>> {
        let mut scanner = Scanner::open(self.store.scan_cache_file(), self.pipeline.raw_scan);
        let mut planned: BTreeMap<String, Planned> = BTreeMap::new();
        for s in stages {
            let imp = self.stage_impl(&s.uses)?;
            let sources = imp.raw_inputs(&s.params, &self.pipeline.root)?;
            let raw = if sources.is_empty() { RawList::default() } else { scanner.scan(&sources, self.show_progress, keep)? };
            let upstream: BTreeMap<String, String> =
                s.deps.iter().map(|d| planned.get(d).map(|p| (d.clone(), p.key.clone())).ok_or_else(|| anyhow!("internal: {d} planned after {}", s.name))).collect::<Result<_>>()?;
            let params_json = s.params.keyed(imp.unkeyed_params()).canonical_json();
            let key = stage_key(&KeyInputs { stage: &s.name, version: imp.info().version, params_json: &params_json, upstream: &upstream, raw_files: &raw });
            planned.insert(s.name.clone(), Planned { key, upstream, raw: std::sync::Arc::new(raw) });
        }
        // Hashing is the slow part of a no-op; keep what we learnt even if the run fails later.
        scanner.save()?;
        Ok(planned)
    }

    pub fn plan_all(&self) -> Result<BTreeMap<String, Planned>> {
        let all: Vec<&ResolvedStage> = self.pipeline.stages.iter().collect();
        self.plan(&all)
    }

    /// The artifact of (stage, key), checked before it is trusted.
    pub fn find(&self, stage: &str, key: &str) -> Result<Found> {
        let Some(a) = self.store.get(stage, key)? else {
            return Ok(Found::Missing);
        };
        let depth = if self.verify_on_use { Depth::Full } else { Depth::Quick };
        let problems = self.store.check(&a, depth);
        Ok(if problems.is_empty() { Found::Fresh(a) } else { Found::Damaged(a, problems) })
    }

    /// Run `target` (or every stage) and whatever it needs that is not in the store.
    pub fn run(&self, target: Option<&str>) -> Result<RunReport> {
        let stages: Vec<&ResolvedStage> = match target {
            Some(t) => self.pipeline.ancestors_and_self(t)?,
            None => self.pipeline.stages.iter().collect(),
        };
        let planned = self.plan_for_run(&stages)?;
        let mut report = RunReport::default();
        // Fast path: nothing to do needs no lock.
        let mut fresh = Vec::new();
        for s in &stages {
            if let Found::Fresh(a) = self.find(&s.name, &planned[&s.name].key)? {
                fresh.push(a);
            }
        }
        if fresh.len() == stages.len() {
            for (s, a) in stages.iter().zip(&fresh) {
                self.say_reused(a, "");
                report.reused.push(s.name.clone());
            }
            return Ok(report);
        }
        let lock = self.store.lock()?;
        self.executor.settle()?;
        let outcomes = self.run_scheduled(&stages, &planned, &lock)?;
        // In pipeline order, whatever order they finished in.
        for s in &stages {
            let (outcome, rebuilt) = &outcomes[&s.name];
            if *rebuilt {
                report.rebuilt_damaged.push(s.name.clone());
            }
            match outcome {
                Outcome::Reused => report.reused.push(s.name.clone()),
                Outcome::Pulled => report.pulled.push(s.name.clone()),
                Outcome::Ran => report.ran.push(s.name.clone()),
            }
        }
        Ok(report)
    }

    /// Run each stage once its upstreams are done, as many at once as
    /// `slots` allows; the lock, commit and lineage are as for one at a time.
    /// After a failure nothing new starts; running stages finish (and commit).
    pub(crate) fn run_scheduled(&self, stages: &[&ResolvedStage], planned: &BTreeMap<String, Planned>, lock: &super::store::StoreLock) -> Result<BTreeMap<String, (Outcome, bool)>> {
        let mut slots = self.slots(stages)?;
        self.executor.label_output(slots.concurrent());
        let mut waiting: Vec<&ResolvedStage> = stages.to_vec();
        let mut outcomes: BTreeMap<String, (Outcome, bool)> = BTreeMap::new();
        let mut failures: Vec<anyhow::Error> = Vec::new();
        let mut started: BTreeMap<String, Instant> = BTreeMap::new();
        std::thread::scope(|scope| {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let mut running = 0;
            loop {
                while failures.is_empty() {
                    let ready = waiting.iter().position(|s| s.deps.iter().all(|d| outcomes.contains_key(d)) && slots.fits(&s.name));
                    let Some(i) = ready else { break };
                    let s = waiting.remove(i);
                    slots.take(&s.name);
                    started.insert(s.name.clone(), Instant::now());
                    running += 1;
                    let done_tx = done_tx.clone();
                    scope.spawn(move || {
                        let result = self.bring_up(s, &planned[&s.name], lock);
                        let _ = done_tx.send((s, result));
                    });
                }
                if running == 0 {
                    break;
                }
                let (s, result) = loop {
                    match done_rx.recv_timeout(progress_every()) {
                        Ok(done) => break done,
                        Err(_) => self.say_running(&started, outcomes.len(), stages.len()),
                    }
                };
                started.remove(&s.name);
                running -= 1;
                slots.give_back(&s.name);
                match result {
                    Ok(o) => {
                        outcomes.insert(s.name.clone(), o);
                    }
                    Err(e) => failures.push(e),
                }
            }
        });
        let mut failures = failures.into_iter();
        match failures.next() {
            None => Ok(outcomes),
            Some(first) => {
                for other in failures {
                    eprintln!("error (also): {other:#}");
                }
                Err(first)
            }
        }
    }

    /// What may run at once: `jobs` jobs, or by default the stages'
    /// declared threads within this machine's cores (any number when worker
    /// stages go to a cluster).
    fn slots(&self, stages: &[&ResolvedStage]) -> Result<Slots> {
        let cores = cores();
        let mut cost = BTreeMap::new();
        for s in stages {
            let imp = self.stage_impl(&s.uses)?;
            let at_once = self.part_plan(imp, &s.params).at_once;
            let threads = imp.threads(&s.params);
            let claim = match self.jobs {
                Some(_) => at_once,
                None if threads == 0 => cores,
                None => threads.saturating_mul(at_once).min(cores),
            };
            cost.insert(s.name.clone(), if self.executor.is_remote() && self.jobs.is_none() { 1 } else { claim });
        }
        let limit = match self.jobs {
            Some(n) => Limit::Stages(n.max(1)),
            None if self.executor.is_remote() => Limit::Stages(usize::MAX),
            None => Limit::Cores(cores),
        };
        Ok(Slots { limit, cost, running: 0, in_use: 0 })
    }

    /// A stage's parts, and how many run at once: within `-j`; by default,
    /// as many as its declared threads fit in the cores (one at a time for
    /// a stage that takes every core); on a cluster, all of them.
    fn part_plan(&self, imp: &dyn Stage, params: &Params) -> PartPlan {
        let parts = imp.parts(params);
        if parts.len() < 2 {
            return PartPlan { parts, at_once: 1, cpus: None };
        }
        let (cores, threads, remote) = (cores(), imp.threads(params), self.executor.is_remote());
        let at_once = match self.jobs {
            Some(n) => n.max(1),
            None if remote => parts.len(),
            None if threads == 0 => 1,
            None => (cores / threads).max(1),
        }
        .min(parts.len());
        // A Slurm job's allocation decides its threads; locally, a share of the cores.
        let cpus = (threads == 0 && !remote).then(|| (cores / at_once).max(1));
        PartPlan { parts, at_once, cpus }
    }

    /// Bring one stage up to date under the lock: reuse it, set a damaged
    /// artifact aside (the bool) and rebuild it, pull it, or run it.
    fn bring_up(&self, s: &ResolvedStage, p: &Planned, lock: &super::store::StoreLock) -> Result<(Outcome, bool)> {
        let mut rebuilt = false;
        // Another process may have built it while we waited for the lock.
        match self.find(&s.name, &p.key)? {
            Found::Fresh(a) => {
                self.say_reused(&a, "");
                return Ok((Outcome::Reused, false));
            }
            Found::Damaged(a, problems) => {
                self.set_aside_damaged(&a, &problems, lock)?;
                rebuilt = true;
            }
            Found::Missing => {}
        }
        if let Some(remote) = &self.remote {
            if remote.fetch(&self.store, &s.name, &p.key, lock).with_context(|| format!("cannot pull {}@{}", s.name, p.key))? {
                self.say(&format!("pulled  {:<10} {}", s.name, p.key));
                return Ok((Outcome::Pulled, rebuilt));
            }
        }
        let secs = self.execute(s, p, lock)?;
        self.say(&format!("ran     {:<10} {}  ({secs:.1} s)", s.name, p.key));
        Ok((Outcome::Ran, rebuilt))
    }

    fn set_aside_damaged(&self, a: &Artifact, problems: &[super::store::Problem], lock: &super::store::StoreLock) -> Result<()> {
        let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let dest = self.store.set_aside(&a.dir, lock)?;
        eprintln!("damaged {}@{}: {}; moved to {} and rebuilding", a.stage, a.key, list.join("; "), dest.display());
        Ok(())
    }

    /// Rerun one stage from its cached upstream artifacts.
    pub fn run_one(&self, name: &str, force: bool) -> Result<RunReport> {
        let stages = self.pipeline.ancestors_and_self(name)?;
        let planned = self.plan_for_run(&stages)?;
        let s = *stages.last().expect("contains self");
        for d in &s.deps {
            let key = &planned[d].key;
            match self.find(d, key)? {
                Found::Fresh(_) => {}
                Found::Missing => bail!("upstream artifact {d}@{key} is missing; make it with `liverseg run {d}` (or `liverseg run {name}` to build everything {name} needs)"),
                Found::Damaged(_, problems) => {
                    let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
                    bail!("upstream artifact {d}@{key} is damaged ({}); `liverseg run {name}` rebuilds it", list.join("; "))
                }
            }
        }
        let p = &planned[name];
        let mut report = RunReport::default();
        let lock = self.store.lock()?;
        self.executor.settle()?;
        match self.find(name, &p.key)? {
            Found::Fresh(a) if !force => {
                self.say_reused(&a, "  (use --force to rerun)");
                report.reused.push(name.to_owned());
                return Ok(report);
            }
            Found::Damaged(a, problems) => self.set_aside_damaged(&a, &problems, &lock)?,
            _ => {}
        }
        let secs = self.execute(s, p, &lock)?;
        self.say(&format!("ran     {:<10} {}  ({secs:.1} s)", name, p.key));
        report.ran.push(name.to_owned());
        Ok(report)
    }

    fn execute(&self, s: &ResolvedStage, p: &Planned, lock: &super::store::StoreLock) -> Result<f64> {
        let imp = self.stage_impl(&s.uses)?;
        let mut upstream = BTreeMap::new();
        for (d, key) in &p.upstream {
            // Checked again just before use: what a stage reads is what the manifest says.
            let a = match self.find(d, key)? {
                Found::Fresh(a) => a,
                Found::Missing => bail!("upstream artifact {d}@{key} vanished from the store"),
                Found::Damaged(_, problems) => {
                    let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
                    bail!("upstream artifact {d}@{key} is damaged ({}); nothing was run", list.join("; "))
                }
            };
            upstream.insert(s.upstream_name(d).to_owned(), a);
        }
        let build = self.store.begin(&s.name, &p.key, lock)?;
        let raw_files = p.raw_files();
        let ctx = StageContext {
            stage: imp.info(),
            instance: &s.name,
            key: &p.key,
            params: &s.params,
            out_dir: &build,
            scratch_dir: self.store.scratch_dir(&s.name, &p.key),
            upstream,
            raw_files: &raw_files,
            raw_bytes: Some(&self.raw_bytes),
            project_root: &self.pipeline.root,
            show_progress: self.show_progress,
            store: &self.store,
            lock: Some(lock),
            executor: self.executor.as_ref(),
            children: Default::default(),
            effective_params: Default::default(),
            part: None,
        };
        self.say(&format!("running {:<10} {}", s.name, p.key));
        let started = now_unix();
        let t0 = Instant::now();
        // On a cluster, stages listed in `slurm.submit` go as jobs too.
        let submitted = self.executor.is_remote() && self.pipeline.slurm.submit.contains(&s.name);
        let placement = if submitted { Placement::Worker } else { imp.info().placement };
        let plan = self.part_plan(imp, &s.params);
        // A detached run submitted a stage with parts as one request: adopt it as that.
        let whole = plan.parts.len() > 1 && self.executor.has_job(&super::worker::WorkerRequest::for_stage(&ctx));
        let result = match placement {
            Placement::InProcess => imp.run(&ctx),
            Placement::Worker if whole => super::worker::run_in_worker(&ctx),
            Placement::Worker if plan.at_once > 1 || (self.executor.is_remote() && plan.parts.len() > 1) => super::worker::run_parts(&ctx, imp, &plan.parts, plan.at_once, plan.cpus),
            Placement::Worker => super::worker::run_in_worker(&ctx),
        };
        let result = result.and_then(|m| check_outputs(imp.info(), &build).map(|_| m));
        let secs = t0.elapsed().as_secs_f64();
        let metrics = match result {
            Ok(m) => m,
            Err(e) => {
                std::fs::remove_dir_all(&build).ok();
                return Err(e).with_context(|| format!("stage `{}` failed; nothing was written to the store", s.name));
            }
        };
        let manifest = Manifest {
            stage: s.name.clone(),
            key: p.key.clone(),
            version: imp.info().version,
            params: serde_json::to_value(&s.params.keyed(imp.unkeyed_params()).0)?,
            effective_params: ctx.effective().map(|e| serde_json::to_value(&e.0)).transpose()?,
            upstream: p.upstream.clone(),
            outputs: BTreeMap::new(),
            raw_inputs: raw_files.clone(),
            started_unix: started,
            finished_unix: now_unix(),
            started_utc: utc_string(started),
            duration_s: secs,
            liverseg_version: env!("CARGO_PKG_VERSION").to_owned(),
            metrics,
            children: ctx.children.into_inner().unwrap_or_else(|e| e.into_inner()),
        };
        self.store.commit(&build, manifest, lock)?;
        // Checkpoints of an interrupted run are no longer needed once the artifact exists.
        let scratch = self.store.scratch_dir(&s.name, &p.key);
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch).ok();
        }
        Ok(secs)
    }

    /// A line per running stage, while two or more run side by side (one
    /// alone shows its own progress).
    fn say_running(&self, started: &BTreeMap<String, Instant>, done: usize, all: usize) {
        if started.len() < 2 {
            return;
        }
        for (stage, t0) in started {
            let secs = t0.elapsed().as_secs();
            self.say(&format!("[{stage}] still running after {} min {:02} s ({done} of {all} stages done)", secs / 60, secs % 60));
        }
    }

    pub(crate) fn say(&self, line: &str) {
        if self.show_progress {
            eprintln!("{line}");
        }
    }

    /// A reused artifact, and the warnings its run gave (a summary's
    /// `warnings`), which hold for it as long as it is reused, as cargo
    /// replays a cached crate's warnings.
    fn say_reused(&self, a: &Artifact, note: &str) {
        self.say(&format!("reused  {:<10} {}{note}", a.stage, a.key));
        for w in a.manifest.metrics.get(WARNINGS).and_then(|v| v.as_array()).into_iter().flatten().filter_map(|w| w.as_str()) {
            eprintln!("warning: {w} (from the run of {}@{})", a.stage, a.key);
        }
    }

    /// The current artifact of a stage, or an error saying how to make it.
    pub fn current_artifact(&self, name: &str) -> Result<Artifact> {
        let stages = self.pipeline.ancestors_and_self(name)?;
        let planned = self.plan(&stages)?;
        let key = &planned[name].key;
        match self.find(name, key)? {
            Found::Fresh(a) => Ok(a),
            Found::Missing => bail!("no artifact of `{name}` for the current pipeline (key {key}); make it with `liverseg run {name}`"),
            Found::Damaged(_, problems) => {
                let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
                bail!("the artifact of `{name}` ({key}) is damaged ({}); `liverseg run {name}` rebuilds it", list.join("; "))
            }
        }
    }
}

/// Every output the stage declares is in its build (`?`: only when written).
fn check_outputs(info: &StageInfo, build: &std::path::Path) -> Result<()> {
    for out in info.outputs {
        if out.ends_with('?') {
            continue;
        }
        let present = match out.strip_suffix('/') {
            Some(dir) => build.join(dir).is_dir(),
            None => build.join(out).is_file(),
        };
        if !present {
            bail!("stage `{}` declares output `{out}` but did not write it", info.name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(limit: Limit, costs: &[(&str, usize)]) -> Slots {
        Slots { limit, cost: costs.iter().map(|(n, c)| (n.to_string(), *c)).collect(), running: 0, in_use: 0 }
    }

    #[test]
    fn stages_share_the_cores_by_their_declared_threads() {
        let mut s = slots(Limit::Cores(2), &[("a", 1), ("b", 1), ("all", 2)]);
        assert!(s.concurrent());
        s.take("a");
        assert!(s.fits("b") && !s.fits("all"), "one core left: a 1-thread stage fits, an every-core one waits");
        s.take("b");
        assert!(!s.fits("a"));
        s.give_back("a");
        s.give_back("b");
        assert!(s.fits("all"), "alone, any stage may start");
        s.take("all");
        assert!(!s.fits("a"));
        assert!(!slots(Limit::Cores(2), &[("x", 2), ("y", 1)]).concurrent(), "no two fit side by side: worker output stays unlabelled");
    }

    #[test]
    fn jobs_count_parts_at_once_whatever_their_threads() {
        let mut s = slots(Limit::Stages(2), &[("a", 1), ("b", 1), ("c", 1), ("folds", 2)]);
        s.take("a");
        assert!(s.fits("b") && !s.fits("folds"), "two folds at once take both jobs");
        s.take("b");
        assert!(!s.fits("c"));
        s.give_back("a");
        s.give_back("b");
        s.take("folds");
        assert!(!s.fits("a"));
        assert!(!slots(Limit::Stages(1), &[("a", 1), ("b", 1)]).concurrent());
    }
}
