//! train / baseline: train DeepLabV3+ (stage `train`) or the plain ResNet
//! segmenter (stage `baseline`) on the train split plus its augmented copies,
//! with early stopping on validation loss. With a tune stage upstream, its
//! best parameters replace the file's. Runs in the `liverseg-torch` worker.
//!
//! inputs: normalise (data.safetensors), split (assignment.parquet), augment;
//!         tune (optional)
//! outputs: model.safetensors (best epoch, smp state_dict names),
//!          metrics.parquet (per epoch), model.json ([`ModelCard`]: spec + preprocessing)

use anyhow::{bail, Context, Result};
use liverseg_engine::params::{ParamSpec, Params};
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_recipe::{Arch, Device, Encoder, Loss, Objective, Optimizer, Schedule};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::LazyLock;

pub const VERSION: u32 = 1;

liverseg_engine::params! {
    pub struct TrainParams {
        arch: Arch = choice "deeplabv3plus", "deeplabv3plus, or resnet (the plain baseline)";
        encoder: Encoder = choice "resnet34", "ResNet encoder";
        epochs: i64 = int "12", "maximum epochs";
        patience: i64 = int "5", "early stopping: epochs without a lower validation loss";
        time_budget_min: f64 = float "0", "stop starting new epochs after this many minutes of training (0 = no limit)";
        batch_size: usize = int "16", "batch size";
        lr: f64 = float "1e-3", "learning rate";
        weight_decay: f64 = float "0", "weight decay (L2 for adam/sgd/rmsprop, decoupled for adamw)";
        optimizer: Optimizer = choice "adam", "optimizer";
        momentum: f64 = float "0.9", "sgd/rmsprop momentum";
        nesterov: bool = bool "false", "sgd: Nesterov momentum";
        loss: Loss = choice "ce", "loss";
        schedule: Schedule = choice "constant", "learning-rate schedule";
        online_flip: bool = bool "false", "also mirror training batches at random (online augmentation)";
        use_augmented: bool = bool "true", "train on the augment stage's copies too";
        max_train_slices: usize = int "0", "use at most this many training slices (0 = all), for cheap trials";
        init_weights: String = str "''", "safetensors file (smp names) to start from, e.g. exported ImageNet encoder weights";
        seed: i64 = int "0", "seed for initialisation, order and dropout";
        save_model: bool = bool "true", "write model.safetensors (tune trials skip it)";
        prune_epoch: i64 = int "0", "median pruning: check at this epoch (0 = never); set by tune";
        prune_threshold: f64 = float "0", "median pruning: stop if the objective at prune_epoch is worse than this";
        prune_metric: Objective = choice "val_loss", "objective checked by pruning";
        threads: i64 = int "0", "CPU threads (0 = all cores)";
        device: Device = choice "auto", "auto = CUDA when available";
        bf16: bool = bool "false", "CUDA only: bf16 autocast";
    }
}

impl TrainParams {
    /// Ranges the kinds alone do not say (also checked after tune's params are merged in).
    pub fn validate(&self) -> Result<()> {
        if self.batch_size < 2 || self.epochs < 1 || self.patience < 1 {
            bail!("batch_size must be ≥ 2, epochs and patience ≥ 1");
        }
        Ok(())
    }
}

const OUTPUTS: &[&str] = &["model.safetensors?", "metrics.parquet", "model.json"];

pub static TRAIN: StageInfo = StageInfo {
    name: "train",
    version: VERSION,
    about: "train DeepLabV3+ with early stopping",
    inputs: &["normalise", "split", "augment"],
    optional_inputs: &["tune"],
    collects: &[],
    per_dataset: false,
    outputs: OUTPUTS,
    params: TrainParams::SPECS,
    placement: Placement::Worker,
};

/// The same stage with the plain ResNet as its default architecture.
pub static BASELINE: LazyLock<StageInfo> = LazyLock::new(|| {
    let specs: Vec<ParamSpec> = TrainParams::SPECS.iter().map(|s| if s.name == "arch" { s.with_default("resnet") } else { s.clone() }).collect();
    StageInfo {
        name: "baseline",
        about: "train the plain ResNet segmenter the study compares with",
        params: Vec::leak(specs),
        ..TRAIN
    }
});

