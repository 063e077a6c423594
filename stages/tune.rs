//! tune: random search and Bayesian optimisation (TPE) over learning rate,
//! batch size, optimizer, weight decay and loss. Each trial is a short
//! training run in its own worker process (`liverseg-torch stage`), stored
//! as a sub-artifact under its own content key (`artifacts/tune.train+trial/`
//! for the instance tune.train), so rerunning a study reuses finished trials,
//! raising the budget runs only the new ones, and a killed study resumes.
//! Trials read only the train and validation splits.
//!
//! inputs: normalise, split, augment
//! outputs: trials.parquet, best.json, read downstream through [`TuneBest`].

use crate::train::TrainParams;
use anyhow::{bail, Context, Result};
use liverseg_engine::params::Params;
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_engine::store::Artifact;
use liverseg_engine::tables::{read_parquet, write_parquet};
use liverseg_engine::worker::WorkerRequest;
use liverseg_recipe::{choices, Arch, Encoder, Objective};
use liverseg_search::{sampler, Point, Sampler, Space};
use polars::prelude::{Column, DataFrame};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// 2: pruning as Optuna's MedianPruner, typed trial columns, trial subsets across patients, arch.
/// 3: trials train from smp's initialisation (train's version 5).
/// 4: `batch` (points asked before results are told) is the search's, and
/// in the key; `parallel` only says how many of them run at once.
pub const VERSION: u32 = 4;
/// 2: the train stage's version 2 (no time budget, spread subsets, per-epoch medians).
/// 3: smp's initialisation (train's version 5).
/// 4: the card holds the inputs' intensity histogram (train's version 7).
const TRIAL_VERSION: u32 = 4;

choices!(
    /// Whether and how trials are stopped early.
    Prune { Median = "median", None = "none" }
);

liverseg_engine::params! {
    pub struct TuneParams {
        strategies: Vec<String> = strs "[random, bayes]", "search strategies, each run with the same budget: random, bayes (TPE), gp (Gaussian process, expected improvement)";
        budget: usize = int "8", "trials per strategy";
        seed: u64 = int "0", "search seed";
        startup: usize = int "3", "bayes, gp: random trials before the model takes over (must be below budget)";
        arch: Arch = choice "deeplabv3plus", "architecture trained in trials (tune one per model: its best params feed that model)";
        space: Value = any "{lr: {log_uniform: [1.0e-4, 1.0e-2]}, batch_size: {choice: [8, 16]}, optimizer: {choice: [adam, adamw, sgd, rmsprop]}, weight_decay: {log_uniform: [1.0e-6, 1.0e-3]}, loss: {choice: [ce, dice, ce_dice]}}",
            "search space: name -> {log_uniform|uniform: [low, high]} or {choice: [...]}";
        objective: Objective = choice "val_dice", "maximise validation Dice, or minimise validation loss (only comparable when every trial uses the same loss)";
        trial_epochs: i64 = int "2", "epochs per trial (the cheap trial setting)";
        trial_max_slices: i64 = int "64", "training slices per trial (0 = all)";
        trial_encoder: Encoder = choice "resnet34", "encoder trained in trials";
        prune: Prune = choice "median", "stop a trial worse than the median of completed trials at the same epoch (Optuna's MedianPruner)";
        prune_startup: usize = int "2", "completed trials before pruning starts (n_startup_trials)";
        prune_warmup: i64 = int "0", "epochs a trial runs before it can be pruned (n_warmup_steps)";
        batch: usize = int "1", "points the sampler proposes before it is told their results (also pruning's reference: the trials completed before the batch); part of the search, so of the key";
        parallel: usize = int "1", "trials of a batch run at once (each a worker process; under Slurm one array); not in the key: it changes when trials run, not which";
        threads: i64 = int "0", "CPU threads per trial (0 = the Slurm job's allocation, else cores / parallel; the count used is then not in the key)";
    }
}

pub static INFO: StageInfo = StageInfo {
    name: "tune",
    version: VERSION,
    about: "random search and Bayesian optimisation of training hyperparameters",
    inputs: &["normalise", "split", "augment"],
    optional_inputs: &[],
    collects: &[],
    per_dataset: false,
    dataset_requires: &[],
    outputs: &["trials.parquet", "best.json"],
    params: TuneParams::SPECS,
    placement: Placement::InProcess,
};

