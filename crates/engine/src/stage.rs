//! What a stage declares and what it is given when it runs.

use super::executor::Executor;
use super::params::{ParamSpec, Params};
use super::store::{Artifact, Store, StoreLock, SubArtifacts};
use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where a stage's `run` executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In the engine process.
    InProcess,
    /// In a worker process (`liverseg-torch stage REQUEST.json`), started by
    /// the pipeline's executor: locally, or as a cluster job.
    Worker,
}

/// The static description of a stage: its name, code version, the upstream
/// stages it reads, the files it writes, and its parameters.
pub struct StageInfo {
    pub name: &'static str,
    /// Bump when the stage's code changes its output: the key changes with it.
    pub version: u32,
    pub about: &'static str,
    /// Upstream stages it always reads: pipeline.yaml's deps must list them.
    pub inputs: &'static [&'static str],
    /// Upstream stages it reads when the pipeline has them.
    pub optional_inputs: &'static [&'static str],
    /// Registered stages of which it reads every dataset instance
    /// (`NAME.dataset`), besides the pipeline's own.
    pub collects: &'static [&'static str],
    /// Runs once per dataset: the source stage, and stages that only
    /// transform one dataset. Each extra dataset of pipeline.yaml gets its
    /// own instance of these.
    pub per_dataset: bool,
    /// A source stage's dataset keys that every extra dataset must set
    /// (without the `data.` prefix).
    pub dataset_requires: &'static [&'static str],
    /// What it writes into its artifact: a file, `dir/` for a folder, and a
    /// trailing `?` when only some runs write it. Checked after every run.
    pub outputs: &'static [&'static str],
    pub params: &'static [ParamSpec],
    pub placement: Placement,
}

/// Summary metrics a stage reports; they go into the manifest and are what
/// `lineage stage.metric` looks up.
pub type Summary = BTreeMap<String, Value>;

/// The summary key of a stage's warnings (an array of strings): printed
/// again whenever the artifact is reused, since they hold for it.
pub const WARNINGS: &str = "warnings";

/// Print a warning now and keep it in the summary for every later reuse.
pub fn warn(summary: &mut Summary, message: String) {
    eprintln!("warning: {message}");
    let list = summary.entry(WARNINGS.to_owned()).or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(items) = list {
        items.push(Value::String(message));
    }
}

/// A raw input file of a source stage, with its content hash.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RawFile {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

pub trait Stage: Send + Sync {
    fn info(&self) -> &'static StageInfo;

    /// Check params beyond their kinds (ranges, combinations) when the
    /// pipeline loads, so a bad value stops the run before anything runs.
    fn check(&self, _params: &Params) -> Result<()> {
        Ok(())
    }

    /// Files and folders outside the store that a source stage reads. The
    /// content hash of every file enters the stage key, under its path
    /// relative to the dataset root: moving the dataset does not change it.
    fn raw_inputs(&self, _params: &Params, _project_root: &Path) -> Result<Vec<super::scan::RawSource>> {
        Ok(Vec::new())
    }

    /// CPU threads the stage keeps busy where it runs (0: every core), so
    /// the scheduler can run stages side by side within the machine's cores.
    fn threads(&self, _params: &Params) -> usize {
        0
    }

    /// Params that say how a stage runs, not what it makes (how many trials
    /// at once): left out of its key and its manifest, so changing one
    /// reruns nothing. The stage must give the same bytes whatever they are.
    fn unkeyed_params(&self) -> &'static [&'static str] {
        &[]
    }

    /// Independent parts a worker stage's run splits into (a model's
    /// cross-validation folds), as the folders inside its build folder that
    /// each builds. With two or more, the engine may run each part as its own
    /// worker request (`StageContext::part`, building into that folder),
    /// side by side, on a cluster as one array, then calls `assemble`.
    fn parts(&self, _params: &Params) -> Vec<String> {
        Vec::new()
    }

    /// Engine side, after every part ran: the stage's own files and summary
    /// from its parts' summaries (in part order), as `run` would write them.
    fn assemble(&self, ctx: &StageContext, _parts: Vec<Summary>) -> Result<Summary> {
        anyhow::bail!("stage `{}` declares parts but cannot assemble them", ctx.stage.name)
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary>;
}

pub struct StageContext<'a> {
    pub stage: &'static StageInfo,
    /// The stage's name in pipeline.yaml: `stage.name`, or an instance's own.
    pub instance: &'a str,
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
    pub store: &'a Store,
    /// Held by the engine for the run; sub-artifacts commit under it.
    pub lock: Option<&'a StoreLock>,
    pub executor: &'a dyn Executor,
    /// Sub-artifacts this run used, by kind: they go into the manifest, so
    /// `gc` keeps them with the artifact.
    pub children: Mutex<BTreeMap<String, Vec<String>>>,
    /// The params the stage actually used, where they differ from the
    /// declared ones (tuned params fed in from upstream).
    pub effective_params: Mutex<Option<Params>>,
    /// Which of the stage's `parts` this run builds, alone, into `out_dir`
    /// (None: the whole stage).
    pub part: Option<usize>,
}

impl StageContext<'_> {
    pub fn upstream(&self, name: &str) -> Result<&Artifact> {
        self.upstream.get(name).ok_or_else(|| anyhow::anyhow!("stage `{}` needs upstream `{name}`, which pipeline.yaml does not list in its deps", self.stage.name))
    }

    /// Upstream artifacts that are dataset instances of registered stage
    /// `stage` (`normalise.site_b` for `normalise`), by dataset name.
    pub fn instances_of(&self, stage: &str) -> Vec<(&str, &Artifact)> {
        self.upstream.iter().filter_map(|(name, a)| name.strip_prefix(stage).and_then(|r| r.strip_prefix('.')).map(|d| (d, a))).collect()
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

    /// Cached sub-artifacts of this stage (a search's trials), each with its
    /// own key and manifest, stored as `artifacts/<stage>+<kind>/<key>/`
    /// under the instance's name (`tune.train+trial`), where `gc`, `verify`
    /// and `push` look for the children its manifest lists.
    pub fn sub_artifacts(&self, kind: &str) -> Result<SubArtifacts<'_>> {
        let lock = self.lock.ok_or_else(|| anyhow::anyhow!("stage `{}`: sub-artifacts need the store lock", self.instance))?;
        Ok(SubArtifacts::new(self.store, lock, self.instance, kind, &self.children))
    }

    /// Every artifact behind this run's upstream, found through the manifests
    /// down to the source stages, oldest first.
    pub fn lineage(&self) -> Result<Vec<Artifact>> {
        super::lineage::ancestry(self.store, self.upstream.values().cloned().collect())
    }

    /// Record the params the stage actually runs with, when they differ from
    /// the declared ones: the manifest, `lineage` and every file's
    /// provenance written afterwards show them beside the declared ones.
    pub fn record_effective_params(&self, params: Params) {
        *self.effective_params.lock().unwrap_or_else(|e| e.into_inner()) = Some(params);
    }

    pub fn effective(&self) -> Option<Params> {
        self.effective_params.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
        if let Some(p) = self.effective() {
            kv.push(("liverseg.effective_params".to_owned(), p.canonical_json()));
        }
        let upstream: BTreeMap<&str, &str> = self.upstream.iter().map(|(k, a)| (k.as_str(), a.key.as_str())).collect();
        kv.push(("liverseg.upstream".to_owned(), serde_json::to_string(&upstream).unwrap_or_default()));
        kv
    }
}
