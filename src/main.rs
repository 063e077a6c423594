//! The `liverseg` command line.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use liverseg::engine::config::{self, Override};
use liverseg::engine::runner::Engine;
use liverseg::engine::{self as eng, stage::Stage};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "liverseg", version, about = "Content-hashed liver segmentation pipeline: data, training, evaluation, lineage")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct PipelineArgs {
    /// The pipeline file.
    #[arg(long, default_value = "pipeline.yaml", global = true)]
    pipeline: PathBuf,
    /// Named profile from pipeline.yaml (default: its default_profile).
    #[arg(long, global = true)]
    profile: Option<String>,
    /// Override a parameter, as editing pipeline.yaml would: -P train.lr=3e-4
    #[arg(short = 'P', value_name = "KEY=VALUE", global = true)]
    set: Vec<Override>,
    /// No progress output.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the DAG up to TARGET (default: everything), reusing complete artifacts.
    Run {
        target: Option<String>,
        /// Print {"ran": [...], "reused": [...]} on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Rerun one stage from the cached upstream artifacts.
    Stage {
        name: String,
        /// Rerun even if an artifact for the current key exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Each stage's key and state (fresh, stale, missing), with the reason.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Trace an artifact file, a stage, or stage.metric back to the raw files.
    Lineage {
        what: String,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Print the stage graph (text, or Graphviz with --dot).
    Dag {
        #[arg(long)]
        dot: bool,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Print the folder of a stage's current artifact (for scripts).
    Path {
        stage: String,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Run one worker request (a tune trial, or a libtorch stage) as its own
    /// process: the command a cluster scheduler runs for each trial.
    Trial {
        /// The request JSON written by the tune stage.
        request: PathBuf,
    },
    /// Re-hash every artifact file against its manifest.
    Verify {
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// List (or with --apply remove) artifacts the current pipeline no longer reaches.
    Gc {
        #[arg(long)]
        apply: bool,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// List every stage's parameters: name, type, default and meaning.
    Params {
        /// Markdown table (as in README.md).
        #[arg(long)]
        markdown: bool,
    },
    /// Segment new scans with a trained model: NIfTI in gives a NIfTI mask
    /// with the input's geometry, a DICOM series gives NIfTI, PNG/JPEG give PNG.
    Predict {
        /// A model artifact folder (artifacts/train/<key>), a model.safetensors
        /// with model.json beside it, or a stage name (train, baseline).
        #[arg(long)]
        model: String,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Evaluate a trained model on external data (any layout ingest reads),
    /// with the model's own preprocessing and the same metrics; never retrains.
    Evaluate {
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
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Model tools.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Write synthetic abdominal CT phantoms as LiTS-layout NIfTI.
    Synth {
        out: PathBuf,
        #[arg(long, default_value_t = 10)]
        cases: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, default_value_t = 128)]
        size: usize,
        #[arg(long, default_value_t = 20)]
        slices: usize,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// deeplabv3plus, or resnet (the plain baseline)
    #[arg(long, default_value = "deeplabv3plus")]
    arch: String,
    #[arg(long, default_value = "resnet34")]
    encoder: String,
    #[arg(long, default_value_t = 1)]
    in_channels: i64,
    #[arg(long, default_value_t = 2)]
    classes: i64,
    /// Input side (summary only).
    #[arg(long, default_value_t = 224)]
    size: i64,
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Print a layer table with output shapes and parameter counts.
    Summary(ModelArgs),
    /// Print the state_dict names and shapes the weights file uses.
    Names(ModelArgs),
}

fn engine<'r>(p: &PipelineArgs, registry: &'r [Box<dyn Stage>]) -> Result<Engine<'r>> {
    if !p.pipeline.is_file() {
        bail!("{}: pipeline file not found (run from the project folder, or pass --pipeline FILE)", p.pipeline.display());
    }
    let pipeline = config::load(&p.pipeline, registry, p.profile.as_deref(), &p.set)?;
    let mut e = Engine::new(pipeline, registry);
    e.show_progress = !p.quiet;
    Ok(e)
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The data stages allocate and free one volume-sized buffer after another on
/// every rayon thread. glibc would hand each one back to the kernel (munmap,
/// or madvise when trimming a thread's arena) and fault it in again for the
/// next volume, which cost about a third of the NIfTI ingest. Keeping freed
/// memory in the process bounds it by the largest working set, not the total.
/// Blocks of 8 MiB and more are still mapped fresh and returned when freed:
/// a volume that large brings far more work than its page faults.
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tuning; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let registry = liverseg::stages::registry();
    match cli.command {
        Command::Run { target, json, p } => {
            let e = engine(&p, &registry)?;
            let report = e.run(target.as_deref())?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            }
        }
        Command::Stage { name, force, p } => {
            let e = engine(&p, &registry)?;
            e.run_one(&name, force)?;
        }
        Command::Status { json, p } => {
            let e = engine(&p, &registry)?;
            let st = eng::status::status(&e)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                let width = st.iter().map(|s| s.stage.len()).max().unwrap_or(0);
                for s in st {
                    println!("{:<width$} {:<7} {}  {}", s.stage, s.state, s.key, s.reasons.join("; "));
                }
            }
        }
        Command::Lineage { what, p } => {
            let e = engine(&p, &registry)?;
            print!("{}", eng::lineage::lineage(&e, &what)?);
        }
        Command::Dag { dot, p } => {
            let e = engine(&p, &registry)?;
            print!("{}", eng::render_dag(&e.pipeline, dot));
        }
        Command::Path { stage, p } => {
            let e = engine(&p, &registry)?;
            println!("{}", e.current_artifact(&stage)?.dir.display());
        }
        Command::Trial { request } => {
            let status = eng::worker::worker_command()?
                .arg("stage")
                .arg(&request)
                .status()
                .context("cannot start liverseg-torch")?;
            if !status.success() {
                anyhow::bail!("trial {} failed ({status})", request.display());
            }
        }
        Command::Verify { p } => {
            let e = engine(&p, &registry)?;
            let mut bad = 0;
            let all = e.store.list()?;
            for a in &all {
                for problem in eng::store::verify(a)? {
                    println!("MISMATCH {problem}");
                    bad += 1;
                }
            }
            if bad > 0 {
                bail!("{bad} mismatch(es) in {} artifacts", all.len());
            }
            println!("ok: {} artifacts verified", all.len());
        }
        Command::Gc { apply, p } => {
            let e = engine(&p, &registry)?;
            let dead = eng::unreachable(&e)?;
            let lock = if apply { Some(e.store.lock()?) } else { None };
            for a in &dead {
                println!("{} {}/{}", if apply { "removed" } else { "unreachable" }, a.stage, a.key);
                if let Some(l) = &lock {
                    e.store.remove(a, l)?;
                }
            }
            if dead.is_empty() {
                println!("nothing to collect");
            } else if !apply {
                println!("{} artifact(s); rerun with --apply to remove them", dead.len());
            }
        }
        Command::Params { markdown } => {
            for s in &registry {
                let info = s.info();
                if markdown {
                    println!("\n**{}** (v{}; reads {}): {}\n", info.name, info.version, if info.inputs.is_empty() { "raw files".to_owned() } else { info.inputs.join(", ") }, info.about);
                    println!("| key | type | default | meaning |\n|---|---|---|---|");
                }
                for p in info.params {
                    let key = if p.name.starts_with(config::DATA_PREFIX) { p.name.to_owned() } else { format!("{}.{}", info.name, p.name) };
                    let ty = match p.ty {
                        eng::params::ParamType::Choice(c) => c.join(" \\| "),
                        other => format!("{other:?}").to_lowercase(),
                    };
                    if markdown {
                        println!("| `{key}` | {ty} | `{}` | {} |", p.default.trim_matches('\'').replace('|', "\\|"), p.help);
                    } else {
                        println!("{key:<28} {ty:<30} {:<22} {}", p.default, p.help);
                    }
                }
            }
        }
        Command::Predict { model, input, output, device, p } => {
            let dir = if std::path::Path::new(&model).exists() {
                PathBuf::from(&model)
            } else {
                // A stage name: its artifact for the current pipeline.
                engine(&p, &registry)?.current_artifact(&model)?.dir
            };
            let status = eng::worker::worker_command()?
                .args(["predict", "--model"])
                .arg(&dir)
                .arg("--input")
                .arg(&input)
                .arg("--output")
                .arg(&output)
                .args(["--device", &device])
                .status()
                .context("cannot start liverseg-torch")?;
            if !status.success() {
                std::process::exit(status.code().unwrap_or(1));
            }
        }
        Command::Evaluate { model, data, source, liver_labels, max_label, case_regex, out, p } => {
            let dir = if std::path::Path::new(&model).exists() { PathBuf::from(&model) } else { engine(&p, &registry)?.current_artifact(&model)?.dir };
            let dir = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
            let card: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("model.json")).with_context(|| format!("{}: no model.json (not a trained model)", dir.display()))?)?;
            let weights = eng::hash::hash_file(&dir.join("model.safetensors"))?;
            let data = data.canonicalize().with_context(|| format!("cannot resolve {}", data.display()))?;
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            // The evaluation is itself a cached pipeline: ingest and normalise with the
            // model's preprocessing, then evaluate every slice.
            let mut data_block = serde_json::json!({"source": source, "root": data, "liver_labels": liver_labels, "max_label": max_label});
            if let Some(r) = case_regex {
                data_block["case_regex"] = r.into();
            }
            let yaml = serde_json::json!({
                "description": "external evaluation (written by liverseg evaluate)",
                "data": data_block,
                "stages": {
                    "ingest": {},
                    "normalise": {"deps": ["ingest"], "params": {"size": card["size"], "window": card["window"], "minmax_8bit": card["minmax_8bit"]}},
                    "evaluate": {"deps": ["normalise"], "params": {"split": "all", "models": [dir], "models_blake3": [weights]}},
                }
            });
            let file = out.join("pipeline.yaml");
            std::fs::write(&file, serde_yaml::to_string(&yaml)?).with_context(|| format!("cannot write {}", file.display()))?;
            let ext = PipelineArgs { pipeline: file, profile: None, set: p.set.clone(), quiet: p.quiet };
            let e = engine(&ext, &registry)?;
            e.run(Some("evaluate"))?;
            let a = e.current_artifact("evaluate")?;
            println!("{}", serde_json::to_string_pretty(&a.manifest.metrics)?);
            println!("tables: {}", a.dir.display());
        }
        Command::Model { cmd } => {
            // Model code lives in the libtorch worker; this binary never loads libtorch.
            let (verb, m) = match cmd {
                ModelCmd::Summary(m) => ("summary", m),
                ModelCmd::Names(m) => ("names", m),
            };
            let status = eng::worker::worker_command()?
                .args(["model", verb, "--arch", &m.arch, "--encoder", &m.encoder, "--in-channels", &m.in_channels.to_string(), "--classes", &m.classes.to_string(), "--size", &m.size.to_string()])
                .status()
                .context("cannot start liverseg-torch")?;
            if !status.success() {
                std::process::exit(status.code().unwrap_or(1));
            }
        }
        Command::Synth { out, cases, seed, size, slices } => {
            liverseg::imaging::synth::write_lits(&out, cases, seed, size, slices).with_context(|| format!("cannot write phantoms to {}", out.display()))?;
            println!("wrote {cases} phantom cases to {}", out.display());
        }
    }
    Ok(())
}
