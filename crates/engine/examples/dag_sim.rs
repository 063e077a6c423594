//! A simulated DAG for the scheduler benchmark (`bash bench/run.sh
//! dag-sim`): STAGES cheap stand-in stages in layers, each reading two of
//! the layer before, and a sweep stage of TRIALS stand-in trials, run
//! through the real engine (plan, lock, scheduler, executor, commit) with
//! a shell script for the worker. It reports wall time and the engine's own
//! CPU time per stage, and how many times it called squeue and sbatch.
//!
//!   dag_sim DIR STAGES TRIALS WIDTH local|slurm
//!
//! DIR must not exist; under `slurm` a cluster must be up (SLURM_CONF).

use anyhow::{bail, Context, Result};
use liverseg_engine::config;
use liverseg_engine::pipeline::ExecutorKind;
use liverseg_engine::runner::Engine;
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_engine::worker::{beside, WorkerRequest};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A stand-in stage's description, under its own name: every stage of the
/// DAG is registered, as a pipeline's real stages are.
fn info(name: String, placement: Placement) -> &'static StageInfo {
    Box::leak(Box::new(StageInfo {
        name: Box::leak(name.into_boxed_str()),
        version: 1,
        about: "a stand-in: the worker script writes out.json",
        inputs: &[],
        optional_inputs: &[],
        collects: &[],
        per_dataset: false,
        dataset_requires: &[],
        outputs: &["out.json"],
        params: &[],
        placement,
    }))
}

struct Step(&'static StageInfo);
impl Stage for Step {
    fn info(&self) -> &'static StageInfo {
        self.0
    }
    fn threads(&self, _: &liverseg_engine::params::Params) -> usize {
        1
    }
    fn run(&self, _: &StageContext) -> Result<Summary> {
        bail!("`{}` runs in the worker", self.0.name)
    }
}

/// `trials` requests in one batch, all at once, as `tune` submits a search's trials.
struct Sweep {
    info: &'static StageInfo,
    trials: usize,
}
impl Stage for Sweep {
    fn info(&self) -> &'static StageInfo {
        self.info
    }
    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let trials_dir = ctx.scratch_dir.join("trials");
        let mut reqs = Vec::with_capacity(self.trials);
        for i in 0..self.trials {
            let mut r = WorkerRequest::for_stage(ctx);
            (r.trial, r.key) = (true, format!("{}-{i:05}", ctx.key));
            r.out_dir = trials_dir.join(format!("t{i:05}"));
            std::fs::create_dir_all(&r.out_dir).with_context(|| format!("cannot create {}", r.out_dir.display()))?;
            r.summary_path = beside(&r.out_dir, "summary.json");
            reqs.push(r);
        }
        let failed: Vec<String> = ctx.executor.run_batch(&reqs, reqs.len()).into_iter().filter_map(|r| r.err().map(|e| format!("{e:#}"))).collect();
        if let Some(first) = failed.first() {
            bail!("{} of {} trials failed, the first: {first}", failed.len(), self.trials);
        }
        std::fs::write(ctx.out("out.json"), format!("{{\"trials\":{}}}", self.trials))?;
        Ok(Summary::new())
    }
}

/// The stand-in worker, for both request layouts: a Slurm job folder
/// (`DIR/request.json`: build in DIR/out) and a local build (`B.request.json`).
const WORKER: &str = r#"#!/bin/sh
case "$2" in
  */request.json) d=$(dirname "$2"); out="$d/out"; sum="$d/summary.json" ;;
  *) out="${2%.request.json}"; sum="$out.summary.json" ;;
esac
mkdir -p "$out" && echo '{}' > "$out/out.json" && printf '{"summary":{}}' > "$sum"
"#;

