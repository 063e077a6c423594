//! `gc`: artifacts the current pipeline no longer reaches.

use super::runner::Engine;
use super::store::{sub_stage, Artifact};
use anyhow::Result;
use std::collections::BTreeSet;

/// Artifacts the current pipeline no longer reaches: not a current key, not
/// in the lineage of one (through the manifests), and not a sub-artifact
/// (a trial) that a kept artifact lists.
pub fn unreachable(engine: &Engine) -> Result<Vec<Artifact>> {
    let planned = engine.plan_all()?;
    let mut keep: BTreeSet<(String, String)> = BTreeSet::new();
    let mut todo: Vec<(String, String)> = planned.iter().map(|(s, p)| (s.clone(), p.key.clone())).collect();
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