pub struct Train(pub &'static StageInfo);

impl Stage for Train {
    fn info(&self) -> &'static StageInfo {
        self.0
    }

    fn check(&self, params: &Params) -> Result<()> {
        params.typed::<TrainParams>()?.validate()
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        #[cfg(feature = "torch")]
        return training::train(ctx);
        #[cfg(not(feature = "torch"))]
        bail!("stage `{}` runs in the liverseg-torch worker (this build has no libtorch)", ctx.stage.name)
    }
}

/// What a trained model needs beside its weights: its spec and the
/// preprocessing it was trained with, from its lineage. Evaluation and
/// prediction reuse it so inputs cannot be prepared differently by mistake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub spec: ModelSpecCard,
    pub size: i64,
    pub window: Vec<f64>,
    pub minmax_8bit: bool,
    pub parameters: i64,
    pub best_epoch: i64,
    pub best_val_loss: f64,
    pub train_stage_key: String,
}

/// The network a card describes (`liverseg_model::ModelSpec`'s fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpecCard {
    pub arch: Arch,
    pub encoder: Encoder,
    pub in_channels: i64,
    pub classes: i64,
}

impl ModelCard {
    /// model.json of a trained model folder.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model.json");
        let bytes = std::fs::read(&path).with_context(|| format!("{}: no model.json (not a trained model)", dir.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not a model card", path.display()))
    }
}

#[cfg(feature = "torch")]
mod training {
    //! The training loop: data, model, epochs with early stopping and
    //! checkpoints, and the artifact.

    use super::{ModelCard, ModelSpecCard, TrainParams};
    use crate::augment::AugmentedSet;
    use crate::normalise::NormalisedSet;
    use crate::split::{Part, SplitAssignment};
    use crate::tune::TuneBest;
    use anyhow::{anyhow, bail, Context, Result};
    use liverseg_engine::stage::{StageContext, Summary};
    use liverseg_engine::tables::write_parquet;
    use liverseg_model::confusion::Confusion;
    use liverseg_model::fit::{self, EpochStats};
    use liverseg_model::loader::SliceSet;
    use liverseg_model::optim::{OptKind, Optimizer};
    use liverseg_model::{device_for, trainable_parameters, weights, ModelSpec, SegmentationModel};
    use liverseg_recipe::{Objective, Schedule};
    use liverseg_rng::Rng;
    use polars::prelude::{Column, DataFrame};
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Instant;
    use tch::{nn, Device, Tensor};

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

    /// A run in progress: the model, its optimizer and where training stands.
    struct Run<'a> {
        ctx: &'a StageContext<'a>,
        p: TrainParams,
        device: Device,
        bf16: bool,
        vs: nn::VarStore,
        model: SegmentationModel,
        opt: Optimizer,
        best: BTreeMap<String, Tensor>,
        progress: Progress,
        pruned: bool,
    }

    pub fn train(ctx: &StageContext) -> Result<Summary> {
        let p = effective_params(ctx)?;
        p.validate()?;
        if p.threads > 0 {
            tch::set_num_threads(p.threads as i32);
        }
        let data = TrainingData::load(ctx, &p)?;
        let mut run = Run::new(ctx, p, data.size)?;
        run.resume()?;
        let started = Instant::now();
        let (train_set, val_set) = (Arc::new(data.train), Arc::new(data.val));
        while run.should_continue()? {
            run.epoch(&train_set, &val_set)?;
        }
        run.say_why_it_stopped();
        run.finish(&data.norm, started)
    }

    /// The stage's params, with an upstream tune stage's best ones in place.
    fn effective_params(ctx: &StageContext) -> Result<TrainParams> {
        let Some(t) = ctx.upstream.get("tune") else { return ctx.params.typed() };
        let mut merged = ctx.params.clone();
        merged.0.extend(TuneBest::read(t)?.params);
        if ctx.show_progress {
            eprintln!("{}: using tuned parameters from tune@{}", ctx.stage.name, t.key);
        }
        merged.typed()
    }

    /// The slices training reads: the train split (at most max_train_slices)
    /// and its augmented copies, and the validation split. Test slices are
    /// never read.
    struct TrainingData {
        train: SliceSet,
        val: SliceSet,
        size: usize,
        norm: NormalisedSet,
    }

