//! Raw input files, listed and hashed for a stage key, with a binary cache
//! (`artifacts/.cache/scan.bin`) so a no-op run over a large data folder
//! neither re-reads unchanged folders nor re-hashes unchanged files.
//!
//! A folder's listing is reused while its mtime, ctime and inode are those
//! recorded (adding, removing or renaming an entry changes them), as git's
//! untracked cache does. A file's hash is reused while its size, mtime,
//! ctime and inode are; a write moves its ctime, which no user can set back.
//! How much is trusted is `ScanMode`. Anything stamped within `RACY_NS` of
//! the scan is recorded as unverified: a change in the same clock tick
//! cannot hide behind an equal timestamp.

use super::hash::{unreadable, RawBytes};
use super::stage::RawFile;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What a stage reads from outside the store.
pub enum RawSource {
    /// One file, recorded as `rel`.
    File { rel: String, path: PathBuf },
    /// Every file under `dir` that is not hidden (symbolic links followed),
    /// in byte order of names, each recorded relative to `base`. Folders
    /// whose name `list_folder_if` accepts are listed as entries, not walked:
    /// hashing them fails and the stage can name them.
    Tree { dir: PathBuf, base: PathBuf, list_folder_if: fn(&str) -> bool },
}

/// How much of the cache a scan trusts (pipeline.yaml `raw_scan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScanMode {
    /// Folder listings reused while the folder is unchanged; every file stat'ed.
    #[default]
    Stat,
    /// Also no stat of the files of an unchanged folder: for read-only data.
    /// A file rewritten in place (same name, same folder) is not seen.
    Folders,
    /// Every folder read and every file stat'ed (hashes still reused by
    /// stamp): for file systems whose folder timestamps cannot be trusted.
    Full,
}

impl std::str::FromStr for ScanMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "stat" => Ok(ScanMode::Stat),
            "folders" => Ok(ScanMode::Folders),
            "full" => Ok(ScanMode::Full),
            other => Err(format!("expected stat, folders or full, got `{other}`")),
        }
    }
}

/// Stamps this close to the scan's start are not trusted next time.
const RACY_NS: i64 = 2_000_000_000;
const MAGIC: &[u8; 8] = b"LSSCAN02";
const RECORD: usize = 72;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct Stamp {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
}

impl Stamp {
    fn of_stat(st: &libc::stat) -> Self {
        Stamp { size: st.st_size as u64, mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec, ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec, inode: st.st_ino }
    }
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Stamp { size: meta.len(), mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(), ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(), inode: meta.ino() }
    }
    /// Recorded as never matching when it may still change within its tick.
    fn settled(self, scan_ns: i64) -> Self {
        if self.mtime_ns.max(self.ctime_ns) >= scan_ns - RACY_NS {
            Stamp::default()
        } else {
            self
        }
    }
    fn valid(&self) -> bool {
        self.inode != 0
    }
}

/// What an entry of a folder is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    File = 0,
    /// Walked into.
    Folder = 1,
    /// Listed but not readable as a file (a folder named like an input, a
    /// dangling link, a loop): hashed, and failing, on every scan.
    Odd = 2,
}

/// One folder of the cache file, borrowed: a header, fixed-size records in
/// name order, then the names.
struct CachedFolder<'a> {
    stamp: Stamp,
    records: &'a [u8],
    names: &'a [u8],
}

