//! What a stage declares and what it is given when it runs.

use super::params::{ParamSpec, Params};
use super::store::Artifact;
use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The static description of a stage: its name, code version, the upstream
/// stages it reads, the files it writes, and its parameters.
pub struct StageInfo {
    pub name: &'static str,
    /// Bump when the stage's code changes its output: the key changes with it.
    pub version: u32,
    pub inputs: &'static [&'static str],
    pub outputs: &'static [&'static str],
    pub params: &'static [ParamSpec],
    pub about: &'static str,
}

/// Summary metrics a stage reports; they go into the manifest and are what
/// `lineage stage.metric` looks up.
pub type Summary = BTreeMap<String, Value>;

/// A raw input file of a source stage, with its content hash.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RawFile {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

pub trait Stage: Send + Sync {
    fn info(&self) -> &'static StageInfo;

    /// Files outside the store that a source stage reads. Their content hashes
    /// enter the stage key.
    /// Each is (path relative to the dataset root, path to read): moving the
    /// dataset elsewhere does not change the key.
    fn raw_inputs(&self, _params: &Params, _project_root: &Path) -> Result<Vec<(String, PathBuf)>> {
        Ok(Vec::new())
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary>;
}

pub struct StageContext<'a> {
    pub stage: &'static StageInfo,
    pub key: &'a str,
    pub params: &'a Params,
    /// Temporary build directory; renamed into the store only when `run` returns Ok.
    pub out_dir: &'a Path,
    /// Scratch space that survives an interrupted run of the same key (checkpoints).
    pub scratch_dir: PathBuf,
    pub upstream: BTreeMap<String, Artifact>,
    pub raw_files: &'a [RawFile],
    /// Raw files the engine already read to hash them (see `read_raw`).
    pub raw_bytes: Option<&'a super::hash::RawBytes>,
    pub project_root: &'a Path,
    pub show_progress: bool,
}

impl StageContext<'_> {
    pub fn upstream(&self, name: &str) -> Result<&Artifact> {
        self.upstream
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("stage `{}` needs upstream `{name}`, which pipeline.yaml does not list in its deps", self.stage.name))
    }

    /// The bytes of a raw input file: those the engine hashed for the key, if
    /// it kept them, else read now.
    pub fn read_raw(&self, path: &Path) -> Result<Vec<u8>> {
        if let Some(bytes) = self.raw_bytes.and_then(|k| k.take(path)) {
            return Ok(bytes);
        }
        use anyhow::Context;
        std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
    }

    pub fn out(&self, file: &str) -> PathBuf {
        self.out_dir.join(file)
    }

    /// Key-value pairs written into every Parquet table, so a table copied out
    /// of the store still names the stage and keys that produced it.
    pub fn provenance(&self) -> Vec<(String, String)> {
        let mut kv = vec![
            ("liverseg.stage".to_owned(), self.stage.name.to_owned()),
            ("liverseg.key".to_owned(), self.key.to_owned()),
            ("liverseg.version".to_owned(), self.stage.version.to_string()),
            ("liverseg.params".to_owned(), self.params.canonical_json()),
        ];
        let upstream: BTreeMap<&str, &str> = self.upstream.iter().map(|(k, a)| (k.as_str(), a.key.as_str())).collect();
        kv.push(("liverseg.upstream".to_owned(), serde_json::to_string(&upstream).unwrap_or_default()));
        kv
    }
}
