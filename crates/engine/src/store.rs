//! The artifact store: `artifacts/<stage>/<key>/` with the stage's outputs and
//! a manifest. Artifacts are built in `artifacts/.tmp/` and renamed into place
//! only when complete, so a killed run never leaves one that looks complete.

use super::hash::{hash_file, hash_written_file};
use super::stage::{RawFile, Summary};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub size: u64,
    pub blake3: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    pub key: String,
    pub version: u32,
    pub params: serde_json::Value,
    /// The params the stage actually used, where they differ from `params`
    /// (tuned params fed in from upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_params: Option<serde_json::Value>,
    pub upstream: BTreeMap<String, String>,
    pub outputs: BTreeMap<String, FileEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw_inputs: Vec<RawFile>,
    pub started_unix: f64,
    pub finished_unix: f64,
    pub started_utc: String,
    pub duration_s: f64,
    pub liverseg_version: String,
    pub metrics: Summary,
    /// Sub-artifacts the run used (a search's trials), by kind: `gc` keeps
    /// them while this artifact is kept.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub children: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Artifact {
    pub stage: String,
    pub key: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Artifact {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

pub struct Store {
    pub root: PathBuf,
}

/// Held for the whole of a run that writes the store.
pub struct StoreLock {
    _file: fs::File,
}

impl Store {
    pub fn new(root: PathBuf) -> Self {
        Store { root }
    }

    pub fn artifact_dir(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(stage).join(key)
    }

    pub fn scratch_dir(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(".scratch").join(stage).join(key)
    }

    pub fn stat_cache_file(&self) -> PathBuf {
        self.root.join(".cache").join("stat-cache.json")
    }

    /// The complete artifact for (stage, key), if any. An artifact directory
    /// only ever appears by rename after its manifest was written.
    pub fn get(&self, stage: &str, key: &str) -> Result<Option<Artifact>> {
        let dir = self.artifact_dir(stage, key);
        let mpath = dir.join(MANIFEST);
        if !mpath.is_file() {
            return Ok(None);
        }
        let manifest = read_manifest(&mpath)?;
        Ok(Some(Artifact { stage: stage.to_owned(), key: key.to_owned(), dir, manifest }))
    }

    /// Every complete artifact in the store, newest last.
    pub fn list(&self) -> Result<Vec<Artifact>> {
        let mut out = Vec::new();
        let Ok(stages) = fs::read_dir(&self.root) else { return Ok(out) };
        for s in stages.flatten() {
            let stage = s.file_name().to_string_lossy().into_owned();
            if stage.starts_with('.') || !s.path().is_dir() {
                continue;
            }
            for k in fs::read_dir(s.path()).with_context(|| format!("cannot list {}", s.path().display()))?.flatten() {
                let key = k.file_name().to_string_lossy().into_owned();
                if let Some(a) = self.get(&stage, &key)? {
                    out.push(a);
                }
            }
        }
        out.sort_by(|a, b| a.manifest.finished_unix.total_cmp(&b.manifest.finished_unix));
        Ok(out)
    }

    /// Take the store's write lock. If another process holds it, say so and wait.
    pub fn lock(&self) -> Result<StoreLock> {
        fs::create_dir_all(&self.root).with_context(|| format!("cannot create the store at {}", self.root.display()))?;
        let path = self.root.join(".lock");
        let mut file = fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let holder = if holder.trim().is_empty() { String::new() } else { format!(" ({})", holder.trim()) };
                eprintln!("waiting: another liverseg process{holder} is writing {}", self.root.display());
                file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
        file.set_len(0).ok();
        let _ = write!(file, "pid {}", std::process::id());
        // Any build directory left now belongs to a process that died mid-stage.
        let tmp = self.root.join(".tmp");
        if tmp.is_dir() {
            fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear stale builds in {}", tmp.display()))?;
        }
        Ok(StoreLock { _file: file })
    }

    /// A fresh, empty build directory for (stage, key).
    pub fn begin(&self, stage: &str, key: &str, _lock: &StoreLock) -> Result<PathBuf> {
        let dir = self.root.join(".tmp").join(format!("{stage}-{key}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// Hash the outputs, write the manifest, and rename the build into place,
    /// replacing an existing artifact of the same key (for `stage --force`).
    pub fn commit(&self, build: &Path, mut manifest: Manifest, _lock: &StoreLock) -> Result<Artifact> {
        manifest.outputs = hash_tree(build, hash_written_file)?;
        let text = serde_json::to_string_pretty(&manifest)?;
        fs::write(build.join(MANIFEST), text).with_context(|| format!("cannot write manifest in {}", build.display()))?;
        let dest = self.artifact_dir(&manifest.stage, &manifest.key);
        fs::create_dir_all(dest.parent().expect("has parent")).with_context(|| format!("cannot create {}", dest.display()))?;
        if dest.exists() {
            let trash = self.root.join(".tmp").join(format!("old-{}-{}", manifest.stage, manifest.key));
            fs::rename(&dest, &trash).with_context(|| format!("cannot move old {} aside", dest.display()))?;
            fs::rename(build, &dest).with_context(|| format!("cannot move build into {}", dest.display()))?;
            fs::remove_dir_all(&trash).ok();
        } else {
            fs::rename(build, &dest).with_context(|| format!("cannot move build into {}", dest.display()))?;
        }
        Ok(Artifact { stage: manifest.stage.clone(), key: manifest.key.clone(), dir: dest, manifest })
    }

    pub fn remove(&self, a: &Artifact, _lock: &StoreLock) -> Result<()> {
        fs::remove_dir_all(&a.dir).with_context(|| format!("cannot remove {}", a.dir.display()))?;
        let scratch = self.scratch_dir(&a.stage, &a.key);
        if scratch.exists() {
            fs::remove_dir_all(&scratch).ok();
        }
        Ok(())
    }
}

/// The folder name of a stage's sub-artifacts of `kind` (`tune+trial`).
pub fn sub_stage(stage: &str, kind: &str) -> String {
    format!("{stage}+{kind}")
}

/// A stage's cached sub-artifacts of one kind (a search's trials): each has
/// its own key and a manifest, is built aside and renamed into place like any
/// artifact, and is seen by `status`, `verify` and `gc`.
pub struct SubArtifacts<'a> {
    store: &'a Store,
    lock: &'a StoreLock,
    stage: String,
    kind: String,
    used: &'a std::sync::Mutex<BTreeMap<String, Vec<String>>>,
}

impl<'a> SubArtifacts<'a> {
    pub(crate) fn new(store: &'a Store, lock: &'a StoreLock, parent: &str, kind: &str, used: &'a std::sync::Mutex<BTreeMap<String, Vec<String>>>) -> Self {
        SubArtifacts { store, lock, stage: sub_stage(parent, kind), kind: kind.to_owned(), used }
    }

    fn note(&self, key: &str) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let keys = used.entry(self.kind.clone()).or_default();
        if !keys.iter().any(|k| k == key) {
            keys.push(key.to_owned());
        }
    }

    /// The complete sub-artifact of `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Artifact>> {
        let a = self.store.get(&self.stage, key)?;
        if a.is_some() {
            self.note(key);
        }
        Ok(a)
    }

    /// A fresh build folder for `key`.
    pub fn begin(&self, key: &str) -> Result<PathBuf> {
        self.store.begin(&self.stage, key, self.lock)
    }

    /// Checkpoints of an interrupted build of `key`.
    pub fn scratch_dir(&self, key: &str) -> PathBuf {
        self.store.scratch_dir(&self.stage, key)
    }

    /// Commit a finished build of `key` with its manifest.
    pub fn commit(&self, build: &Path, key: &str, version: u32, params: &super::params::Params, upstream: BTreeMap<String, String>, metrics: Summary, started_unix: f64) -> Result<Artifact> {
        let finished = now_unix();
        let manifest = Manifest {
            stage: self.stage.clone(),
            key: key.to_owned(),
            version,
            params: serde_json::to_value(&params.0)?,
            effective_params: None,
            upstream,
            outputs: BTreeMap::new(),
            raw_inputs: Vec::new(),
            started_unix,
            finished_unix: finished,
            started_utc: utc_string(started_unix),
            duration_s: finished - started_unix,
            liverseg_version: env!("CARGO_PKG_VERSION").to_owned(),
            metrics,
            children: BTreeMap::new(),
        };
        let a = self.store.commit(build, manifest, self.lock)?;
        let scratch = self.scratch_dir(key);
        if scratch.exists() {
            fs::remove_dir_all(&scratch).ok();
        }
        self.note(key);
        Ok(a)
    }
}

pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a liverseg manifest", path.display()))
}

