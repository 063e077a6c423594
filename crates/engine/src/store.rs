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

/// The raw files in a source stage's key, beside its manifest: a no-op run
/// reads the manifest, and a million raw files would make it 180 MB.
pub const RAW_INPUTS: &str = "raw_inputs.json";

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
    #[error("{0}: a symbolic link inside the store (never followed; `verify --repair` moves the link aside)")]
    Symlink(PathBuf),
}

impl Problem {
    /// The artifact (or folder) the problem makes unusable.
    pub fn path(&self) -> &Path {
        match self {
            Problem::Missing(p)
            | Problem::Extra(p)
            | Problem::ManifestEdited(p)
            | Problem::NotIndexed(p)
            | Problem::NoManifest(p)
            | Problem::BadManifest(p, _)
            | Problem::Leftover(p)
            | Problem::Symlink(p) => p,
            Problem::Resized { path, .. } | Problem::Changed { path, .. } => path,
        }
    }
}

/// How closely to look at an artifact before trusting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Manifest against the index, and every output either re-hashed or
    /// unchanged since it was last hashed (its size, mtime, ctime and inode
    /// as recorded then): what every use costs. A write to a file, even
    /// one that restores its mtime, moves its ctime, so it is re-hashed.
    Quick,
    /// Every file re-hashed, nothing extra: `verify` and `run --verify`.
    Full,
}

/// A file's identity when it was last hashed: any write moves its ctime
/// (which no user can set), a replacement changes its inode. Not the
/// device number: on a cluster's shared file system it differs by node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        Stamp { size: m.len(), mtime_ns: ns(m.mtime(), m.mtime_nsec()), ctime_ns: ns(m.ctime(), m.ctime_nsec()), inode: m.ino() }
    }
}

/// The verified stamps of an artifact's outputs, by name.
type Stamps = BTreeMap<String, Stamp>;

/// Why `name` cannot be a single folder name in the store: empty, `.`,
/// `..`, hidden (the store's own folders start with a dot), or holding a
/// separator or NUL.
pub fn bad_component(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name == "." || name == ".." {
        Some("a relative step")
    } else if name.starts_with('.') {
        Some("hidden (starts with a dot)")
    } else if name.contains(['/', '\\', '\0']) {
        Some("holds a path separator or NUL")
    } else {
        None
    }
}

/// Why `name` cannot be a file inside an artifact: it must be relative,
/// of plain components, never `..`, and not the manifest itself.
pub fn bad_relative(name: &str) -> Option<String> {
    if name.starts_with('/') {
        return Some("an absolute path".into());
    }
    if name == MANIFEST {
        return Some("the manifest's own name".into());
    }
    name.split('/').find_map(|c| match c {
        "" => Some("an empty component".into()),
        "." | ".." => Some(format!("a `{c}` component")),
        _ if c.contains(['\\', '\0']) => Some("a backslash or NUL".into()),
        _ => None,
    })
}

