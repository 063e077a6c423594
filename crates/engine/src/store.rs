//! The artifact store: `artifacts/<stage>/<key>/` with the stage's outputs and
//! a manifest. Artifacts are built in `artifacts/.tmp/` and renamed into place
//! only when complete, so a killed run never leaves one that looks complete.

use super::hash::{hash_file, hash_written_file};
use super::stage::{RawFile, Summary};
use anyhow::{Context, Result};
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
    /// blake3 of manifest.json as read.
    pub manifest_blake3: String,
}

/// What can be wrong with an artifact or the store around it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("{0}: missing")]
    Missing(PathBuf),
    #[error("{path}: {got} bytes, the manifest says {want}")]
    Resized { path: PathBuf, want: u64, got: u64 },
    #[error("{path}: content changed (blake3 {want} in the manifest, {got} on disk)")]
    Changed { path: PathBuf, want: String, got: String },
    #[error("{0}: not in the manifest")]
    Extra(PathBuf),
    #[error("{0}: edited since it was written (its blake3 is not the one the store recorded)")]
    ManifestEdited(PathBuf),
    #[error("{0}: not recorded in the store's index (written by another tool, or by a liverseg before the index)")]
    NotIndexed(PathBuf),
    #[error("{0}: no manifest (an incomplete build, or not an artifact)")]
    NoManifest(PathBuf),
    #[error("{0}: {1}")]
    BadManifest(PathBuf, String),
    #[error("{0}: left over from an interrupted build")]
    Leftover(PathBuf),
}

impl Problem {
    /// The artifact (or folder) the problem makes unusable.
    pub fn path(&self) -> &Path {
        match self {
            Problem::Missing(p) | Problem::Extra(p) | Problem::ManifestEdited(p) | Problem::NotIndexed(p) | Problem::NoManifest(p) | Problem::BadManifest(p, _) | Problem::Leftover(p) => p,
            Problem::Resized { path, .. } | Problem::Changed { path, .. } => path,
        }
    }
}

/// How closely to look at an artifact before trusting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Manifest against the index, every output's size, and the small
    /// metadata files (JSON, Parquet) re-hashed: what every use costs.
    Quick,
    /// Every file re-hashed, nothing extra: `verify` and `run --verify`.
    Full,
}

/// Files re-hashed on every use: small, and what stages read whole.
fn rehashed_on_use(name: &str, size: u64) -> bool {
    (name.ends_with(".json") || name.ends_with(".parquet")) && size <= 4 << 20
}

