//! Looking across runs, as DVC's `exp show`, `metrics diff` and `params
//! diff` do: every artifact of a stage as a table of its params and summary
//! metrics, read from the manifests alone; and two runs side by side, each
//! named by artifact key, stage name or a git revision of pipeline.yaml.

use super::runner::{Engine, Found};
use super::stage::Stage;
use super::store::Artifact;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Scalars of a JSON value by dotted path; arrays and nulls are left out.
pub fn flatten(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(x, &key, out);
            }
        }
        Value::Array(_) | Value::Null => {}
        _ => {
            out.insert(prefix.to_owned(), v.clone());
        }
    }
}

/// An artifact's declared params and, where upstream values replaced some
/// (a model trained with tuned params), every param it ran with as
/// `used.NAME`: all of them, so that rows compare like with like.
pub fn params_of(a: &Artifact) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    flatten(&a.manifest.params, "", &mut out);
    if let Some(effective) = &a.manifest.effective_params {
        let mut used = BTreeMap::new();
        flatten(effective, "", &mut used);
        out.extend(used.into_iter().map(|(k, v)| (format!("used.{k}"), v)));
    }
    out
}

/// Declared params an artifact did not run with, because an upstream result
/// replaced them (a model trained with searched values): name, declared, used.
pub fn replaced_params(a: &Artifact) -> Vec<(String, Value, Value)> {
    let Some(effective) = &a.manifest.effective_params else {
        return vec![];
    };
    let (mut declared, mut used) = (BTreeMap::new(), BTreeMap::new());
    flatten(&a.manifest.params, "", &mut declared);
    flatten(effective, "", &mut used);
    declared.into_iter().filter_map(|(k, d)| used.get(&k).filter(|u| **u != d).map(|u| (k, d, u.clone()))).collect()
}

/// `lr=0.001 (declared 0.0003), batch_size=8 (declared 4)`.
pub fn describe_replaced(replaced: &[(String, Value, Value)]) -> String {
    replaced.iter().map(|(k, d, u)| format!("{k}={} (declared {})", cell(u), cell(d))).collect::<Vec<_>>().join(", ")
}

pub fn metrics_of(a: &Artifact) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    flatten(&Value::Object(a.manifest.metrics.clone().into_iter().collect()), "", &mut out);
    out
}

/// A table of strings with a header, printable as text, CSV, Markdown or JSON.
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