/// Whether `key` looks like a stage key (hex, as `stage_key` makes them).
fn is_key(key: &str) -> bool {
    key.len() == super::hash::KEY_HEX_LEN && key.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Manifest {
    /// Every name the store would turn into a path (stage, key, output
    /// files, upstream and child keys) is safe, so no manifest, local or
    /// pulled, can make the store touch anything outside its folder.
    pub fn check_names(&self) -> Result<(), String> {
        if let Some(why) = bad_component(&self.stage) {
            return Err(format!("stage name `{}` is {why}", self.stage));
        }
        if !is_key(&self.key) {
            return Err(format!("key `{}` is not a stage key", self.key));
        }
        for (name, entry) in &self.outputs {
            if let Some(why) = bad_relative(name) {
                return Err(format!("output `{name}` is {why}"));
            }
            if entry.blake3.len() != 64 || !entry.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("output `{name}` has no blake3 hash (`{}`)", entry.blake3));
            }
        }
        for (stage, key) in &self.upstream {
            if bad_component(stage).is_some() || !is_key(key) {
                return Err(format!("upstream `{stage}` → `{key}` is not a stage and key"));
            }
        }
        for (kind, keys) in &self.children {
            if let Some(why) = bad_component(kind) {
                return Err(format!("child kind `{kind}` is {why}"));
            }
            if let Some(k) = keys.iter().find(|k| !is_key(k)) {
                return Err(format!("child key `{k}` of kind `{kind}` is not a stage key"));
            }
        }
        Ok(())
    }

    /// Whether the raw files are in `RAW_INPUTS` rather than the manifest.
    pub fn raw_inputs_beside(&self) -> bool {
        self.outputs.contains_key(RAW_INPUTS)
    }

    /// The key this manifest's declared inputs (stage, version, params,
    /// upstream keys, the hashes of `raw`, its raw files) hash to. A
    /// sub-artifact's key is hashed under its kind (`trial` for `tune.train+trial`).
    pub fn declared_key(&self, raw: &[RawFile]) -> String {
        let stage = self.stage.split_once('+').map_or(self.stage.as_str(), |(_, kind)| kind);
        let params = serde_json::to_string(&self.params).unwrap_or_default();
        super::hash::stage_key(&super::hash::KeyInputs { stage, version: self.version, params_json: &params, upstream: &self.upstream, raw_files: &raw })
    }
}

impl Artifact {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The raw files in this artifact's key: from `RAW_INPUTS`, or the
    /// manifest of an artifact made before it.
    pub fn raw_inputs(&self) -> Result<Vec<RawFile>> {
        if !self.manifest.raw_inputs_beside() {
            return Ok(self.manifest.raw_inputs.clone());
        }
        read_raw_inputs(&self.file(RAW_INPUTS))
    }

    /// The artifact in `dir`, from its manifest.
    pub fn load(dir: &Path) -> Result<Self> {
        let mpath = dir.join(MANIFEST);
        let bytes = fs::read(&mpath).with_context(|| format!("cannot read {}", mpath.display()))?;
        let manifest: Manifest = serde_json::from_slice(&bytes).with_context(|| format!("{}: not a liverseg manifest", mpath.display()))?;
        Ok(Artifact { stage: manifest.stage.clone(), key: manifest.key.clone(), dir: dir.to_path_buf(), manifest, manifest_blake3: blake3::hash(&bytes).to_hex().to_string() })
    }
}

