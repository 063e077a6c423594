//! Content hashes: files (with a stat cache so unchanged files are not re-read)
//! and stage keys.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Length of the hex key used for artifact directories (80 bits).
pub const KEY_HEX_LEN: usize = 20;

pub fn hash_file(path: &Path) -> Result<String> {
    let len = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?.len();
    hash_file_of_len(path, len)
}

/// `hash_file` when the caller has just stat'ed the file.
fn hash_file_of_len(path: &Path, len: u64) -> Result<String> {
    // Large artifacts (tensors of a whole dataset): memory-mapped and hashed on all cores.
    if len > 8 << 20 {
        let mut h = blake3::Hasher::new();
        h.update_mmap_rayon(path).with_context(|| format!("cannot read {}", path.display()))?;
        return Ok(h.finalize().to_hex().to_string());
    }
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; (len as usize).clamp(1, 1 << 16)];
    // The `len` bytes the caller stat'ed (the stat cache records that size);
    // stopping there saves the end-of-file read on every small file.
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = f.read(&mut buf[..want]).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            anyhow::bail!("{}: shorter than its size; did it change while being read?", path.display());
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Small raw input files as read to hash them, kept for the stage that reads
/// them next. Each is then read once per run (for a folder of small 2D
/// slices the second open and read cost about 10% of ingest), and the stage
/// gets exactly the bytes whose hash is in its key, even if the file changes
/// meanwhile. Files up to `MAX_KEPT_FILE`, within a total budget; larger
/// ones (CT volumes) are read again, one copy from the page cache, which
/// keeps memory to a volume per worker.
pub struct RawBytes {
    files: std::sync::Mutex<std::collections::HashMap<PathBuf, Vec<u8>>>,
    left: std::sync::atomic::AtomicU64,
}

const MAX_KEPT_FILE: u64 = 1 << 20;

impl RawBytes {
    pub fn new(budget: u64) -> Self {
        RawBytes { files: Default::default(), left: budget.into() }
    }

    /// Room for `len` more bytes? (Reserves them if so.)
    fn reserve(&self, len: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        len <= MAX_KEPT_FILE && self.left.fetch_update(Relaxed, Relaxed, |left| left.checked_sub(len)).is_ok()
    }

    fn keep(&self, path: &Path, bytes: Vec<u8>) {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).insert(path.to_path_buf(), bytes);
    }

    /// The kept bytes of `path`, handed over once.
    pub fn take(&self, path: &Path) -> Option<Vec<u8>> {
        let bytes = self.files.lock().unwrap_or_else(|e| e.into_inner()).remove(path)?;
        self.left.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Some(bytes)
    }
}

/// The hash recorded for a raw file that cannot be read.
pub fn unreadable(e: impl std::fmt::Display) -> String {
    format!("{UNREADABLE}{e}")
}

/// Prefix of the hash of a raw file that could not be read.
pub const UNREADABLE: &str = "unreadable: ";

/// Read exactly `len` bytes of `path` and hash them.
fn read_and_hash(path: &Path, len: u64) -> Result<(String, Vec<u8>)> {
    // Read into unfilled capacity (no zeroing), `len` bytes at most.
    let mut bytes = Vec::with_capacity(len as usize);
    std::fs::File::open(path).and_then(|f| f.take(len).read_to_end(&mut bytes)).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 != len {
        anyhow::bail!("{}: {} bytes, {len} when stat'ed; did it change while being read?", path.display(), bytes.len());
    }
    Ok((blake3::hash(&bytes).to_hex().to_string(), bytes))
}

/// Hashes of files this process wrote, taken from the bytes as they were
/// written, so committing an artifact need not read its outputs back. Entries
/// are checked against size, mtime and inode, like the stat cache.
static WRITTEN: std::sync::Mutex<BTreeMap<PathBuf, StatEntry>> = std::sync::Mutex::new(BTreeMap::new());