    impl TrainingData {
        fn load(ctx: &StageContext, p: &TrainParams) -> Result<Self> {
            let norm = NormalisedSet::open(ctx.upstream("normalise")?)?;
            let assignment = SplitAssignment::read(ctx.upstream("split")?)?;
            assignment.check_covers(&norm)?;
            let mut train_rows = assignment.rows(Part::Train);
            if p.max_train_slices > 0 {
                train_rows.truncate(p.max_train_slices);
            }
            let (mut ti, mut tm) = norm.select(&train_rows);
            let (vi, vm) = norm.select(&assignment.rows(Part::Val));
            let size = norm.size;
            if p.use_augmented {
                let aug = AugmentedSet::open(ctx.upstream("augment")?)?;
                let keep = if p.max_train_slices == 0 { aug.n } else { aug.n.min(p.max_train_slices * 2) };
                let px = size * size;
                ti.extend_from_slice(&aug.images()[..keep * px]);
                tm.extend_from_slice(&aug.masks()[..keep * px]);
            }
            let (train, val) = (SliceSet { images: ti, masks: tm, size }, SliceSet { images: vi, masks: vm, size });
            if train.len() < 2 || val.is_empty() {
                bail!("training needs at least 2 training and 1 validation slice (got {} and {})", train.len(), val.len());
            }
            Ok(TrainingData { train, val, size, norm })
        }
    }

    impl<'a> Run<'a> {
        fn new(ctx: &'a StageContext<'a>, p: TrainParams, size: usize) -> Result<Self> {
            let spec = ModelSpec { arch: p.arch, encoder: p.encoder, in_channels: 1, classes: 2 };
            let device = device_for(p.device)?;
            let bf16 = p.bf16 && device.is_cuda();
            tch::manual_seed(p.seed);
            let mut vs = nn::VarStore::new(device);
            let model = SegmentationModel::new(&vs.root(), &spec)?;
            model.check_input(size as i64, size as i64)?;
            if !p.init_weights.is_empty() {
                let n = weights::load(&mut vs, &ctx.project_root.join(&p.init_weights), false)?;
                if ctx.show_progress {
                    eprintln!("initialised {n} tensors from {}", p.init_weights);
                }
            }
            let opt = Optimizer::new(OptKind::new(p.optimizer, p.momentum, p.nesterov), vs.trainable_variables(), p.lr, p.weight_decay);
            let best = fit::snapshot(&vs);
            let progress = Progress { epochs_done: 0, best_loss: f64::INFINITY, best_epoch: 0, bad_epochs: 0, lr: p.lr, plateau_bad: 0, step: 0, rows: Vec::new() };
            Ok(Run { ctx, p, device, bf16, vs, model, opt, best, progress, pruned: false })
        }

        /// Resume an interrupted run of this very key from its checkpoint.
        fn resume(&mut self) -> Result<()> {
            let scratch = &self.ctx.scratch_dir;
            let (ckpt, prog) = (scratch.join("checkpoint.safetensors"), scratch.join("progress.json"));
            if ckpt.is_file() && prog.is_file() {
                let saved: Progress = serde_json::from_slice(&std::fs::read(&prog)?).context("corrupt progress.json in scratch")?;
                let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&ckpt).map_err(|e| anyhow!("{}: {e}", ckpt.display()))?.into_iter().collect();
                fit::restore(&self.vs, &tensors, "model.")?;
                self.best = tensors.iter().filter_map(|(k, v)| k.strip_prefix("best.").map(|n| (n.to_owned(), v.shallow_clone()))).collect();
                self.opt.load_state(&tensors)?;
                self.opt.step = saved.step;
                self.progress = saved;
                if self.ctx.show_progress {
                    eprintln!("resuming {} from epoch {} (checkpoint in {})", self.ctx.stage.name, self.progress.epochs_done + 1, scratch.display());
                }
            }
            // A resumed trial that had already been pruned stays pruned.
            let pe = self.p.prune_epoch;
            if pe > 0 {
                if let Some(r) = self.progress.rows.get(pe as usize - 1) {
                    self.pruned = self.objective(r) > self.p.prune_threshold;
                }
            }
            Ok(())
        }

        fn objective(&self, r: &EpochRow) -> f64 {
            match self.p.prune_metric {
                Objective::ValDice => -r.val_dice,
                Objective::ValLoss => r.val_loss,
            }
        }

        fn spent(&self) -> f64 {
            self.progress.rows.iter().map(|r| r.seconds).sum()
        }

        fn should_continue(&self) -> Result<bool> {
            let (p, prog) = (&self.p, &self.progress);
            let budget_s = p.time_budget_min * 60.0;
            Ok(!self.pruned && prog.epochs_done < p.epochs && prog.bad_epochs < p.patience && (budget_s <= 0.0 || self.spent() < budget_s))
        }

