//! Training through the pipeline on small phantoms: it learns, it resumes
//! after a kill, and it is deterministic on CPU.

use std::path::{Path, PathBuf};
use std::process::Command;

fn liverseg() -> PathBuf {
    // The engine binary sits next to this package's worker in the shared target dir.
    PathBuf::from(env!("CARGO_BIN_EXE_liverseg-torch")).with_file_name("liverseg")
}

const PIPELINE: &str = r#"
data:
  source: synthetic
  synthetic_cases: 12
  synthetic_size: 64
  synthetic_slices: 10
external:
  other_site: {source: synthetic, synthetic_cases: 2, synthetic_size: 80, synthetic_slices: 8, synthetic_seed: 42}
stages:
  ingest: {}
  normalise: {deps: [ingest], params: {size: 64}}
  split: {deps: [normalise]}
  augment: {deps: [normalise, split], params: {copies: 1}}
  train:
    deps: [normalise, split, augment]
    params: {encoder: resnet18, epochs: 4, batch_size: 8, lr: 1.0e-3, threads: 2, seed: 3}
  evaluate:
    deps: [normalise, split, train]
    params: {split: val}
  report:
    deps: [ingest, normalise, split, evaluate, train]
"#;

fn project(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), PIPELINE).unwrap();
    dir
}

fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new(liverseg()).args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "liverseg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn artifact(dir: &Path, stage: &str) -> PathBuf {
    std::fs::read_dir(dir.join("artifacts").join(stage)).unwrap().flatten().map(|e| e.path()).find(|p| p.join("manifest.json").is_file()).unwrap()
}

fn metrics(dir: &Path) -> polars::prelude::DataFrame {
    liverseg_engine::tables::read_parquet(&artifact(dir, "train").join("metrics.parquet")).unwrap()
}

fn column(df: &polars::prelude::DataFrame, name: &str) -> Vec<f64> {
    df.column(name).unwrap().f64().unwrap().iter().map(|v| v.unwrap()).collect()
}