/// Record that `path` now holds bytes whose blake3 is `hash` (call after closing it).
pub fn note_written(path: &Path, hash: blake3::Hash) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let (size, mtime_ns, inode) = stat_of(&meta);
    let entry = StatEntry { size, mtime_ns, inode, blake3: hash.to_hex().to_string() };
    WRITTEN.lock().unwrap_or_else(|e| e.into_inner()).insert(path.to_path_buf(), entry);
    Ok(())
}

/// The hash noted when this process wrote `path`, if the file is unchanged
/// since; otherwise the file is read and hashed.
pub fn hash_written_file(path: &Path) -> Result<String> {
    let known = WRITTEN.lock().unwrap_or_else(|e| e.into_inner()).remove(path);
    if let Some(e) = known {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
        if stat_of(&meta) == (e.size, e.mtime_ns, e.inode) {
            return Ok(e.blake3);
        }
    }
    hash_file(path)
}

pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Inputs to a stage key. Every field is length-prefixed so no two different
/// inputs can produce the same byte stream.
pub struct KeyInputs<'a> {
    pub stage: &'a str,
    pub version: u32,
    pub params_json: &'a str,
    pub upstream: &'a BTreeMap<String, String>,
    pub raw_files: &'a [(String, String)],
}

pub fn stage_key(k: &KeyInputs) -> String {
    let mut h = blake3::Hasher::new();
    let mut field = |tag: &str, s: &str| {
        h.update(tag.as_bytes());
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field("stage", k.stage);
    field("version", &k.version.to_string());
    field("params", k.params_json);
    for (name, key) in k.upstream {
        field("upstream", name);
        field("key", key);
    }
    for (path, hash) in k.raw_files {
        field("raw", path);
        field("hash", hash);
    }
    h.finalize().to_hex()[..KEY_HEX_LEN].to_string()
}

#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
struct StatEntry {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    blake3: String,
}

/// (path, size, mtime, inode) → blake3. A file whose stat matches is not re-read;
/// touching it changes the mtime, so it is re-hashed, but the hash (and hence
/// the stage key) is unchanged unless the content changed.
pub struct StatCache {
    file: PathBuf,
    entries: BTreeMap<String, StatEntry>,
    dirty: bool,
}

fn stat_of(meta: &std::fs::Metadata) -> (u64, i128, u64) {
    use std::os::unix::fs::MetadataExt;
    let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
    (meta.len(), mtime_ns, meta.ino())
}

impl StatCache {
    pub fn open(file: PathBuf) -> Self {
        // A missing or unreadable cache only costs re-hashing, never correctness.
        let entries = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        StatCache { file, entries, dirty: false }
    }

    /// (size, hash) of each path, in order; files whose stat changed are
    /// re-hashed in parallel. A file that cannot be read (no permission, a
    /// folder, a symlink loop) gets size 0 and the hash `unreadable: REASON`,
    /// so the stage that reads it can quarantine it or fail naming it; the
    /// key still changes when it becomes readable.
    /// With `keep`, files that have to be read are kept there for the stage.
    pub fn hash_many(&mut self, paths: &[std::path::PathBuf], show_progress: bool, keep: Option<&RawBytes>) -> Result<Vec<(u64, String)>> {
        use rayon::prelude::*;
        // Stat in parallel too: on a first run over many small files the
        // system calls are most of the cost.
        let stats: Vec<std::io::Result<(u64, i128, u64)>> = paths.par_iter().map(|path| std::fs::metadata(path).map(|m| stat_of(&m))).collect();
        let mut out: Vec<Option<(u64, String)>> = Vec::with_capacity(paths.len());
        let mut misses = Vec::new();
        for (i, (path, stat)) in paths.iter().zip(&stats).enumerate() {
            match (stat, self.entries.get(&super::paths::encode(path))) {
                (Err(e), _) => out.push(Some((0, unreadable(e)))),
                (Ok((size, mtime_ns, inode)), Some(e)) if e.size == *size && e.mtime_ns == *mtime_ns && e.inode == *inode => out.push(Some((*size, e.blake3.clone()))),
                (Ok(_), _) => {
                    out.push(None);
                    misses.push(i);
                }
            }
        }
        if misses.is_empty() {
            return Ok(out.into_iter().map(|o| o.expect("filled")).collect());
        }
        let bar = crate::progress::bar(misses.len() as u64, "hashing", show_progress && misses.len() > 200);
        let hashed: Vec<Result<String>> = misses
            .par_iter()
            .map(|&i| {
                let (path, len) = (&paths[i], stats[i].as_ref().map(|s| s.0).unwrap_or(0));
                let h = match keep {
                    Some(k) if k.reserve(len) => read_and_hash(path, len).map(|(h, bytes)| {
                        k.keep(path, bytes);
                        h
                    }),
                    _ => hash_file_of_len(path, len),
                };
                bar.inc(1);
                h
            })
            .collect();
        bar.finish_and_clear();
        for (i, h) in misses.into_iter().zip(hashed) {
            let Ok((size, mtime_ns, inode)) = stats[i] else {
                continue;
            };
            match h {
                Ok(blake3) => {
                    self.entries.insert(super::paths::encode(&paths[i]), StatEntry { size, mtime_ns, inode, blake3: blake3.clone() });
                    out[i] = Some((size, blake3));
                }
                // Not cached: it is read again next time, when it may have become readable.
                Err(e) => out[i] = Some((0, unreadable(e.root_cause()))),
            }
        }
        self.dirty = true;
        Ok(out.into_iter().map(|o| o.expect("filled")).collect())
    }

    pub fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = self.file.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(&self.entries)?).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.file).with_context(|| format!("cannot replace {}", self.file.display()))?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_files_read_for_hashing_are_kept_once_within_budget() {
        let dir = std::env::temp_dir().join(format!("liverseg-rawbytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, big) = (dir.join("a"), dir.join("b"), dir.join("big"));
        std::fs::write(&a, b"first file").unwrap();
        std::fs::write(&b, b"second").unwrap();
        std::fs::write(&big, vec![7u8; MAX_KEPT_FILE as usize + 1]).unwrap();
        let mut cache = StatCache::open(dir.join("stat-cache.json"));
        let keep = RawBytes::new(12); // room for `a` (10 bytes), not also `b` (6)
        let hashes = cache.hash_many(&[a.clone(), b.clone(), big.clone()], false, Some(&keep)).unwrap();
        assert_eq!(hashes[0], (10, hash_bytes(b"first file")));
        assert_eq!(hashes[2].1, hash_file(&big).unwrap());
        let kept: Vec<bool> = [&a, &b].iter().map(|p| keep.files.lock().unwrap().contains_key(*p)).collect();
        assert_eq!(kept.iter().filter(|k| **k).count(), 1, "the budget holds one of the two small files");
        assert!(keep.take(&big).is_none(), "files over MAX_KEPT_FILE are not kept");
        let which = if kept[0] { &a } else { &b };
        assert_eq!(keep.take(which).unwrap(), std::fs::read(which).unwrap());
        assert!(keep.take(which).is_none(), "handed over once");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_depends_on_every_input() {
        let up = BTreeMap::from([("a".to_owned(), "k1".to_owned())]);
        let raw = vec![("f".to_owned(), "h".to_owned())];
        let base = KeyInputs { stage: "s", version: 1, params_json: "{}", upstream: &up, raw_files: &raw };
        let k0 = stage_key(&base);
        assert_eq!(k0, stage_key(&base));
        assert_ne!(k0, stage_key(&KeyInputs { version: 2, ..base }));
        let base = KeyInputs { stage: "s", version: 1, params_json: "{}", upstream: &up, raw_files: &raw };
        assert_ne!(k0, stage_key(&KeyInputs { params_json: "{\"a\":1}", ..base }));
        let raw2 = vec![("f".to_owned(), "h2".to_owned())];
        let base = KeyInputs { stage: "s", version: 1, params_json: "{}", upstream: &up, raw_files: &raw };
        assert_ne!(k0, stage_key(&KeyInputs { raw_files: &raw2, ..base }));
    }
}
