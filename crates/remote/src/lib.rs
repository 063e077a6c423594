//! A remote cache for the artifact store, as `dvc push`/`pull`: artifacts go
//! to S3 (or any object_store backend, or a folder) under
//! `PREFIX/<stage>/<key>/<file>`, each artifact's manifest last, so a remote
//! artifact exists exactly when its manifest does. Keys are content hashes,
//! so a push moves only keys the remote lacks, and a pull fetches only what
//! a run would otherwise compute.
//!
//! A pulled file enters the store only after its size and blake3 match the
//! manifest; files are staged in `artifacts/.pull/<stage>-<key>/`, which a
//! killed pull leaves for the next one to resume, and the artifact is
//! installed whole through the store's index-then-rename commit.
//! Credentials come from the environment (AWS_ACCESS_KEY_ID, ..., or the
//! instance's role), never from pipeline.yaml.

use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use liverseg_engine::store::{sub_stage, Artifact, FileEntry, Manifest, Store, StoreLock, MANIFEST};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Transfers at once.
const CONCURRENCY: usize = 8;

pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// As the user wrote it, for messages.
    pub url: String,
    runtime: tokio::runtime::Runtime,
}

/// What a push or pull moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub artifacts: usize,
    pub files: usize,
    pub bytes: u64,
    /// Files already in place from an interrupted transfer.
    pub resumed: usize,
}

impl Moved {
    pub fn add(&mut self, other: Moved) {
        self.artifacts += other.artifacts;
        self.files += other.files;
        self.bytes += other.bytes;
        self.resumed += other.resumed;
    }
}