/// squeue and sbatch shims that count their calls, then run the real ones.
fn counting_shims(dir: &Path) -> Result<()> {
    let bin = dir.join("shims");
    std::fs::create_dir_all(&bin)?;
    for tool in ["squeue", "sbatch"] {
        let real = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).map(|p| p.join(tool)).find(|p| p.is_file());
        let Some(real) = real else { continue };
        let script = format!("#!/bin/sh\necho >> '{}/{tool}.calls'\nexec '{}' \"$@\"\n", dir.display(), real.display());
        write_executable(&bin.join(tool), &script)?;
    }
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())))?;
    std::env::set_var("PATH", path);
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// pipeline.yaml: `s00000`, then layers of `width` stages each reading two
/// of the layer before; a sweep reading the first stage when trials > 0.
fn pipeline_yaml(stages: usize, trials: usize, width: usize, executor: &str) -> String {
    let mut y =
        format!("executor: {executor}\nslurm: {{default: {{partition: many, cpus: 1, mem: 50M}}, trial: {{partition: many, cpus: 1, mem: 50M}}, poll_seconds: 0.5}}\nstages:\n  s00000: {{}}\n");
    for i in 1..stages {
        let layer_start = 1 + ((i - 1) / width) * width;
        let deps: Vec<usize> = if layer_start == 1 { vec![0] } else { vec![layer_start - width + (i - layer_start), layer_start - width + (i - layer_start + 1) % width] };
        let deps: Vec<String> = deps.iter().map(|d| format!("s{d:05}")).collect();
        let _ = writeln!(y, "  s{i:05}: {{deps: [{}]}}", deps.join(", "));
    }
    if trials > 0 {
        y.push_str("  sweep: {deps: [s00000]}\n");
    }
    y
}

fn cpu_seconds() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn calls(dir: &Path, tool: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("{tool}.calls"))).map(|t| t.lines().count()).unwrap_or(0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, stages, trials, width, executor] = args.as_slice() else {
        bail!("usage: dag_sim DIR STAGES TRIALS WIDTH local|slurm");
    };
    let (stages, trials, width): (usize, usize, usize) = (stages.parse()?, trials.parse()?, width.parse()?);
    let kind: ExecutorKind = executor.parse()?;
    let dir = PathBuf::from(dir);
    if dir.exists() {
        bail!("{}: exists; give a new folder", dir.display());
    }
    std::fs::create_dir_all(&dir)?;
    let dir = std::fs::canonicalize(&dir)?;
    counting_shims(&dir)?;
    write_executable(&dir.join("worker.sh"), WORKER)?;
    std::env::set_var(liverseg_engine::executor::WORKER_ENV, dir.join("worker.sh"));
    let file = dir.join("pipeline.yaml");
    std::fs::write(&file, pipeline_yaml(stages.max(1), trials, width.max(1), executor))?;
    let mut registry: Vec<Box<dyn Stage>> = (0..stages.max(1)).map(|i| Box::new(Step(info(format!("s{i:05}"), Placement::Worker))) as Box<dyn Stage>).collect();
    registry.push(Box::new(Sweep { info: info("sweep".into(), Placement::InProcess), trials }));

    let (t0, cpu0) = (Instant::now(), cpu_seconds());
    let pipeline = config::load(&file, &registry, None, &[])?;
    let mut engine = Engine::new(pipeline, &registry);
    engine.show_progress = false;
    engine.use_executor(kind)?;
    let report = engine.run(None)?;
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    // Worker requests: a job each for the stand-in stages, and the trials.
    let requests = report.ran.len() - usize::from(trials > 0) + trials;
    println!(
        "{executor}: {} stage(s) ran, {requests} worker request(s): wall {wall:.1} s; per request {:.1} ms wall, {:.2} ms engine CPU; squeue {} call(s), sbatch {}",
        report.ran.len(),
        1000.0 * wall / requests as f64,
        1000.0 * cpu / requests as f64,
        calls(&dir, "squeue"),
        calls(&dir, "sbatch")
    );

    let (t0, cpu0) = (Instant::now(), cpu_seconds());
    let pipeline = config::load(&file, &registry, None, &[])?;
    let mut engine = Engine::new(pipeline, &registry);
    engine.show_progress = false;
    let again = engine.run(None)?;
    if !again.ran.is_empty() {
        bail!("the no-op rerun ran {} stage(s)", again.ran.len());
    }
    println!("{executor}: no-op rerun of {} stage(s): {:.3} s wall, {:.3} s CPU", again.reused.len(), t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    Ok(())
}