pub fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format_float(f),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Four significant decimals for values of order one, more for small ones.
fn format_float(f: f64) -> String {
    if f == 0.0 || !f.is_finite() || f.abs() >= 1e-3 && f.abs() < 1e6 {
        let s = format!("{f:.4}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    } else {
        // 3e-4, not 3.0000e-4.
        let s = format!("{f:.4e}");
        match s.split_once('e') {
            Some((m, e)) if m.contains('.') => format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.')),
            _ => s,
        }
    }
}

impl Table {
    pub fn text(&self) -> String {
        let cells: Vec<Vec<String>> = std::iter::once(self.header.clone()).chain(self.rows.iter().map(|r| r.iter().map(cell).collect())).collect();
        let widths: Vec<usize> = (0..self.header.len()).map(|c| cells.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        cells.iter().map(|r| r.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned() + "\n").collect()
    }

    pub fn csv(&self) -> String {
        let quote = |s: String| if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s };
        let line = |r: Vec<String>| r.into_iter().map(quote).collect::<Vec<_>>().join(",") + "\n";
        std::iter::once(line(self.header.clone())).chain(self.rows.iter().map(|r| line(r.iter().map(cell).collect()))).collect()
    }

    pub fn markdown(&self) -> String {
        let esc = |s: String| s.replace('|', "\\|");
        let mut out = format!("| {} |\n|{}\n", self.header.join(" | "), "---|".repeat(self.header.len()));
        for r in &self.rows {
            out += &format!("| {} |\n", r.iter().map(|v| esc(cell(v))).collect::<Vec<_>>().join(" | "));
        }
        out
    }

    pub fn json(&self) -> Value {
        Value::Array(self.rows.iter().map(|r| Value::Object(self.header.iter().cloned().zip(r.iter().cloned()).collect())).collect())
    }
}

/// `exp show`: every artifact of `stage`, oldest first (or sorted by a
/// column), with the params that differ between them and the metrics whose
/// names contain one of `metric_filters` (all when empty).
pub fn show(artifacts: &[Artifact], metric_filters: &[String], sort: Option<&str>, reverse: bool) -> Result<Table> {
    let params: Vec<BTreeMap<String, Value>> = artifacts.iter().map(params_of).collect();
    let metrics: Vec<BTreeMap<String, Value>> = artifacts.iter().map(metrics_of).collect();
    let param_names: BTreeSet<&String> = params.iter().flat_map(|p| p.keys()).collect();
    let differing: Vec<&String> = param_names.into_iter().filter(|k| params.iter().any(|p| p.get(*k) != params[0].get(*k))).collect();
    let keep = |m: &str| metric_filters.is_empty() || metric_filters.iter().any(|f| m.contains(f.as_str()));
    let metric_names: BTreeSet<&String> = metrics.iter().flat_map(|m| m.keys()).filter(|m| keep(m)).collect();
    let mut header = vec!["key".to_owned(), "finished (UTC)".to_owned()];
    header.extend(differing.iter().map(|k| format!("param.{k}")));
    header.extend(metric_names.iter().map(|m| m.to_string()));
    let mut rows: Vec<Vec<Value>> = artifacts
        .iter()
        .zip(params.iter().zip(&metrics))
        .map(|(a, (p, m))| {
            let mut row = vec![Value::from(a.key.clone()), Value::from(finished_utc(a))];
            row.extend(differing.iter().map(|k| p.get(*k).cloned().unwrap_or(Value::Null)));
            row.extend(metric_names.iter().map(|k| m.get(*k).cloned().unwrap_or(Value::Null)));
            row
        })
        .collect();
    if let Some(col) = sort {
        let c = header.iter().position(|h| h == col || h == &format!("param.{col}")).ok_or_else(|| anyhow!("--sort {col}: no such column (columns: {})", header.join(", ")))?;
        rows.sort_by(|a, b| compare(&a[c], &b[c]));
    }
    if reverse {
        rows.reverse();
    }
    Ok(Table { header, rows })
}

fn finished_utc(a: &Artifact) -> String {
    let t = super::store::utc_string(a.manifest.finished_unix);
    t.get(..19).unwrap_or(&t).replace('T', " ")
}

/// Numbers by value, then strings; missing last.
fn compare(a: &Value, b: &Value) -> std::cmp::Ordering {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        _ => cell(a).cmp(&cell(b)),
    }
}

/// One side of a diff: the artifacts it names, by stage.
pub struct Side {
    pub label: String,
    pub artifacts: BTreeMap<String, Artifact>,
    /// Stages the side's pipeline has but whose artifact is not in the store.
    pub missing: Vec<String>,
    /// The declared params of every stage (a git revision need not have run).
    pub params: BTreeMap<String, BTreeMap<String, Value>>,
}

/// Resolve `spec`: an artifact key (or a unique prefix of at least 6
/// characters), a stage of the current pipeline (its current artifact), or
/// a git revision (`HEAD~1`), whose pipeline.yaml is planned as a run of it
/// would be and found in the store by key.
pub fn resolve(engine: &Engine, registry: &[Box<dyn Stage>], spec: &str) -> Result<Side> {
    if engine.pipeline.stage(spec).is_some() {
        let a = engine.current_artifact(spec)?;
        let params = BTreeMap::from([(spec.to_owned(), params_of(&a))]);
        return Ok(Side { label: format!("{spec}@{}", a.key), artifacts: BTreeMap::from([(spec.to_owned(), a)]), missing: vec![], params });
    }
    if let Some(run) = super::runs::find(&engine.store, spec)? {
        return of_run(engine, &run);
    }
    if spec.chars().all(|c| c.is_ascii_hexdigit()) && !spec.is_empty() {
        let hits: Vec<Artifact> = engine.store.list()?.into_iter().filter(|a| a.key.starts_with(spec)).collect();
        match hits.len() {
            _ if spec.len() < MIN_PREFIX => bail!("`{spec}`: a key prefix needs at least {MIN_PREFIX} characters (`exp show` prints the shortest unique ones)"),
            1 => {
                let a = hits.into_iter().next().expect("one");
                let params = BTreeMap::from([(a.stage.clone(), params_of(&a))]);
                return Ok(Side { label: format!("{}@{}", a.stage, a.key), artifacts: BTreeMap::from([(a.stage.clone(), a)]), missing: vec![], params });
            }
            n if n > 1 => bail!("`{spec}` matches {n} artifacts ({}); give more of the key", hits.iter().map(|a| format!("{}@{}", a.stage, a.key)).collect::<Vec<_>>().join(", ")),
            _ => {}
        }
    }
    at_revision(engine, registry, spec)
}

