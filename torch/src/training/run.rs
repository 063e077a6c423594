//! The training loop behind the `train` and `baseline` stages.

use super::loader::{batches, SliceSet};
use super::metrics::{confusion, Confusion};
use super::optim::{OptKind, Optimizer};
use super::Loss;
use liverseg::engine::stage::{StageContext, Summary};
use liverseg::engine::table::{read_parquet, write_parquet, TensorFile};
use crate::model::{self, ModelSpec, SegmentationModel};
use liverseg::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::{Column, DataFrame};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRow {
    pub epoch: i64,
    pub lr: f64,
    pub train_loss: f64,
    pub train_pa: f64,
    pub train_miou: f64,
    pub train_liver_iou: f64,
    pub train_dice: f64,
    pub val_loss: f64,
    pub val_pa: f64,
    pub val_miou: f64,
    pub val_liver_iou: f64,
    pub val_dice: f64,
    pub seconds: f64,
    pub train_images_per_s: f64,
}

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    epochs_done: i64,
    best_loss: f64,
    best_epoch: i64,
    bad_epochs: i64,
    lr: f64,
    plateau_bad: i64,
    step: i64,
    rows: Vec<EpochRow>,
}

/// Preprocessing the model was trained with, from its lineage; evaluation and
/// prediction reuse it so inputs cannot be prepared differently by mistake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub spec: ModelSpec,
    pub size: i64,
    pub window: Vec<f64>,
    pub minmax_8bit: bool,
    pub parameters: i64,
    pub best_epoch: i64,
    pub best_val_loss: f64,
    pub train_stage_key: String,
}

pub fn device_for(choice: &str) -> Result<Device> {
    Ok(match choice {
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("train.device is `cuda` but no CUDA device is available");
            }
            Device::Cuda(0)
        }
        _ => Device::cuda_if_available(),
    })
}

fn load_sets(ctx: &StageContext, max_train: usize, use_augmented: bool) -> Result<(SliceSet, SliceSet, usize)> {
    let norm = ctx.upstream("normalise")?;
    let split = ctx.upstream("split")?;
    let data = TensorFile::open(&norm.file("data.safetensors"))?;
    let (shape, images) = data.u8("images")?;
    let (_, masks) = data.u8("masks")?;
    let size = shape[1];
    let px = size * size;
    let assignment = read_parquet(&split.file("assignment.parquet"))?;
    let splits: Vec<String> = assignment.column("split")?.str()?.iter().map(|s| s.unwrap_or_default().to_owned()).collect();
    if splits.len() != shape[0] {
        bail!("split assignment lists {} slices, normalise has {}", splits.len(), shape[0]);
    }
    let mut train = SliceSet { images: Vec::new(), masks: Vec::new(), size };
    let mut val = SliceSet { images: Vec::new(), masks: Vec::new(), size };
    let mut n_train = 0;
    for (i, s) in splits.iter().enumerate() {
        let set = match s.as_str() {
            "train" if max_train == 0 || n_train < max_train => {
                n_train += 1;
                &mut train
            }
            "val" => &mut val,
            _ => continue, // test slices are never read by training
        };
        set.images.extend_from_slice(&images[i * px..(i + 1) * px]);
        set.masks.extend_from_slice(&masks[i * px..(i + 1) * px]);
    }
    if use_augmented {
        let aug = ctx.upstream("augment")?;
        let a = TensorFile::open(&aug.file("augmented.safetensors"))?;
        let (ashape, ai) = a.u8("images")?;
        let (_, am) = a.u8("masks")?;
        let keep = if max_train == 0 { ashape[0] } else { ashape[0].min(max_train * 2) };
        train.images.extend_from_slice(&ai[..keep * px]);
        train.masks.extend_from_slice(&am[..keep * px]);
    }
    if train.len() < 2 || val.is_empty() {
        bail!("training needs at least 2 training and 1 validation slice (got {} and {})", train.len(), val.len());
    }
    Ok((train, val, size))
}

