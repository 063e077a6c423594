//! tune: random search and Bayesian optimisation (TPE) over learning rate,
//! batch size, optimizer, weight decay and loss. Each trial is a short
//! training run in its own worker process (`liverseg-torch stage`), cached
//! under its own content key in `artifacts/.trials/`, so rerunning a study
//! reuses finished trials, raising the budget runs only the new ones, and a
//! killed study resumes. Trials read only the train and validation splits.
//!
//! inputs: normalise, split, augment
//! outputs: trials.parquet, best.json

use crate::engine::hash::stage_key;
use crate::engine::params::{param, ParamType::*, ParamSpec, Params};
use crate::engine::stage::{Stage, StageContext, StageInfo, Summary};
use crate::engine::table::{read_parquet, write_parquet};
use crate::engine::worker::{run_request, WorkerRequest};
use crate::tune::{sampler, Point, Space};
use anyhow::{bail, Context, Result};
use polars::prelude::{Column, DataFrame};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

pub const VERSION: u32 = 1;
const TRIAL_VERSION: u32 = 1;
const PARAMS: &[ParamSpec] = &[
    param("strategies", StrList, "[random, bayes]", "search strategies, each run with the same budget"),
    param("budget", Int, "4", "trials per strategy"),
    param("seed", Int, "0", "search seed"),
    param("startup", Int, "3", "bayes: random trials before the model takes over"),
    param(
        "space",
        Any,
        "{lr: {log_uniform: [1.0e-4, 1.0e-2]}, batch_size: {choice: [8, 16]}, optimizer: {choice: [adam, adamw, sgd, rmsprop]}, weight_decay: {log_uniform: [1.0e-6, 1.0e-3]}, loss: {choice: [ce, dice, ce_dice]}}",
        "search space: name -> {log_uniform|uniform: [low, high]} or {choice: [...]}",
    ),
    param("objective", Choice(&["val_dice", "val_loss"]), "val_dice", "maximise validation Dice, or minimise validation loss (only comparable when every trial uses the same loss)"),
    param("trial_epochs", Int, "2", "epochs per trial (the cheap trial setting)"),
    param("trial_max_slices", Int, "64", "training slices per trial (0 = all)"),
    param("trial_encoder", Choice(&["resnet18", "resnet34", "resnet50"]), "resnet34", "encoder trained in trials"),
    param("prune", Choice(&["median", "none"]), "median", "stop a trial worse than the median of earlier trials at prune_epoch"),
    param("prune_epoch", Int, "1", "epoch at which pruning compares"),
    param("parallel", Int, "1", "trials run at once (each a worker process)"),
    param("threads", Int, "0", "CPU threads per trial (0 = all cores / parallel)"),
];