struct Record<'a> {
    name: &'a [u8],
    kind: Kind,
    stamp: Stamp,
    hash: [u8; 32],
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl<'a> CachedFolder<'a> {
    fn len(&self) -> usize {
        self.records.len() / RECORD
    }
    fn record(&self, i: usize) -> Option<Record<'a>> {
        let r = self.records.get(i * RECORD..(i + 1) * RECORD)?;
        let (off, len) = (u32_at(r, 0) as usize, u32_at(r, 4) as usize & 0xff_ffff);
        let kind = match r[7] {
            0 => Kind::File,
            1 => Kind::Folder,
            _ => Kind::Odd,
        };
        let stamp = Stamp { size: u64_at(r, 8), mtime_ns: u64_at(r, 16) as i64, ctime_ns: u64_at(r, 24) as i64, inode: u64_at(r, 32) };
        Some(Record { name: self.names.get(off..off + len)?, kind, stamp, hash: r[40..72].try_into().expect("32 bytes") })
    }
    fn find(&self, name: &[u8]) -> Option<Record<'a>> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            let r = self.record(mid)?;
            match r.name.cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(r),
            }
        }
        None
    }
}

/// The cache file as read: folders found by path without decoding records.
struct CacheFile {
    bytes: Vec<u8>,
    /// Folder path → (header offset, records offset, record count, names length).
    folders: HashMap<Vec<u8>, (usize, usize, usize, usize)>,
}

impl CacheFile {
    /// A missing, foreign, truncated or damaged cache only costs re-reading:
    /// its last 32 bytes are the blake3 of the rest.
    fn read(path: &Path) -> Self {
        let mut bytes = std::fs::read(path).unwrap_or_default();
        let body = bytes.len().saturating_sub(32);
        let intact = bytes.len() >= MAGIC.len() + 32 && blake3::Hasher::new().update_rayon(&bytes[..body]).finalize().as_bytes() == &bytes[body..];
        bytes.truncate(if intact { body } else { 0 });
        let folders = Self::index(&bytes).unwrap_or_default();
        CacheFile { bytes, folders }
    }

    fn index(b: &[u8]) -> Option<HashMap<Vec<u8>, (usize, usize, usize, usize)>> {
        if b.get(..8)? != MAGIC {
            return None;
        }
        let mut at = 8;
        let mut out = HashMap::new();
        while at < b.len() {
            let plen = u32_at(b.get(at..at + 4)?, 0) as usize;
            let path = b.get(at + 4..at + 4 + plen)?.to_vec();
            let head = at + 4 + plen;
            b.get(head..head + 40)?;
            let (n, nlen) = (u64_at(b, head + 24) as usize, u64_at(b, head + 32) as usize);
            let records = head + 40;
            let end = records.checked_add(n.checked_mul(RECORD)?)?.checked_add(nlen)?;
            b.get(records..end)?;
            out.insert(path, (head, records, n, nlen));
            at = end;
        }
        Some(out)
    }

    fn folder(&self, path: &Path) -> Option<CachedFolder<'_>> {
        let &(head, records, n, nlen) = self.folders.get(path.as_os_str().as_bytes())?;
        let b = &self.bytes;
        let stamp = Stamp { size: 0, mtime_ns: u64_at(b, head) as i64, ctime_ns: u64_at(b, head + 8) as i64, inode: u64_at(b, head + 16) };
        let names_at = records + n * RECORD;
        Some(CachedFolder { stamp, records: &b[records..names_at], names: &b[names_at..names_at + nlen] })
    }
}

impl CacheFile {
    /// The record of a file the stage names itself.
    fn named(&self, path: &Path) -> Option<Record<'_>> {
        let key = named_key(path);
        self.folders.get(&key)?;
        self.folder(Path::new(OsStr::from_bytes(&key)))?.record(0)
    }
}

/// The cached record of entry `i` of `f`: by position when the listing is
/// the cached one, else by name.
fn record_of<'a>(cached: Option<&CachedFolder<'a>>, f: &Folder, i: usize) -> Option<Record<'a>> {
    let c = cached?;
    if f.listing_reused {
        c.record(i)
    } else {
        c.find(f.name(i))
    }
}

/// A folder as this scan found it.
struct Folder {
    path: PathBuf,
    /// Its path relative to the source's base, as recorded (`paths::encode`), with a trailing `/` unless empty.
    rel_prefix: String,
    stamp: Stamp,
    /// Whether the listing came from the cache unchanged.
    listing_reused: bool,
    names: Vec<u8>,
    ends: Vec<u32>,
    kinds: Vec<Kind>,
}

