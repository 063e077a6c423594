//! `exp show`, `metrics diff`, `params diff` and `plots diff`: looking across
//! the runs the store holds (liverseg_engine::experiments does the work).

use crate::commands::{engine, registry};
use crate::PipelineArgs;
use anyhow::{bail, Context, Result};
use liverseg_engine::experiments::{self as exp, Side, Table};
use liverseg_engine::runner::Engine;
use liverseg_engine::store::{self, Artifact};
use liverseg_remote::Remote;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ShowArgs {
    /// List this stage's artifacts instead (default: every recorded run, over the whole pipeline).
    #[arg(long)]
    stage: Option<String>,
    /// Only metrics whose names contain one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<String>,
    /// Sort by this column (a metric, or a param by its name).
    #[arg(long)]
    sort: Option<String>,
    /// Descending order.
    #[arg(long)]
    reverse: bool,
    #[command(flatten)]
    format: Format,
}

#[derive(clap::Args)]
pub struct Format {
    #[arg(long, conflicts_with_all = ["csv", "md"])]
    json: bool,
    #[arg(long, conflicts_with = "md")]
    csv: bool,
    /// A Markdown table (for a paper or an issue).
    #[arg(long)]
    md: bool,
}

impl Format {
    fn print(&self, t: &Table) -> Result<()> {
        match (self.json, self.csv, self.md) {
            (true, _, _) => say!("{}", serde_json::to_string_pretty(&t.json())?),
            (_, true, _) => say_raw!("{}", t.csv()),
            (_, _, true) => say_raw!("{}", t.markdown()),
            _ => say_raw!("{}", t.text()),
        }
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct DiffArgs {
    /// An artifact key (or a unique prefix), a stage name (its current
    /// artifact), or a git revision of pipeline.yaml (HEAD~1).
    a: String,
    /// As A; default: the current pipeline.
    b: Option<String>,
    /// Unchanged values too.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    format: Format,
}

#[derive(clap::Args)]
pub struct PlotsArgs {
    /// Runs to compare, each as for `metrics diff`.
    #[arg(required = true, num_args = 1..)]
    runs: Vec<String>,
    /// The HTML page to write.
    #[arg(long, short = 'o', default_value = "plots.html")]
    out: PathBuf,
}

pub fn show(p: &PipelineArgs, a: &ShowArgs) -> Result<()> {
    let e = engine(p)?;
    let Some(stage) = &a.stage else {
        let runs = liverseg_engine::runs::list(&e.store)?;
        if runs.is_empty() {
            bail!("no recorded run in {} yet: `liverseg run` records one (`exp show --stage STAGE` lists a stage's artifacts)", e.store.root.display());
        }
        let sides: Vec<Side> = runs.iter().map(|r| exp::of_run(&e, r)).collect::<Result<_>>()?;
        let order: Vec<String> = e.pipeline.stages.iter().map(|s| s.name.clone()).collect();
        return a.format.print(&exp::show_runs(&sides, &order, &a.metrics, a.sort.as_deref(), a.reverse)?);
    };
    let everything = e.store.list()?;
    let artifacts: Vec<Artifact> = everything.iter().filter(|x| &x.stage == stage).cloned().collect();
    if artifacts.is_empty() {
        bail!("no artifact of stage `{stage}` in {}", e.store.root.display());
    }
    let mut t = exp::show(&artifacts, &a.metrics, a.sort.as_deref(), a.reverse)?;
    if !a.format.json {
        // Keys as their shortest unique prefixes in the store: what `metrics diff` takes.
        let all: Vec<&str> = everything.iter().map(|x| x.key.as_str()).collect();
        let full: Vec<String> = t.rows.iter().map(|r| r[0].as_str().unwrap_or_default().to_owned()).collect();
        for (row, short) in t.rows.iter_mut().zip(exp::short_keys(full.iter().map(String::as_str), &all)) {
            row[0] = Value::from(short);
        }
    }
    a.format.print(&t)
}

/// The current pipeline, as a side of a diff.
const WORKSPACE: &str = "workspace";

fn sides(p: &PipelineArgs, a: &str, b: Option<&str>) -> Result<(Side, Side)> {
    let e = engine(p)?;
    let resolve = |spec: &str| if spec == WORKSPACE { workspace(&e) } else { exp::resolve(&e, registry(), spec) };
    Ok((resolve(a)?, resolve(b.unwrap_or(WORKSPACE))?))
}

/// Every stage of the current pipeline with an artifact for its current key.
fn workspace(e: &Engine) -> Result<Side> {
    let planned = e.plan_all()?;
    let mut side = Side { label: WORKSPACE.into(), artifacts: BTreeMap::new(), missing: vec![], params: BTreeMap::new() };
    for s in &e.pipeline.stages {
        let mut p = BTreeMap::new();
        exp::flatten(&serde_json::to_value(&s.params.0)?, "", &mut p);
        side.params.insert(s.name.clone(), p);
        match e.store.get(&s.name, &planned[&s.name].key)? {
            Some(a) => {
                side.params.insert(s.name.clone(), exp::params_of(&a));
                side.artifacts.insert(s.name.clone(), a);
            }
            None => side.missing.push(s.name.clone()),
        }
    }
    Ok(side)
}

/// Prints the differences; true when there are any.
fn print_diff(x: &Side, y: &Side, mut t: Table, format: &Format) -> Result<bool> {
    t.header[2] = x.label.clone();
    t.header[3] = y.label.clone();
    for (side, other) in [(x, y), (y, x)] {
        for m in side.missing.iter().filter(|m| other.artifacts.contains_key(*m)) {
            eprintln!("note: {}: no artifact of `{m}` in the store (not run at that revision?)", side.label);
        }
    }
    let differs = t.rows.iter().any(|r| r[2] != r[3]);
    format.print(&t)?;
    Ok(differs)
}

/// `metrics diff`: exit 0 when nothing differs, 1 when something does.
pub fn metrics_diff(p: &PipelineArgs, a: &DiffArgs) -> Result<bool> {
    let (x, y) = sides(p, &a.a, a.b.as_deref())?;
    let by_stage = |s: &Side| -> BTreeMap<String, BTreeMap<String, Value>> { s.artifacts.iter().map(|(k, v)| (k.clone(), exp::metrics_of(v))).collect() };
    let t = exp::diff(&by_stage(&x), &by_stage(&y), a.all);
    print_diff(&x, &y, t, &a.format)
}

pub fn params_diff(p: &PipelineArgs, a: &DiffArgs) -> Result<bool> {
    let (x, y) = sides(p, &a.a, a.b.as_deref())?;
    let mut t = exp::diff(&x.params, &y.params, a.all);
    mark_replaced(&mut t, &x, &y);
    print_diff(&x, &y, t, &a.format)
}

/// A declared param that both runs replaced by the same upstream value
/// (`used.NAME`) changed nothing that ran: say so in its change column.
fn mark_replaced(t: &mut Table, x: &Side, y: &Side) {
    let single = x.params.len() == 1 && y.params.len() == 1;
    for row in &mut t.rows {
        let (Some(stage), Some(name)) = (row[0].as_str(), row[1].as_str()) else {
            continue;
        };
        if name.starts_with("used.") {
            continue;
        }
        let used = |s: &Side| {
            let params = if single { s.params.values().next() } else { s.params.get(stage) };
            params.and_then(|p| p.get(&format!("used.{name}"))).cloned()
        };
        match (used(x), used(y)) {
            (Some(u), Some(v)) if u == v => row[4] = Value::from(format!("no effect: both ran {}", exp::cell(&u))),
            (Some(_), Some(_)) => row[4] = Value::from(format!("{}; replaced upstream (see used.{name})", exp::cell(&row[4]))),
            _ => {}
        }
    }
}

/// `plots diff`: learning curves and per-case Dice of several runs on one page.
pub fn plots_diff(p: &PipelineArgs, a: &PlotsArgs) -> Result<()> {
    let e = engine(p)?;
    let mut runs: Vec<(String, Artifact)> = Vec::new();
    for spec in &a.runs {
        let side = if spec == WORKSPACE { workspace(&e)? } else { exp::resolve(&e, registry(), spec)? };
        let many = side.artifacts.len() > 1;
        for (stage, art) in side.artifacts {
            let label = if many { format!("{} {stage}", side.label) } else { side.label.clone() };
            runs.push((label, art));
        }
    }
    let html = liverseg_stages::report::plots_page(&runs)?;
    std::fs::write(&a.out, html).with_context(|| format!("cannot write {}", a.out.display()))?;
    say!("wrote {}", a.out.display());
    Ok(())
}

/// The remote cache: `--remote`, else pipeline.yaml's `remote:`.
pub fn remote(p: &PipelineArgs, e: &Engine) -> Result<Remote> {
    let url = p.remote.clone().or_else(|| e.pipeline.remote.clone()).context("no remote cache: set `remote:` in pipeline.yaml or pass --remote s3://bucket/prefix (or a folder)")?;
    Remote::open(&url, &e.pipeline.root)
}

/// The current artifacts of the pipeline up to `target`, by stage, and the stages without one.
fn current(e: &Engine, target: Option<&str>) -> Result<(Vec<(String, String)>, Vec<Artifact>)> {
    let stages = match target {
        Some(t) => e.pipeline.ancestors_and_self(t)?,
        None => e.pipeline.stages.iter().collect(),
    };
    let planned = e.plan_all()?;
    let mut keys = Vec::new();
    let mut present = Vec::new();
    for s in stages {
        let key = planned[&s.name].key.clone();
        if let Some(a) = e.store.get(&s.name, &key)? {
            present.push(a);
        }
        keys.push((s.name.clone(), key));
    }
    Ok((keys, present))
}

/// An artifact's sub-artifacts (a search's trials) that the store holds.
fn children(e: &Engine, a: &Artifact) -> Result<Vec<Artifact>> {
    let mut out = Vec::new();
    for (kind, keys) in &a.manifest.children {
        for k in keys {
            if let Some(c) = e.store.get(&store::sub_stage(&a.stage, kind), k)? {
                out.push(c);
            }
        }
    }
    Ok(out)
}

fn transfer_bar(len: u64, label: &str, quiet: bool) -> indicatif::ProgressBar {
    liverseg_engine::progress::bar(len, label, !quiet)
}

pub fn push(p: &PipelineArgs, target: Option<&str>) -> Result<()> {
    let e = engine(p)?;
    let remote = remote(p, &e)?;
    let (keys, present) = current(&e, target)?;
    let mut all = Vec::new();
    for a in present {
        all.extend(children(&e, &a)?);
        all.push(a);
    }
    let bar = transfer_bar(all.iter().map(|a| a.manifest.outputs.len() as u64).sum(), "push", p.quiet);
    let mut total = liverseg_remote::Moved::default();
    for a in &all {
        let m = remote.push(a, &bar).with_context(|| format!("cannot push {}@{}", a.stage, a.key))?;
        total.artifacts += m.artifacts;
        total.files += m.files;
        total.bytes += m.bytes;
        total.resumed += m.resumed;
    }
    bar.finish_and_clear();
    let missing: Vec<&str> = keys.iter().filter(|(s, k)| !all.iter().any(|a| &a.stage == s && &a.key == k)).map(|(s, _)| s.as_str()).collect();
    say!("pushed {} artifact(s), {} file(s), {} bytes to {} ({} already there{})", total.artifacts, total.files, total.bytes, remote.url, all.len() - total.artifacts, resumed_note(total.resumed));
    if !missing.is_empty() {
        say!("not in the local store (run them first): {}", missing.join(", "));
    }
    Ok(())
}

fn resumed_note(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("; {n} file(s) of an interrupted transfer kept")
    }
}

pub fn pull(p: &PipelineArgs, target: Option<&str>) -> Result<()> {
    let e = engine(p)?;
    let remote = remote(p, &e)?;
    let (keys, _) = current(&e, target)?;
    let lock = e.store.lock()?;
    let bar = transfer_bar(0, "pull", p.quiet);
    let (mut total, mut absent) = (liverseg_remote::Moved::default(), Vec::new());
    for (stage, key) in &keys {
        // A present artifact may still lack a child (one set aside as damaged).
        if let Some(a) = e.store.get(stage, key)? {
            total.add(remote.pull_children(&e.store, &a.manifest, &lock, &bar).with_context(|| format!("cannot pull the sub-artifacts of {stage}@{key}"))?);
            continue;
        }
        match remote.pull(&e.store, stage, key, &lock, &bar).with_context(|| format!("cannot pull {stage}@{key}"))? {
            Some((_, m)) => total.add(m),
            None => absent.push(stage.as_str()),
        }
    }
    bar.finish_and_clear();
    say!("pulled {} artifact(s), {} file(s), {} bytes from {}{}", total.artifacts, total.files, total.bytes, remote.url, resumed_note(total.resumed));
    if !absent.is_empty() {
        say!("not on the remote (a run computes them): {}", absent.join(", "));
    }
    Ok(())
}
