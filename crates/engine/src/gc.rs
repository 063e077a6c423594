//! `gc`: artifacts the current pipeline no longer reaches.

use super::runner::Engine;
use super::store::{sub_stage, Artifact};
use anyhow::Result;
use std::collections::BTreeSet;

/// Artifacts nothing kept reaches. Kept are the current pipeline's keys and,
/// unless `workspace_only`, every recorded run's (the experiments); then
/// everything in their lineage (through the manifests) and every
/// sub-artifact (a trial) a kept artifact lists.
pub fn unreachable(engine: &Engine, workspace_only: bool) -> Result<Vec<Artifact>> {
    let planned = engine.plan_all()?;
    let mut keep: BTreeSet<(String, String)> = BTreeSet::new();
    let mut todo: Vec<(String, String)> = planned.iter().map(|(s, p)| (s.clone(), p.key.clone())).collect();
    if !workspace_only {
        for run in super::runs::list(&engine.store)? {
            todo.extend(run.stages.into_iter());
        }
    }
    while let Some((s, k)) = todo.pop() {
        if keep.insert((s.clone(), k.clone())) {
            if let Some(a) = engine.store.get(&s, &k)? {
                todo.extend(a.manifest.upstream.iter().map(|(d, key)| (d.clone(), key.clone())));
                for (kind, keys) in &a.manifest.children {
                    todo.extend(keys.iter().map(|key| (sub_stage(&s, kind), key.clone())));
                }
            }
        }
    }
    Ok(engine.store.list()?.into_iter().filter(|a| !keep.contains(&(a.stage.clone(), a.key.clone()))).collect())
}

/// The bytes an artifact holds: its outputs as its manifest lists them.
pub fn size(a: &Artifact) -> u64 {
    a.manifest.outputs.values().map(|f| f.size).sum()
}