impl Folder {
    fn name(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.names[start..self.ends[i] as usize]
    }
}

/// An entry to hash: a file of a folder, or a file named by the stage.
#[derive(Clone, Copy)]
enum Item {
    InFolder { folder: u32, entry: u32 },
    Named(u32),
}

/// The raw files of a stage in order, compactly: a million names cost one
/// buffer, not a million strings.
#[derive(Debug, Default, Clone)]
pub struct RawList {
    names: String,
    ends: Vec<usize>,
    sizes: Vec<u64>,
    hashes: Vec<[u8; 32]>,
    /// Files that could not be read: index → `unreadable: reason`.
    unreadable: std::collections::BTreeMap<usize, String>,
}

impl RawList {
    pub fn len(&self) -> usize {
        self.ends.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
    pub fn rel(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.names[start..self.ends[i]]
    }
    /// The recorded hash: 64 hex digits, or `unreadable: reason`.
    pub fn hash(&self, i: usize) -> String {
        match self.unreadable.get(&i) {
            Some(why) => why.clone(),
            None => blake3::Hash::from_bytes(self.hashes[i]).to_hex().to_string(),
        }
    }
    /// The items' names, with sizes and hashes still to fill in.
    fn named(found: &Found) -> Self {
        let n = found.items.len();
        let mut list = RawList { names: String::new(), ends: Vec::with_capacity(n), sizes: vec![0; n], hashes: vec![[0; 32]; n], unreadable: Default::default() };
        for it in &found.items {
            match *it {
                Item::Named(n) => list.names.push_str(&found.named[n as usize].0),
                Item::InFolder { folder, entry } => {
                    let f = &found.folders[folder as usize];
                    list.names.push_str(&f.rel_prefix);
                    super::paths::encode_into(&mut list.names, f.name(entry as usize));
                }
            }
            list.ends.push(list.names.len());
        }
        list
    }
    /// Each (path, hash) in order, as the stage key hashes them.
    pub fn for_each_pair(&self, f: &mut dyn FnMut(&str, &str)) {
        for i in 0..self.len() {
            match self.unreadable.get(&i) {
                Some(why) => f(self.rel(i), why),
                None => f(self.rel(i), blake3::Hash::from_bytes(self.hashes[i]).to_hex().as_str()),
            }
        }
    }
    pub fn to_raw_files(&self) -> Vec<RawFile> {
        (0..self.len()).map(|i| RawFile { path: self.rel(i).to_owned(), size: self.sizes[i], blake3: self.hash(i) }).collect()
    }
}

/// What scans cost so far: how much was read rather than taken from the cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanStats {
    /// Folders listed from the file system (not from the cache).
    pub folders_read: usize,
    /// Files stat'ed.
    pub files_stated: usize,
    /// Files read and hashed.
    pub files_hashed: usize,
}

/// Lists and hashes raw sources against the cache; `save` writes what it learnt.
pub struct Scanner {
    pub stats: ScanStats,
    file: PathBuf,
    mode: ScanMode,
    cache: CacheFile,
    scan_ns: i64,
    /// Folders listed by this scan, with their hashes, to be saved.
    seen: HashMap<PathBuf, (Folder, Vec<(Stamp, [u8; 32])>)>,
    dirty: bool,
}

impl Scanner {
    pub fn open(file: PathBuf, mode: ScanMode) -> Self {
        let scan_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let cache = CacheFile::read(&file);
        Scanner { stats: ScanStats::default(), file, mode, cache, scan_ns, seen: HashMap::new(), dirty: false }
    }

