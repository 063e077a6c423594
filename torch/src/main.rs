//! The libtorch worker: runs the stages and commands that need a model, so the
//! `liverseg` engine binary itself never loads libtorch.

use anyhow::{bail, Result};
use liverseg::engine::worker::WorkerJob;
use std::path::PathBuf;

fn usage() -> ! {
    eprintln!("usage: liverseg-torch stage REQUEST.json\n       liverseg-torch predict --model DIR --input FILE_OR_DIR --output OUT [--device D]\n       liverseg-torch model summary|names [--arch A] [--encoder E] [--in-channels N] [--classes N] [--size S]");
    std::process::exit(2);
}

fn main() {
    // Die with the engine: a killed `liverseg run` must not leave training behind.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = real_main(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn flag(args: &[String], name: &str, default: &str) -> String {
    args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone()).unwrap_or_else(|| default.to_owned())
}

fn real_main(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("stage") => {
            let Some(path) = args.get(1) else { usage() };
            let job = WorkerJob::load(&PathBuf::from(path))?;
            let info: &'static liverseg::engine::stage::StageInfo = match job.req.stage.as_str() {
                "train" => &liverseg::stages::train::TRAIN,
                "baseline" => &liverseg::stages::train::BASELINE,
                "evaluate" => &liverseg::stages::evaluate::INFO,
                other => bail!("the worker has no stage `{other}`"),
            };
            let ctx = job.context(info);
            let summary = match info.name {
                "evaluate" => liverseg_torch::evaluate::evaluate(&ctx)?,
                _ => liverseg_torch::training::run::train(&ctx)?,
            };
            job.finish(&summary)
        }
        Some("predict") => {
            let get = |n: &str| -> Result<PathBuf> { args.windows(2).find(|w| w[0] == n).map(|w| PathBuf::from(&w[1])).ok_or_else(|| anyhow::anyhow!("predict needs {n}")) };
            let device = liverseg_torch::training::run::device_for(&flag(args, "--device", "auto"))?;
            for f in liverseg_torch::predict::predict(&get("--model")?, &get("--input")?, &get("--output")?, device)? {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
        Some("bench-train") => {
            // Training and inference images/s of DeepLabV3+ResNet34 with Adam on
            // random data: the counterpart of bench/py_train_speed.py.
            let size: i64 = flag(args, "--size", "224").parse()?;
            let batch: i64 = flag(args, "--batch", "8").parse()?;
            let steps: usize = flag(args, "--steps", "5").parse()?;
            let (train, infer) = liverseg_torch::training::run::speed(size, batch, steps)?;
            println!("{train:.2} {infer:.2}");
            Ok(())
        }
        Some("model") => {
            let spec = liverseg_torch::model::ModelSpec {
                arch: flag(args, "--arch", "deeplabv3plus"),
                encoder: flag(args, "--encoder", "resnet34"),
                in_channels: flag(args, "--in-channels", "1").parse()?,
                classes: flag(args, "--classes", "2").parse()?,
            };
            match args.get(1).map(String::as_str) {
                Some("summary") => print!("{}", liverseg_torch::model::summary::summary(&spec, flag(args, "--size", "224").parse()?)?),
                Some("names") => {
                    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
                    liverseg_torch::model::SegmentationModel::new(&vs.root(), &spec)?;
                    for (name, shape) in liverseg_torch::model::io::state_dict_names(&vs) {
                        println!("{name}\t{shape:?}");
                    }
                }
                _ => usage(),
            }
            Ok(())
        }
        _ => usage(),
    }
}