impl Remote {
    /// `s3://bucket/prefix` (credentials, region and endpoint from the usual
    /// AWS_* variables), or a local folder.
    pub fn open(url: &str, project_root: &Path) -> Result<Self> {
        let (store, prefix): (Arc<dyn ObjectStore>, String) = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("remote {url}: no bucket");
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build().with_context(|| format!("remote {url}"))?;
            (Arc::new(s3), prefix.trim_matches('/').to_owned())
        } else if url.contains("://") {
            bail!("remote {url}: only s3:// URLs and folders are supported");
        } else {
            let dir = project_root.join(url);
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the remote folder {}", dir.display()))?;
            (Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&dir).with_context(|| format!("remote {}", dir.display()))?), String::new())
        };
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("cannot start the transfer runtime")?;
        Ok(Remote { store, prefix: ObjectPath::from(prefix), url: url.to_owned(), runtime })
    }

    fn object(&self, stage: &str, key: &str, file: &str) -> ObjectPath {
        let mut p = self.artifact(stage, key);
        for part in file.split('/') {
            p = p.child(part);
        }
        p
    }

    /// The folder of stage@key on the remote.
    fn artifact(&self, stage: &str, key: &str) -> ObjectPath {
        self.prefix.child(stage).child(key)
    }

    /// The remote's manifest of stage@key, if it has the artifact.
    fn manifest(&self, stage: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.object(stage, key, MANIFEST);
        self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => Ok(Some(r.bytes().await.with_context(|| format!("cannot read {path} from {}", self.url))?.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(anyhow!("{}: cannot read {path}: {e}", self.url)),
            }
        })
    }

    pub fn has(&self, stage: &str, key: &str) -> Result<bool> {
        let path = self.object(stage, key, MANIFEST);
        self.runtime.block_on(async {
            match self.store.head(&path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(anyhow!("{}: cannot read {path}: {e}", self.url)),
            }
        })
    }

    /// Upload `a` unless the remote has it: its files (those the remote
    /// already holds at the right size are kept: a resumed push), then its
    /// manifest, which makes it visible.
    pub fn push(&self, a: &Artifact, bar: &indicatif::ProgressBar) -> Result<Moved> {
        if self.has(&a.stage, &a.key)? {
            return Ok(Moved::default());
        }
        let files: Vec<(String, FileEntry)> = a.manifest.outputs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let moved = self.runtime.block_on(async {
            let present: std::collections::BTreeMap<String, u64> = {
                let prefix = self.artifact(&a.stage, &a.key);
                let list: Vec<object_store::ObjectMeta> = self.store.list(Some(&prefix)).try_collect().await.map_err(|e| anyhow!("{}: cannot list {prefix}: {e}", self.url))?;
                list.into_iter().map(|m| (m.location.to_string(), m.size)).collect()
            };
            let results: Vec<Result<(bool, u64)>> = futures::stream::iter(files.iter().map(|(name, entry)| {
                let location = self.object(&a.stage, &a.key, name);
                let resumed = present.get(&location.to_string()) == Some(&entry.size);
                let local = a.dir.join(name);
                async move {
                    if resumed {
                        return Ok((true, 0));
                    }
                    let bytes = tokio::fs::read(&local).await.with_context(|| format!("cannot read {}", local.display()))?;
                    let n = bytes.len() as u64;
                    self.store.put(&location, PutPayload::from(bytes)).await.map_err(|e| anyhow!("{}: cannot upload {location}: {e}", self.url))?;
                    Ok((false, n))
                }
            }))
            .buffer_unordered(CONCURRENCY)
            .inspect(|_| bar.inc(1))
            .collect()
            .await;
            let mut moved = Moved { artifacts: 1, ..Default::default() };
            for r in results {
                let (resumed, n) = r?;
                if resumed {
                    moved.resumed += 1;
                } else {
                    moved.files += 1;
                    moved.bytes += n;
                }
            }
            let manifest = tokio::fs::read(a.dir.join(MANIFEST)).await.with_context(|| format!("cannot read {}", a.dir.join(MANIFEST).display()))?;
            let location = self.object(&a.stage, &a.key, MANIFEST);
            self.store.put(&location, PutPayload::from(manifest)).await.map_err(|e| anyhow!("{}: cannot upload {location}: {e}", self.url))?;
            Ok::<_, anyhow::Error>(moved)
        })?;
        Ok(moved)
    }

    /// The remote's manifest of stage@key, if it has one, refused unless
    /// it is for that stage and key, every name in it is a safe path, and
    /// its declared inputs (version, params, upstream keys, raw file
    /// hashes) hash to the key, as they did where it was made.
    fn checked_manifest(&self, stage: &str, key: &str) -> Result<Option<(String, Manifest)>> {
        let Some(text) = self.manifest(stage, key)? else { return Ok(None) };
        let text = String::from_utf8(text).map_err(|_| anyhow!("{}: the manifest of {stage}@{key} is not UTF-8", self.url))?;
        let manifest: Manifest = serde_json::from_str(&text).with_context(|| format!("{}: the manifest of {stage}@{key} is not a liverseg manifest", self.url))?;
        if manifest.stage != stage || manifest.key != key {
            bail!("{}: the manifest at {stage}/{key} is for {}@{}; refusing it", self.url, manifest.stage, manifest.key);
        }
        if let Err(why) = manifest.check_names() {
            bail!("{}: the manifest of {stage}@{key} is unsafe: its {why}; refusing it", self.url);
        }
        // Raw files listed beside the manifest are checked once fetched (`pull_files`).
        if !manifest.raw_inputs_beside() {
            self.check_declared_key(&manifest, &manifest.raw_inputs)?;
        }
        Ok(Some((text, manifest)))
    }

    fn check_declared_key(&self, manifest: &Manifest, raw: &[liverseg_engine::stage::RawFile]) -> Result<()> {
        let (stage, key) = (&manifest.stage, &manifest.key);
        let declared = manifest.declared_key(raw);
        if &declared != key {
            bail!("{}: the manifest of {stage}@{key} declares inputs whose key is {declared}; refusing it", self.url);
        }
        Ok(())
    }

    /// Fetch stage@key into `store` if the remote has it; None if it does
    /// not. Its sub-artifacts (a search's trials) are installed first, so an
    /// interrupted pull never leaves a parent without its children. Every
    /// file is checked against the manifest before it is kept.
    pub fn pull(&self, store: &Store, stage: &str, key: &str, lock: &StoreLock, bar: &indicatif::ProgressBar) -> Result<Option<(Artifact, Moved)>> {
        let Some((text, manifest)) = self.checked_manifest(stage, key)? else { return Ok(None) };
        let mut moved = self.pull_children(store, &manifest, lock, bar)?;
        let (artifact, m) = self.pull_files(store, &text, manifest, lock, bar)?;
        moved.add(m);
        Ok(Some((artifact, moved)))
    }

    /// The sub-artifacts `parent` lists that the local store lacks.
    pub fn pull_children(&self, store: &Store, parent: &Manifest, lock: &StoreLock, bar: &indicatif::ProgressBar) -> Result<Moved> {
        let mut moved = Moved::default();
        for (kind, keys) in &parent.children {
            let sub = sub_stage(&parent.stage, kind);
            for key in keys {
                if store.get(&sub, key)?.is_some() {
                    continue;
                }
                let Some((text, child)) = self.checked_manifest(&sub, key)? else {
                    bail!("{}: {}@{} lists {sub}@{key}, which the remote lacks; refusing an incomplete artifact", self.url, parent.stage, parent.key);
                };
                if !child.children.is_empty() {
                    bail!("{}: {sub}@{key} lists sub-artifacts of its own; refusing it", self.url);
                }
                moved.add(self.pull_files(store, &text, child, lock, bar)?.1);
            }
        }
        Ok(moved)
    }

    /// One artifact's files through the staging folder into the store.
    fn pull_files(&self, store: &Store, text: &str, manifest: Manifest, lock: &StoreLock, bar: &indicatif::ProgressBar) -> Result<(Artifact, Moved)> {
        let (stage, key) = (manifest.stage.clone(), manifest.key.clone());
        let staging = store.root.join(".pull").join(format!("{stage}-{key}"));
        if let Some(link) = store.symlink_in(&staging) {
            bail!("{} is a symbolic link; the store never writes through one", link.display());
        }
        // Files kept from an interrupted pull are resumed, but never through a link.
        if walkdir::WalkDir::new(&staging).into_iter().flatten().any(|e| e.path_is_symlink()) {
            std::fs::remove_dir_all(&staging).with_context(|| format!("cannot clear {}", staging.display()))?;
        }
        std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        bar.inc_length(manifest.outputs.len() as u64);
        let moved = self.runtime.block_on(async {
            let results: Vec<Result<(bool, u64)>> = futures::stream::iter(manifest.outputs.iter().map(|(name, entry)| self.fetch_file(&stage, &key, name, entry, &staging)))
                .buffer_unordered(CONCURRENCY)
                .inspect(|_| bar.inc(1))
                .collect()
                .await;
            let mut moved = Moved { artifacts: 1, ..Default::default() };
            let mut errors = Vec::new();
            for r in results {
                match r {
                    Ok((true, _)) => moved.resumed += 1,
                    Ok((false, n)) => {
                        moved.files += 1;
                        moved.bytes += n;
                    }
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            if !errors.is_empty() {
                bail!("not pulled: {}", errors.join("; "));
            }
            Ok(moved)
        })?;
        if manifest.raw_inputs_beside() {
            // Its size and hash matched the manifest's when it was fetched.
            self.check_declared_key(&manifest, &liverseg_engine::store::read_raw_inputs(&staging.join(liverseg_engine::store::RAW_INPUTS))?)?;
        }
        std::fs::write(staging.join(MANIFEST), text).with_context(|| format!("cannot write {}", staging.join(MANIFEST).display()))?;
        let artifact = store.install(&staging, text, manifest, lock)?;
        Ok((artifact, moved))
    }

    /// One file into the staging folder, checked; (already there, bytes).
    async fn fetch_file(&self, stage: &str, key: &str, name: &str, entry: &FileEntry, staging: &Path) -> Result<(bool, u64)> {
        let dest = staging.join(name);
        if tokio::fs::metadata(&dest).await.is_ok_and(|m| m.len() == entry.size) && hash_file(&dest).await? == entry.blake3 {
            return Ok((true, 0));
        }
        let location = self.object(stage, key, name);
        let bytes = self
            .store
            .get(&location)
            .await
            .map_err(|e| anyhow!("{}: cannot download {location}: {e}", self.url))?
            .bytes()
            .await
            .map_err(|e| anyhow!("{}: cannot download {location}: {e}", self.url))?;
        let got = blake3::hash(&bytes).to_hex().to_string();
        if bytes.len() as u64 != entry.size || got != entry.blake3 {
            bail!(
                "{stage}@{key}: remote object {location} is damaged ({} bytes, blake3 {}…; the manifest says {} bytes, {}…)",
                bytes.len(),
                &got[..12],
                entry.size,
                &entry.blake3[..entry.blake3.len().min(12)]
            );
        }
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await.with_context(|| format!("cannot create {}", parent.display()))?;
        }
        // A partial file never carries the final name.
        let part = PathBuf::from(format!("{}.part", dest.display()));
        tokio::fs::write(&part, &bytes).await.with_context(|| format!("cannot write {}", part.display()))?;
        tokio::fs::rename(&part, &dest).await.with_context(|| format!("cannot write {}", dest.display()))?;
        Ok((false, bytes.len() as u64))
    }
}

async fn hash_file(path: &Path) -> Result<String> {
    let bytes = tokio::fs::read(path).await.with_context(|| format!("cannot read {}", path.display()))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// The engine's hook for `run --pull`: a missing artifact is fetched when
/// the remote has it.
impl liverseg_engine::runner::RemoteCache for Remote {
    fn fetch(&self, store: &Store, stage: &str, key: &str, lock: &StoreLock) -> Result<bool> {
        let bar = indicatif::ProgressBar::hidden();
        Ok(self.pull(store, stage, key, lock, &bar)?.is_some())
    }
}
