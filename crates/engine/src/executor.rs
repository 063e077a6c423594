//! Executors: where worker requests run. A stage placed in the worker, and
//! each trial of a search, is a request file that `liverseg-torch stage
//! REQUEST.json` runs; an executor decides where that command runs and waits
//! for its summary. `Local` starts it as a child process; a cluster executor
//! submits it as a job. The artifact is committed by the engine either way,
//! so where a request ran never changes what the store holds.

use super::worker::{WorkerOutput, WorkerRequest};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

pub trait Executor: Send + Sync {
    /// Whether requests run elsewhere (a cluster), not as children of the engine.
    fn is_remote(&self) -> bool {
        false
    }

    /// Stages may run side by side from now on: label what their requests
    /// print so each line says whose it is.
    fn label_output(&self, _on: bool) {}

    /// Submit `req` to start once the jobs `after` succeeded, and return
    /// without waiting: its job id, and the folder its build appears in
    /// (`run --detach`).
    fn detach(&self, req: &WorkerRequest, _after: &[String]) -> Result<(String, PathBuf)> {
        bail!("stage `{}`: only a cluster executor can detach jobs", req.label)
    }

    /// Before a run writes the store: wait for the jobs an earlier detached
    /// run submitted (the jobs after a finished one may still read its build).
    fn settle(&self) -> Result<()> {
        Ok(())
    }

    /// Whether jobs of an earlier detached run are still to be collected.
    fn detached_pending(&self) -> bool {
        false
    }

    /// Whether an earlier run left a job for exactly this request.
    fn has_job(&self, _req: &WorkerRequest) -> bool {
        false
    }

    /// Run one request to completion and return what it wrote.
    fn run(&self, req: &WorkerRequest) -> Result<WorkerOutput>;

    /// Run independent requests (the trials of one search batch), at most
    /// `parallel` at a time; results in request order.
    fn run_batch(&self, reqs: &[WorkerRequest], parallel: usize) -> Vec<Result<WorkerOutput>> {
        let mut out: Vec<Result<WorkerOutput>> = Vec::with_capacity(reqs.len());
        for chunk in reqs.chunks(parallel.max(1)) {
            let results: Vec<Result<WorkerOutput>> = std::thread::scope(|scope| {
                let handles: Vec<_> = chunk.iter().map(|r| scope.spawn(move || self.run(r))).collect();
                handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("worker thread panicked")))).collect()
            });
            out.extend(results);
        }
        out
    }
}

/// Worker processes on this machine, children of the engine.
#[derive(Default)]
pub struct Local {
    /// Prefix each line a worker prints with its label (stages run side by side).
    labelled: AtomicBool,
}

impl Local {
    pub const fn new() -> Self {
        Local { labelled: AtomicBool::new(false) }
    }
}

impl Executor for Local {
    fn label_output(&self, on: bool) {
        self.labelled.store(on, Ordering::Relaxed);
    }

    fn run(&self, req: &WorkerRequest) -> Result<WorkerOutput> {
        let req_path = req.write()?;
        let mut cmd = worker_command()?;
        cmd.arg("stage").arg(&req_path);
        if let Some(n) = req.cpus {
            cmd.env(super::worker::CPUS_ENV, n.to_string());
        }
        let status = if self.labelled.load(Ordering::Relaxed) { run_labelled(cmd, &req.label) } else { cmd.status() };
        let status = status.context("cannot start the liverseg-torch worker")?;
        std::fs::remove_file(&req_path).ok();
        if !status.success() {
            bail!("worker for stage `{}` failed ({status})", req.stage);
        }
        req.take_output()
    }
}

/// Run `cmd` with each line of its stderr printed as `[label] line`.
fn run_labelled(mut cmd: std::process::Command, label: &str) -> std::io::Result<std::process::ExitStatus> {
    use std::io::BufRead;
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn()?;
    let stderr = child.stderr.take().expect("stderr is piped");
    for line in std::io::BufReader::new(stderr).split(b'\n').map_while(std::result::Result::ok) {
        eprintln!("[{label}] {}", String::from_utf8_lossy(&line).trim_end_matches('\r'));
    }
    child.wait()
}

/// Names the worker binary where it is not beside the engine's (a cluster
/// whose nodes install it elsewhere, or a stand-in in the executor's tests).
pub const WORKER_ENV: &str = "LIVERSEG_WORKER";

/// The worker binary: `LIVERSEG_WORKER`, else the one next to the running one.
pub fn worker_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(WORKER_ENV).filter(|v| !v.is_empty()).map(PathBuf::from) {
        if !bin.is_file() {
            bail!("{}: {WORKER_ENV} names no file", bin.display());
        }
        return Ok(bin);
    }
    let me = std::env::current_exe().context("cannot locate the running executable")?;
    let dir = me.parent().ok_or_else(|| anyhow!("executable has no folder"))?;
    let bin = dir.join("liverseg-torch");
    if !bin.is_file() {
        bail!("{}: worker binary not found; build it with `make build`", bin.display());
    }
    Ok(bin)
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