fn write_checkpoint(dir: &Path, vs: &nn::VarStore, best: &BTreeMap<String, Tensor>, opt: &Optimizer, progress: &Progress) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, v)| (format!("model.{k}"), v.to_device(Device::Cpu))).collect();
    named.extend(best.iter().map(|(k, v)| (format!("best.{k}"), v.shallow_clone())));
    named.extend(opt.named_state().into_iter().map(|(k, v)| (k, v.to_device(Device::Cpu))));
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let tmp = dir.join("checkpoint.safetensors.tmp");
    Tensor::write_safetensors(&refs, &tmp).map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::write(dir.join("progress.json.tmp"), serde_json::to_vec(progress)?)?;
    // Tensors first, then the progress that points at them.
    std::fs::rename(&tmp, dir.join("checkpoint.safetensors"))?;
    std::fs::rename(dir.join("progress.json.tmp"), dir.join("progress.json"))?;
    Ok(())
}

fn snapshot(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().map(|(k, v)| (k, v.detach().to_device(Device::Cpu).copy())).collect()
}

pub fn train(ctx: &StageContext) -> Result<Summary> {
    // With a tune stage upstream, its best parameters replace the file's.
    let tuned;
    let p = match ctx.upstream.get("tune") {
        Some(t) => {
            let mut merged = ctx.params.clone();
            for (k, v) in liverseg::stages::tune::best_params(&t.dir)? {
                merged.0.insert(k, v);
            }
            if ctx.show_progress {
                eprintln!("{}: using tuned parameters from tune@{}", ctx.stage.name, t.key);
            }
            tuned = merged;
            &tuned
        }
        None => ctx.params,
    };
    let spec = ModelSpec { arch: p.str("arch")?.to_owned(), encoder: p.str("encoder")?.to_owned(), in_channels: 1, classes: 2 };
    let epochs = p.i64("epochs")?;
    let patience = p.i64("patience")?;
    let batch = p.usize("batch_size")?;
    if batch < 2 || epochs < 1 || patience < 1 {
        bail!("train: batch_size must be ≥ 2, epochs and patience ≥ 1");
    }
    let seed = p.i64("seed")?;
    let threads = p.i64("threads")?;
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let device = device_for(p.str("device")?)?;
    let bf16 = p.bool("bf16")? && device.is_cuda();
    let loss_fn = Loss::parse(p.str("loss")?)?;
    let schedule = p.str("schedule")?.to_owned();
    let base_lr = p.f64("lr")?;
    let (train_set, val_set, size) = load_sets(ctx, p.usize("max_train_slices")?, p.bool("use_augmented")?)?;
    let (train_set, val_set) = (Arc::new(train_set), Arc::new(val_set));

    tch::manual_seed(seed);
    let mut vs = nn::VarStore::new(device);
    let model = SegmentationModel::new(&vs.root(), &spec)?;
    model.check_input(size as i64, size as i64)?;
    let init = p.str("init_weights")?;
    if !init.is_empty() {
        let n = model::io::load(&mut vs, &ctx.project_root.join(init), false)?;
        if ctx.show_progress {
            eprintln!("initialised {n} tensors from {init}");
        }
    }
    let kind = OptKind::parse(p.str("optimizer")?, p.f64("momentum")?, p.bool("nesterov")?)?;
    let mut opt = Optimizer::new(kind, vs.trainable_variables(), base_lr, p.f64("weight_decay")?);
    let mut best = snapshot(&vs);
    let mut progress = Progress { epochs_done: 0, best_loss: f64::INFINITY, best_epoch: 0, bad_epochs: 0, lr: base_lr, plateau_bad: 0, step: 0, rows: Vec::new() };

    // Resume an interrupted run of this very key.
    let ckpt = ctx.scratch_dir.join("checkpoint.safetensors");
    let prog = ctx.scratch_dir.join("progress.json");
    if ckpt.is_file() && prog.is_file() {
        let saved: Progress = serde_json::from_slice(&std::fs::read(&prog)?).context("corrupt progress.json in scratch")?;
        let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&ckpt).map_err(|e| anyhow!("{}: {e}", ckpt.display()))?.into_iter().collect();
        tch::no_grad(|| -> Result<()> {
            for (name, mut var) in vs.variables() {
                let src = tensors.get(&format!("model.{name}")).ok_or_else(|| anyhow!("checkpoint lacks model.{name}"))?;
                var.copy_(&src.to_device(device));
            }
            Ok(())
        })?;
        best = tensors.iter().filter_map(|(k, v)| k.strip_prefix("best.").map(|n| (n.to_owned(), v.shallow_clone()))).collect();
        opt.load_state(&tensors)?;
        opt.step = saved.step;
        progress = saved;
        if ctx.show_progress {
            eprintln!("resuming {} from epoch {} (checkpoint in {})", ctx.stage.name, progress.epochs_done + 1, ctx.scratch_dir.display());
        }
    }

    let name = ctx.stage.name;
    let started = Instant::now();
    let objective_of = |r: &EpochRow| -> Result<f64> { Ok(if p.str("prune_metric")? == "val_dice" { -r.val_dice } else { r.val_loss }) };
    // A resumed trial that had already been pruned stays pruned.
    let prune_epoch = p.i64("prune_epoch")?;
    let mut pruned = prune_epoch > 0
        && match progress.rows.get(prune_epoch as usize - 1) {
            Some(r) => objective_of(r)? > p.f64("prune_threshold")?,
            None => false,
        };
    let budget_s = p.f64("time_budget_min")? * 60.0;
    let spent = |prog: &Progress| prog.rows.iter().map(|r| r.seconds).sum::<f64>();
    while !pruned && progress.epochs_done < epochs && progress.bad_epochs < patience && (budget_s <= 0.0 || spent(&progress) < budget_s) {
        let epoch = progress.epochs_done + 1;
        let lr = match schedule.as_str() {
            "cosine" => base_lr * 0.5 * (1.0 + (std::f64::consts::PI * (epoch - 1) as f64 / epochs as f64).cos()),
            _ => progress.lr,
        };
        opt.lr = lr;
        // Per-epoch seeds make a resumed run identical to an uninterrupted one.
        tch::manual_seed(seed.wrapping_mul(1000).wrapping_add(epoch));
        let mut order: Vec<usize> = (0..train_set.len()).collect();
        Rng::derive(seed as u64, epoch as u64).shuffle(&mut order);
        let flip = p.bool("online_flip")?.then_some((seed as u64) << 20 | epoch as u64);
        let t0 = Instant::now();
        let nb = train_set.len().div_ceil(batch) as u64;
        let bar = liverseg::progress::bar(nb, &format!("{name} {epoch}/{epochs}"), ctx.show_progress);
        let (mut loss_sum, mut seen, mut conf) = (0.0, 0usize, Confusion::default());
        for b in batches(train_set.clone(), order, batch, true, flip) {
            let x = b.x.to_device(device);
            let y = b.y.to_device(device);
            let logits = tch::autocast(bf16, || model.forward(&x, true));
            let loss = loss_fn.compute(&logits.to_kind(Kind::Float), &y);
            opt.zero_grad();
            loss.backward();
            opt.step();
            let n = y.size()[0] as usize;
            loss_sum += loss.double_value(&[]) * n as f64;
            seen += n;
            conf.add(&confusion(&logits.detach().argmax(1, false), &y));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let train_secs = t0.elapsed().as_secs_f64();
        let (val_loss, vconf) = evaluate_set(&model, &val_set, batch, device, loss_fn, bf16);
        let train_loss = loss_sum / seen.max(1) as f64;
        let row = EpochRow {
            epoch,
            lr,
            train_loss,
            train_pa: conf.pixel_accuracy(),
            train_miou: conf.miou(),
            train_liver_iou: conf.liver_iou(),
            train_dice: conf.dice(),
            val_loss,
            val_pa: vconf.pixel_accuracy(),
            val_miou: vconf.miou(),
            val_liver_iou: vconf.liver_iou(),
            val_dice: vconf.dice(),
            seconds: t0.elapsed().as_secs_f64(),
            train_images_per_s: seen as f64 / train_secs,
        };
        if ctx.show_progress {
            eprintln!(
                "Epoch {epoch}/{epochs} [{name}] Train Loss: {:.4}, Train PA: {:.4}, Train IoU: {:.4} | Validation Loss: {:.4}, Validation PA: {:.4}, Validation IoU: {:.4} | Dice {:.4} | {:.1} s, {:.1} img/s",
                row.train_loss, row.train_pa, row.train_miou, row.val_loss, row.val_pa, row.val_miou, row.val_dice, row.seconds, row.train_images_per_s
            );
        }
        if val_loss < progress.best_loss {
            if ctx.show_progress {
                if progress.best_loss.is_finite() {
                    eprintln!("Loss decreased from {:.4} to {:.4}, saving the model", progress.best_loss, val_loss);
                } else {
                    eprintln!("Loss decreased from inf to {val_loss:.4}, saving the model");
                }
            }
            progress.best_loss = val_loss;
            progress.best_epoch = epoch;
            progress.bad_epochs = 0;
            best = snapshot(&vs);
        } else {
            progress.bad_epochs += 1;
            if ctx.show_progress {
                eprintln!("Loss not decreased for {} epoch(s) (best {:.4} at epoch {})", progress.bad_epochs, progress.best_loss, progress.best_epoch);
            }
        }
        if schedule == "plateau" {
            if progress.bad_epochs > 0 {
                progress.plateau_bad += 1;
                if progress.plateau_bad >= 2 {
                    progress.lr *= 0.5;
                    progress.plateau_bad = 0;
                }
            } else {
                progress.plateau_bad = 0;
            }
        }
        progress.epochs_done = epoch;
        progress.step = opt.step;
        let objective = objective_of(&row)?;
        progress.rows.push(row);
        write_checkpoint(&ctx.scratch_dir, &vs, &best, &opt, &progress)?;
        // Median pruning (tune): worse than the earlier trials' median at this epoch.
        if prune_epoch > 0 && epoch == prune_epoch && objective > p.f64("prune_threshold")? {
            pruned = true;
            if ctx.show_progress {
                eprintln!("pruned at epoch {epoch}: {} worse than the median of earlier trials", p.str("prune_metric")?);
            }
            break;
        }
    }
    if ctx.show_progress {
        if progress.bad_epochs >= patience {
            eprintln!("early stopping: no lower validation loss for {patience} epochs");
        } else if budget_s > 0.0 && spent(&progress) >= budget_s && progress.epochs_done < epochs {
            eprintln!("time budget of {:.0} min reached after {} epochs", budget_s / 60.0, progress.epochs_done);
        }
    }

    // The artifact holds the best epoch's weights.
    tch::no_grad(|| -> Result<()> {
        for (n, mut var) in vs.variables() {
            let src = best.get(&n).ok_or_else(|| anyhow!("best snapshot lacks {n}"))?;
            var.copy_(&src.to_device(device));
        }
        Ok(())
    })?;
    let steps = opt.step;
    if p.bool("save_model")? {
        model::io::save(&vs, &ctx.out("model.safetensors"), steps)?;
    }
    let rows = &progress.rows;
    let col_f = |f: fn(&EpochRow) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let mut df = DataFrame::new_infer_height(vec![
        Column::new("epoch".into(), rows.iter().map(|r| r.epoch).collect::<Vec<_>>()),
        Column::new("lr".into(), col_f(|r| r.lr)),
        Column::new("train_loss".into(), col_f(|r| r.train_loss)),
        Column::new("train_pa".into(), col_f(|r| r.train_pa)),
        Column::new("train_miou".into(), col_f(|r| r.train_miou)),
        Column::new("train_liver_iou".into(), col_f(|r| r.train_liver_iou)),
        Column::new("train_dice".into(), col_f(|r| r.train_dice)),
        Column::new("val_loss".into(), col_f(|r| r.val_loss)),
        Column::new("val_pa".into(), col_f(|r| r.val_pa)),
        Column::new("val_miou".into(), col_f(|r| r.val_miou)),
        Column::new("val_liver_iou".into(), col_f(|r| r.val_liver_iou)),
        Column::new("val_dice".into(), col_f(|r| r.val_dice)),
        Column::new("seconds".into(), col_f(|r| r.seconds)),
        Column::new("train_images_per_s".into(), col_f(|r| r.train_images_per_s)),
    ])?;
    write_parquet(&ctx.out("metrics.parquet"), &mut df, &ctx.provenance())?;
    let norm = ctx.upstream("normalise")?;
    let np = &norm.manifest.params;
    let window: Vec<f64> = np.get("window").and_then(|w| serde_json::from_value(w.clone()).ok()).unwrap_or_else(|| vec![-100.0, 400.0]);
    let parameters = model::trainable_parameters(&vs);
    let best_row = rows.iter().find(|r| r.epoch == progress.best_epoch).cloned();
    let card = ModelCard {
        spec: spec.clone(),
        size: size as i64,
        window,
        minmax_8bit: np.get("minmax_8bit").and_then(|v| v.as_bool()).unwrap_or(false),
        parameters,
        best_epoch: progress.best_epoch,
        best_val_loss: progress.best_loss,
        train_stage_key: ctx.key.to_owned(),
    };
    std::fs::write(ctx.out("model.json"), serde_json::to_vec_pretty(&card)?)?;
    let mut s = Summary::new();
    s.insert("parameters".into(), parameters.into());
    s.insert("epochs_run".into(), (rows.len() as i64).into());
    s.insert("best_epoch".into(), progress.best_epoch.into());
    s.insert("best_val_loss".into(), json_f(progress.best_loss));
    if let Some(r) = best_row {
        s.insert("val_dice".into(), json_f(r.val_dice));
        s.insert("val_miou".into(), json_f(r.val_miou));
        s.insert("val_pa".into(), json_f(r.val_pa));
        s.insert("val_liver_iou".into(), json_f(r.val_liver_iou));
    }
    s.insert("train_seconds".into(), json_f(rows.iter().map(|r| r.seconds).sum::<f64>()));
    s.insert("wall_seconds_this_run".into(), json_f(started.elapsed().as_secs_f64()));
    s.insert("device".into(), format!("{device:?}").into());
    s.insert("pruned".into(), pruned.into());
    for k in ["lr", "batch_size", "optimizer", "weight_decay", "loss"] {
        s.insert(format!("used.{k}"), p.get(k)?.clone());
    }
    Ok(s)
}

