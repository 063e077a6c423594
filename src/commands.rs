//! One function per command. Each loads what it needs (the pipeline, the
//! store), calls the engine or the worker, and prints.

use crate::{ModelArgs, PipelineArgs};
use anyhow::{bail, Context, Result};
use liverseg_engine::config::{self, DATA_PREFIX};
use liverseg_engine::executor::worker_command;
use liverseg_engine::runner::Engine;
use liverseg_engine::stage::Stage;
use liverseg_engine::{gc as collect, lineage as trace, status as state, store};
use liverseg_stages::train::ModelCard;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub(crate) fn registry() -> &'static [Box<dyn Stage>] {
    static REGISTRY: OnceLock<Vec<Box<dyn Stage>>> = OnceLock::new();
    REGISTRY.get_or_init(liverseg_stages::registry)
}

pub(crate) fn engine(p: &PipelineArgs) -> Result<Engine<'static>> {
    if !p.pipeline.is_file() {
        bail!("{}: pipeline file not found (run from the project folder, or pass --pipeline FILE)", p.pipeline.display());
    }
    let pipeline = config::load(&p.pipeline, registry(), p.profile.as_deref(), &p.set)?;
    let kind = p.executor.unwrap_or(pipeline.executor);
    let mut e = Engine::new(pipeline, registry());
    e.use_executor(kind)?;
    e.show_progress = !p.quiet;
    Ok(e)
}

pub fn run(p: &PipelineArgs, target: Option<&str>, json: bool, verify: bool, pull: bool, jobs: Option<usize>, name: Option<&str>) -> Result<()> {
    if let Some(n) = name {
        liverseg_engine::runs::check_name(n)?;
    }
    let e = run_engine(p, verify, pull, jobs)?;
    let report = e.run(target)?;
    if json {
        say!("{}", serde_json::to_string(&report)?);
    }
    let planned = e.plan_all()?;
    let stages = report.ran.iter().chain(&report.reused).filter_map(|s| planned.get(s).map(|plan| (s.clone(), plan.key.clone()))).collect();
    let overrides = p.set.iter().map(|o| format!("{}={}", o.key, serde_yaml::to_string(&o.value).unwrap_or_default().trim())).collect();
    let rec = liverseg_engine::runs::record(&e.store, name, overrides, &e.pipeline.profile, stages)?;
    if !p.quiet && !json {
        eprintln!("recorded as run `{}` (`liverseg exp show` lists the runs)", rec.name);
    }
    tell_replaced_params(p, &e, report.ran.iter().chain(&report.reused))
}

/// The engine as `run` sets it up: verify, pull and jobs from its flags.
fn run_engine(p: &PipelineArgs, verify: bool, pull: bool, jobs: Option<usize>) -> Result<Engine<'static>> {
    let mut e = engine(p)?;
    e.verify_on_use |= verify;
    e.jobs = jobs;
    if pull {
        e.remote = Some(Box::new(crate::compare::remote(p, &e)?));
    }
    Ok(e)
}

/// `run --detach`: what ran here, what was submitted after what, what is left.
pub fn run_detached(p: &PipelineArgs, target: Option<&str>, verify: bool, pull: bool, jobs: Option<usize>) -> Result<()> {
    let report = run_engine(p, verify, pull, jobs)?.run_detached(target)?;
    if report.submitted.is_empty() {
        eprintln!("nothing to submit: every stage is up to date or was run here");
        return Ok(());
    }
    if !report.left.is_empty() {
        eprintln!("left for `liverseg run` (they run in the engine, after a job): {}", report.left.join(", "));
    }
    eprintln!("{} stage(s) submitted as Slurm jobs; `liverseg status` shows them, `liverseg run` waits for them and commits them", report.submitted.len());
    Ok(())
}

