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
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
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

    /// Hash of `path`, re-reading it only if its stat changed. Returns (size, hash).
    pub fn hash(&mut self, path: &Path) -> Result<(u64, String)> {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
        let (size, mtime_ns, inode) = stat_of(&meta);
        let k = path.to_string_lossy().into_owned();
        if let Some(e) = self.entries.get(&k) {
            if e.size == size && e.mtime_ns == mtime_ns && e.inode == inode {
                return Ok((size, e.blake3.clone()));
            }
        }
        let blake3 = hash_file(path)?;
        self.entries.insert(k, StatEntry { size, mtime_ns, inode, blake3: blake3.clone() });
        self.dirty = true;
        Ok((size, blake3))
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
