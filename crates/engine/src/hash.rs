//! Content hashes: files (with a stat cache so unchanged files are not re-read)
//! and stage keys.

use anyhow::{Context, Result};
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
    pub raw_files: &'a dyn RawPairs,
}

/// Raw files as (path, hash) pairs, in the order the key hashes them.
pub trait RawPairs {
    fn for_each_pair(&self, f: &mut dyn FnMut(&str, &str));
}

impl RawPairs for &[(String, String)] {
    fn for_each_pair(&self, f: &mut dyn FnMut(&str, &str)) {
        self.iter().for_each(|(p, h)| f(p, h));
    }
}

impl RawPairs for &[super::stage::RawFile] {
    fn for_each_pair(&self, f: &mut dyn FnMut(&str, &str)) {
        self.iter().for_each(|r| f(&r.path, &r.blake3));
    }
}

impl RawPairs for super::scan::RawList {
    fn for_each_pair(&self, f: &mut dyn FnMut(&str, &str)) {
        super::scan::RawList::for_each_pair(self, f)
    }
}

pub fn stage_key(k: &KeyInputs) -> String {
    let mut h = blake3::Hasher::new();
    // Fields go through a buffer: a million small updates would cost more
    // than the hashing (blake3 is fastest on large slices).
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut field = |tag: &str, s: &str| {
        buf.extend_from_slice(tag.as_bytes());
        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
        if buf.len() >= 1 << 20 {
            h.update(&buf);
            buf.clear();
        }
    };
    field("stage", k.stage);
    field("version", &k.version.to_string());
    field("params", k.params_json);
    for (name, key) in k.upstream {
        field("upstream", name);
        field("key", key);
    }
    k.raw_files.for_each_pair(&mut |path, hash| {
        field("raw", path);
        field("hash", hash);
    });
    h.update(&buf);
    h.finalize().to_hex()[..KEY_HEX_LEN].to_string()
}

#[derive(Clone, PartialEq, Debug)]
struct StatEntry {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    blake3: String,
}

fn stat_of(meta: &std::fs::Metadata) -> (u64, i128, u64) {
    use std::os::unix::fs::MetadataExt;
    let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
    (meta.len(), mtime_ns, meta.ino())
}

/// Hash the `len` bytes of a raw file, keeping them in `keep` when it has room.
pub fn hash_raw_file(path: &Path, len: u64, keep: Option<&RawBytes>) -> Result<String> {
    match keep {
        Some(k) if k.reserve(len) => read_and_hash(path, len).map(|(h, bytes)| {
            k.keep(path, bytes);
            h
        }),
        _ => hash_file_of_len(path, len),
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
        let mut scanner = crate::scan::Scanner::open(dir.join("scan.bin"), crate::scan::ScanMode::Stat);
        let keep = RawBytes::new(12); // room for `a` (10 bytes), not also `b` (6)
        let sources: Vec<crate::scan::RawSource> = [&a, &b, &big].iter().map(|p| crate::scan::RawSource::File { rel: String::new(), path: p.to_path_buf() }).collect();
        let list = scanner.scan(&sources, false, Some(&keep)).unwrap();
        let hashes: Vec<(u64, String)> = list.to_raw_files().into_iter().map(|r| (r.size, r.blake3)).collect();
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
        let base = KeyInputs { stage: "s", version: 1, params_json: "{}", upstream: &up, raw_files: &raw.as_slice() };
        let k0 = stage_key(&base);
        assert_eq!(k0, stage_key(&base));
        assert_ne!(k0, stage_key(&KeyInputs { version: 2, ..base }));
        let base = KeyInputs { stage: "s", version: 1, params_json: "{}", upstream: &up, raw_files: &raw.as_slice() };
        assert_ne!(k0, stage_key(&KeyInputs { params_json: "{\"a\":1}", ..base }));
        let raw2 = vec![("f".to_owned(), "h2".to_owned())];
        let base = KeyInputs { stage: "s", version: 1, params_json: "{}", upstream: &up, raw_files: &raw.as_slice() };
        assert_ne!(k0, stage_key(&KeyInputs { raw_files: &raw2.as_slice(), ..base }));
    }
}