fn json_f(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
}

/// Mean loss and confusion of `model` over a set, in eval mode.
pub fn evaluate_set(model: &SegmentationModel, set: &Arc<SliceSet>, batch: usize, device: Device, loss_fn: Loss, bf16: bool) -> (f64, Confusion) {
    let (mut loss_sum, mut seen, mut conf) = (0.0, 0usize, Confusion::default());
    tch::no_grad(|| {
        for b in batches(set.clone(), (0..set.len()).collect(), batch, false, None) {
            let x = b.x.to_device(device);
            let y = b.y.to_device(device);
            let logits = tch::autocast(bf16, || model.forward(&x, false)).to_kind(Kind::Float);
            let n = y.size()[0] as usize;
            loss_sum += loss_fn.compute(&logits, &y).double_value(&[]) * n as f64;
            seen += n;
            conf.add(&confusion(&logits.argmax(1, false), &y));
        }
    });
    (loss_sum / seen.max(1) as f64, conf)
}

/// Images/s for training steps (forward, CE loss, backward, Adam) and for
/// inference of DeepLabV3+ResNet34 on random data; the first step is warm-up.
pub fn speed(size: i64, batch: i64, steps: usize) -> Result<(f64, f64)> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let spec = ModelSpec { arch: "deeplabv3plus".into(), encoder: "resnet34".into(), in_channels: 1, classes: 2 };
    let model = SegmentationModel::new(&vs.root(), &spec)?;
    let mut opt = Optimizer::new(OptKind::Adam, vs.trainable_variables(), 1e-3, 0.0);
    let x = Tensor::rand([batch, 1, size, size], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(2, [batch, size, size], (Kind::Int64, Device::Cpu));
    let mut t0 = Instant::now();
    for i in 0..=steps {
        if i == 1 {
            t0 = Instant::now();
        }
        opt.zero_grad();
        let loss = Loss::CrossEntropy.compute(&model.forward(&x, true), &y);
        loss.backward();
        opt.step();
    }
    let train = (batch as usize * steps) as f64 / t0.elapsed().as_secs_f64();
    let infer = tch::no_grad(|| {
        let _ = model.forward(&x, false);
        let t0 = Instant::now();
        for _ in 0..steps {
            let _ = model.forward(&x, false);
        }
        (batch as usize * steps) as f64 / t0.elapsed().as_secs_f64()
    });
    Ok((train, infer))
}