pub struct Tune;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialResult {
    pub key: String,
    pub point: Point,
    /// Objective (lower is better) after each epoch run.
    pub curve: Vec<f64>,
    pub best: f64,
    pub pruned: bool,
    pub seconds: f64,
}

/// tune's output as train reads it (best.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TuneBest {
    pub objective: String,
    /// Value as reported: validation loss, or validation Dice (higher is better).
    pub value: f64,
    pub strategy: String,
    pub trial: usize,
    pub params: Point,
    pub per_strategy: BTreeMap<String, (f64, Point)>,
}

impl TuneBest {
    pub fn read(a: &Artifact) -> Result<Self> {
        let path = a.file("best.json");
        let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not a tune result", path.display()))
    }
}

impl TuneParams {
    fn space(&self) -> Result<Space> {
        let space = Space::parse(&self.space)?;
        for name in space.0.keys() {
            if !TrainParams::SPECS.iter().any(|s| s.name == name) {
                bail!("tune.space.{name}: the train stage has no parameter `{name}`");
            }
        }
        Ok(space)
    }

    /// CPU threads a local trial gets when `threads` is 0: this machine's
    /// share per trial. Not in the trial's params (its key): under Slurm the
    /// job's allocation decides instead.
    fn trial_cpus(&self) -> Option<usize> {
        (self.threads == 0).then(|| (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) / self.at_once()).max(1))
    }

    /// Trials running at once: a batch's, up to `parallel`.
    fn at_once(&self) -> usize {
        self.parallel.min(self.batch).max(1)
    }
}

impl Stage for Tune {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    /// Its trials' threads: `at_once` trials, each with `threads`.
    fn threads(&self, params: &Params) -> usize {
        params.typed::<TuneParams>().map_or(0, |p| if p.threads > 0 { p.threads as usize * p.at_once() } else { 0 })
    }

    fn unkeyed_params(&self) -> &'static [&'static str] {
        &["parallel"]
    }

    fn check(&self, params: &Params) -> Result<()> {
        let p: TuneParams = params.typed()?;
        let space = p.space()?;
        if p.strategies.is_empty() {
            bail!("tune.strategies: empty");
        }
        if p.budget == 0 || p.parallel == 0 || p.batch == 0 {
            bail!("tune.budget, tune.batch and tune.parallel must be at least 1");
        }
        if p.threads < 0 {
            bail!("tune.threads must be 0 (the allocation) or a positive count, got {}", p.threads);
        }
        if p.trial_epochs < 1 {
            bail!("tune.trial_epochs must be at least 1");
        }
        for s in &p.strategies {
            sampler(s, space.clone(), p.seed, p.startup)?;
            if s != "random" && p.budget <= p.startup {
                bail!("tune.budget ({}) must exceed tune.startup ({}), or the `{s}` strategy never gets a trial of its own (every trial would be a random start-up trial)", p.budget, p.startup);
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p: TuneParams = ctx.params.typed()?;
        let study = Study { ctx, p: &p, space: p.space()?, upstream: ctx.upstream.iter().map(|(k, a)| (k.clone(), a.key.clone())).collect() };
        let mut rows: Vec<(String, usize, TrialResult)> = Vec::new();
        let (mut ran, mut reused) = (0usize, 0usize);
        for strategy in &p.strategies {
            let (trials, r, u) = study.search(strategy)?;
            rows.extend(trials.into_iter().enumerate().map(|(i, t)| (strategy.clone(), i, t)));
            ran += r;
            reused += u;
        }
        let best = best_of(&rows, &p)?;
        let best_path = ctx.out("best.json");
        std::fs::write(&best_path, serde_json::to_vec_pretty(&best)?).with_context(|| format!("cannot write {}", best_path.display()))?;
        write_trials(ctx, &rows, &study.space, p.objective)?;
        let mut summary = Summary::new();
        summary.insert("best_value".into(), json!(best.value));
        summary.insert("best_strategy".into(), best.strategy.clone().into());
        summary.insert("trials".into(), rows.len().into());
        summary.insert("trials_run".into(), ran.into());
        summary.insert("trials_reused".into(), reused.into());
        summary.insert("trials_pruned".into(), rows.iter().filter(|r| r.2.pruned).count().into());
        for (st, (v, _)) in &best.per_strategy {
            summary.insert(format!("{st}.best_value"), json!(v));
        }
        Ok(summary)
    }
}

/// Failed trials (key, error), each distinct error once.
fn failure_report(failed: Vec<(String, String)>) -> String {
    let lines: Vec<String> = liverseg_engine::worker::group_errors(failed)
        .into_iter()
        .map(|(error, keys)| match keys.len() {
            1 => format!("trial {} failed: {error}", keys[0]),
            n => format!("{n} trials ({}{}) failed: {error}", keys[..n.min(3)].join(", "), if n > 3 { ", ..." } else { "" }),
        })
        .collect();
    lines.join("\n  ")
}

/// One study: the search of each strategy over the space, trials cached.
struct Study<'a> {
    ctx: &'a StageContext<'a>,
    p: &'a TuneParams,
    space: Space,
    upstream: BTreeMap<String, String>,
}