    /// The raw files of `sources`, in order, each with its size and hash.
    /// A file that cannot be read gets `unreadable: reason`, so the stage
    /// can quarantine it or fail naming it. With `keep`, files that had to
    /// be read are kept there for the stage.
    pub fn scan(&mut self, sources: &[RawSource], show_progress: bool, keep: Option<&RawBytes>) -> Result<RawList> {
        let found = self.find_items(sources)?;
        let mut list = RawList::named(&found);
        let misses = self.look_up(&found, &mut list);
        let learnt = self.hash_misses(&found, misses, &mut list, show_progress, keep);
        self.stats.folders_read += found.folders.iter().filter(|f| !f.listing_reused).count();
        self.stats.files_hashed += learnt.len();
        if !learnt.is_empty() || found.folders.iter().any(|f| !f.listing_reused) {
            self.dirty = true;
            self.remember(found, &list, learnt);
        }
        Ok(list)
    }

    /// Every folder and item of `sources`, in order.
    fn find_items(&self, sources: &[RawSource]) -> Result<Found> {
        let mut found = Found::default();
        for source in sources {
            match source {
                RawSource::File { rel, path } => {
                    found.items.push(Item::Named(found.named.len() as u32));
                    found.named.push((rel.clone(), path.clone()));
                }
                RawSource::Tree { dir, base, list_folder_if } => {
                    let rel = dir.strip_prefix(base).map(super::paths::encode).unwrap_or_default();
                    let prefix = if rel.is_empty() { rel } else { format!("{rel}/") };
                    let first = found.folders.len() as u32;
                    let (folders, mut items) = self.walk(dir, prefix, *list_folder_if, &mut Vec::new()).with_context(|| format!("cannot walk {}", dir.display()))?;
                    for it in &mut items {
                        if let Item::InFolder { folder, .. } = it {
                            *folder += first;
                        }
                    }
                    found.folders.extend(folders);
                    found.items.extend(items);
                }
            }
        }
        Ok(found)
    }
}

/// What a scan found: folders, the files the stage names, and the items to hash.
#[derive(Default)]
struct Found {
    folders: Vec<Folder>,
    named: Vec<(String, PathBuf)>,
    items: Vec<Item>,
}

impl Found {
    fn path_of(&self, it: Item) -> PathBuf {
        match it {
            Item::Named(n) => self.named[n as usize].1.clone(),
            Item::InFolder { folder, entry } => {
                let f = &self.folders[folder as usize];
                f.path.join(OsStr::from_bytes(f.name(entry as usize)))
            }
        }
    }
}

/// A folder's subtree: its folders (itself first) and its items in order.
type Tree = (Vec<Folder>, Vec<Item>);

