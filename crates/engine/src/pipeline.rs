//! A resolved pipeline: its stages in topological order, each with typed,
//! canonical params, the registered stage it runs, and how it sees its
//! upstream.

use super::params::Params;
use anyhow::{anyhow, bail, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct ResolvedStage {
    pub name: String,
    /// The registered stage that does the work: `name` itself, or for an
    /// instance such as `normalise.hospital_b` or `tune_baseline`, the stage
    /// it instantiates.
    pub uses: String,
    pub deps: Vec<String>,
    /// Upstream names as the stage sees them, where they differ from the dep
    /// names (an instance reads `ingest.hospital_b` as `ingest`).
    pub upstream_as: BTreeMap<String, String>,
    pub params: Params,
}

impl ResolvedStage {
    /// The name under which the stage finds upstream `dep`.
    pub fn upstream_name<'a>(&'a self, dep: &'a str) -> &'a str {
        self.upstream_as.get(dep).map(String::as_str).unwrap_or(dep)
    }
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub root: PathBuf,
    pub profile: String,
    /// Stages in topological order.
    pub stages: Vec<ResolvedStage>,
    /// Re-hash every file a run reuses or reads (pipeline.yaml `verify_on_use`).
    pub verify_on_use: bool,
    /// How far a no-op trusts the raw-file cache (pipeline.yaml `raw_scan`).
    pub raw_scan: super::scan::ScanMode,
    /// Where worker requests run (`executor:`, or `--executor`); never part of a key.
    pub executor: ExecutorKind,
    /// Job resources when they run on Slurm (`slurm:`).
    pub slurm: super::slurm::SlurmConfig,
    /// The remote cache (`remote:`): s3://bucket/prefix or a folder.
    pub remote: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorKind {
    Local,
    Slurm,
}

impl std::str::FromStr for ExecutorKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "local" => Ok(ExecutorKind::Local),
            "slurm" => Ok(ExecutorKind::Slurm),
            _ => bail!("`{s}`: expected local or slurm"),
        }
    }
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&ResolvedStage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// `name` and every stage it depends on, in topological order.
    pub fn ancestors_and_self(&self, name: &str) -> Result<Vec<&ResolvedStage>> {
        if self.stage(name).is_none() {
            bail!("unknown stage `{name}`; the pipeline has: {}", self.stage_names().join(", "));
        }
        let mut needed = BTreeSet::new();
        let mut todo = vec![name.to_owned()];
        while let Some(n) = todo.pop() {
            if needed.insert(n.clone()) {
                if let Some(s) = self.stage(&n) {
                    todo.extend(s.deps.iter().cloned());
                }
            }
        }
        Ok(self.stages.iter().filter(|s| needed.contains(&s.name)).collect())
    }

    pub fn stage_names(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.name.clone()).collect()
    }

    /// The DAG as text, or as Graphviz dot with each stage's outputs
    /// (`outputs` gives them for a registered stage name).
    pub fn render(&self, dot: bool, outputs: impl Fn(&str) -> Vec<String>) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        if !dot {
            for s in &self.stages {
                if s.deps.is_empty() {
                    let _ = writeln!(out, "{}  (source)", s.name);
                } else {
                    let _ = writeln!(out, "{}  <- {}", s.name, s.deps.join(", "));
                }
            }
            return out;
        }
        out.push_str("digraph liverseg {\n  rankdir=LR;\n  node [shape=box, fontname=\"sans-serif\", fontsize=11];\n");
        for s in &self.stages {
            let files = outputs(&s.uses).join("\\n").replace('"', "'");
            let _ = writeln!(out, "  \"{0}\" [label=\"{0}\\n{files}\"];", s.name);
            for d in &s.deps {
                let _ = writeln!(out, "  \"{d}\" -> \"{}\";", s.name);
            }
        }
        out.push_str("}\n");
        out
    }
}

/// A `-P key=value` override.
#[derive(Debug, Clone)]
pub struct Override {
    pub key: String,
    pub value: serde_yaml::Value,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (key, value) = s.split_once('=').ok_or_else(|| format!("`{s}` is not key=value (e.g. train.lr=3e-4)"))?;
        // The value is read as YAML so that `-P a.b=3e-4` means what `b: 3e-4` means in the file.
        let value: serde_yaml::Value = serde_yaml::from_str(value).map_err(|e| format!("`{value}` is not a YAML value: {e}"))?;
        Ok(Override { key: key.trim().to_owned(), value })
    }
}

/// Kahn's algorithm, keeping file order among ready stages; on a cycle, returns it.
pub fn topo_sort(order: &[String], deps: &BTreeMap<String, Vec<String>>) -> std::result::Result<Vec<String>, Vec<String>> {
    let mut done: Vec<String> = Vec::new();
    let mut remaining: Vec<String> = order.to_vec();
    while !remaining.is_empty() {
        let ready = remaining.iter().position(|n| deps[n].iter().all(|d| done.contains(d)));
        match ready {
            Some(i) => done.push(remaining.remove(i)),
            None => return Err(find_cycle(&remaining, deps)),
        }
    }
    Ok(done)
}

/// Walk deps from any remaining stage until a name repeats.
fn find_cycle(remaining: &[String], deps: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut path = vec![remaining[0].clone()];
    loop {
        let last = path.last().cloned().unwrap_or_default();
        let Some(next) = deps[&last].iter().find(|d| remaining.contains(d)).cloned() else {
            return path;
        };
        if let Some(pos) = path.iter().position(|p| *p == next) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(next);
            return cycle;
        }
        path.push(next);
    }
}

/// Names a user gives stages and datasets: letters, digits, `_` and `-`
/// (`.` joins a stage to its instance, `+` a stage to its sub-artifacts).
pub fn check_name(name: &str, place: &str) -> Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(anyhow!("{place}: names may use letters, digits, `_` and `-` only"));
    }
    Ok(())
}