/// Say which declared params did not run because an upstream stage (a
/// search) replaced them: a note per stage, and a warning for every -P that
/// set one of them, since that override had no effect.
fn tell_replaced_params<'a>(p: &PipelineArgs, e: &Engine, stages: impl Iterator<Item = &'a String>) -> Result<()> {
    let planned = e.plan_all()?;
    for stage in stages {
        let Some(a) = planned.get(stage).map(|plan| e.store.get(stage, &plan.key)).transpose()?.flatten() else {
            continue;
        };
        let replaced = liverseg_engine::experiments::replaced_params(&a);
        if replaced.is_empty() {
            continue;
        }
        for (name, _, used) in &replaced {
            if let Some(o) = p.set.iter().find(|o| o.key == format!("{stage}.{name}")) {
                let set = serde_yaml::to_string(&o.value).unwrap_or_default();
                eprintln!(
                    "warning: -P {}={} had no effect: {stage} ran with {name}={} from its upstream (`liverseg lineage {stage}` shows where)",
                    o.key,
                    set.trim(),
                    liverseg_engine::experiments::cell(used)
                );
            }
        }
        if !p.quiet {
            eprintln!("note: {stage} ran with params its upstream chose, not the declared ones: {}", liverseg_engine::experiments::describe_replaced(&replaced));
        }
    }
    Ok(())
}

pub fn stage(p: &PipelineArgs, name: &str, force: bool) -> Result<()> {
    engine(p)?.run_one(name, force).map(|_| ())
}

pub fn status(p: &PipelineArgs, json: bool) -> Result<()> {
    let e = engine(p)?;
    let st = state::status(&e)?;
    let jobs = liverseg_engine::slurm::jobs_of_running_run(&e.store);
    let detached = liverseg_engine::slurm::detached_jobs(&e.store)?;
    if json {
        let rows = |list: &[(String, String, String)]| -> Vec<serde_json::Value> { list.iter().map(|(s, j, st)| serde_json::json!({"stage": s, "job": j, "state": st})).collect() };
        say!("{}", serde_json::to_string_pretty(&serde_json::json!({"stages": st, "slurm_jobs": rows(&jobs), "detached_jobs": rows(&detached)}))?);
        return Ok(());
    }
    let width = st.iter().map(|s| s.stage.len()).max().unwrap_or(0);
    for s in st {
        let mut reasons = s.reasons.clone();
        if let Some(a) = e.store.get(&s.stage, &s.key)? {
            let replaced = liverseg_engine::experiments::replaced_params(&a);
            if !replaced.is_empty() {
                reasons.push(format!("ran with upstream-chosen {}", liverseg_engine::experiments::describe_replaced(&replaced)));
            }
        }
        say!("{:<width$} {:<7} {}  {}", s.stage, s.state, s.key, reasons.join("; "));
    }
    for (title, list) in [("Slurm jobs of the run in progress:", jobs), ("Slurm jobs of the detached run (`liverseg run` collects them):", detached)] {
        if !list.is_empty() {
            say!("{title}");
            for (stage, job, state) in list {
                say!("  {stage:<width$} job {job:<12} {state}");
            }
        }
    }
    Ok(())
}

pub fn lineage(p: &PipelineArgs, what: &str) -> Result<()> {
    say_raw!("{}", trace::lineage(&engine(p)?, what)?);
    Ok(())
}

pub fn dag(p: &PipelineArgs, dot: bool) -> Result<()> {
    let outputs = |stage: &str| config::find(registry(), stage).map(|s| s.info().outputs.iter().map(|o| o.to_string()).collect()).unwrap_or_default();
    say_raw!("{}", engine(p)?.pipeline.render(dot, outputs));
    Ok(())
}

pub fn path(p: &PipelineArgs, stage: &str) -> Result<()> {
    say!("{}", engine(p)?.current_artifact(stage)?.dir.display());
    Ok(())
}

pub fn trial(request: &Path) -> Result<()> {
    let status = worker_command()?.arg("stage").arg(request).status().context("cannot start liverseg-torch")?;
    if !status.success() {
        bail!("trial {} failed ({status})", request.display());
    }
    Ok(())
}