#[test]
fn training_learns_resumes_and_is_deterministic() {
    // 1. An uninterrupted run learns: validation loss falls and liver Dice
    //    clears a bar that an all-background or random model cannot.
    let a = project("train_a");
    run(&a, &["run", "report", "-q"]);
    let m = metrics(&a);
    let loss = column(&m, "val_loss");
    assert!(loss.iter().cloned().fold(f64::MAX, f64::min) < loss[0], "val loss never fell: {loss:?}");
    let manifest = liverseg_engine::store::read_manifest(&artifact(&a, "evaluate").join("manifest.json")).unwrap();
    let dice = manifest.metrics["train.dice_per_case"].as_f64().unwrap();
    assert!(dice > 0.6, "liver Dice per case {dice}");
    // The report's Table 1 is the evaluate artifact's, and every section is there.
    let html = std::fs::read_to_string(artifact(&a, "report").join("report.html")).unwrap();
    for section in ["Table 1", "Learning curves", "Examples", "Grad-CAM", "External validation", "other_site", "Hyperparameter search", "Data", "Lineage", "data:image/png;base64,", "data:image/svg+xml;base64,"] {
        assert!(html.contains(section), "report lacks {section}");
    }
    assert!(html.contains(&format!("{dice:.4}")), "Table 1 does not show the evaluated Dice {dice:.4}");

    // The `external:` dataset went through the same preprocessing and metrics.
    let ext_dice = manifest.metrics["external.other_site.train.dice_per_case"].as_f64().unwrap();
    assert!(ext_dice > 0.4, "external Dice per case {ext_dice}");
    assert_eq!(manifest.metrics["external.other_site.cases"], 2);
    assert!(html.contains(&format!("{ext_dice:.4}")), "the report does not show the external Dice {ext_dice:.4}");
    let ext_norm = liverseg_engine::store::read_manifest(&artifact(&a, "normalise.other_site").join("manifest.json")).unwrap();
    let own_norm = liverseg_engine::store::read_manifest(&artifact(&a, "normalise").join("manifest.json")).unwrap();
    assert_eq!(ext_norm.params, own_norm.params, "external data must get the models' preprocessing");

    // Grad-CAM of the liver class is highest over the liver: on the best
    // example, its mean inside the true liver exceeds its mean outside.
    let eval_dir = artifact(&a, "evaluate");
    let examples = liverseg_engine::tables::read_parquet(&eval_dir.join("examples.parquet")).unwrap();
    let labels: Vec<String> = examples.column("label").unwrap().str().unwrap().iter().map(|v| v.unwrap().to_owned()).collect();
    let idx: Vec<u64> = examples.column("idx").unwrap().u64().unwrap().iter().map(|v| v.unwrap()).collect();
    let cams = liverseg_engine::tensors::TensorFile::open(&eval_dir.join("gradcam/train.safetensors")).unwrap();
    let (shape, cam) = cams.u8("gradcam").unwrap();
    // Two validation patients: best and median/worst are one and the same case, shown once.
    assert_eq!(shape, vec![2, 64, 64]);
    assert_eq!(labels, ["best", "median"]);
    let data = liverseg_engine::tensors::TensorFile::open(&artifact(&a, "normalise").join("data.safetensors")).unwrap();
    let (_, masks) = data.u8("masks").unwrap();
    let best = labels.iter().position(|l| l == "best").unwrap();
    let truth = &masks[idx[best] as usize * 4096..(idx[best] as usize + 1) * 4096];
    let map = &cam[best * 4096..(best + 1) * 4096];
    let mean = |inside: bool| {
        let v: Vec<f64> = (0..4096).filter(|&i| (truth[i] > 0) == inside).map(|i| map[i] as f64).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    assert!(mean(true) > mean(false), "Grad-CAM inside the liver {:.1} vs outside {:.1}", mean(true), mean(false));

    // Headless Chromium renders the report and every embedded image decodes.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/scripts/render_report.sh");
    let shot = a.join("report.png");
    let out = Command::new("bash").arg(&script).arg(artifact(&a, "report").join("report.html")).arg(&shot).output().unwrap();
    match out.status.code() {
        Some(2) => eprintln!("SKIPPED report render: {}", String::from_utf8_lossy(&out.stderr).trim()),
        _ => {
            assert!(out.status.success(), "report render: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
            assert!(shot.is_file(), "no screenshot");
        }
    }
    let weights = tch::Tensor::read_safetensors(artifact(&a, "train").join("model.safetensors")).unwrap();
    assert!(weights.iter().any(|(n, _)| n == "decoder.aspp.0.convs.0.0.weight"));

    // predict round-trips a real NIfTI: same shape and affine, a 0/1 mask.
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/formats/totalsegmentator/example_ct_sm.nii.gz");
    if shared.is_file() {
        let out = a.join("pred.nii.gz");
        run(&a, &["predict", "--model", "train", "--input", shared.to_str().unwrap(), "--output", out.to_str().unwrap()]);
        let (src, pred) = (liverseg_imaging::nifti::read(&shared).unwrap(), liverseg_imaging::nifti::read(&out).unwrap());
        assert_eq!(src.volume.dims, pred.volume.dims);
        assert_eq!(src.volume.affine, pred.volume.affine);
        assert_eq!(pred.datatype, 2, "uint8 mask");
        assert!(pred.volume.data.iter().all(|&v| v == 0.0 || v == 1.0));
    } else {
        eprintln!("SKIPPED predict round trip: ../shared/data is absent");
    }

    // External evaluation: other data, the model's own preprocessing, no retraining.
    run(&a, &["synth", "ext", "--cases", "2", "--size", "64", "--slices", "6", "--seed", "42"]);
    let out = run(&a, &["evaluate", "--model", "train", "--data", "ext", "--out", "ext-eval", "-q"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("\"split\": \"all\"") && printed.contains(".dice_per_case"), "{printed}");
    let ext_yaml = std::fs::read_to_string(a.join("ext-eval/pipeline.yaml")).unwrap();
    assert!(ext_yaml.contains("size: 64"), "preprocessing comes from the model: {ext_yaml}");
    assert_eq!(std::fs::read_dir(a.join("artifacts/train")).unwrap().count(), 1, "evaluation must not retrain");

    // 2. Killed after its first epoch, the next run resumes from the checkpoint
    //    and ends with the same metrics as the uninterrupted run.
    let b = project("train_b");
    run(&b, &["run", "augment", "-q"]);
    let mut child = Command::new(liverseg()).args(["run", "train", "-q"]).current_dir(&b).spawn().unwrap();
    let scratch = b.join("artifacts/.scratch/train");
    let t0 = std::time::Instant::now();
    loop {
        let done = std::fs::read_dir(&scratch).ok().and_then(|mut d| d.next()).map(|e| e.unwrap().path().join("progress.json").is_file()).unwrap_or(false);
        if done || t0.elapsed().as_secs() > 600 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!b.join("artifacts/train").exists() || std::fs::read_dir(b.join("artifacts/train")).unwrap().next().is_none(), "a killed run left an artifact");
    let out = Command::new(liverseg()).args(["run", "train"]).current_dir(&b).output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resuming train from epoch"), "{stderr}");
    let (ma, mb) = (metrics(&a), metrics(&b));
    for col in ["train_loss", "val_loss", "val_dice", "val_miou", "lr"] {
        assert_eq!(column(&ma, col), column(&mb, col), "{col} differs between the uninterrupted and the resumed run");
    }
    // Checkpoints are scratch: gone once the artifact exists, and not part of it.
    assert!(!artifact(&b, "train").join("checkpoint.safetensors").exists());
}
