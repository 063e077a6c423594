//! Running a stage in a separate worker process. Stages that need libtorch run
//! as `liverseg-torch stage REQUEST.json`, so the engine binary stays small and
//! starts fast, and a scheduler could run the same command on another machine.

use super::params::Params;
use super::stage::{RawFile, StageContext, Summary};
use super::store::{read_manifest, Artifact, MANIFEST};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize)]
pub struct WorkerRequest {
    pub stage: String,
    pub key: String,
    pub params: BTreeMap<String, serde_json::Value>,
    pub out_dir: PathBuf,
    pub scratch_dir: PathBuf,
    pub upstream: BTreeMap<String, PathBuf>,
    pub raw_files: Vec<RawFile>,
    pub project_root: PathBuf,
    pub show_progress: bool,
    /// Where the worker writes the stage's summary metrics (JSON).
    pub summary_path: PathBuf,
}

/// The worker binary next to the running one.
pub fn worker_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot locate the running executable")?;
    let dir = me.parent().ok_or_else(|| anyhow!("executable has no folder"))?;
    let bin = dir.join("liverseg-torch");
    if !bin.is_file() {
        bail!("{}: worker binary not found; build it with `make build`", bin.display());
    }
    Ok(bin)
}

/// Run `ctx`'s stage in the worker and return its summary.
pub fn run_in_worker(ctx: &StageContext) -> Result<Summary> {
    let summary_path = ctx.out_dir.with_extension("summary.json");
    let req = WorkerRequest {
        stage: ctx.stage.name.to_owned(),
        key: ctx.key.to_owned(),
        params: ctx.params.0.clone(),
        out_dir: ctx.out_dir.to_path_buf(),
        scratch_dir: ctx.scratch_dir.clone(),
        upstream: ctx.upstream.iter().map(|(k, a)| (k.clone(), a.dir.clone())).collect(),
        raw_files: ctx.raw_files.to_vec(),
        project_root: ctx.project_root.to_path_buf(),
        show_progress: ctx.show_progress,
        summary_path: summary_path.clone(),
    };
    run_request(&req)
}

/// A command for the worker binary that dies with the process that starts
/// it. PDEATHSIG is set between fork and exec, and the parent is checked
/// afterwards: set in the worker's own `main` it would come too late when the
/// engine is killed while the worker is still loading libtorch, and that
/// orphan would race a rerun of the same trial over its checkpoint.
pub fn worker_command() -> Result<std::process::Command> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(worker_binary()?);
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Run one request in a worker process (its stderr passes through) and
/// return the summary it wrote.
pub fn run_request(req: &WorkerRequest) -> Result<Summary> {
    let req_path = req.out_dir.with_extension("request.json");
    std::fs::write(&req_path, serde_json::to_vec_pretty(req)?).with_context(|| format!("cannot write {}", req_path.display()))?;
    let status = worker_command()?
        .arg("stage")
        .arg(&req_path)
        .status()
        .context("cannot start the liverseg-torch worker")?;
    std::fs::remove_file(&req_path).ok();
    if !status.success() {
        bail!("worker for stage `{}` failed ({status})", req.stage);
    }
    let bytes = std::fs::read(&req.summary_path).with_context(|| format!("worker wrote no summary at {}", req.summary_path.display()))?;
    std::fs::remove_file(&req.summary_path).ok();
    serde_json::from_slice(&bytes).context("worker summary is not JSON")
}

/// Worker side: rebuild the context from a request.
pub struct WorkerJob {
    pub req: WorkerRequest,
    pub params: Params,
    pub upstream: BTreeMap<String, Artifact>,
}

impl WorkerJob {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let req: WorkerRequest = serde_json::from_slice(&bytes).with_context(|| format!("{}: not a worker request", path.display()))?;
        let mut upstream = BTreeMap::new();
        for (name, dir) in &req.upstream {
            let manifest = read_manifest(&dir.join(MANIFEST))?;
            upstream.insert(name.clone(), Artifact { stage: name.clone(), key: manifest.key.clone(), dir: dir.clone(), manifest });
        }
        Ok(WorkerJob { params: Params(req.params.clone()), upstream, req })
    }

    pub fn context<'a>(&'a self, stage: &'static super::stage::StageInfo) -> StageContext<'a> {
        StageContext {
            stage,
            key: &self.req.key,
            params: &self.params,
            out_dir: &self.req.out_dir,
            scratch_dir: self.req.scratch_dir.clone(),
            upstream: self.upstream.clone(),
            raw_files: &self.req.raw_files,
            raw_bytes: None,
            project_root: &self.req.project_root,
            show_progress: self.req.show_progress,
        }
    }

    pub fn finish(&self, summary: &Summary) -> Result<()> {
        std::fs::write(&self.req.summary_path, serde_json::to_vec(summary)?).with_context(|| format!("cannot write {}", self.req.summary_path.display()))
    }
}