pub fn verify(p: &PipelineArgs, repair: bool) -> Result<()> {
    let e = engine(p)?;
    let (artifacts, problems) = e.store.audit(store::Depth::Full)?;
    for problem in &problems {
        say!("PROBLEM {problem}");
    }
    if repair && !problems.is_empty() {
        return repair_store(&e, &problems);
    }
    let leftovers = problems.iter().filter(|p| matches!(p, store::Problem::Leftover(_))).count();
    if problems.len() > leftovers {
        bail!(
            "{} problem(s) in {} artifacts of {}; `liverseg verify --repair` moves the damaged ones aside so the next run rebuilds them",
            problems.len() - leftovers,
            artifacts,
            e.store.root.display()
        );
    }
    if leftovers > 0 {
        // Not damage: a killed run's build, cleared by the next run; its own exit code.
        eprintln!("{artifacts} artifacts verified; {leftovers} leftover(s) of interrupted builds in {} (the next run or `verify --repair` clears them)", e.store.root.join(".tmp").display());
        std::process::exit(3);
    }
    say!("ok: {artifacts} artifacts verified");
    Ok(())
}

/// Set aside every damaged artifact or stray folder, and clear leftovers.
fn repair_store(e: &Engine, problems: &[store::Problem]) -> Result<()> {
    let lock = e.store.lock()?; // also clears leftovers of interrupted builds
    let mut moved = std::collections::BTreeSet::new();
    for problem in problems {
        if let store::Problem::Leftover(path) = problem {
            e.store.clear_leftover(path, &lock)?;
            say!("cleared {}", path.display());
            continue;
        }
        // The artifact folder: artifacts/<stage>/<key>/, whatever file the problem names.
        let rel = problem.path().strip_prefix(&e.store.root).unwrap_or(problem.path());
        let dir = e.store.root.join(rel.iter().take(2).collect::<PathBuf>());
        if std::fs::symlink_metadata(&dir).is_ok() && moved.insert(dir.clone()) {
            say!("moved {} to {}", dir.display(), e.store.set_aside(&dir, &lock)?.display());
        }
    }
    say!("repaired: {} folder(s) set aside; the next run rebuilds what the pipeline needs", moved.len());
    Ok(())
}

