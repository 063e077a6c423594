//! The generic engine: parameters, hashing, the artifact store, the DAG,
//! locking, lineage. Nothing here knows about livers.

pub mod config;
pub mod hash;
pub mod lineage;
pub mod params;
pub mod runner;
pub mod stage;
pub mod status;
pub mod store;
pub mod table;
pub mod worker;

use anyhow::Result;
use std::collections::BTreeSet;
use std::fmt::Write;

/// The DAG as text, or as Graphviz dot.
pub fn render_dag(p: &config::Pipeline, dot: bool) -> String {
    let mut out = String::new();
    if dot {
        out.push_str("digraph liverseg {\n  rankdir=LR;\n  node [shape=box];\n");
        for s in &p.stages {
            let _ = writeln!(out, "  \"{}\";", s.name);
            for d in &s.deps {
                let _ = writeln!(out, "  \"{d}\" -> \"{}\";", s.name);
            }
        }
        out.push_str("}\n");
    } else {
        for s in &p.stages {
            if s.deps.is_empty() {
                let _ = writeln!(out, "{}  (source)", s.name);
            } else {
                let _ = writeln!(out, "{}  <- {}", s.name, s.deps.join(", "));
            }
        }
    }
    out
}

/// Artifacts the current pipeline no longer reaches (every stage's current key
/// and, through manifests, everything those were built from).
pub fn unreachable(engine: &runner::Engine) -> Result<Vec<store::Artifact>> {
    let planned = engine.plan_all()?;
    let mut keep: BTreeSet<(String, String)> = BTreeSet::new();
    let mut todo: Vec<(String, String)> = planned.iter().map(|(s, p)| (s.clone(), p.key.clone())).collect();
    while let Some((s, k)) = todo.pop() {
        if keep.insert((s.clone(), k.clone())) {
            if let Some(a) = engine.store.get(&s, &k)? {
                todo.extend(a.manifest.upstream.iter().map(|(d, key)| (d.clone(), key.clone())));
            }
        }
    }
    Ok(engine.store.list()?.into_iter().filter(|a| !keep.contains(&(a.stage.clone(), a.key.clone()))).collect())
}