impl Scanner {
    /// `dir` and everything under it, subfolders walked in parallel.
    fn walk(&self, dir: &Path, prefix: String, list_if: fn(&str) -> bool, ancestors: &mut Vec<(u64, u64)>) -> Result<Tree> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a folder", dir.display());
        }
        ancestors.push((meta.dev(), meta.ino()));
        let folder = self.list(dir, prefix, Stamp { size: 0, ..Stamp::of(&meta) }, list_if)?;
        let subs: Vec<usize> = (0..folder.kinds.len()).filter(|&i| folder.kinds[i] == Kind::Folder).collect();
        let walked: Vec<Option<Tree>> = subs
            .par_iter()
            .map(|&i| {
                let name = OsStr::from_bytes(folder.name(i));
                let path = folder.path.join(name);
                let looped = std::fs::metadata(&path).map(|m| ancestors.contains(&(m.dev(), m.ino()))).unwrap_or(false);
                let prefix = format!("{}{}/", folder.rel_prefix, super::paths::encode(Path::new(name)));
                // A folder that cannot be walked (or a loop) is listed; hashing it fails, naming it.
                (!looped).then(|| self.walk(&path, prefix, list_if, &mut ancestors.clone()).ok()).flatten()
            })
            .collect();
        let mut walked: HashMap<usize, Tree> = subs.into_iter().zip(walked).filter_map(|(i, t)| t.map(|t| (i, t))).collect();
        let mut folders = Vec::new();
        let mut items = Vec::new();
        for i in 0..folder.kinds.len() {
            match walked.remove(&i) {
                Some((sub_folders, sub_items)) => {
                    let offset = 1 + folders.len() as u32;
                    items.extend(sub_items.into_iter().map(|it| match it {
                        Item::InFolder { folder, entry } => Item::InFolder { folder: folder + offset, entry },
                        named => named,
                    }));
                    folders.extend(sub_folders);
                }
                None => items.push(Item::InFolder { folder: 0, entry: i as u32 }),
            }
        }
        folders.insert(0, folder);
        Ok((folders, items))
    }

    /// The entries of `dir` in byte order of names: from the cache while the
    /// folder's stamp is the one recorded, else read.
    fn list(&self, dir: &Path, rel_prefix: String, stamp: Stamp, list_if: fn(&str) -> bool) -> Result<Folder> {
        let mut f = Folder { path: dir.to_path_buf(), rel_prefix, stamp, listing_reused: false, names: Vec::new(), ends: Vec::new(), kinds: Vec::new() };
        let reusable = self.mode != ScanMode::Full;
        if let Some(c) = self.cache.folder(dir).filter(|c| reusable && c.stamp.valid() && c.stamp == stamp) {
            for i in 0..c.len() {
                let Some(r) = c.record(i) else { break };
                f.names.extend_from_slice(r.name);
                f.ends.push(f.names.len() as u32);
                f.kinds.push(r.kind);
            }
            if f.kinds.len() == c.len() {
                f.listing_reused = true;
                return Ok(f);
            }
            (f.names, f.ends, f.kinds) = Default::default();
        }
        let mut entries: Vec<(Vec<u8>, Kind)> = Vec::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
            let name = e.file_name();
            if name.as_bytes().starts_with(b".") {
                continue;
            }
            let mut kind = e.file_type().ok();
            if kind.is_none_or(|k| k.is_symlink()) {
                kind = std::fs::metadata(e.path()).map(|m| m.file_type()).ok();
            }
            let listed_as_input = list_if(&name.to_string_lossy());
            let kind = match kind {
                Some(k) if k.is_file() => Kind::File,
                Some(k) if k.is_dir() && !listed_as_input => Kind::Folder,
                Some(k) if k.is_dir() => Kind::Odd,
                Some(_) => continue, // a FIFO or socket: never opened
                None => Kind::Odd,   // a dangling link
            };
            entries.push((name.into_vec(), kind));
        }
        entries.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in entries {
            f.names.extend_from_slice(&name);
            f.ends.push(f.names.len() as u32);
            f.kinds.push(kind);
        }
        Ok(f)
    }
}

use std::os::unix::ffi::OsStringExt;

/// An item not found in the cache: its index and stamp, or why it cannot be read.
type Miss = (usize, Result<Stamp, String>);

impl Scanner {
    /// Fill in the size and hash of every item the cache still holds; the rest are misses.
    fn look_up(&mut self, found: &Found, list: &mut RawList) -> Vec<Miss> {
        let cache = &self.cache;
        let cached: Vec<Option<CachedFolder>> = found.folders.iter().map(|f| cache.folder(&f.path)).collect();
        let handles: Vec<Option<std::fs::File>> = found.folders.iter().map(|f| std::fs::File::open(&f.path).ok()).collect();
        let trust_files = self.mode == ScanMode::Folders;
        let stated = std::sync::atomic::AtomicUsize::new(0);
        let misses = found
            .items
            .par_iter()
            .zip(list.sizes.par_iter_mut())
            .zip(list.hashes.par_iter_mut())
            .enumerate()
            .filter_map(|(i, ((it, size), hash))| {
                let (stamp, record) = match *it {
                    Item::Named(n) => {
                        let path = &found.named[n as usize].1;
                        stated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        (std::fs::metadata(path).map(|m| Stamp::of(&m)), cache.named(path))
                    }
                    Item::InFolder { folder, entry } => {
                        let f = &found.folders[folder as usize];
                        let record = record_of(cached[folder as usize].as_ref(), f, entry as usize);
                        if let Some(r) = record.as_ref().filter(|r| trust_files && f.listing_reused && r.kind == Kind::File && r.stamp.valid()) {
                            (*size, *hash) = (r.stamp.size, r.hash);
                            return None;
                        }
                        stated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        (stat_at(handles[folder as usize].as_ref(), &f.path, f.name(entry as usize)), record)
                    }
                };
                match (stamp, record) {
                    (Err(e), _) => Some((i, Err(unreadable(e)))),
                    (Ok(s), Some(r)) if r.kind == Kind::File && r.stamp.valid() && r.stamp == s => {
                        (*size, *hash) = (s.size, r.hash);
                        None
                    }
                    (Ok(s), _) => Some((i, Ok(s))),
                }
            })
            .collect();
        self.stats.files_stated += stated.into_inner();
        misses
    }