/// The shortest key prefix `resolve` takes.
pub const MIN_PREFIX: usize = 4;

/// The shortest prefix of each key (at least 8 characters, as git's short
/// hashes) that no other key in `all` shares.
pub fn short_keys<'a>(keys: impl Iterator<Item = &'a str>, all: &[&str]) -> Vec<String> {
    keys.map(|k| {
        let n = (8..=k.len()).find(|&n| all.iter().filter(|o| o.starts_with(&k[..n])).count() <= 1).unwrap_or(k.len());
        k[..n.min(k.len())].to_owned()
    })
    .collect()
}

/// A recorded run as a side: the artifacts of its stages that the store still holds.
pub fn of_run(engine: &Engine, run: &super::runs::RunRecord) -> Result<Side> {
    let mut side = Side { label: run.name.clone(), artifacts: BTreeMap::new(), missing: vec![], params: BTreeMap::new() };
    for (stage, key) in &run.stages {
        match engine.store.get(stage, key)? {
            Some(a) => {
                side.params.insert(stage.clone(), params_of(&a));
                side.artifacts.insert(stage.clone(), a);
            }
            None => side.missing.push(stage.clone()),
        }
    }
    Ok(side)
}

/// The pipeline at git revision `rev`, planned against today's store.
fn at_revision(engine: &Engine, registry: &[Box<dyn Stage>], rev: &str) -> Result<Side> {
    let file = &engine.pipeline.file;
    let text = git_show(file, rev).with_context(|| format!("`{rev}` is no stage of this pipeline, no artifact key in the store, and no git revision of {}", file.display()))?;
    let overrides: Vec<super::pipeline::Override> = Vec::new();
    let profile = Some(engine.pipeline.profile.as_str()).filter(|p| !p.is_empty());
    let pipeline = super::config::parse(&text, file, &engine.pipeline.root, registry, profile, &overrides).with_context(|| format!("pipeline.yaml at {rev}"))?;
    let mut then = Engine::new(pipeline, registry);
    then.show_progress = false;
    let planned = then.plan_all()?;
    let mut side = Side { label: rev.to_owned(), artifacts: BTreeMap::new(), missing: vec![], params: BTreeMap::new() };
    for s in &then.pipeline.stages {
        let mut p = BTreeMap::new();
        flatten(&serde_json::to_value(&s.params.0)?, "", &mut p);
        side.params.insert(s.name.clone(), p);
        match then.find(&s.name, &planned[&s.name].key)? {
            Found::Fresh(a) => {
                // A tuned model ran with other params than it declares.
                side.params.insert(s.name.clone(), params_of(&a));
                side.artifacts.insert(s.name.clone(), a);
            }
            _ => side.missing.push(s.name.clone()),
        }
    }
    Ok(side)
}