impl Study<'_> {
    /// Run one strategy's budget; returns its trials in order, and how many
    /// ran and were reused.
    fn search(&self, strategy: &str) -> Result<(Vec<TrialResult>, usize, usize)> {
        let p = self.p;
        let mut s: Box<dyn Sampler> = sampler(strategy, self.space.clone(), p.seed, p.startup)?;
        let mut done: Vec<TrialResult> = Vec::new();
        let (mut ran, mut reused) = (0, 0);
        while done.len() < p.budget {
            let batch: Vec<Point> = (0..p.batch.min(p.budget - done.len())).map(|_| s.ask()).collect();
            let prune = self.prune_medians(&done);
            for (t, pt) in self.run_batch(&batch, prune)?.into_iter().zip(batch) {
                let (t, cached) = t;
                if cached {
                    reused += 1
                } else {
                    ran += 1
                }
                if self.ctx.show_progress {
                    eprintln!(
                        "{} {strategy} trial {}: {} {:.4}{}{}  {}",
                        self.ctx.instance,
                        done.len(),
                        p.objective,
                        p.objective.reported(t.best),
                        if t.pruned { " (pruned)" } else { "" },
                        if cached { " (cached)" } else { "" },
                        serde_json::to_string(&pt)?
                    );
                }
                s.tell(pt, t.best);
                done.push(t);
            }
        }
        Ok((done, ran, reused))
    }

    /// Optuna's MedianPruner: the median objective of the trials completed
    /// (not pruned) before this batch, after each epoch; none until
    /// `prune_startup` trials have completed.
    fn prune_medians(&self, done: &[TrialResult]) -> Vec<f64> {
        let completed: Vec<&TrialResult> = done.iter().filter(|t| !t.pruned).collect();
        if self.p.prune != Prune::Median || completed.len() < self.p.prune_startup.max(1) {
            return Vec::new();
        }
        // Epochs some completed trial reached (one stopped early has a shorter curve).
        (0..self.p.trial_epochs as usize)
            .map_while(|e| {
                let mut at_e: Vec<f64> = completed.iter().filter_map(|t| t.curve.get(e).copied()).collect();
                median(&mut at_e)
            })
            .collect()
    }

    /// The train-stage params of one trial.
    fn trial_params(&self, point: &Point, prune: &[f64]) -> Result<Params> {
        let p = self.p;
        let mut tp = liverseg_engine::config::defaults("train", TrainParams::SPECS.iter())?;
        tp.0.insert("arch".into(), json!(p.arch));
        tp.0.insert("encoder".into(), json!(p.trial_encoder));
        tp.0.insert("epochs".into(), p.trial_epochs.into());
        tp.0.insert("max_train_slices".into(), p.trial_max_slices.into());
        tp.0.insert("seed".into(), p.seed.into());
        tp.0.insert("threads".into(), p.threads.into());
        tp.0.insert("device".into(), "auto".into());
        tp.0.insert("save_model".into(), false.into());
        tp.0.insert("prune_metric".into(), json!(p.objective));
        tp.0.insert("prune_warmup".into(), p.prune_warmup.into());
        // As reported (Dice as Dice); the trial turns them back into its minimised sense.
        tp.0.insert("prune_medians".into(), json!(prune.iter().map(|m| p.objective.reported(*m)).collect::<Vec<f64>>()));
        for (k, v) in point {
            // Choices come back as YAML values; integers stay integers.
            tp.0.insert(k.clone(), v.clone());
        }
        Ok(tp)
    }

    /// Run the trials of one batch (cached ones are reused); returns (result, cached) each.
    fn run_batch(&self, batch: &[Point], prune: Vec<f64>) -> Result<Vec<(TrialResult, bool)>> {
        let ctx = self.ctx;
        let trials = ctx.sub_artifacts("trial")?;
        let mut out: Vec<Option<(TrialResult, bool)>> = Vec::new();
        let mut todo = Vec::new();
        for pt in batch {
            let params = self.trial_params(pt, &prune)?;
            let key = trials.key(TRIAL_VERSION, &params, &self.upstream);
            match trials.get(&key)? {
                Some(a) => out.push(Some((read_result(&a)?, true))),
                None => {
                    out.push(None);
                    todo.push((out.len() - 1, key, params, pt.clone()));
                }
            }
        }
        let mut reqs = Vec::new();
        for (_, key, params, _) in &todo {
            let build = trials.begin(key)?;
            reqs.push(WorkerRequest {
                stage: "train".into(),
                label: ctx.instance.to_owned(),
                trial: true,
                key: key.clone(),
                params: params.0.clone(),
                summary_path: liverseg_engine::worker::beside(&build, "summary.json"),
                out_dir: build,
                scratch_dir: trials.scratch_dir(key),
                upstream: ctx.upstream.iter().map(|(k, a)| (k.clone(), a.dir.clone())).collect(),
                raw_files: Vec::new(),
                project_root: ctx.project_root.to_path_buf(),
                store_root: ctx.store.root.clone(),
                show_progress: false,
                cpus: self.p.trial_cpus(),
                part: None,
                manifest: None,
                provisional: Default::default(),
            });
        }
        let started = liverseg_engine::store::now_unix();
        let results = ctx.executor.run_batch(&reqs, self.p.parallel);
        // Every trial that finished is committed before a failed one stops
        // the study, so a rerun runs only the failed ones.
        let mut failed = Vec::new();
        for ((slot, key, params, point), (req, summary)) in todo.into_iter().zip(reqs.iter().zip(results)) {
            let summary = match summary {
                Ok(s) => s.summary,
                Err(e) => {
                    failed.push((key, format!("{e:#}")));
                    continue;
                }
            };
            let result = trial_result(&req.out_dir, &key, point, &summary, self.p.objective)?;
            let result_path = req.out_dir.join("result.json");
            std::fs::write(&result_path, serde_json::to_vec_pretty(&result)?).with_context(|| format!("cannot write {}", result_path.display()))?;
            trials.commit(&req.out_dir, &key, TRIAL_VERSION, &params, self.upstream.clone(), summary, started)?;
            out[slot] = Some((result, false));
        }
        if !failed.is_empty() {
            bail!("{} of {} trial(s) failed; the others are kept for the next run:\n  {}", failed.len(), reqs.len(), failure_report(failed));
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// A finished trial's result, from the metrics its training wrote.
fn trial_result(dir: &std::path::Path, key: &str, point: Point, summary: &Summary, objective: Objective) -> Result<TrialResult> {
    let metrics = read_parquet(&dir.join("metrics.parquet"))?;
    let col = |c: &str| -> Result<Vec<f64>> { Ok(metrics.column(c)?.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect()) };
    let (dice, loss) = (col("val_dice")?, col("val_loss")?);
    let curve: Vec<f64> = dice.iter().zip(&loss).map(|(&d, &l)| objective.to_minimise(d, l)).collect();
    Ok(TrialResult {
        key: key.into(),
        point,
        best: curve.iter().copied().fold(f64::INFINITY, f64::min),
        curve,
        pruned: summary.get("pruned").and_then(Value::as_bool).unwrap_or(false),
        seconds: col("seconds")?.iter().sum(),
    })
}

fn read_result(a: &Artifact) -> Result<TrialResult> {
    let path = a.file("result.json");
    serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?).with_context(|| format!("{}: not a trial result", path.display()))
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// The best trial overall and per strategy (lower is better internally).
fn best_of(rows: &[(String, usize, TrialResult)], p: &TuneParams) -> Result<TuneBest> {
    let pick = |f: &dyn Fn(&(String, usize, TrialResult)) -> bool| rows.iter().filter(|r| f(r)).min_by(|a, b| a.2.best.total_cmp(&b.2.best).then(a.1.cmp(&b.1)));
    let best = pick(&|_| true).context("no trials ran")?;
    let mut per_strategy = BTreeMap::new();
    for st in &p.strategies {
        if let Some(b) = pick(&|r| &r.0 == st) {
            per_strategy.insert(st.clone(), (p.objective.reported(b.2.best), b.2.point.clone()));
        }
    }
    Ok(TuneBest { objective: p.objective.name().to_owned(), value: p.objective.reported(best.2.best), strategy: best.0.clone(), trial: best.1, params: best.2.point.clone(), per_strategy })
}

/// A trial parameter as a column of its own type: float for ranges, int
/// or float for numeric choices, plain strings for the rest.
fn typed_column(name: &str, dim: &liverseg_search::Dim, values: &[Option<&Value>]) -> Column {
    use liverseg_search::Dim;
    let all = |f: fn(&Value) -> bool| values.iter().flatten().all(|v| f(v));
    match dim {
        Dim::Choice(_) if all(Value::is_i64) => Column::new(name.into(), values.iter().map(|v| v.and_then(Value::as_i64)).collect::<Vec<_>>()),
        Dim::Choice(_) if !all(Value::is_number) => Column::new(name.into(), values.iter().map(|v| v.map(|v| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))).collect::<Vec<_>>()),
        _ => Column::new(name.into(), values.iter().map(|v| v.and_then(Value::as_f64)).collect::<Vec<_>>()),
    }
}

fn write_trials(ctx: &StageContext, rows: &[(String, usize, TrialResult)], space: &Space, objective: Objective) -> Result<()> {
    let mut cols = vec![Column::new("strategy".into(), rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()), Column::new("trial".into(), rows.iter().map(|r| r.1 as u64).collect::<Vec<_>>())];
    for (name, dim) in &space.0 {
        let values: Vec<Option<&Value>> = rows.iter().map(|r| r.2.point.get(name)).collect();
        cols.push(typed_column(&format!("param_{name}"), dim, &values));
    }
    cols.extend([
        Column::new("objective".into(), rows.iter().map(|r| objective.reported(r.2.best)).collect::<Vec<_>>()),
        Column::new(
            "objective_per_epoch".into(),
            rows.iter().map(|r| serde_json::to_string(&r.2.curve.iter().map(|v| objective.reported(*v)).collect::<Vec<_>>()).unwrap_or_default()).collect::<Vec<_>>(),
        ),
        Column::new("epochs_run".into(), rows.iter().map(|r| r.2.curve.len() as u64).collect::<Vec<_>>()),
        Column::new("pruned".into(), rows.iter().map(|r| r.2.pruned).collect::<Vec<_>>()),
        Column::new("seconds".into(), rows.iter().map(|r| r.2.seconds).collect::<Vec<_>>()),
        Column::new("trial_key".into(), rows.iter().map(|r| r.2.key.clone()).collect::<Vec<_>>()),
    ]);
    let mut df = DataFrame::new_infer_height(cols)?;
    write_parquet(&ctx.out("trials.parquet"), &mut df, &ctx.provenance())
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_error_of_many_trials_is_reported_once() {
        let same = "sbatch refused the job for `tune.train`: Invalid job array specification";
        let mut failed: Vec<(String, String)> = (0..1500).map(|i| (format!("k{i}"), same.to_owned())).collect();
        failed.push(("k9999".into(), "Slurm job 7_3 FAILED (exit code 1)".into()));
        let report = super::failure_report(failed);
        assert_eq!(report.lines().count(), 2, "{report}");
        assert!(report.starts_with(&format!("1500 trials (k0, k1, k2, ...) failed: {same}")), "{report}");
        assert!(report.ends_with("trial k9999 failed: Slurm job 7_3 FAILED (exit code 1)"), "{report}");
    }
}