    /// Read and hash the misses in parallel; returns the items hashed, with their stamps.
    fn hash_misses(&self, found: &Found, misses: Vec<Miss>, list: &mut RawList, show_progress: bool, keep: Option<&RawBytes>) -> Vec<(usize, Stamp)> {
        let bar = crate::progress::bar(misses.len() as u64, "hashing", show_progress && misses.len() > 200);
        let hashed: Vec<(usize, Stamp, Result<[u8; 32], String>)> = misses
            .into_par_iter()
            .map(|(i, stamp)| {
                let done = match stamp {
                    Err(why) => (i, Stamp::default(), Err(why)),
                    Ok(s) => (i, s, read_hash(&found.path_of(found.items[i]), s.size, keep).map_err(|e| unreadable(e.root_cause()))),
                };
                bar.inc(1);
                done
            })
            .collect();
        bar.finish_and_clear();
        let mut learnt = Vec::new();
        for (i, stamp, hash) in hashed {
            list.sizes[i] = stamp.size;
            match hash {
                Ok(h) => {
                    list.hashes[i] = h;
                    learnt.push((i, stamp));
                }
                Err(why) => {
                    list.unreadable.insert(i, why);
                }
            }
        }
        learnt
    }

    /// Keep this scan's folders and named files, with every readable file's
    /// stamp and hash, for `save`.
    fn remember(&mut self, found: Found, list: &RawList, learnt: Vec<(usize, Stamp)>) {
        let learnt: HashMap<usize, Stamp> = learnt.into_iter().collect();
        let cached: Vec<Option<CachedFolder>> = found.folders.iter().map(|f| self.cache.folder(&f.path)).collect();
        let mut per_folder: Vec<Vec<(Stamp, [u8; 32])>> = found.folders.iter().map(|f| vec![(Stamp::default(), [0; 32]); f.kinds.len()]).collect();
        for (i, it) in found.items.iter().enumerate() {
            if list.unreadable.contains_key(&i) {
                continue;
            }
            // Not learnt means found in the cache with this very stamp.
            let stamp = |record: Option<Record>| learnt.get(&i).copied().or(record.map(|r| r.stamp)).unwrap_or_default();
            match *it {
                Item::InFolder { folder, entry } => {
                    let record = record_of(cached[folder as usize].as_ref(), &found.folders[folder as usize], entry as usize);
                    per_folder[folder as usize][entry as usize] = (stamp(record), list.hashes[i]);
                }
                Item::Named(n) => {
                    let path = &found.named[n as usize].1;
                    let record = named_record(stamp(self.cache.named(path)), list.hashes[i]);
                    self.seen.insert(PathBuf::from(OsStr::from_bytes(&named_key(path))), record);
                }
            }
        }
        for (f, hashes) in found.folders.into_iter().zip(per_folder) {
            self.seen.insert(f.path.clone(), (f, hashes));
        }
    }