/// `git show REV:FILE`, run where the file is.
fn git_show(file: &Path, rev: &str) -> Result<String> {
    let abs = std::path::absolute(file)?;
    let dir = abs.parent().ok_or_else(|| anyhow!("{} has no folder", file.display()))?;
    let name = abs.file_name().ok_or_else(|| anyhow!("{} has no name", file.display()))?;
    let out = std::process::Command::new("git").arg("-C").arg(dir).arg("show").arg(format!("{rev}:./{}", name.to_string_lossy())).output().context("cannot run git")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `exp show` over the whole pipeline: one row per recorded run, with the
/// params (of every stage, `stage.param`) that differ between runs, and the
/// metrics of the last stage that has any, or with `metric_filters`, every
/// stage's metrics whose names contain one (`stage.metric`).
pub fn show_runs(sides: &[Side], stage_order: &[String], metric_filters: &[String], sort: Option<&str>, reverse: bool) -> Result<Table> {
    let prefixed =
        |by_stage: &BTreeMap<String, BTreeMap<String, Value>>| -> BTreeMap<String, Value> { by_stage.iter().flat_map(|(s, m)| m.iter().map(move |(k, v)| (format!("{s}.{k}"), v.clone()))).collect() };
    let params: Vec<BTreeMap<String, Value>> = sides.iter().map(|s| prefixed(&s.params)).collect();
    let names: BTreeSet<&String> = params.iter().flat_map(|p| p.keys()).collect();
    let differing: Vec<&String> = names.into_iter().filter(|k| params.iter().any(|p| p.get(*k) != params[0].get(*k))).collect();
    let metrics_by_stage: Vec<BTreeMap<String, BTreeMap<String, Value>>> = sides.iter().map(|s| s.artifacts.iter().map(|(st, a)| (st.clone(), metrics_of(a))).collect()).collect();
    let last_with_metrics = stage_order.iter().rev().find(|st| metrics_by_stage.iter().any(|m| m.get(*st).is_some_and(|x| !x.is_empty())));
    let metrics: Vec<BTreeMap<String, Value>> = metrics_by_stage
        .iter()
        .map(|m| {
            let all = prefixed(m);
            match metric_filters {
                [] => all.into_iter().filter(|(k, _)| last_with_metrics.is_some_and(|st| k.starts_with(&format!("{st}.")))).collect(),
                f => all.into_iter().filter(|(k, _)| f.iter().any(|x| k.contains(x.as_str()))).collect(),
            }
        })
        .collect();
    let metric_names: BTreeSet<&String> = metrics.iter().flat_map(|m| m.keys()).collect();
    let mut header = vec!["run".to_owned(), "finished (UTC)".to_owned()];
    header.extend(differing.iter().map(|k| format!("param.{k}")));
    header.extend(metric_names.iter().map(|m| m.to_string()));
    let mut rows: Vec<Vec<Value>> = sides
        .iter()
        .zip(params.iter().zip(&metrics))
        .map(|(s, (p, m))| {
            let finished = s.artifacts.values().map(|a| a.manifest.finished_unix).fold(0.0, f64::max);
            let mut row = vec![Value::from(s.label.clone()), Value::from(super::store::utc_string(finished).get(..19).unwrap_or("").replace('T', " "))];
            row.extend(differing.iter().map(|k| p.get(*k).cloned().unwrap_or(Value::Null)));
            row.extend(metric_names.iter().map(|k| m.get(*k).cloned().unwrap_or(Value::Null)));
            row
        })
        .collect();
    if let Some(col) = sort {
        let c = header.iter().position(|h| h == col || h == &format!("param.{col}")).ok_or_else(|| anyhow!("--sort {col}: no such column (columns: {})", header.join(", ")))?;
        rows.sort_by(|a, b| compare(&a[c], &b[c]));
    }
    if reverse {
        rows.reverse();
    }
    Ok(Table { header, rows })
}

/// Rows of `stage  name  A  B  change` for every value that differs (or
/// every value, with `all`); A and B are maps by stage.
pub fn diff(a: &BTreeMap<String, BTreeMap<String, Value>>, b: &BTreeMap<String, BTreeMap<String, Value>>, all: bool) -> Table {
    let mut rows = Vec::new();
    let stages: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let single = a.len() == 1 && b.len() == 1;
    for stage in stages {
        // Two single artifacts of different stages (train against baseline) compare by name.
        let (x, y) = if single { (a.values().next(), b.values().next()) } else { (a.get(stage), b.get(stage)) };
        let empty = BTreeMap::new();
        let (x, y) = (x.unwrap_or(&empty), y.unwrap_or(&empty));
        let names: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
        for n in names {
            let (u, v) = (x.get(n).cloned().unwrap_or(Value::Null), y.get(n).cloned().unwrap_or(Value::Null));
            if u == v && !all {
                continue;
            }
            let change = match (u.as_f64(), v.as_f64()) {
                (Some(p), Some(q)) if u.is_number() && v.is_number() => Value::from(format!("{}{}", if q - p >= 0.0 { "+" } else { "" }, format_float(q - p))),
                _ if u == v => Value::from(""),
                _ => Value::from("changed"),
            };
            rows.push(vec![Value::from(stage.clone()), Value::from(n.clone()), u, v, change]);
        }
        if single {
            break;
        }
    }
    Table { header: vec!["stage".into(), "name".into(), "A".into(), "B".into(), "change".into()], rows }
}