pub fn gc(p: &PipelineArgs, apply: bool, workspace_only: bool) -> Result<()> {
    let e = engine(p)?;
    let dead = collect::unreachable(&e, workspace_only)?;
    let lock = if apply { Some(e.store.lock()?) } else { None };
    let mut total = 0;
    for a in &dead {
        let size = collect::size(a);
        total += size;
        say!("{} {}/{}  {}", if apply { "removed" } else { "would remove" }, a.stage, a.key, human_bytes(size));
        if let Some(l) = &lock {
            e.store.remove(a, l)?;
        }
    }
    let kept = if workspace_only { "the current pipeline's artifacts and their lineage" } else { "the current pipeline's and every recorded run's artifacts (`exp show`) and their lineage" };
    if dead.is_empty() {
        say!("nothing to collect: everything in the store belongs to {kept}");
    } else if !apply {
        say!("{} artifact(s), {}, outside {kept}; rerun with --apply to remove them", dead.len(), human_bytes(total));
    } else {
        say!("removed {} artifact(s), {}", dead.len(), human_bytes(total));
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

pub fn params(markdown: bool) -> Result<()> {
    for s in registry() {
        let info = s.info();
        if markdown {
            let reads = if info.inputs.is_empty() { "raw files".to_owned() } else { info.inputs.join(", ") };
            say!("\n**{}** (v{}; reads {reads}): {}\n", info.name, info.version, info.about);
            say!("| key | type | default | meaning |\n|---|---|---|---|");
        }
        for p in info.params {
            let key = if p.name.starts_with(DATA_PREFIX) { p.name.to_owned() } else { format!("{}.{}", info.name, p.name) };
            let kind = p.kind.describe();
            if markdown {
                say!("| `{key}` | {} | `{}` | {} |", kind.replace('|', "\\|"), p.default.trim_matches('\'').replace('|', "\\|"), p.help);
            } else {
                say!("{key:<28} {kind:<30} {:<22} {}", p.default, p.help);
            }
        }
    }
    Ok(())
}

/// A model argument: a folder or weights file, or a stage whose current
/// artifact holds one. Anything that looks like a path is taken as one.
fn model_dir(p: &PipelineArgs, model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if model.contains(std::path::MAIN_SEPARATOR) || model.ends_with(".safetensors") || model.starts_with('.') {
        bail!("no model at {model}");
    }
    let engine = engine(p).with_context(|| format!("no model at {model}: not a file, and no pipeline to find a stage `{model}` in"))?;
    if engine.pipeline.stage(model).is_none() {
        bail!("no model at {model}: neither a file nor a stage of {}", p.pipeline.display());
    }
    Ok(engine.current_artifact(model)?.dir)
}

#[derive(clap::Args)]
pub struct PredictArgs {
    /// A model: an artifact folder (artifacts/train/<key>), a model.safetensors,
    /// or a stage name (train, baseline). Repeat for an ensemble (softmax averaged).
    #[arg(long, short = 'm', required = true)]
    model: Vec<String>,
    /// A NIfTI file, a DICOM series folder, a PNG/JPEG, or a folder of any mix.
    #[arg(long, short = 'i')]
    input: PathBuf,
    /// The output folder (created): `<case>_liver.nii.gz` (or `.png` for images) and
    /// `<case>_liver.json`, its provenance (model key, params, input and output hashes).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// `nifti`, or `dicom-seg` (a DICOM Segmentation object per DICOM series, besides the NIfTI;
    /// other inputs of a mixed folder get their NIfTI or PNG only).
    #[arg(long, default_value = "nifti", value_parser = ["nifti", "dicom-seg"])]
    format: String,
    /// Also write the liver probability (softmax) as a float NIfTI.
    #[arg(long)]
    probabilities: bool,
    /// No test-time mirroring (4× faster; on by default, as in nnU-Net).
    #[arg(long)]
    no_mirror: bool,
    /// Keep every connected component, not only the largest.
    #[arg(long)]
    no_largest_component: bool,
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    device: String,
    /// bf16 runs faster on CPUs with AVX-512 BF16/AMX; see BENCHMARKS.md for its agreement with fp32.
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    precision: String,
    /// Slices per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Predict even when the input's unit (HU or 8-bit) is not the model's.
    #[arg(long)]
    force: bool,
    /// Skip cases an earlier run finished (their outputs and sidecar exist);
    /// redo the ones it left unfinished.
    #[arg(long = "continue", conflicts_with = "overwrite")]
    resume: bool,
    /// Replace existing outputs (without it, or --continue, they are an error).
    #[arg(long)]
    overwrite: bool,
}

pub fn predict(p: &PipelineArgs, a: &PredictArgs) -> Result<()> {
    let mut cmd = worker_command()?;
    cmd.arg("predict");
    for m in &a.model {
        cmd.arg("--model").arg(model_dir(p, m)?);
    }
    cmd.arg("--input").arg(&a.input).arg("--output").arg(&a.output);
    cmd.args(["--format", &a.format, "--device", &a.device, "--precision", &a.precision, "--batch", &a.batch.to_string()]);
    for (set, flag) in [
        (a.probabilities, "--probabilities"),
        (a.no_mirror, "--no-mirror"),
        (a.no_largest_component, "--no-largest-component"),
        (a.force, "--force"),
        (a.resume, "--continue"),
        (a.overwrite, "--overwrite"),
    ] {
        if set {
            cmd.arg(flag);
        }
    }
    let status = cmd.status().context("cannot start liverseg-torch")?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

pub fn model(verb: &str, m: &ModelArgs) -> Result<()> {
    // Model code lives in the libtorch worker; this binary never loads libtorch.
    let status = worker_command()?
        .args(["model", verb, "--arch", &m.arch, "--encoder", &m.encoder, "--in-channels", &m.in_channels.to_string(), "--classes", &m.classes.to_string(), "--size", &m.size.to_string()])
        .status()
        .context("cannot start liverseg-torch")?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

pub fn synth(out: &Path, cases: usize, seed: u64, size: usize, slices: usize) -> Result<()> {
    liverseg_imaging::synth::write_lits(out, cases, seed, size, slices).with_context(|| format!("cannot write phantoms to {}", out.display()))?;
    say!("wrote {cases} phantom cases to {}", out.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct ExternalEval {
    /// A model artifact folder, or a stage name (train, baseline).
    #[arg(long)]
    model: String,
    /// The dataset folder.
    #[arg(long)]
    data: PathBuf,
    /// nifti | dicom | slices2d
    #[arg(long, default_value = "nifti")]
    source: String,
    /// Mask labels that count as liver, e.g. 5 for TotalSegmentator.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    liver_labels: Vec<f64>,
    #[arg(long, default_value_t = 2)]
    max_label: i64,
    /// slices2d: regex with patient and slice groups.
    #[arg(long)]
    case_regex: Option<String>,
    /// Workspace for the evaluation's own pipeline and artifacts.
    #[arg(long, default_value = "external-eval")]
    out: PathBuf,
    /// Evaluate even when the data's intensity unit (HU or 8-bit) is not the model's.
    #[arg(long)]
    force: bool,
}

/// A pipeline file, as `evaluate --model --data` writes one.
#[derive(Serialize)]
struct PipelineFile {
    description: &'static str,
    data: BTreeMap<&'static str, Value>,
    stages: BTreeMap<&'static str, StageDecl>,
}

#[derive(Serialize)]
struct StageDecl {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deps: Vec<&'static str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    params: BTreeMap<&'static str, Value>,
}

/// The evaluation is itself a cached pipeline in `--out`: ingest and
/// normalise with the model's preprocessing, then evaluate every slice.
pub fn evaluate_external(p: &PipelineArgs, e: ExternalEval) -> Result<()> {
    let dir = model_dir(p, &e.model)?;
    let dir = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
    let card = ModelCard::read(&dir)?;
    if let Some(w) = card.data_warning() {
        eprintln!("warning: {}: {w}", dir.display());
    }
    let weights = liverseg_engine::hash::hash_file(&dir.join("model.safetensors"))?;
    let data = e.data.canonicalize().with_context(|| format!("cannot resolve {}", e.data.display()))?;
    std::fs::create_dir_all(&e.out).with_context(|| format!("cannot create {}", e.out.display()))?;
    let mut data_keys = BTreeMap::from([("source", e.source.into()), ("root", data.to_string_lossy().into()), ("liver_labels", serde_json::json!(e.liver_labels)), ("max_label", e.max_label.into())]);
    if let Some(r) = e.case_regex {
        data_keys.insert("case_regex", r.into());
    }
    let file = PipelineFile {
        description: "external evaluation (written by liverseg evaluate)",
        data: data_keys,
        stages: BTreeMap::from([
            ("ingest", StageDecl { deps: vec![], params: BTreeMap::new() }),
            (
                "normalise",
                StageDecl { deps: vec!["ingest"], params: BTreeMap::from([("size", card.size.into()), ("window", serde_json::json!(card.window)), ("minmax_8bit", card.minmax_8bit.into())]) },
            ),
            (
                "evaluate",
                StageDecl {
                    deps: vec!["ingest", "normalise"],
                    params: BTreeMap::from([("split", "all".into()), ("models", serde_json::json!([dir])), ("models_blake3", serde_json::json!([weights])), ("force_unit", e.force.into())]),
                },
            ),
        ]),
    };
    let path = e.out.join("pipeline.yaml");
    std::fs::write(&path, serde_yaml::to_string(&file)?).with_context(|| format!("cannot write {}", path.display()))?;
    // -P picks the model in the project's pipeline; of them only evaluate's
    // own apply to this evaluation (its other stages come from the model).
    let set = p.set.iter().filter(|o| o.key.starts_with("evaluate.")).cloned().collect();
    let ext = PipelineArgs { pipeline: path, profile: None, set, quiet: p.quiet, executor: p.executor, remote: p.remote.clone() };
    let eng = engine(&ext)?;
    eng.run(Some("evaluate"))?;
    let a = eng.current_artifact("evaluate")?;
    say!("{}", serde_json::to_string_pretty(&a.manifest.metrics)?);
    say!("tables: {}", a.dir.display());
    Ok(())
}