    /// Write what this scan learnt (atomically), keeping the records of
    /// folders it did not visit. Nothing is written after a pure no-op.
    pub fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let mut out = MAGIC.to_vec();
        for (path, (folder, hashes)) in &self.seen {
            write_folder(&mut out, path.as_os_str().as_bytes(), folder, hashes, self.scan_ns);
        }
        for (path, &(head, records, n, nlen)) in &self.cache.folders {
            if !self.seen.contains_key(Path::new(OsStr::from_bytes(path))) {
                out.extend_from_slice(&(path.len() as u32).to_le_bytes());
                out.extend_from_slice(path);
                out.extend_from_slice(&self.cache.bytes[head..records + n * RECORD + nlen]);
            }
        }
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let checksum = *blake3::Hasher::new().update_rayon(&out).finalize().as_bytes();
        out.extend_from_slice(&checksum);
        let tmp = self.file.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &out).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.file).with_context(|| format!("cannot replace {}", self.file.display()))?;
        self.dirty = false;
        Ok(())
    }
}

/// The cache's key for a file the stage names itself: a NUL (never in a
/// path) before its path, so it cannot clash with a folder's listing.
fn named_key(path: &Path) -> Vec<u8> {
    let mut key = vec![0u8];
    key.extend_from_slice(path.as_os_str().as_bytes());
    key
}

/// A named file's record, as a one-entry pseudo-folder never used as a listing.
fn named_record(stamp: Stamp, hash: [u8; 32]) -> (Folder, Vec<(Stamp, [u8; 32])>) {
    let folder = Folder { path: PathBuf::new(), rel_prefix: String::new(), stamp: Stamp::default(), listing_reused: false, names: Vec::new(), ends: vec![0], kinds: vec![Kind::File] };
    (folder, vec![(stamp, hash)])
}

fn write_folder(out: &mut Vec<u8>, path: &[u8], f: &Folder, hashes: &[(Stamp, [u8; 32])], scan_ns: i64) {
    out.extend_from_slice(&(path.len() as u32).to_le_bytes());
    out.extend_from_slice(path);
    let s = f.stamp.settled(scan_ns);
    for v in [s.mtime_ns as u64, s.ctime_ns as u64, s.inode, f.kinds.len() as u64, f.names.len() as u64] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for (i, kind) in f.kinds.iter().enumerate() {
        let start = if i == 0 { 0 } else { f.ends[i - 1] };
        let len = f.ends[i] - start;
        let (stamp, hash) = if *kind == Kind::File { (hashes[i].0.settled(scan_ns), hashes[i].1) } else { (Stamp::default(), [0; 32]) };
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&(len | (*kind as u32) << 24).to_le_bytes());
        for v in [stamp.size, stamp.mtime_ns as u64, stamp.ctime_ns as u64, stamp.inode] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&hash);
    }
    out.extend_from_slice(&f.names);
}

/// The stamp of `name` in a folder (links followed), relative to the
/// folder's open handle so the kernel resolves one component.
fn stat_at(dir: Option<&std::fs::File>, dir_path: &Path, name: &[u8]) -> std::io::Result<Stamp> {
    use std::os::fd::AsRawFd;
    let (Some(dir), Ok(cname)) = (dir, CString::new(name)) else {
        return std::fs::metadata(dir_path.join(OsStr::from_bytes(name))).map(|m| Stamp::of(&m));
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid folder descriptor, a NUL-terminated name, and a buffer for the result.
    let rc = unsafe { libc::fstatat(dir.as_raw_fd(), cname.as_ptr(), st.as_mut_ptr(), 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstatat returned 0, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(Stamp::of_stat(&st))
}

/// Read `len` bytes of `path` and hash them, keeping them for the stage when `keep` has room.
fn read_hash(path: &Path, len: u64, keep: Option<&RawBytes>) -> Result<[u8; 32]> {
    let hex = super::hash::hash_raw_file(path, len, keep)?;
    Ok(*blake3::Hash::from_hex(hex.as_bytes()).context("internal: a blake3 hash in hex")?.as_bytes())
}
