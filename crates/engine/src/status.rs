//! `status`: is each stage's artifact fresh, stale or missing, and why.

use super::runner::{Engine, Found};
use super::store::Artifact;
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeSet;

/// fresh: an artifact exists for the current key; stale: only for older keys; missing: none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageState {
    Fresh,
    Stale,
    Missing,
    /// An artifact exists for the current key but fails its check.
    Damaged,
}

impl std::fmt::Display for StageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            StageState::Fresh => "fresh",
            StageState::Stale => "stale",
            StageState::Missing => "missing",
            StageState::Damaged => "damaged",
        })
    }
}

#[derive(Debug, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub key: String,
    pub state: StageState,
    pub reasons: Vec<String>,
}

pub fn status(engine: &Engine) -> Result<Vec<StageStatus>> {
    let planned = engine.plan_all()?;
    // Read every manifest only when a stage is not fresh: a no-op status costs what a no-op run does.
    let mut all: Option<Vec<Artifact>> = None;
    let mut out = Vec::new();
    for s in &engine.pipeline.stages {
        let p = &planned[&s.name];
        match engine.find(&s.name, &p.key)? {
            Found::Fresh(_) => {
                out.push(StageStatus { stage: s.name.clone(), key: p.key.clone(), state: StageState::Fresh, reasons: vec![] });
                continue;
            }
            Found::Damaged(_, problems) => {
                let reasons = problems.iter().map(|p| p.to_string()).collect();
                out.push(StageStatus { stage: s.name.clone(), key: p.key.clone(), state: StageState::Damaged, reasons });
                continue;
            }
            Found::Missing => {}
        }
        // Compare with the most recent artifact of this stage.
        if all.is_none() {
            all = Some(engine.store.list()?);
        }
        let last: Option<&Artifact> = all.as_ref().and_then(|all| all.iter().rev().find(|a| a.stage == s.name));
        let Some(last) = last else {
            out.push(StageStatus { stage: s.name.clone(), key: p.key.clone(), state: StageState::Missing, reasons: vec!["never run".into()] });
            continue;
        };
        let m = &last.manifest;
        let mut reasons = Vec::new();
        let version = engine.stage_impl(&s.uses)?.info().version;
        if m.version != version {
            reasons.push(format!("code version {} -> {version}", m.version));
        }
        let old = m.params.as_object().cloned().unwrap_or_default();
        let now = s.params.keyed(engine.stage_impl(&s.uses)?.unkeyed_params());
        let keys: BTreeSet<&String> = old.keys().chain(now.0.keys()).collect();
        for k in keys {
            let (a, b) = (old.get(k), now.0.get(k));
            if a != b {
                let show = |v: Option<&serde_json::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(unset)".into());
                reasons.push(format!("param {}.{k}: {} -> {}", s.name, show(a), show(b)));
            }
        }
        for (d, key) in &p.upstream {
            if m.upstream.get(d) != Some(key) {
                reasons.push(format!("upstream {d} changed ({} -> {key})", m.upstream.get(d).map(String::as_str).unwrap_or("none")));
            }
        }
        let old_raw = last.raw_inputs()?;
        let new_raw = p.raw_files();
        if !new_raw.is_empty() || !old_raw.is_empty() {
            let old: std::collections::BTreeMap<&str, &str> = old_raw.iter().map(|r| (r.path.as_str(), r.blake3.as_str())).collect();
            let new: std::collections::BTreeMap<&str, &str> = new_raw.iter().map(|r| (r.path.as_str(), r.blake3.as_str())).collect();
            let changed: Vec<&str> = new.iter().filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v)).map(|(k, _)| *k).collect();
            let added: Vec<&str> = new.keys().filter(|k| !old.contains_key(*k)).copied().collect();
            let removed: Vec<&str> = old.keys().filter(|k| !new.contains_key(*k)).copied().collect();
            for (what, list) in [("changed", changed), ("added", added), ("removed", removed)] {
                if !list.is_empty() {
                    let shown: Vec<&str> = list.iter().take(3).copied().collect();
                    let more = if list.len() > 3 { format!(" and {} more", list.len() - 3) } else { String::new() };
                    reasons.push(format!("raw file {what}: {}{more}", shown.join(", ")));
                }
            }
        }
        if reasons.is_empty() {
            reasons.push(format!("key differs from last artifact {}", last.key));
        }
        out.push(StageStatus { stage: s.name.clone(), key: p.key.clone(), state: StageState::Stale, reasons });
    }
    Ok(out)
}