pub static INFO: StageInfo = StageInfo {
    name: "tune",
    version: VERSION,
    inputs: &["normalise", "split", "augment"],
    outputs: &["trials.parquet", "best.json"],
    params: PARAMS,
    about: "random search and Bayesian optimisation of training hyperparameters",
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Best {
    pub objective: String,
    /// Value as reported: validation loss, or validation Dice (higher is better).
    pub value: f64,
    pub strategy: String,
    pub trial: usize,
    pub params: Point,
    pub per_strategy: BTreeMap<String, (f64, Point)>,
}

/// The train-stage params of one trial.
fn trial_params(base: &Params, point: &Point, threads: i64, prune: Option<(i64, f64)>, objective: &str) -> Params {
    let mut p = Params::default();
    for spec in super::train::TRAIN.params {
        let v: serde_yaml::Value = serde_yaml::from_str(spec.default).expect("valid default");
        p.0.insert(spec.name.to_owned(), crate::engine::params::coerce(spec.ty, &v).expect("valid default"));
    }
    p.0.insert("encoder".into(), base.0["trial_encoder"].clone());
    p.0.insert("epochs".into(), base.0["trial_epochs"].clone());
    p.0.insert("max_train_slices".into(), base.0["trial_max_slices"].clone());
    p.0.insert("seed".into(), base.0["seed"].clone());
    p.0.insert("threads".into(), threads.into());
    p.0.insert("device".into(), "auto".into());
    p.0.insert("save_model".into(), false.into());
    p.0.insert("prune_metric".into(), objective.into());
    if let Some((epoch, threshold)) = prune {
        p.0.insert("prune_epoch".into(), epoch.into());
        p.0.insert("prune_threshold".into(), serde_json::json!(threshold));
    }
    for (k, v) in point {
        // Choices come back as YAML values; integers stay integers.
        p.0.insert(k.clone(), v.clone());
    }
    p
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

impl Stage for Tune {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p = ctx.params;
        let space = Space::parse(p.get("space")?)?;
        for name in space.0.keys() {
            if !super::train::TRAIN.params.iter().any(|s| s.name == name) {
                bail!("tune.space.{name}: the train stage has no parameter `{name}`");
            }
        }
        let strategies = p.str_list("strategies")?;
        if strategies.is_empty() {
            bail!("tune.strategies: empty");
        }
        let budget = p.usize("budget")?;
        let objective = p.str("objective")?.to_owned();
        let parallel = p.usize("parallel")?.max(1);
        let threads = match p.i64("threads")? {
            0 => (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) / parallel).max(1) as i64,
            t => t,
        };
        let prune_epoch = p.i64("prune_epoch")?;
        let pruning = p.str("prune")? == "median";
        let upstream_keys: BTreeMap<String, String> = ctx.upstream.iter().map(|(k, a)| (k.clone(), a.key.clone())).collect();
        let trials_dir = ctx.project_root.join("artifacts").join(".trials");
        std::fs::create_dir_all(&trials_dir)?;

        let mut rows: Vec<(String, usize, TrialResult)> = Vec::new();
        let (mut ran, mut reused) = (0usize, 0usize);
        for strategy in &strategies {
            let mut s = sampler(strategy, space.clone(), p.u64("seed")?, p.usize("startup")?)?;
            let mut done: Vec<TrialResult> = Vec::new();
            let mut number = 0;
            while number < budget {
                let batch: Vec<Point> = (0..parallel.min(budget - number)).map(|_| s.ask()).collect();
                // The pruning threshold depends only on trials finished before this batch.
                let prune = if pruning && prune_epoch > 0 {
                    let mut at_k: Vec<f64> = done.iter().filter_map(|t| t.curve.get(prune_epoch as usize - 1).copied()).collect();
                    median(&mut at_k).map(|m| (prune_epoch, m))
                } else {
                    None
                };
                let jobs: Vec<(Params, String)> = batch
                    .iter()
                    .map(|pt| {
                        let tp = trial_params(p, pt, threads, prune, &objective);
                        let key = stage_key(&crate::engine::hash::KeyInputs { stage: "trial", version: TRIAL_VERSION, params_json: &tp.canonical_json(), upstream: &upstream_keys, raw_files: &[] });
                        (tp, key)
                    })
                    .collect();
                let results: Vec<Result<(TrialResult, bool)>> = std::thread::scope(|scope| {
                    let handles: Vec<_> = jobs
                        .iter()
                        .zip(&batch)
                        .map(|((tp, key), pt)| scope.spawn(|| run_trial(ctx, &trials_dir, tp, key, pt, &objective)))
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap_or_else(|_| bail!("trial thread panicked"))).collect()
                });
                for (r, pt) in results.into_iter().zip(batch) {
                    let (t, cached) = r?;
                    if cached { reused += 1 } else { ran += 1 }
                    if ctx.show_progress {
                        eprintln!(
                            "tune {strategy} trial {number}: {objective} {:.4}{}{}  {}",
                            if objective == "val_dice" { -t.best } else { t.best },
                            if t.pruned { " (pruned)" } else { "" },
                            if cached { " (cached)" } else { "" },
                            serde_json::to_string(&pt)?
                        );
                    }
                    s.tell(pt, t.best);
                    done.push(t.clone());
                    rows.push((strategy.clone(), number, t));
                    number += 1;
                }
            }
        }

        // The best trial overall and per strategy (objective: lower is better internally).
        let sign = if objective == "val_dice" { -1.0 } else { 1.0 };
        let pick = |f: &dyn Fn(&(String, usize, TrialResult)) -> bool| rows.iter().filter(|r| f(r)).min_by(|a, b| a.2.best.total_cmp(&b.2.best).then(a.1.cmp(&b.1)));
        let best = pick(&|_| true).context("no trials ran")?;
        let mut per_strategy = BTreeMap::new();
        for st in &strategies {
            if let Some(b) = pick(&|r| &r.0 == st) {
                per_strategy.insert(st.clone(), (sign * b.2.best, b.2.point.clone()));
            }
        }
        let best_out = Best { objective: objective.clone(), value: sign * best.2.best, strategy: best.0.clone(), trial: best.1, params: best.2.point.clone(), per_strategy };
        std::fs::write(ctx.out("best.json"), serde_json::to_vec_pretty(&best_out)?)?;

        let mut cols = vec![
            Column::new("strategy".into(), rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()),
            Column::new("trial".into(), rows.iter().map(|r| r.1 as u64).collect::<Vec<_>>()),
        ];
        for name in space.0.keys() {
            cols.push(Column::new(format!("param_{name}").into(), rows.iter().map(|r| r.2.point.get(name).map(|v| v.to_string()).unwrap_or_default()).collect::<Vec<_>>()));
        }
        cols.extend([
            Column::new("objective".into(), rows.iter().map(|r| sign * r.2.best).collect::<Vec<_>>()),
            Column::new("objective_per_epoch".into(), rows.iter().map(|r| serde_json::to_string(&r.2.curve.iter().map(|v| sign * v).collect::<Vec<_>>()).unwrap_or_default()).collect::<Vec<_>>()),
            Column::new("epochs_run".into(), rows.iter().map(|r| r.2.curve.len() as u64).collect::<Vec<_>>()),
            Column::new("pruned".into(), rows.iter().map(|r| r.2.pruned).collect::<Vec<_>>()),
            Column::new("seconds".into(), rows.iter().map(|r| r.2.seconds).collect::<Vec<_>>()),
            Column::new("trial_key".into(), rows.iter().map(|r| r.2.key.clone()).collect::<Vec<_>>()),
        ]);
        let mut df = DataFrame::new_infer_height(cols)?;
        write_parquet(&ctx.out("trials.parquet"), &mut df, &ctx.provenance())?;
        let mut summary = Summary::new();
        summary.insert("best_value".into(), serde_json::json!(best_out.value));
        summary.insert("best_strategy".into(), best_out.strategy.clone().into());
        summary.insert("trials".into(), rows.len().into());
        summary.insert("trials_run".into(), ran.into());
        summary.insert("trials_reused".into(), reused.into());
        summary.insert("trials_pruned".into(), rows.iter().filter(|r| r.2.pruned).count().into());
        for (st, (v, _)) in &best_out.per_strategy {
            summary.insert(format!("{st}.best_value"), serde_json::json!(v));
        }
        Ok(summary)
    }
}