/// blake3 and size of every file under `dir` except the manifest, by
/// relative path. `hash` is `hash_file`, or `hash_written_file` when
/// committing what this process just wrote.
pub fn hash_tree(dir: &Path, hash: fn(&Path) -> Result<String>) -> Result<BTreeMap<String, FileEntry>> {
    use rayon::prelude::*;
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.with_context(|| format!("cannot walk {}", dir.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).expect("under dir").to_string_lossy().into_owned();
        if rel != MANIFEST {
            files.push((rel, entry.into_path()));
        }
    }
    files
        .par_iter()
        .map(|(rel, path)| {
            let size = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?.len();
            Ok((rel.clone(), FileEntry { size, blake3: hash(path)? }))
        })
        .collect()
}

/// Differences between an artifact's files and its manifest.
pub fn verify(a: &Artifact) -> Result<Vec<String>> {
    let actual = hash_tree(&a.dir, hash_file)?;
    let mut problems = Vec::new();
    for (name, want) in &a.manifest.outputs {
        match actual.get(name) {
            None => problems.push(format!("{}: missing", a.dir.join(name).display())),
            Some(got) if got != want => problems.push(format!("{}: content changed (blake3 {} in the manifest, {} on disk)", a.dir.join(name).display(), &want.blake3[..16], &got.blake3[..16])),
            _ => {}
        }
    }
    for name in actual.keys() {
        if !a.manifest.outputs.contains_key(name) {
            problems.push(format!("{}: not in the manifest", a.dir.join(name).display()));
        }
    }
    if a.manifest.key != a.key || a.manifest.stage != a.stage {
        bail!("{}: manifest names {}/{}", a.dir.display(), a.manifest.stage, a.manifest.key);
    }
    Ok(problems)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_string(unix: f64) -> String {
    let secs = unix.floor() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formatting() {
        assert_eq!(super::utc_string(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc_string(1_798_000_000.0), "2026-12-23T04:26:40Z");
    }
}