impl Artifact {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The artifact in `dir`, from its manifest.
    pub fn load(dir: &Path) -> Result<Self> {
        let mpath = dir.join(MANIFEST);
        let bytes = fs::read(&mpath).with_context(|| format!("cannot read {}", mpath.display()))?;
        let manifest: Manifest = serde_json::from_slice(&bytes).with_context(|| format!("{}: not a liverseg manifest", mpath.display()))?;
        Ok(Artifact { stage: manifest.stage.clone(), key: manifest.key.clone(), dir: dir.to_path_buf(), manifest, manifest_blake3: blake3::hash(&bytes).to_hex().to_string() })
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

    /// The index entry of an artifact: the blake3 of its manifest, recorded
    /// when it was committed.
    fn index_file(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(".index").join(stage).join(key)
    }

    /// The complete artifact for (stage, key), if any. An artifact directory
    /// only ever appears by rename after its manifest was written.
    pub fn get(&self, stage: &str, key: &str) -> Result<Option<Artifact>> {
        let dir = self.artifact_dir(stage, key);
        let mpath = dir.join(MANIFEST);
        if !mpath.is_file() {
            return Ok(None);
        }
        let bytes = fs::read(&mpath).with_context(|| format!("cannot read {}", mpath.display()))?;
        let manifest = serde_json::from_slice(&bytes).with_context(|| format!("{}: not a liverseg manifest", mpath.display()))?;
        Ok(Some(Artifact { stage: stage.to_owned(), key: key.to_owned(), dir, manifest, manifest_blake3: blake3::hash(&bytes).to_hex().to_string() }))
    }

    /// What is wrong with `a`, looked at to `depth`; empty when it can be trusted.
    pub fn check(&self, a: &Artifact, depth: Depth) -> Vec<Problem> {
        let mpath = a.dir.join(MANIFEST);
        let mut problems = Vec::new();
        if a.manifest.key != a.key || a.manifest.stage != a.stage {
            problems.push(Problem::BadManifest(mpath.clone(), format!("names {}/{}", a.manifest.stage, a.manifest.key)));
        }
        match fs::read_to_string(self.index_file(&a.stage, &a.key)) {
            Ok(h) if h.trim() == a.manifest_blake3 => {}
            Ok(_) => problems.push(Problem::ManifestEdited(mpath)),
            Err(_) => problems.push(Problem::NotIndexed(mpath)),
        }
        if depth == Depth::Full {
            return match verify_files(a) {
                Ok(p) => problems.into_iter().chain(p).collect(),
                Err(e) => problems.into_iter().chain([Problem::BadManifest(a.dir.clone(), format!("{e:#}"))]).collect(),
            };
        }
        for (name, want) in &a.manifest.outputs {
            let path = a.dir.join(name);
            match fs::metadata(&path) {
                Err(_) => problems.push(Problem::Missing(path)),
                Ok(m) if m.len() != want.size => problems.push(Problem::Resized { path, want: want.size, got: m.len() }),
                Ok(m) if rehashed_on_use(name, m.len()) => match hash_file(&path) {
                    Ok(h) if h == want.blake3 => {}
                    Ok(h) => problems.push(Problem::Changed { path, want: want.blake3[..16].to_owned(), got: h[..16].to_owned() }),
                    Err(_) => problems.push(Problem::Missing(path)),
                },
                Ok(_) => {}
            }
        }
        problems
    }

    /// Every problem in the store: each artifact checked to `depth` (sub-
    /// artifacts included), folders without a complete manifest, and (when
    /// no run holds the lock) leftovers of interrupted builds.
    pub fn audit(&self, depth: Depth) -> Result<(usize, Vec<Problem>)> {
        let mut problems = Vec::new();
        let mut artifacts = 0;
        let Ok(stages) = fs::read_dir(&self.root) else {
            return Ok((0, problems));
        };
        for s in stages.flatten() {
            let name = s.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !s.path().is_dir() {
                continue;
            }
            for k in fs::read_dir(s.path()).with_context(|| format!("cannot list {}", s.path().display()))?.flatten() {
                let dir = k.path();
                if !dir.join(MANIFEST).is_file() {
                    problems.push(Problem::NoManifest(dir));
                    continue;
                }
                match self.get(&name, &k.file_name().to_string_lossy()) {
                    Ok(Some(a)) => {
                        artifacts += 1;
                        problems.extend(self.check(&a, depth));
                    }
                    Ok(None) => problems.push(Problem::NoManifest(dir)),
                    Err(e) => problems.push(Problem::BadManifest(dir.join(MANIFEST), format!("{e:#}"))),
                }
            }
        }
        if !self.locked_by_another()? {
            if let Ok(left) = fs::read_dir(self.root.join(".tmp")) {
                problems.extend(left.flatten().map(|e| Problem::Leftover(e.path())));
            }
        }
        Ok((artifacts, problems))
    }

    /// Whether another process holds the write lock (a run in progress).
    pub fn locked_by_another(&self) -> Result<bool> {
        let path = self.root.join(".lock");
        let Ok(file) = fs::OpenOptions::new().read(true).write(true).open(&path) else {
            return Ok(false);
        };
        Ok(match file.try_lock() {
            Ok(()) => false,
            Err(fs::TryLockError::WouldBlock) => true,
            Err(fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
        })
    }

    /// Move an artifact (or a folder that is not one) aside, to
    /// `.damaged/`, so the next run rebuilds it and nothing is lost.
    pub fn set_aside(&self, dir: &Path, _lock: &StoreLock) -> Result<PathBuf> {
        let rel = dir.strip_prefix(&self.root).unwrap_or(dir);
        let base = format!("{}-{}", rel.to_string_lossy().replace('/', "__"), (now_unix() * 1e6) as u64);
        let dest = (0..).map(|n| self.root.join(".damaged").join(format!("{base}.{n}"))).find(|d| !d.exists()).expect("a free name");
        fs::create_dir_all(dest.parent().expect("under .damaged")).with_context(|| format!("cannot create {}", dest.display()))?;
        fs::rename(dir, &dest).with_context(|| format!("cannot move {} aside", dir.display()))?;
        if let (Some(stage), Some(key)) = (rel.parent(), rel.file_name()) {
            let _ = fs::remove_file(self.index_file(&stage.to_string_lossy(), &key.to_string_lossy()));
        }
        Ok(dest)
    }

    /// Every complete artifact in the store, newest last.
    pub fn list(&self) -> Result<Vec<Artifact>> {
        let mut out = Vec::new();
        let Ok(stages) = fs::read_dir(&self.root) else {
            return Ok(out);
        };
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
    pub fn commit(&self, build: &Path, mut manifest: Manifest, lock: &StoreLock) -> Result<Artifact> {
        manifest.outputs = hash_tree(build, hash_written_file)?;
        let text = serde_json::to_string_pretty(&manifest)?;
        fs::write(build.join(MANIFEST), &text).with_context(|| format!("cannot write manifest in {}", build.display()))?;
        self.install(build, &text, manifest, lock)
    }

    /// Put a complete build (outputs and manifest.json, whose text is
    /// `text`: one pulled from a remote, say) into the store.
    pub fn install(&self, build: &Path, text: &str, manifest: Manifest, _lock: &StoreLock) -> Result<Artifact> {
        // The index records the manifest's hash before the artifact appears:
        // an artifact is never visible without its entry.
        let manifest_blake3 = blake3::hash(text.as_bytes()).to_hex().to_string();
        let index = self.index_file(&manifest.stage, &manifest.key);
        fs::create_dir_all(index.parent().expect("under .index")).with_context(|| format!("cannot create {}", index.display()))?;
        let tmp = index.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, &manifest_blake3).and_then(|_| fs::rename(&tmp, &index)).with_context(|| format!("cannot write {}", index.display()))?;
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
        Ok(Artifact { stage: manifest.stage.clone(), key: manifest.key.clone(), dir: dest, manifest, manifest_blake3 })
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

    /// The complete sub-artifact of `key`, if any and if it passes the
    /// quick check; a damaged one is set aside, to be made again.
    pub fn get(&self, key: &str) -> Result<Option<Artifact>> {
        let Some(a) = self.store.get(&self.stage, key)? else {
            return Ok(None);
        };
        let problems = self.store.check(&a, Depth::Quick);
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            let dest = self.store.set_aside(&a.dir, self.lock)?;
            eprintln!("damaged {}@{key}: {}; moved to {} and making it again", self.stage, list.join("; "), dest.display());
            return Ok(None);
        }
        self.note(key);
        Ok(Some(a))
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

/// Differences between an artifact's files and its manifest, every file re-hashed.
fn verify_files(a: &Artifact) -> Result<Vec<Problem>> {
    let actual = hash_tree(&a.dir, hash_file)?;
    let mut problems = Vec::new();
    for (name, want) in &a.manifest.outputs {
        let path = a.dir.join(name);
        match actual.get(name) {
            None => problems.push(Problem::Missing(path)),
            Some(got) if got != want => problems.push(Problem::Changed { path, want: want.blake3[..16].to_owned(), got: got.blake3[..16].to_owned() }),
            _ => {}
        }
    }
    for name in actual.keys() {
        if !a.manifest.outputs.contains_key(name) {
            problems.push(Problem::Extra(a.dir.join(name)));
        }
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