/// Run one trial in a worker, or reuse its cached result. Returns (result, cached).
fn run_trial(ctx: &StageContext, trials_dir: &std::path::Path, params: &Params, key: &str, point: &Point, objective: &str) -> Result<(TrialResult, bool)> {
    let done = trials_dir.join(key);
    if let Ok(bytes) = std::fs::read(done.join("result.json")) {
        if let Ok(r) = serde_json::from_slice::<TrialResult>(&bytes) {
            return Ok((r, true));
        }
    }
    let build = trials_dir.join(format!(".tmp-{key}"));
    let _ = std::fs::remove_dir_all(&build);
    std::fs::create_dir_all(&build)?;
    let req = WorkerRequest {
        stage: "train".into(),
        key: key.into(),
        params: params.0.clone(),
        out_dir: build.clone(),
        scratch_dir: trials_dir.join(format!("{key}.scratch")),
        upstream: ctx.upstream.iter().map(|(k, a)| (k.clone(), a.dir.clone())).collect(),
        raw_files: Vec::new(),
        project_root: ctx.project_root.to_path_buf(),
        show_progress: false,
        summary_path: build.with_extension("summary.json"),
    };
    let summary = run_request(&req).with_context(|| format!("trial {key} failed"))?;
    let metrics = read_parquet(&build.join("metrics.parquet"))?;
    let col = if objective == "val_dice" { "val_dice" } else { "val_loss" };
    let curve: Vec<f64> = metrics.column(col)?.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).map(|v| if objective == "val_dice" { -v } else { v }).collect();
    let seconds: f64 = metrics.column("seconds")?.f64()?.iter().map(|v| v.unwrap_or(0.0)).sum();
    let result = TrialResult {
        key: key.into(),
        point: point.clone(),
        best: curve.iter().copied().fold(f64::INFINITY, f64::min),
        curve,
        pruned: summary.get("pruned").and_then(Value::as_bool).unwrap_or(false),
        seconds,
    };
    std::fs::write(build.join("result.json"), serde_json::to_vec_pretty(&result)?)?;
    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(&build, &done).with_context(|| format!("cannot store trial {key}"))?;
    let _ = std::fs::remove_dir_all(trials_dir.join(format!("{key}.scratch")));
    Ok((result, false))
}

/// Best params found by an upstream tune artifact, to override train's.
pub fn best_params(dir: &std::path::Path) -> Result<Point> {
    let best: Best = serde_json::from_slice(&std::fs::read(dir.join("best.json")).with_context(|| format!("{}: no best.json", dir.display()))?)?;
    Ok(best.params)
}
