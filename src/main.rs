//! The `liverseg` command line: parse the arguments, then one small function
//! per command (src/commands.rs). The engine binary never loads libtorch;
//! commands that need a model hand over to the liverseg-torch worker.

/// `println!` that returns the write's error instead of panicking, so a
/// closed pipe (`liverseg params | head -1`) ends the command quietly.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        writeln!(std::io::stdout().lock(), $($t)*)?;
    }};
}

/// `print!` likewise.
macro_rules! say_raw {
    ($($t:tt)*) => {{
        use std::io::Write;
        write!(std::io::stdout().lock(), $($t)*)?;
    }};
}

mod commands;
mod compare;

use clap::{Args, Parser, Subcommand};
use liverseg_engine::config::Override;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "liverseg", version, about = "Content-hashed liver segmentation pipeline: data, training, evaluation, lineage")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Options of every pipeline command, before or after the subcommand.
    #[command(flatten)]
    p: PipelineArgs,
}

#[derive(Args, Clone)]
#[command(next_help_heading = "Pipeline options (before or after the command)")]
pub struct PipelineArgs {
    /// The pipeline file.
    #[arg(long, default_value = "pipeline.yaml", global = true)]
    pub pipeline: PathBuf,
    /// Where worker stages and trials run: local (default) or slurm
    /// (overrides pipeline.yaml's `executor:`; never part of a stage key).
    #[arg(long, global = true)]
    pub executor: Option<liverseg_engine::config::ExecutorKind>,
    /// The remote cache for push, pull and run --pull: s3://bucket/prefix or
    /// a folder (overrides pipeline.yaml's `remote:`).
    #[arg(long, global = true)]
    pub remote: Option<String>,
    /// Named profile from pipeline.yaml (default: its default_profile).
    #[arg(long, global = true)]
    pub profile: Option<String>,
    /// Override a parameter, as editing pipeline.yaml would: -P train.lr=3e-4
    #[arg(short = 'P', value_name = "KEY=VALUE", global = true)]
    pub set: Vec<Override>,
    /// No progress output.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the DAG up to TARGET (default: everything), reusing complete artifacts.
    Run {
        target: Option<String>,
        /// Print {"ran": [...], "reused": [...]} on stdout.
        #[arg(long)]
        json: bool,
        /// Re-hash every file of every artifact the run reuses or reads (as
        /// `verify_on_use: true` in pipeline.yaml); damaged ones are rebuilt.
        #[arg(long)]
        verify: bool,
        /// Fetch from the remote cache any stage whose key it holds, instead of running it.
        #[arg(long)]
        pull: bool,
        /// Stages run at once, each as soon as its upstreams are done
        /// (default: as many as the cores allow for their declared threads;
        /// under Slurm, as many as the cluster takes). Never part of a key.
        #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        jobs: Option<u16>,
        /// Name this run (an experiment): `exp show` lists it by name and
        /// `gc` keeps its artifacts. A name used before now names this run.
        #[arg(long)]
        name: Option<String>,
        /// On a cluster: run here only what needs no job, submit the rest as
        /// jobs chained by their dependencies, and exit; `status` shows them
        /// and a later `run` waits for them and commits them.
        #[arg(long, conflicts_with_all = ["json", "name"])]
        detach: bool,
    },
    /// Upload the current pipeline's artifacts (up to TARGET) to the remote cache.
    Push { target: Option<String> },
    /// Download what the current pipeline (up to TARGET) would otherwise compute.
    Pull { target: Option<String> },
    /// Rerun one stage from the cached upstream artifacts.
    Stage {
        name: String,
        /// Rerun even if an artifact for the current key exists.
        #[arg(long)]
        force: bool,
    },
    /// Each stage's key and state (fresh, stale, missing), with the reason.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Trace an artifact file, a stage, or stage.metric back to the raw files.
    Lineage { what: String },
    /// Print the stage graph (text, or Graphviz with --dot).
    Dag {
        #[arg(long)]
        dot: bool,
    },
    /// Print the folder of a stage's current artifact (for scripts).
    Path { stage: String },
    /// Run one worker request (a tune trial, or a libtorch stage) as its own
    /// process: the command a cluster scheduler runs for each trial.
    Trial {
        /// The request JSON written by the tune stage.
        request: PathBuf,
    },
    /// Re-hash every artifact file (trials included) against its manifest,
    /// each manifest against the store's index; flag folders without a
    /// manifest and leftovers of interrupted builds. Exits 1 on any problem.
    Verify {
        /// Move damaged artifacts and stray folders aside (to artifacts/.damaged/)
        /// so the next run rebuilds them, and clear leftovers.
        #[arg(long)]
        repair: bool,
    },
    /// List, with sizes, the artifacts that neither the current pipeline nor
    /// any recorded run (`exp show`) needs; --apply removes them.
    Gc {
        #[arg(long)]
        apply: bool,
        /// Keep only what the current pipeline needs: experiments' artifacts go too.
        #[arg(long)]
        workspace_only: bool,
    },
    /// List every stage's parameters: name, type, default and meaning; or
    /// `params diff A B`: the params two runs differ in.
    Params {
        /// Markdown tables (docs/params.md, made by `make docs`).
        #[arg(long)]
        markdown: bool,
        #[command(subcommand)]
        cmd: Option<ParamsCmd>,
    },
    /// Experiments: `exp show` lists every run of a stage with its params and metrics.
    Exp {
        #[command(subcommand)]
        cmd: ExpCmd,
    },
    /// `metrics diff A B`: the summary metrics two runs differ in, with deltas.
    Metrics {
        #[command(subcommand)]
        cmd: MetricsCmd,
    },
    /// `plots diff A B ...`: learning curves and per-case Dice of runs on one HTML page.
    Plots {
        #[command(subcommand)]
        cmd: PlotsCmd,
    },
    /// Segment new scans, as `nnUNetv2_predict -i IN -o OUT`: NIfTI files,
    /// DICOM series (found by content, grouped by SeriesInstanceUID) and
    /// PNG/JPEG slices, or a folder of any mix; one output per case.
    Predict(commands::PredictArgs),
    /// Evaluate a trained model on external data (any layout ingest reads),
    /// with the model's own preprocessing and the same metrics; never retrains.
    Evaluate(commands::ExternalEval),
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
pub struct ModelArgs {
    /// deeplabv3plus, or resnet (the plain baseline)
    #[arg(long, default_value = "deeplabv3plus")]
    pub arch: String,
    #[arg(long, default_value = "resnet34")]
    pub encoder: String,
    #[arg(long, default_value_t = 1)]
    pub in_channels: i64,
    #[arg(long, default_value_t = 2)]
    pub classes: i64,
    /// Input side (summary only).
    #[arg(long, default_value_t = 224)]
    pub size: i64,
}

#[derive(Subcommand)]
enum ExpCmd {
    /// Every artifact of a stage: key, time, the params that differ, the metrics.
    Show(compare::ShowArgs),
}

/// Exit codes of the diffs: 0 nothing differs, 1 something does, 2 an error.
#[derive(Subcommand)]
enum MetricsCmd {
    /// Compare the summary metrics of two runs (A, B: key, stage, git revision, or `workspace`).
    Diff(compare::DiffArgs),
}

#[derive(Subcommand)]
enum ParamsCmd {
    /// Compare the params of two runs (A, B: key, stage, git revision, or `workspace`).
    Diff(compare::DiffArgs),
}

#[derive(Subcommand)]
enum PlotsCmd {
    /// Write one HTML page with the runs' learning curves and per-case Dice.
    Diff(compare::PlotsArgs),
}

/// A diff's exit code: 1 when the runs differ; an error is 2, not 1.
fn diff_exit(result: anyhow::Result<bool>) -> anyhow::Result<()> {
    match result {
        Ok(false) => Ok(()),
        Ok(true) => std::process::exit(1),
        Err(e) if closed_pipe(&e) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2)
        }
    }
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Print a layer table with output shapes and parameter counts.
    Summary(ModelArgs),
    /// Print the state_dict names and shapes the weights file uses.
    Names(ModelArgs),
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli) {
        if closed_pipe(&e) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Whether the reader of our output went away: nothing left to say.
fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    use commands as c;
    let p = &cli.p;
    match cli.command {
        Command::Run { target, json, verify, pull, jobs, name, detach: false } => c::run(p, target.as_deref(), json, verify, pull, jobs.map(usize::from), name.as_deref()),
        Command::Run { target, verify, pull, jobs, detach: true, .. } => c::run_detached(p, target.as_deref(), verify, pull, jobs.map(usize::from)),
        Command::Push { target } => compare::push(p, target.as_deref()),
        Command::Pull { target } => compare::pull(p, target.as_deref()),
        Command::Stage { name, force } => c::stage(p, &name, force),
        Command::Status { json } => c::status(p, json),
        Command::Lineage { what } => c::lineage(p, &what),
        Command::Dag { dot } => c::dag(p, dot),
        Command::Path { stage } => c::path(p, &stage),
        Command::Trial { request } => c::trial(&request),
        Command::Verify { repair } => c::verify(p, repair),
        Command::Gc { apply, workspace_only } => c::gc(p, apply, workspace_only),
        Command::Params { cmd: Some(ParamsCmd::Diff(a)), .. } => diff_exit(compare::params_diff(p, &a)),
        Command::Params { markdown, cmd: None } => c::params(markdown),
        Command::Exp { cmd: ExpCmd::Show(a) } => compare::show(p, &a),
        Command::Metrics { cmd: MetricsCmd::Diff(a) } => diff_exit(compare::metrics_diff(p, &a)),
        Command::Plots { cmd: PlotsCmd::Diff(a) } => compare::plots_diff(p, &a),
        Command::Predict(args) => c::predict(p, &args),
        Command::Evaluate(e) => c::evaluate_external(p, e),
        Command::Model { cmd } => match cmd {
            ModelCmd::Summary(m) => c::model("summary", &m),
            ModelCmd::Names(m) => c::model("names", &m),
        },
        Command::Synth { out, cases, seed, size, slices } => c::synth(&out, cases, seed, size, slices),
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
