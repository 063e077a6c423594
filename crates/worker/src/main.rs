//! The libtorch worker: runs the stages and commands that need a model, so the
//! `liverseg` engine binary itself never loads libtorch.

/// `println!` that returns the write's error instead of panicking on a closed pipe.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        writeln!(std::io::stdout().lock(), $($t)*)?;
    }};
}

mod inputs;
mod predict;

use anyhow::{anyhow, bail, Context, Result};
use liverseg_engine::worker::WorkerJob;
use liverseg_model::{ModelSpec, SegmentationModel};
use liverseg_recipe::{Arch, Device, Encoder};
use std::ffi::OsString;
use std::path::PathBuf;

const USAGE: &str = "usage: liverseg-torch stage REQUEST.json
       liverseg-torch predict --model DIR [--model DIR]... --input FILE_OR_DIR --output DIR
             [--format nifti|dicom-seg] [--probabilities] [--no-mirror] [--no-largest-component]
             [--device auto|cpu|cuda] [--precision fp32|bf16] [--batch N] [--force]
       liverseg-torch model summary|names [--arch A] [--encoder E] [--in-channels N] [--classes N] [--size S]
       liverseg-torch bench-train [--size S] [--batch B] [--steps N]";

fn main() {
    // Die with the engine: a killed `liverseg run` must not leave training behind.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if let Err(e) = real_main(&args) {
        // The reader of our output went away: nothing left to say.
        if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The value after `--name`, if given.
fn flag(args: &[OsString], name: &str) -> Option<OsString> {
    args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone())
}

/// The value after `--name` as UTF-8 text, or `default`.
fn text(args: &[OsString], name: &str, default: &str) -> Result<String> {
    match flag(args, name) {
        Some(v) => v.into_string().map_err(|v| anyhow!("{name} {}: not UTF-8", v.to_string_lossy())),
        None => Ok(default.to_owned()),
    }
}

fn parsed<T: std::str::FromStr>(args: &[OsString], name: &str, default: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let v = text(args, name, default)?;
    v.parse().map_err(|e| anyhow!("{name} {v}: {e}"))
}

fn real_main(args: &[OsString]) -> Result<()> {
    let command = args.first().and_then(|a| a.to_str());
    match command {
        Some("stage") => stage(args.get(1).ok_or_else(|| anyhow!("{USAGE}"))?),
        Some("predict") => {
            for f in predict::predict(&predict_options(args)?)? {
                say!("wrote {}", f.display());
            }
            Ok(())
        }
        Some("bench-train") => {
            // Training and inference images/s of DeepLabV3+ResNet34 with Adam on
            // random data: the counterpart of bench/py_train_speed.py.
            let (train, infer) = liverseg_model::fit::speed(parsed(args, "--size", "224")?, parsed(args, "--batch", "8")?, parsed(args, "--steps", "5")?)?;
            say!("{train:.2} {infer:.2}");
            Ok(())
        }
        Some("model") => model(args),
        _ => bail!("{USAGE}"),
    }
}

/// Every value given after `--name` (a repeatable option).
fn all_flags(args: &[OsString], name: &str) -> Vec<OsString> {
    args.windows(2).filter(|w| w[0] == name).map(|w| w[1].clone()).collect()
}

fn predict_options(args: &[OsString]) -> Result<predict::Options> {
    let path = |n: &str| flag(args, n).map(PathBuf::from).ok_or_else(|| anyhow!("predict needs {n}\n{USAGE}"));
    let has = |n: &str| args.iter().any(|a| a == n);
    let models: Vec<PathBuf> = all_flags(args, "--model").into_iter().map(PathBuf::from).collect();
    if models.is_empty() {
        bail!("predict needs --model\n{USAGE}");
    }
    let bf16 = match text(args, "--precision", "fp32")?.as_str() {
        "fp32" => false,
        "bf16" => true,
        other => bail!("--precision {other}: expected fp32 or bf16"),
    };
    let dicom_seg = match text(args, "--format", "nifti")?.as_str() {
        "nifti" => false,
        "dicom-seg" => true,
        other => bail!("--format {other}: expected nifti or dicom-seg"),
    };
    Ok(predict::Options {
        models,
        input: path("--input")?,
        output: path("--output")?,
        dicom_seg,
        probabilities: has("--probabilities"),
        mirror: !has("--no-mirror"),
        largest_component: !has("--no-largest-component"),
        device: liverseg_model::device_for(parsed::<Device>(args, "--device", "auto")?)?,
        bf16,
        force: has("--force"),
        batch: match parsed::<usize>(args, "--batch", "8")? {
            0 => bail!("--batch 0: give at least one slice per forward pass"),
            n => n,
        },
        resume: has("--continue"),
        overwrite: has("--overwrite"),
    })
}

/// Run one stage request: the stage named in it, from the registry.
fn stage(request: &OsString) -> Result<()> {
    let job = WorkerJob::load(&PathBuf::from(request))?;
    let registry = liverseg_stages::registry();
    let stage = registry.iter().find(|s| s.info().name == job.req.stage).with_context(|| format!("the worker has no stage `{}`", job.req.stage))?;
    // Declared threads are in the key and used as given (libtorch's sums
    // depend on the count); else the allocation, recorded by the stage.
    match stage.threads(&job.params) {
        0 => liverseg_engine::worker::allocated_threads().into_iter().for_each(|n| tch::set_num_threads(n as i32)),
        n => tch::set_num_threads(n as i32),
    }
    let ctx = job.context(stage.info());
    let summary = stage.run(&ctx)?;
    job.finish(&ctx, summary)
}

fn model(args: &[OsString]) -> Result<()> {
    let spec = ModelSpec {
        arch: parsed::<Arch>(args, "--arch", "deeplabv3plus")?,
        encoder: parsed::<Encoder>(args, "--encoder", "resnet34")?,
        in_channels: parsed(args, "--in-channels", "1")?,
        classes: parsed(args, "--classes", "2")?,
    };
    match args.get(1).and_then(|a| a.to_str()) {
        Some("summary") => say!("{}", liverseg_model::summary::summary(&spec, parsed(args, "--size", "224")?)?.trim_end()),
        Some("names") => {
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            SegmentationModel::new(&vs.root(), &spec)?;
            for (name, shape) in liverseg_model::weights::state_dict_names(&vs) {
                say!("{name}\t{shape:?}");
            }
        }
        _ => bail!("{USAGE}"),
    }
    Ok(())
}
