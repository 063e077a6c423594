//! Run records: each successful `run` writes which artifact key every stage
//! it reached had, with its overrides and an optional name, to
//! `artifacts/.runs/`. They are the experiments: `exp show` lists them as
//! rows over the whole pipeline, and `gc` keeps what any of them needs.

use super::store::{utc_string, Store};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub name: String,
    pub finished_unix: f64,
    /// The -P overrides it ran with, as typed.
    pub overrides: Vec<String>,
    pub profile: String,
    /// Stage name -> artifact key, for every stage the run reached.
    pub stages: BTreeMap<String, String>,
}

impl RunRecord {
    pub fn finished_utc(&self) -> String {
        let t = utc_string(self.finished_unix);
        t.get(..19).unwrap_or(&t).replace('T', " ")
    }
}

fn folder(store: &Store) -> PathBuf {
    store.root.join(".runs")
}

/// A run's name must make a plain file name.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !name.starts_with('.');
    if !ok {
        bail!("run name `{name}`: use 1 to 64 letters, digits, `-`, `_` or `.`, not starting with `.`");
    }
    Ok(())
}

/// Record a finished run. A named run replaces an earlier record of that
/// name; an unnamed run that reached exactly the artifacts of an earlier
/// record (a no-op rerun) adds nothing.
pub fn record(store: &Store, name: Option<&str>, overrides: Vec<String>, profile: &str, stages: BTreeMap<String, String>) -> Result<RunRecord> {
    let existing = list(store)?;
    if name.is_none() {
        if let Some(same) = existing.iter().find(|r| r.stages == stages) {
            return Ok(same.clone());
        }
    }
    let finished_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let name = match name {
        Some(n) => n.to_owned(),
        None => (existing.len() + 1..).map(|n| format!("run-{n}")).find(|n| !existing.iter().any(|r| &r.name == n)).unwrap_or_default(),
    };
    check_name(&name)?;
    let rec = RunRecord { name, finished_unix, overrides, profile: profile.to_owned(), stages };
    let dir = folder(store);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{}.json", rec.name));
    let tmp = dir.join(format!(".{}.json.tmp{}", rec.name, std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&rec)?).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(rec)
}

/// Every run record, oldest first. A damaged record is an error naming it:
/// gc must not forget an experiment because its record cannot be read.
pub fn list(store: &Store) -> Result<Vec<RunRecord>> {
    let dir = folder(store);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(vec![]);
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let rec: RunRecord = serde_json::from_slice(&bytes).with_context(|| format!("{}: not a run record (remove it to forget that run)", path.display()))?;
        out.push(rec);
    }
    out.sort_by(|a, b| a.finished_unix.total_cmp(&b.finished_unix).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// The record named `name`.
pub fn find(store: &Store, name: &str) -> Result<Option<RunRecord>> {
    Ok(list(store)?.into_iter().find(|r| r.name == name))
}