/// A `RAW_INPUTS` file's list.
pub fn read_raw_inputs(path: &Path) -> Result<Vec<RawFile>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a list of raw files", path.display()))
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

    pub fn scan_cache_file(&self) -> PathBuf {
        self.root.join(".cache").join("scan.bin")
    }

    /// The index entry of an artifact: the blake3 of its manifest, recorded
    /// when it was committed.
    fn index_file(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(".index").join(stage).join(key)
    }

    /// The stamps of an artifact's files when they were last hashed and
    /// found equal to the manifest, beside its index entry.
    fn stamps_file(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(".index").join(stage).join(format!("{key}.stamps"))
    }

    fn read_stamps(&self, a: &Artifact) -> Stamps {
        // The manifest's hash heads the file: stamps of another build of the same key never count.
        let Ok(text) = fs::read_to_string(self.stamps_file(&a.stage, &a.key)) else { return Stamps::new() };
        match text.split_once('\n') {
            Some((head, body)) if head == a.manifest_blake3 => serde_json::from_str(body).unwrap_or_default(),
            _ => Stamps::new(),
        }
    }

    /// Record `stamps` as verified. A cache: failing to write it costs a re-hash next time.
    fn write_stamps(&self, a: &Artifact, stamps: &Stamps) {
        let path = self.stamps_file(&a.stage, &a.key);
        if self.symlink_in(&path).is_some() {
            return;
        }
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_file_name(format!("{}.stamps.tmp{}-{n}", a.key, std::process::id()));
        let text = format!("{}\n{}", a.manifest_blake3, serde_json::to_string(stamps).unwrap_or_default());
        if fs::write(&tmp, text).and_then(|_| fs::rename(&tmp, &path)).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }

    /// Stamp every output of `a` as it is now (just hashed, or just written).
    fn stamp_all(&self, a: &Artifact) {
        let stamps: Option<Stamps> = a.manifest.outputs.keys().map(|name| fs::symlink_metadata(a.dir.join(name)).ok().map(|m| (name.clone(), Stamp::of(&m)))).collect();
        if let Some(stamps) = stamps {
            self.write_stamps(a, &stamps);
        }
    }

    /// The first symbolic link on the way from the store's root down to
    /// `path` (the root itself may be one: a store on another disk).
    pub fn symlink_in(&self, path: &Path) -> Option<PathBuf> {
        let rel = path.strip_prefix(&self.root).ok()?;
        let mut at = self.root.clone();
        for c in rel.components() {
            at.push(c);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => return Some(at),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Refuse to write at `path` when a symbolic link would take the write out of the store.
    fn contained(&self, path: &Path) -> Result<()> {
        match self.symlink_in(path) {
            Some(link) => anyhow::bail!("{} is a symbolic link; the store never writes through one (`liverseg verify --repair` moves it aside)", link.display()),
            None => Ok(()),
        }
    }

    /// The complete artifact for (stage, key), if any. An artifact directory
    /// only ever appears by rename after its manifest was written.
    pub fn get(&self, stage: &str, key: &str) -> Result<Option<Artifact>> {
        for name in [stage, key] {
            if let Some(why) = bad_component(name) {
                anyhow::bail!("`{name}` cannot name an artifact in {}: it is {why}", self.root.display());
            }
        }
        let dir = self.artifact_dir(stage, key);
        let mpath = dir.join(MANIFEST);
        if !mpath.is_file() {
            return Ok(None);
        }
        let bytes = fs::read(&mpath).with_context(|| format!("cannot read {}", mpath.display()))?;
        let manifest: Manifest = serde_json::from_slice(&bytes).with_context(|| format!("{}: not a liverseg manifest", mpath.display()))?;
        Ok(Some(Artifact { stage: stage.to_owned(), key: key.to_owned(), dir, manifest, manifest_blake3: blake3::hash(&bytes).to_hex().to_string() }))
    }

    /// What is wrong with `a`, looked at to `depth`; empty when it can be trusted.
    pub fn check(&self, a: &Artifact, depth: Depth) -> Vec<Problem> {
        let mpath = a.dir.join(MANIFEST);
        let mut problems = Vec::new();
        if a.manifest.key != a.key || a.manifest.stage != a.stage {
            problems.push(Problem::BadManifest(mpath.clone(), format!("names {}/{}", a.manifest.stage, a.manifest.key)));
        }
        if let Err(why) = a.manifest.check_names() {
            // Its names cannot be trusted as paths: nothing more is looked at.
            problems.push(Problem::BadManifest(mpath, why));
            return problems;
        }
        if let Some(link) = self.symlink_in(&mpath) {
            problems.push(Problem::Symlink(link));
            return problems;
        }
        match fs::read_to_string(self.index_file(&a.stage, &a.key)) {
            Ok(h) if h.trim() == a.manifest_blake3 => {}
            Ok(_) => problems.push(Problem::ManifestEdited(mpath)),
            Err(_) => problems.push(Problem::NotIndexed(mpath)),
        }
        if depth == Depth::Full {
            let found = verify_files(a).unwrap_or_else(|e| vec![Problem::BadManifest(a.dir.clone(), format!("{e:#}"))]);
            if problems.is_empty() && found.is_empty() {
                self.stamp_all(a);
            }
            return problems.into_iter().chain(found).collect();
        }
        problems.extend(self.check_outputs_quickly(a));
        problems
    }

    /// Each output re-hashed, unless its stamp says it is untouched since it
    /// was last hashed; the stamps of what was re-hashed are recorded.
    fn check_outputs_quickly(&self, a: &Artifact) -> Vec<Problem> {
        let mut problems = Vec::new();
        let stamps = self.read_stamps(a);
        let mut now = Stamps::new();
        let mut rehashed = false;
        for (name, want) in &a.manifest.outputs {
            let path = a.dir.join(name);
            let meta = match fs::symlink_metadata(&path) {
                Err(_) => {
                    problems.push(Problem::Missing(path));
                    continue;
                }
                Ok(m) => m,
            };
            // The artifact's own folder was checked above; a nested name's folders are checked here.
            if meta.file_type().is_symlink() || (name.contains('/') && self.symlink_in(&path).is_some()) {
                problems.push(Problem::Symlink(path));
            } else if meta.len() != want.size {
                problems.push(Problem::Resized { path, want: want.size, got: meta.len() });
            } else if stamps.get(name) == Some(&Stamp::of(&meta)) {
                now.insert(name.clone(), Stamp::of(&meta));
            } else {
                match hash_file(&path) {
                    Ok(h) if h == want.blake3 => {
                        rehashed = true;
                        now.insert(name.clone(), Stamp::of(&meta));
                    }
                    Ok(h) => problems.push(Problem::Changed { path, want: want.blake3[..16].to_owned(), got: h[..16].to_owned() }),
                    Err(_) => problems.push(Problem::Missing(path)),
                }
            }
        }
        if problems.is_empty() && rehashed {
            self.write_stamps(a, &now);
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
            if s.file_type().is_ok_and(|t| t.is_symlink()) {
                problems.push(Problem::Symlink(s.path()));
                continue;
            }
            if name.starts_with('.') || !s.path().is_dir() {
                continue;
            }
            for k in fs::read_dir(s.path()).with_context(|| format!("cannot list {}", s.path().display()))?.flatten() {
                let dir = k.path();
                if k.file_type().is_ok_and(|t| t.is_symlink()) {
                    problems.push(Problem::Symlink(dir));
                    continue;
                }
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
            for leftovers in [".tmp", ".pull"] {
                let folder = self.root.join(leftovers);
                if self.symlink_in(&folder).is_some() {
                    continue; // reported as a link above
                }
                if let Ok(left) = fs::read_dir(&folder) {
                    problems.extend(left.flatten().map(|e| Problem::Leftover(e.path())));
                }
            }
        }
        Ok((artifacts, problems))
    }

    /// Remove what an interrupted build or pull left in `.tmp/` or `.pull/`.
    pub fn clear_leftover(&self, path: &Path, _lock: &StoreLock) -> Result<()> {
        let parent = path.parent().and_then(|p| p.strip_prefix(&self.root).ok());
        if !matches!(parent.and_then(|p| p.to_str()), Some(".tmp" | ".pull")) {
            anyhow::bail!("{} is not a leftover of the store", path.display());
        }
        self.contained(path)?;
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(_) => return Ok(()),
        }
        .with_context(|| format!("cannot remove {}", path.display()))
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
        // A link on the way is what gets moved: never what it points to.
        let dir = &self.symlink_in(dir).unwrap_or_else(|| dir.to_path_buf());
        self.contained(&self.root.join(".damaged"))?;
        let rel = dir.strip_prefix(&self.root).unwrap_or(dir);
        let base = format!("{}-{}", rel.to_string_lossy().replace('/', "__"), (now_unix() * 1e6) as u64);
        let dest = (0..).map(|n| self.root.join(".damaged").join(format!("{base}.{n}"))).find(|d| !d.exists()).expect("a free name");
        fs::create_dir_all(dest.parent().expect("under .damaged")).with_context(|| format!("cannot create {}", dest.display()))?;
        fs::rename(dir, &dest).with_context(|| format!("cannot move {} aside", dir.display()))?;
        if let (Some(stage), Some(key)) = (rel.parent(), rel.file_name()) {
            let (stage, key) = (stage.to_string_lossy(), key.to_string_lossy());
            if bad_component(&stage).is_none() && bad_component(&key).is_none() {
                let _ = fs::remove_file(self.index_file(&stage, &key));
                let _ = fs::remove_file(self.stamps_file(&stage, &key));
            }
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
            // A linked folder is not the store's (`verify` names it).
            if stage.starts_with('.') || !s.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for k in fs::read_dir(s.path()).with_context(|| format!("cannot list {}", s.path().display()))?.flatten() {
                let key = k.file_name().to_string_lossy().into_owned();
                if !k.file_type().is_ok_and(|t| t.is_dir()) || bad_component(&key).is_some() {
                    continue;
                }
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
        if !manifest.raw_inputs.is_empty() {
            let path = build.join(RAW_INPUTS);
            fs::write(&path, serde_json::to_vec(&std::mem::take(&mut manifest.raw_inputs))?).with_context(|| format!("cannot write {}", path.display()))?;
        }
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
        manifest.check_names().map_err(|why| anyhow::anyhow!("{}: refusing a manifest whose {why}", build.display()))?;
        let manifest_blake3 = blake3::hash(text.as_bytes()).to_hex().to_string();
        let index = self.index_file(&manifest.stage, &manifest.key);
        let dest = self.artifact_dir(&manifest.stage, &manifest.key);
        for path in [&index, &dest] {
            self.contained(path)?;
        }
        if let Some(link) = walkdir::WalkDir::new(build).into_iter().flatten().find(|e| e.path_is_symlink()) {
            anyhow::bail!("{}: a symbolic link in a build; refusing to install it", link.path().display());
        }
        fs::create_dir_all(index.parent().expect("under .index")).with_context(|| format!("cannot create {}", index.display()))?;
        let tmp = index.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, &manifest_blake3).and_then(|_| fs::rename(&tmp, &index)).with_context(|| format!("cannot write {}", index.display()))?;
        fs::create_dir_all(dest.parent().expect("has parent")).with_context(|| format!("cannot create {}", dest.display()))?;
        if dest.exists() {
            let trash = self.root.join(".tmp").join(format!("old-{}-{}", manifest.stage, manifest.key));
            fs::rename(&dest, &trash).with_context(|| format!("cannot move old {} aside", dest.display()))?;
            fs::rename(build, &dest).with_context(|| format!("cannot move build into {}", dest.display()))?;
            fs::remove_dir_all(&trash).ok();
        } else {
            fs::rename(build, &dest).with_context(|| format!("cannot move build into {}", dest.display()))?;
        }
        // Old stamps of this key describe other files: cleared, then written for these.
        let _ = fs::remove_file(self.stamps_file(&manifest.stage, &manifest.key));
        let a = Artifact { stage: manifest.stage.clone(), key: manifest.key.clone(), dir: dest, manifest, manifest_blake3 };
        self.stamp_all(&a);
        Ok(a)
    }

    pub fn remove(&self, a: &Artifact, _lock: &StoreLock) -> Result<()> {
        self.contained(&a.dir)?;
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

    /// The key of a sub-artifact made by `version` of its producer from
    /// `params` and `upstream`: hashed under the kind, as
    /// `Manifest::declared_key` checks it.
    pub fn key(&self, version: u32, params: &super::params::Params, upstream: &BTreeMap<String, String>) -> String {
        super::hash::stage_key(&super::hash::KeyInputs { stage: &self.kind, version, params_json: &params.canonical_json(), upstream, raw_files: &(&[] as &[(String, String)]) })
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

/// A build no index vouches for yet (a detached job's, read by the jobs
/// after it): its manifest names `key` and every file hashes as it says.
pub fn check_build(a: &Artifact, key: &str) -> Vec<Problem> {
    let mpath = a.dir.join(MANIFEST);
    if a.key != key {
        return vec![Problem::BadManifest(mpath, format!("names key {}, where {key} was submitted", a.key))];
    }
    if let Err(why) = a.manifest.check_names() {
        return vec![Problem::BadManifest(mpath, why)];
    }
    verify_files(a).unwrap_or_else(|e| vec![Problem::BadManifest(a.dir.clone(), format!("{e:#}"))])
}

/// Differences between an artifact's files and its manifest, every file re-hashed.
fn verify_files(a: &Artifact) -> Result<Vec<Problem>> {
    let actual = hash_tree(&a.dir, hash_file)?;
    let mut problems: Vec<Problem> = walkdir::WalkDir::new(&a.dir).into_iter().flatten().filter(|e| e.path_is_symlink()).map(|e| Problem::Symlink(e.into_path())).collect();
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