        /// One epoch: train, validate, keep the best weights, schedule the
        /// learning rate, checkpoint, and prune.
        fn epoch(&mut self, train_set: &Arc<SliceSet>, val_set: &Arc<SliceSet>) -> Result<()> {
            let (p, name) = (&self.p, self.ctx.stage.name);
            let epoch = self.progress.epochs_done + 1;
            let lr = match p.schedule {
                Schedule::Cosine => p.lr * 0.5 * (1.0 + (std::f64::consts::PI * (epoch - 1) as f64 / p.epochs as f64).cos()),
                _ => self.progress.lr,
            };
            self.opt.lr = lr;
            // Per-epoch seeds make a resumed run identical to an uninterrupted one.
            tch::manual_seed(p.seed.wrapping_mul(1000).wrapping_add(epoch));
            let mut order: Vec<usize> = (0..train_set.len()).collect();
            Rng::derive(p.seed as u64, epoch as u64).shuffle(&mut order);
            let flip = p.online_flip.then_some((p.seed as u64) << 20 | epoch as u64);
            let t0 = Instant::now();
            let bar = liverseg_engine::progress::bar(train_set.len().div_ceil(p.batch_size) as u64, &format!("{name} {epoch}/{}", p.epochs), self.ctx.show_progress);
            let stats = fit::train_epoch(&self.model, &mut self.opt, train_set.clone(), order, p.batch_size, self.device, p.loss, self.bf16, flip, &mut || bar.inc(1));
            bar.finish_and_clear();
            let train_secs = t0.elapsed().as_secs_f64();
            let (val_loss, vconf) = fit::evaluate(&self.model, val_set, p.batch_size, self.device, p.loss, self.bf16);
            let row = epoch_row(epoch, lr, &stats, val_loss, &vconf, t0.elapsed().as_secs_f64(), train_secs);
            self.report(&row);
            self.keep_if_best(epoch, val_loss);
            self.plateau();
            self.progress.epochs_done = epoch;
            self.progress.step = self.opt.step;
            let objective = self.objective(&row);
            self.progress.rows.push(row);
            write_checkpoint(&self.ctx.scratch_dir, &self.vs, &self.best, &self.opt, &self.progress)?;
            // Median pruning (tune): worse than the earlier trials' median at this epoch.
            if self.p.prune_epoch > 0 && epoch == self.p.prune_epoch && objective > self.p.prune_threshold {
                self.pruned = true;
                if self.ctx.show_progress {
                    eprintln!("pruned at epoch {epoch}: {} worse than the median of earlier trials", self.p.prune_metric);
                }
            }
            Ok(())
        }

        fn report(&self, row: &EpochRow) {
            if self.ctx.show_progress {
                eprintln!(
                    "Epoch {}/{} [{}] Train Loss: {:.4}, Train PA: {:.4}, Train IoU: {:.4} | Validation Loss: {:.4}, Validation PA: {:.4}, Validation IoU: {:.4} | Dice {:.4} | {:.1} s, {:.1} img/s",
                    row.epoch, self.p.epochs, self.ctx.stage.name, row.train_loss, row.train_pa, row.train_miou, row.val_loss, row.val_pa, row.val_miou, row.val_dice, row.seconds, row.train_images_per_s
                );
            }
        }

        /// Early stopping's bookkeeping: a lower validation loss keeps these weights.
        fn keep_if_best(&mut self, epoch: i64, val_loss: f64) {
            let (prog, show) = (&mut self.progress, self.ctx.show_progress);
            if val_loss < prog.best_loss {
                if show {
                    if prog.best_loss.is_finite() {
                        eprintln!("Loss decreased from {:.4} to {:.4}, saving the model", prog.best_loss, val_loss);
                    } else {
                        eprintln!("Loss decreased from inf to {val_loss:.4}, saving the model");
                    }
                }
                prog.best_loss = val_loss;
                prog.best_epoch = epoch;
                prog.bad_epochs = 0;
                self.best = fit::snapshot(&self.vs);
            } else {
                prog.bad_epochs += 1;
                if show {
                    eprintln!("Loss not decreased for {} epoch(s) (best {:.4} at epoch {})", prog.bad_epochs, prog.best_loss, prog.best_epoch);
                }
            }
        }

        /// Reduce-on-plateau: halve the rate after two epochs without improvement.
        fn plateau(&mut self) {
            if self.p.schedule != Schedule::Plateau {
                return;
            }
            let prog = &mut self.progress;
            if prog.bad_epochs > 0 {
                prog.plateau_bad += 1;
                if prog.plateau_bad >= 2 {
                    prog.lr *= 0.5;
                    prog.plateau_bad = 0;
                }
            } else {
                prog.plateau_bad = 0;
            }
        }

