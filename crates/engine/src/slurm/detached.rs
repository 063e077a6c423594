//! Detached jobs (`run --detach`): each submitted to start after its
//! upstream jobs succeeded (`--dependency=afterok`; cancelled by Slurm when
//! one fails), never watched by the reaper (the engine exits on purpose), and
//! listed in `.slurm/detached.json` until a later run waits for them all.

use super::{array_id, exit_code, queue, tail, JobDir, JobRecord, Slurm, State};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const RECORD: &str = "detached.json";

#[derive(Serialize, Deserialize, Clone)]
struct Detached {
    label: String,
    dir: PathBuf,
    job: JobRecord,
}

/// The record's jobs; none when there is no record.
fn read(root: &Path) -> Result<Vec<Detached>> {
    let path = root.join(RECORD);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("{}: not a list of detached jobs", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write(root: &Path, list: &[Detached]) -> Result<()> {
    let (path, tmp) = (root.join(RECORD), root.join(format!("{RECORD}.tmp")));
    std::fs::write(&tmp, serde_json::to_vec_pretty(list)?).and_then(|_| std::fs::rename(&tmp, &path)).with_context(|| format!("cannot write {}", path.display()))
}

impl Slurm {
    /// Submit `req` after the jobs `after`, recorded for the collecting run.
    pub(super) fn submit_detached(&self, req: &super::WorkerRequest, after: &[String]) -> Result<(String, PathBuf)> {
        let (job, dir) = self.prepare(req)?;
        // On whole arrays (each of one task): Slurm takes `afterok:<id>_0` as
        // met when that task is cancelled while still pending (22.05, seen on
        // the test cluster), but not `afterok:<id>`.
        let arrays: Vec<&str> = after.iter().map(|id| array_id(id)).collect();
        let dependency = (!after.is_empty()).then(|| format!("afterok:{}", arrays.join(":")));
        let out = dir.out();
        let record = match self.submit(&[(&job, JobDir(dir.0.clone()))], 1, dependency, false) {
            Ok(mut r) => r.remove(0),
            Err(e) => {
                std::fs::remove_dir_all(&dir.0).ok();
                return Err(e);
            }
        };
        let mut list = read(&self.root)?;
        list.push(Detached { label: req.label.clone(), dir: dir.0, job: record.clone() });
        write(&self.root, &list)?;
        Ok((record.id, out))
    }

    pub(super) fn has_detached(&self) -> bool {
        self.root.join(RECORD).exists()
    }

    /// Wait for every detached job, then forget the record. Jobs that did
    /// not finish are one error; finished ones are adopted as the run reaches
    /// their stages (by their folders, as any earlier run's).
    pub(super) fn settle_detached(&self) -> Result<()> {
        let list = read(&self.root)?;
        if list.is_empty() {
            return Ok(());
        }
        eprintln!("waiting for the {} job(s) of the detached run before committing any", list.len());
        let jobs: Vec<(String, JobDir, JobRecord)> = list.iter().map(|d| (d.label.clone(), JobDir(d.dir.clone()), d.job.clone())).collect();
        let states = self.wait(&jobs)?;
        let path = self.root.join(RECORD);
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        let failed: Vec<String> = jobs
            .iter()
            .zip(&states)
            .filter_map(|((label, _, rec), state)| match state {
                State::Exited(0) => None,
                State::Exited(rc) => Some(format!("{label}: Slurm job {} FAILED (exit code {rc}); last lines of {}:\n    {}", rec.id, rec.log.display(), tail(&rec.log, 15))),
                State::Ended(s) => Some(format!("{label}: Slurm job {} ended {s} (a job it waited for failed, or it was cancelled)", rec.id)),
                State::Pending | State::Running => Some(format!("{label}: Slurm job {} still running", rec.id)),
            })
            .collect();
        if !failed.is_empty() {
            bail!(
                "{} of the {} job(s) of the detached run did not finish (the finished ones are adopted by the next run; it submits the rest again):\n  {}",
                failed.len(),
                jobs.len(),
                failed.join("\n  ")
            );
        }
        Ok(())
    }
}

/// The jobs of a detached run not yet collected, for `liverseg status`:
/// (stage, job id, state), from their exit records and one squeue call.
pub fn detached_jobs(store: &crate::store::Store) -> Result<Vec<(String, String, String)>> {
    let list = read(&store.root.join(".slurm"))?;
    let open: Vec<&str> = list.iter().filter(|d| exit_code(&JobDir(d.dir.clone())).is_none()).map(|d| d.job.id.as_str()).collect();
    let queued = if open.is_empty() { Default::default() } else { queue(&open).unwrap_or_default() };
    Ok(list
        .iter()
        .map(|d| {
            let state = match exit_code(&JobDir(d.dir.clone())) {
                Some(0) => "COMPLETED".to_owned(),
                Some(rc) => format!("FAILED (exit {rc})"),
                None => match queued.get(&d.job.id) {
                    Some((s, r)) if !r.is_empty() && r != "None" => format!("{s} ({r})"),
                    Some((s, _)) => s.clone(),
                    None => format!("not in the queue (array {})", array_id(&d.job.id)),
                },
            };
            (d.label.clone(), d.job.id.clone(), state)
        })
        .collect())
}