        fn say_why_it_stopped(&self) {
            let (p, prog) = (&self.p, &self.progress);
            if !self.ctx.show_progress {
                return;
            }
            let budget_s = p.time_budget_min * 60.0;
            if prog.bad_epochs >= p.patience {
                eprintln!("early stopping: no lower validation loss for {} epochs", p.patience);
            } else if budget_s > 0.0 && self.spent() >= budget_s && prog.epochs_done < p.epochs {
                eprintln!("time budget of {:.0} min reached after {} epochs", budget_s / 60.0, prog.epochs_done);
            }
        }

        /// The artifact: the best epoch's weights, the per-epoch table, the
        /// model card and the summary.
        fn finish(self, norm: &NormalisedSet, started: Instant) -> Result<Summary> {
            let ctx = self.ctx;
            fit::restore(&self.vs, &self.best, "")?;
            if self.p.save_model {
                weights::save(&self.vs, &ctx.out("model.safetensors"), self.opt.step)?;
            }
            let rows = &self.progress.rows;
            write_metrics(ctx, rows)?;
            let parameters = trainable_parameters(&self.vs);
            let card = ModelCard {
                spec: ModelSpecCard { arch: self.p.arch, encoder: self.p.encoder, in_channels: 1, classes: 2 },
                size: norm.size as i64,
                window: norm.params.window.clone(),
                minmax_8bit: norm.params.minmax_8bit,
                parameters,
                best_epoch: self.progress.best_epoch,
                best_val_loss: self.progress.best_loss,
                train_stage_key: ctx.key.to_owned(),
            };
            std::fs::write(ctx.out("model.json"), serde_json::to_vec_pretty(&card)?)?;
            let mut s = Summary::new();
            s.insert("parameters".into(), parameters.into());
            s.insert("epochs_run".into(), (rows.len() as i64).into());
            s.insert("best_epoch".into(), self.progress.best_epoch.into());
            s.insert("best_val_loss".into(), json_f(self.progress.best_loss));
            if let Some(r) = rows.iter().find(|r| r.epoch == self.progress.best_epoch) {
                s.insert("val_dice".into(), json_f(r.val_dice));
                s.insert("val_miou".into(), json_f(r.val_miou));
                s.insert("val_pa".into(), json_f(r.val_pa));
                s.insert("val_liver_iou".into(), json_f(r.val_liver_iou));
            }
            s.insert("train_seconds".into(), json_f(rows.iter().map(|r| r.seconds).sum::<f64>()));
            s.insert("wall_seconds_this_run".into(), json_f(started.elapsed().as_secs_f64()));
            s.insert("device".into(), format!("{:?}", self.device).into());
            s.insert("pruned".into(), self.pruned.into());
            let used = serde_json::to_value(&self.p)?;
            for k in ["lr", "batch_size", "optimizer", "weight_decay", "loss"] {
                s.insert(format!("used.{k}"), used[k].clone());
            }
            Ok(s)
        }
    }

    fn epoch_row(epoch: i64, lr: f64, stats: &EpochStats, val_loss: f64, vconf: &Confusion, seconds: f64, train_secs: f64) -> EpochRow {
        let conf = &stats.confusion;
        EpochRow {
            epoch,
            lr,
            train_loss: stats.loss,
            train_pa: conf.pixel_accuracy(),
            train_miou: conf.miou(),
            train_liver_iou: conf.liver_iou(),
            train_dice: conf.dice(),
            val_loss,
            val_pa: vconf.pixel_accuracy(),
            val_miou: vconf.miou(),
            val_liver_iou: vconf.liver_iou(),
            val_dice: vconf.dice(),
            seconds,
            train_images_per_s: stats.seen as f64 / train_secs,
        }
    }

    fn write_metrics(ctx: &StageContext, rows: &[EpochRow]) -> Result<()> {
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
        write_parquet(&ctx.out("metrics.parquet"), &mut df, &ctx.provenance())
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

    fn json_f(v: f64) -> serde_json::Value {
        serde_json::Number::from_f64(v).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
    }

    impl From<&ModelSpecCard> for ModelSpec {
        fn from(c: &ModelSpecCard) -> Self {
            ModelSpec { arch: c.arch, encoder: c.encoder, in_channels: c.in_channels, classes: c.classes }
        }
    }
}
