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
use liverseg_metrics::IntensityHistogram;
use liverseg_recipe::scaling::InputScaling;
use liverseg_recipe::{Arch, Device, Encoder, InputScheme, Loss, Objective, Optimizer, Schedule};
use polars::prelude::{Column, DataFrame, DataType};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::LazyLock;

/// 2: no wall-clock budget; trial subsets spread over patients; pruning by
/// per-epoch medians of completed trials; weights carry their metadata.
/// 3: the model card records the training inputs' intensity percentiles.
/// 4: the weights' `scaling` metadata describes the aspect-keeping fit.
/// 5: the model starts from smp's initialisation (BatchNorm weight 1, not
/// uniform in [0, 1]; torchvision's encoder convs; PyTorch's decoder and head).
/// 6: the model card names its training data (source, root hash, cases).
/// 7: the model card holds the training inputs' intensity histogram.
pub const VERSION: u32 = 7;

liverseg_engine::params! {
    pub struct TrainParams {
        arch: Arch = choice "deeplabv3plus", "deeplabv3plus, or resnet (the plain baseline)";
        encoder: Encoder = choice "resnet34", "ResNet encoder";
        epochs: i64 = int "12", "maximum epochs";
        patience: i64 = int "5", "early stopping: epochs without a better stop_metric";
        stop_metric: Objective = choice "val_loss", "early stopping and the kept epoch: val_loss (lowest) or val_dice (highest Dice over the validation slices; for recipes whose loss and Dice disagree, as under strong augmentation)";
        batch_size: usize = int "16", "batch size";
        lr: f64 = float "1e-3", "learning rate";
        weight_decay: f64 = float "0", "weight decay (L2 for adam/sgd/rmsprop, decoupled for adamw)";
        optimizer: Optimizer = choice "adam", "optimizer";
        momentum: f64 = float "0.9", "sgd/rmsprop momentum";
        nesterov: bool = bool "false", "sgd: Nesterov momentum";
        loss: Loss = choice "ce", "loss";
        schedule: Schedule = choice "constant", "learning-rate schedule (poly: lr·(1 − epoch/epochs)^0.9, nnU-Net's)";
        online_flip: bool = bool "false", "also mirror training batches at random (online augmentation; online_augment {mirror: 0.5})";
        online_augment: serde_json::Value = any "null", "online augmentation of training batches, a fresh draw per slice and epoch on the loader thread: null, nnunet (nnU-Net's 2D set), domain (nnunet plus re-export under other CT windows), or {rotation: [p, lo, hi], scale: [p, lo, hi], mirror: p, gamma: ..., rewindow: {p, width, level}} (see docs/guide.md)";
        input_scaling: InputScheme = choice "fixed", "how stored slices become model input: fixed (/255 of the window or 8-bit export), percentile (each image clipped to its 0.5–99.5 percentiles and z-scored; for exports of unknown window), ct (clipped to the training liver's 0.5–99.5 percentiles, z-scored with their mean and std; HU data), nyul (each image's body percentiles 1, 10, ..., 90, 99 mapped piecewise linearly onto the training slices' mean: Nyúl–Udupa histogram standardisation)";
        steps_per_epoch: usize = int "0", "optimizer steps per epoch (nnU-Net: 250); 0 = one pass over the training slices";
        folds: usize = int "0", "cross-validation: K models on K patient-level folds of train+validation (each fold's validation for its early stopping; the test split untouched), used as their ensemble (mean softmax); 0 = one model on the split's train/validation";
        use_augmented: bool = bool "true", "train on the augment stage's copies too";
        max_train_slices: usize = int "0", "use at most this many training slices (0 = all), spread evenly over the training patients, with their augmented copies; for cheap trials";
        init_weights: String = str "''", "safetensors file (smp names) to start from, e.g. exported ImageNet encoder weights";
        seed: i64 = int "0", "seed for initialisation, order and dropout";
        save_model: bool = bool "true", "write model.safetensors (tune trials skip it)";
        prune_medians: Vec<f64> = floats "[]", "median pruning (set by tune): the median objective of completed trials after each epoch; worse than it, a trial stops";
        prune_warmup: i64 = int "0", "median pruning: epochs a trial runs before it can be pruned (Optuna's n_warmup_steps)";
        prune_metric: Objective = choice "val_loss", "objective checked by pruning (val_dice is maximised)";
        threads: i64 = int "0", "CPU threads (0 = the Slurm job's allocation, else all cores; the count used is then not in the key)";
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
        if !(self.lr.is_finite() && self.lr > 0.0) || !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("lr must be a positive number and weight_decay ≥ 0, got lr {} and weight_decay {}", self.lr, self.weight_decay);
        }
        if self.threads < 0 {
            bail!("threads must be 0 (the allocation) or a positive count, got {}", self.threads);
        }
        if self.folds == 1 {
            bail!("folds must be 0 (no cross-validation) or at least 2");
        }
        if self.online_flip && !self.online_augment.is_null() {
            bail!("online_flip and online_augment both set: online_flip is online_augment {{mirror: 0.5}}; set one");
        }
        self.online_transforms()?;
        Ok(())
    }

    /// What the loader draws from each epoch, if anything.
    pub fn online_transforms(&self) -> Result<Option<liverseg_imaging::augment::Transforms>> {
        if self.online_flip {
            return Ok(Some(liverseg_imaging::augment::Transforms { mirror: 0.5, ..Default::default() }));
        }
        liverseg_imaging::augment::Transforms::from_param(&self.online_augment).context("online_augment")
    }
}

/// A cross-validated model has `folds/fold<k>/` (each a model.safetensors,
/// metrics.parquet and model.json) instead of a top-level model.safetensors.
const OUTPUTS: &[&str] = &["model.safetensors?", "metrics.parquet", "model.json", "folds/?"];

pub static TRAIN: StageInfo = StageInfo {
    name: "train",
    version: VERSION,
    about: "train DeepLabV3+ with early stopping",
    inputs: &["normalise", "split", "augment"],
    optional_inputs: &["tune"],
    collects: &[],
    per_dataset: false,
    dataset_requires: &[],
    outputs: OUTPUTS,
    params: TrainParams::SPECS,
    placement: Placement::Worker,
};

/// The same stage with the plain ResNet as its default architecture.
pub static BASELINE: LazyLock<StageInfo> = LazyLock::new(|| {
    let specs: Vec<ParamSpec> = TrainParams::SPECS.iter().map(|s| if s.name == "arch" { s.with_default("resnet") } else { s.clone() }).collect();
    StageInfo { name: "baseline", about: "train the plain ResNet segmenter the study compares with", params: Vec::leak(specs), ..TRAIN }
});

pub struct Train(pub &'static StageInfo);

impl Stage for Train {
    fn info(&self) -> &'static StageInfo {
        self.0
    }

    fn check(&self, params: &Params) -> Result<()> {
        params.typed::<TrainParams>()?.validate()
    }

    fn threads(&self, params: &Params) -> usize {
        params.typed::<TrainParams>().map_or(0, |p| p.threads.max(0) as usize)
    }

    /// Cross-validation folds train independently, each into its folder.
    fn parts(&self, params: &Params) -> Vec<String> {
        let folds = params.typed::<TrainParams>().map_or(0, |p| p.folds);
        if folds < 2 {
            return Vec::new();
        }
        (0..folds).map(fold_folder).collect()
    }

    fn assemble(&self, ctx: &StageContext, parts: Vec<Summary>) -> Result<Summary> {
        assemble_folds(ctx, parts)
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        #[cfg(feature = "torch")]
        return training::train(ctx);
        #[cfg(not(feature = "torch"))]
        bail!("stage `{}` runs in the liverseg-torch worker (this build has no libtorch)", ctx.stage.name)
    }
}

/// Where fold `k` of a cross-validated model lies in its artifact.
fn fold_folder(k: usize) -> String {
    format!("folds/fold{k}")
}

/// The top-level files of a cross-validated model, from its folds' folders
/// and summaries: a card naming the folds, every fold's epochs (with a
/// `fold` column), and a summary with each fold's figures (`fold<k>.…`)
/// beside their mean. The same whether the folds ran one after another in
/// one worker or side by side.
fn assemble_folds(ctx: &StageContext, folds: Vec<Summary>) -> Result<Summary> {
    let k = folds.len();
    let mut cards = Vec::with_capacity(k);
    let mut epochs: Option<DataFrame> = None;
    for i in 0..k {
        let dir = ctx.out(&fold_folder(i));
        let card_path = dir.join("model.json");
        let bytes = std::fs::read(&card_path).with_context(|| format!("fold {i} of {k}: cannot read {}", card_path.display()))?;
        cards.push(serde_json::from_slice::<ModelCard>(&bytes).with_context(|| format!("{}: not a model card", card_path.display()))?);
        let mut df = liverseg_engine::tables::read_parquet(&dir.join("metrics.parquet"))?;
        let rows = df.height();
        // Why each fold stopped stays in its own table.
        df.with_column(Column::full_null("stop_reason".into(), rows, &DataType::String))?;
        df.with_column(Column::new("fold".into(), vec![i as i64; rows]))?;
        epochs = Some(match epochs {
            None => df,
            Some(all) => all.vstack(&df)?,
        });
    }
    let Some(mut epochs) = epochs else { bail!("stage `{}`: no folds to assemble", ctx.instance) };
    let mut card = cards[0].clone();
    card.folds = k;
    card.best_epoch = 0;
    card.best_val_loss = cards.iter().map(|c| c.best_val_loss).sum::<f64>() / k as f64;
    // Every fold's training slices: the pool of train and validation patients.
    card.input_histogram = cards.iter().map(|c| c.input_histogram.clone()).collect::<Option<Vec<_>>>().map(|all| {
        let mut pooled = IntensityHistogram::default();
        all.iter().for_each(|h| pooled.add(h));
        pooled
    });
    let card_path = ctx.out("model.json");
    std::fs::write(&card_path, serde_json::to_vec_pretty(&card)?).with_context(|| format!("cannot write {}", card_path.display()))?;
    liverseg_engine::tables::write_parquet(&ctx.out("metrics.parquet"), &mut epochs, &ctx.provenance())?;
    Ok(ensemble_summary(&folds))
}

/// A cross-validated model's summary: the folds' means and totals, and each fold's own figures.
fn ensemble_summary(folds: &[Summary]) -> Summary {
    let k = folds.len();
    let finite = |v: f64| serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number);
    let sum = |key: &str| folds.iter().filter_map(|f| f.get(key).and_then(|v| v.as_f64())).sum::<f64>();
    let mut s = Summary::new();
    for key in ["train_loss", "val_dice", "val_miou", "val_pa", "val_liver_iou", "best_val_loss"] {
        s.insert(key.into(), finite(sum(key) / k as f64));
    }
    s.insert("epochs_run".into(), finite(sum("epochs_run")));
    s.insert("train_seconds".into(), finite(sum("train_seconds")));
    s.insert("stop_reason".into(), format!("{k} folds").into());
    s.insert("folds".into(), k.into());
    for (i, fs) in folds.iter().enumerate() {
        for (key, v) in fs {
            if !key.starts_with("used.") {
                s.insert(format!("fold{i}.{key}"), v.clone());
            }
        }
    }
    for (key, v) in &folds[0] {
        if key.starts_with("used.") || matches!(key.as_str(), "parameters" | "device" | "cpu_threads") {
            s.insert(key.clone(), v.clone());
        }
    }
    s
}

/// An epoch's training order: a shuffle of every slice, or, for `samples`
/// > 0 (a fixed number of steps), as many shuffles as fill it, cut there.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, samples: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    liverseg_rng::Rng::derive(seed, epoch).shuffle(&mut order);
    let mut pass = 1u64;
    while samples > order.len() {
        let mut more: Vec<usize> = (0..n).collect();
        liverseg_rng::Rng::derive(seed, epoch | pass << 40).shuffle(&mut more);
        order.extend(more);
        pass += 1;
    }
    if samples > 0 {
        order.truncate(samples);
    }
    order
}

#[cfg(test)]
mod tests {
    /// A pass is a shuffle of every slice; a fixed step count cycles through
    /// fresh shuffles, so no slice is seen twice before all are seen once.
    #[test]
    fn epoch_orders_cover_every_slice_and_fill_fixed_steps() {
        let one = super::epoch_order(10, 3, 1, 0);
        assert_eq!(
            {
                let mut o = one.clone();
                o.sort();
                o
            },
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(one, super::epoch_order(10, 3, 1, 0));
        assert_ne!(one, super::epoch_order(10, 3, 2, 0));
        let long = super::epoch_order(10, 3, 1, 25);
        assert_eq!(long.len(), 25);
        assert_eq!(long[..10], one[..]);
        assert_eq!(
            {
                let mut o = long[10..20].to_vec();
                o.sort();
                o
            },
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(super::epoch_order(10, 3, 1, 4), one[..4]);
    }
}

/// What a trained model needs beside its weights: its spec and the
/// preprocessing it was trained with, from its lineage. Evaluation and
/// prediction reuse it so inputs cannot be prepared differently by mistake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub spec: ModelSpecCard,
    pub size: i64,
    /// The intensity unit of the training data: `HU` (CT windowed with
    /// `window`) or `8bit` (exported 0..255 images, scaled by /255 or min-max).
    pub unit: String,
    pub window: Vec<f64>,
    pub minmax_8bit: bool,
    pub parameters: i64,
    pub best_epoch: i64,
    pub best_val_loss: f64,
    pub train_stage_key: String,
    /// Where the training inputs' body intensities lie, to warn when a new
    /// 8-bit export was scaled differently (absent in older cards).
    #[serde(default)]
    pub input_stats: Option<InputStats>,
    /// Grey levels of the training inputs (before augmentation), to measure
    /// how far new inputs lie from them (absent in older cards).
    #[serde(default)]
    pub input_histogram: Option<IntensityHistogram>,
    /// How the stored slices become model input (absent in older cards: fixed).
    #[serde(default)]
    pub scaling: InputScaling,
    /// Cross-validation folds whose ensemble this is (0: a single model).
    #[serde(default)]
    pub folds: usize,
    /// The data it learnt from (absent in older cards).
    #[serde(default)]
    pub training_data: Option<TrainingData>,
}

/// Where a model's training data came from, from its lineage: enough to
/// tell phantoms from CT, and to check a data folder is the one it saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingData {
    /// `data.source` of ingest: synthetic, nifti, dicom or slices2d.
    pub source: String,
    /// `data.root`, relative to the pipeline file (empty for phantoms).
    pub root: String,
    /// blake3 over the raw files' paths and hashes, as `lineage` prints it
    /// (absent for phantoms, which have no raw files).
    pub root_blake3: Option<String>,
    pub raw_files: usize,
    pub cases: u64,
    pub ingest_key: String,
}

impl TrainingData {
    /// From the ingest artifact behind a stage.
    pub fn from_lineage(ctx: &liverseg_engine::stage::StageContext) -> Result<Option<Self>> {
        let Some(ingest) = ctx.lineage()?.into_iter().find(|a| a.stage == "ingest") else {
            return Ok(None);
        };
        let m = &ingest.manifest;
        let text = |k: &str| m.params.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let raw = ingest.raw_inputs()?;
        let root_blake3 = (!raw.is_empty()).then(|| {
            let mut h = blake3::Hasher::new();
            raw.iter().for_each(|r| {
                h.update(r.path.as_bytes());
                h.update(r.blake3.as_bytes());
            });
            h.finalize().to_hex().to_string()
        });
        let source = text("data.source");
        let root = if source == "synthetic" { String::new() } else { text("data.root") };
        let cases = m.metrics.get("cases").and_then(|v| v.as_u64()).unwrap_or(0);
        Ok(Some(TrainingData { source, root, root_blake3, raw_files: raw.len(), cases, ingest_key: m.key.clone() }))
    }

    pub fn phantoms(&self) -> bool {
        self.source == "synthetic"
    }
}

impl ModelCard {
    /// A warning for anyone about to use the model on real scans: it learnt
    /// from synthetic phantoms, or its card does not say what it learnt from.
    pub fn data_warning(&self) -> Option<String> {
        match &self.training_data {
            Some(d) if d.phantoms() => Some(format!(
                "this model was trained on synthetic phantoms ({} generated cases, ingest {}), not on CT; its masks of real scans are not to be trusted. Train on your data first (README, \"Your own data\")",
                d.cases,
                &d.ingest_key[..d.ingest_key.len().min(12)]
            )),
            Some(_) => None,
            None => Some("this model's card does not name its training data (it predates liverseg recording it); check its lineage before trusting its masks".to_owned()),
        }
    }
}

/// Percentiles of the nonzero (body) pixels of model inputs, 0..255.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InputStats {
    pub p50: f64,
    pub p95: f64,
}

impl InputStats {
    /// Of u8 model inputs; both 0 when no pixel is above 0.
    pub fn of(pixels: &[u8]) -> Self {
        let mut counts = [0u64; 256];
        pixels.iter().for_each(|&v| counts[v as usize] += 1);
        let body: u64 = counts[1..].iter().sum();
        let quantile = |q: f64| {
            let target = (q * body as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            (1..256).find(|&v| {
                seen += counts[v];
                seen >= target
            })
        };
        match body {
            0 => InputStats { p50: 0.0, p95: 0.0 },
            _ => InputStats { p50: quantile(0.5).unwrap_or(0) as f64, p95: quantile(0.95).unwrap_or(0) as f64 },
        }
    }
}

/// The network a card describes (`liverseg_model::ModelSpec`'s fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpecCard {
    pub arch: Arch,
    pub encoder: Encoder,
    pub in_channels: i64,
    pub classes: i64,
}

/// The metadata key of model.safetensors that holds the model card.
pub const CARD_METADATA: &str = "liverseg.model_card";

impl ModelCard {
    /// model.json of a trained model folder, or else the card in the
    /// metadata of its model.safetensors (the weights file alone).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model.json");
        if !path.is_file() {
            return Self::from_weights(&dir.join("model.safetensors"));
        }
        let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not a model card", path.display()))
    }

    /// The card stored in a weights file's metadata.
    pub fn from_weights(weights: &Path) -> Result<Self> {
        if !weights.is_file() {
            bail!("no model at {}", weights.parent().unwrap_or(weights).display());
        }
        let meta = liverseg_engine::tensors::metadata(weights)?;
        let card = meta.get(CARD_METADATA).with_context(|| format!("{}: no model card in its metadata (not a liverseg model)", weights.display()))?;
        serde_json::from_str(card).with_context(|| format!("{}: bad model card in its metadata", weights.display()))
    }
}

/// Why training stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// No lower validation loss for `patience` epochs.
    EarlyStop,
    /// `epochs` were run.
    MaxEpochs,
    /// Worse than the median of completed trials (tune).
    Pruned,
}

impl StopReason {
    pub fn name(self) -> &'static str {
        match self {
            StopReason::EarlyStop => "early_stop",
            StopReason::MaxEpochs => "max_epochs",
            StopReason::Pruned => "pruned",
        }
    }
}

#[cfg(feature = "torch")]
mod training {
    //! The training loop: data, model, epochs with early stopping and
    //! checkpoints, and the artifact.

    use super::{InputScaling, InputScheme, InputStats, IntensityHistogram, ModelCard, ModelSpecCard, StopReason, TrainParams, CARD_METADATA};
    use crate::augment::AugmentedSet;
    use crate::normalise::NormalisedSet;
    use crate::split::{Part, SplitAssignment};
    use crate::tune::TuneBest;
    use anyhow::{anyhow, bail, Context, Result};
    use liverseg_engine::stage::{StageContext, Summary};
    use liverseg_engine::tables::write_parquet;
    use liverseg_engine::tensors::{write_with_metadata, NamedTensor};
    use liverseg_imaging::augment::Transforms;
    use liverseg_model::confusion::Confusion;
    use liverseg_model::fit::{self, EpochStats};
    use liverseg_model::loader::{Online, SliceSet};
    use liverseg_model::optim::{OptKind, Optimizer};
    use liverseg_model::{device_for, trainable_parameters, weights, ModelSpec, SegmentationModel};
    use liverseg_recipe::{Objective, Schedule};
    use liverseg_rng::Rng;
    use polars::prelude::{Column, DataFrame};
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::path::PathBuf;
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
        /// Validation loss of the kept epoch.
        best_loss: f64,
        /// stop_metric of the kept epoch, as minimised.
        best_score: f64,
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
        online: Option<Arc<Transforms>>,
        /// Where this model's files go, its checkpoint, and its name in progress output.
        out: PathBuf,
        scratch: PathBuf,
        label: String,
    }

    pub fn train(ctx: &StageContext) -> Result<Summary> {
        let p = effective_params(ctx)?;
        p.validate()?;
        let norm = NormalisedSet::open(ctx.upstream("normalise")?)?;
        let assignment = SplitAssignment::read(ctx.upstream("split")?)?;
        assignment.check_covers(&norm)?;
        let (train_rows, val_rows) = (assignment.rows(Part::Train), assignment.rows(Part::Val));
        if p.folds == 0 {
            let data = TrainingData::load(ctx, &p, &norm, &train_rows, &train_rows, &val_rows)?;
            let run = Run::new(ctx, p, norm.size, ctx.out_dir.to_path_buf(), ctx.scratch_dir.clone(), ctx.stage.name.to_owned())?;
            return Ok(run.train(data, &norm)?.0);
        }
        // The folds share one input scaling, from all of their training data
        // (nnU-Net computes it before splitting into folds).
        let pool: Vec<usize> = train_rows.iter().chain(&val_rows).copied().collect();
        let folds = patient_folds(&norm, &pool, p.folds, p.seed as u64)?;
        let train_fold = |k: usize, out: PathBuf, scratch: PathBuf| -> Result<Summary> {
            let (fold_train, fold_val) = &folds[k];
            let data = TrainingData::load(ctx, &p, &norm, &pool, fold_train, fold_val)?;
            let label = format!("{} fold {}/{}", ctx.instance, k + 1, p.folds);
            let run = Run::new(ctx, p.clone(), norm.size, out, scratch, label)?;
            let started = liverseg_engine::store::now_unix();
            let mut summary = run.train(data, &norm)?.0;
            // When each fold ran: side by side or one after another.
            summary.insert("started_unix".into(), started.into());
            summary.insert("finished_unix".into(), liverseg_engine::store::now_unix().into());
            let patients: std::collections::BTreeSet<&str> = fold_val.iter().map(|&r| norm.case_id[r].as_str()).collect();
            summary.insert("val_patients".into(), patients.into_iter().collect::<Vec<_>>().into());
            Ok(summary)
        };
        // One fold alone (the engine runs the folds side by side and assembles them).
        if let Some(k) = ctx.part {
            return train_fold(k, ctx.out_dir.to_path_buf(), ctx.scratch_dir.clone());
        }
        let mut summaries = Vec::new();
        for k in 0..p.folds {
            let folder = super::fold_folder(k);
            let out = ctx.out(&folder);
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            summaries.push(train_fold(k, out, ctx.scratch_dir.join(&folder))?);
        }
        super::assemble_folds(ctx, summaries)
    }

    /// Patient-level folds of `pool` (rows of the normalised set): patients
    /// shuffled with `seed` and dealt round-robin; each fold is (train rows,
    /// validation rows).
    fn patient_folds(norm: &NormalisedSet, pool: &[usize], k: usize, seed: u64) -> Result<Vec<(Vec<usize>, Vec<usize>)>> {
        let mut patients: Vec<&str> = pool.iter().map(|&r| norm.case_id[r].as_str()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        if patients.len() < k {
            bail!("train.folds {k}: train and validation hold only {} patients", patients.len());
        }
        Rng::new(seed).shuffle(&mut patients);
        let fold_of: BTreeMap<&str, usize> = patients.iter().enumerate().map(|(i, &c)| (c, i % k)).collect();
        Ok((0..k).map(|f| pool.iter().copied().partition(|&r| fold_of[norm.case_id[r].as_str()] != f)).collect())
    }

    /// The stage's params, with an upstream tune stage's best ones in place.
    fn effective_params(ctx: &StageContext) -> Result<TrainParams> {
        let Some(t) = ctx.upstream.get("tune") else {
            return ctx.params.typed();
        };
        let mut merged = ctx.params.clone();
        merged.0.extend(TuneBest::read(t)?.params);
        if ctx.show_progress {
            eprintln!("{}: using tuned parameters from {}@{}", ctx.instance, t.stage, t.key);
        }
        let typed = merged.typed()?;
        ctx.record_effective_params(merged);
        Ok(typed)
    }

    /// The slices one model trains on: its training rows (at most
    /// max_train_slices, spread over the patients) with their augmented
    /// copies, and its validation rows. Test slices are never read.
    struct TrainingData {
        train: SliceSet,
        val: SliceSet,
        /// Of the training rows' own slices, before augmentation.
        input_stats: InputStats,
        input_histogram: IntensityHistogram,
    }

    impl TrainingData {
        /// `scaling_rows`: the rows the input scaling's statistics come from.
        fn load(ctx: &StageContext, p: &TrainParams, norm: &NormalisedSet, scaling_rows: &[usize], train_rows: &[usize], val_rows: &[usize]) -> Result<Self> {
            let train_rows = spread(train_rows.to_vec(), p.max_train_slices);
            let (mut ti, mut tm) = norm.select(&train_rows);
            let (vi, vm) = norm.select(val_rows);
            let (input_stats, input_histogram) = (InputStats::of(&ti), IntensityHistogram::of(&ti));
            let size = norm.size;
            if p.use_augmented {
                // The augmented copies of the chosen slices, by their source row
                // (augment copies the split's training part only).
                let aug = AugmentedSet::open(ctx.upstream("augment")?)?;
                let chosen: std::collections::BTreeSet<usize> = train_rows.iter().copied().collect();
                let px = size * size;
                for (j, src) in aug.source_idx.iter().enumerate() {
                    if chosen.contains(src) {
                        ti.extend_from_slice(&aug.images()[j * px..(j + 1) * px]);
                        tm.extend_from_slice(&aug.masks()[j * px..(j + 1) * px]);
                    }
                }
            }
            let scaling = input_scaling(p.input_scaling, norm, scaling_rows)?;
            let (train, val) = (SliceSet { images: ti, masks: tm, size, scaling }, SliceSet { images: vi, masks: vm, size, scaling });
            if train.len() < 2 || val.is_empty() {
                bail!("training needs at least 2 training and 1 validation slice (got {} and {})", train.len(), val.len());
            }
            Ok(TrainingData { train, val, input_stats, input_histogram })
        }
    }

    /// The scheme's statistics: for `ct`, of the liver pixels of `train_rows`
    /// (every training slice, before augmentation), which must be CT; for
    /// `nyul`, the mean landmarks of those slices.
    fn input_scaling(scheme: InputScheme, norm: &NormalisedSet, train_rows: &[usize]) -> Result<InputScaling> {
        if scheme == InputScheme::Ct && norm.unit() != "HU" {
            bail!("input_scaling ct is nnU-Net's CT scheme and needs HU data; these slices are {} (use percentile for 8-bit exports)", norm.unit());
        }
        let px = norm.size * norm.size;
        let (images, masks) = (norm.images(), norm.masks());
        let liver = train_rows.iter().flat_map(|&r| images[r * px..(r + 1) * px].iter().zip(&masks[r * px..(r + 1) * px]).filter(|(_, &m)| m == 1).map(|(&v, _)| v));
        InputScaling::fit(scheme, liver, train_rows.iter().map(|&r| &images[r * px..(r + 1) * px]))
    }

    /// At most `max` of `rows` (0 = all), evenly spaced, so that a subset of
    /// the training slices (rows in case order) spans the training patients.
    fn spread(rows: Vec<usize>, max: usize) -> Vec<usize> {
        if max == 0 || rows.len() <= max {
            return rows;
        }
        (0..max).map(|i| rows[i * rows.len() / max]).collect()
    }

    impl<'a> Run<'a> {
        fn new(ctx: &'a StageContext<'a>, p: TrainParams, size: usize, out: PathBuf, scratch: PathBuf, label: String) -> Result<Self> {
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
            let progress = Progress { epochs_done: 0, best_loss: f64::INFINITY, best_score: f64::INFINITY, best_epoch: 0, bad_epochs: 0, lr: p.lr, plateau_bad: 0, step: 0, rows: Vec::new() };
            let online = p.online_transforms()?.map(Arc::new);
            Ok(Run { ctx, p, device, bf16, vs, model, opt, best, progress, pruned: false, online, out, scratch, label })
        }

        /// Train to a stop (resuming a checkpoint of this key) and write the
        /// model's files; returns its summary, card and epochs.
        fn train(mut self, data: TrainingData, norm: &NormalisedSet) -> Result<(Summary, ModelCard, Vec<EpochRow>)> {
            self.resume()?;
            let started = Instant::now();
            let (train_set, val_set) = (Arc::new(data.train), Arc::new(data.val));
            while self.stop_reason().is_none() {
                self.epoch(&train_set, &val_set)?;
            }
            self.say_why_it_stopped();
            self.finish(norm, (data.input_stats, data.input_histogram), train_set.scaling, started)
        }

        /// Resume an interrupted run of this very key from its checkpoint.
        fn resume(&mut self) -> Result<()> {
            let scratch = &self.scratch;
            let (ckpt, prog) = (scratch.join("checkpoint.safetensors"), scratch.join("progress.json"));
            if ckpt.is_file() && prog.is_file() {
                let bytes = std::fs::read(&prog).with_context(|| format!("cannot read {}", prog.display()))?;
                let saved: Progress = serde_json::from_slice(&bytes).with_context(|| format!("{}: corrupt checkpoint progress", prog.display()))?;
                let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&ckpt).map_err(|e| anyhow!("{}: {e}", ckpt.display()))?.into_iter().collect();
                fit::restore(&self.vs, &tensors, "model.")?;
                self.best = tensors.iter().filter_map(|(k, v)| k.strip_prefix("best.").map(|n| (n.to_owned(), v.shallow_clone()))).collect();
                self.opt.load_state(&tensors)?;
                self.opt.step = saved.step;
                self.progress = saved;
                if self.ctx.show_progress {
                    eprintln!("resuming {} from epoch {} (checkpoint in {})", self.label, self.progress.epochs_done + 1, scratch.display());
                }
            }
            // A resumed trial that had already been pruned stays pruned.
            self.pruned = self.progress.rows.iter().any(|r| self.prunes(r));
            Ok(())
        }

        /// Median pruning: after the warm-up, worse than the median of
        /// completed trials at the same epoch.
        fn prunes(&self, r: &EpochRow) -> bool {
            let Some(&median) = self.p.prune_medians.get(r.epoch as usize - 1) else {
                return false;
            };
            let median = self.p.prune_metric.to_minimise(median, median);
            r.epoch > self.p.prune_warmup && self.objective(r) > median
        }

        fn objective(&self, r: &EpochRow) -> f64 {
            match self.p.prune_metric {
                Objective::ValDice => -r.val_dice,
                Objective::ValLoss => r.val_loss,
            }
        }

        /// Why training stops now, or None to go on.
        fn stop_reason(&self) -> Option<StopReason> {
            let (p, prog) = (&self.p, &self.progress);
            if self.pruned {
                Some(StopReason::Pruned)
            } else if prog.bad_epochs >= p.patience {
                Some(StopReason::EarlyStop)
            } else if prog.epochs_done >= p.epochs {
                Some(StopReason::MaxEpochs)
            } else {
                None
            }
        }

        /// One epoch: train, validate, keep the best weights, schedule the
        /// learning rate, checkpoint, and prune.
        fn epoch(&mut self, train_set: &Arc<SliceSet>, val_set: &Arc<SliceSet>) -> Result<()> {
            let (p, name) = (&self.p, self.label.as_str());
            let epoch = self.progress.epochs_done + 1;
            let lr = match p.schedule {
                Schedule::Cosine => p.lr * 0.5 * (1.0 + (std::f64::consts::PI * (epoch - 1) as f64 / p.epochs as f64).cos()),
                Schedule::Poly => p.lr * (1.0 - (epoch - 1) as f64 / p.epochs as f64).powf(0.9),
                _ => self.progress.lr,
            };
            self.opt.lr = lr;
            // Per-epoch seeds make a resumed run identical to an uninterrupted one.
            tch::manual_seed(p.seed.wrapping_mul(1000).wrapping_add(epoch));
            let order = super::epoch_order(train_set.len(), p.seed as u64, epoch as u64, p.steps_per_epoch * p.batch_size);
            let online = self.online.clone().map(|transforms| Online { transforms, seed: (p.seed as u64) << 20 | epoch as u64 });
            let t0 = Instant::now();
            let bar = liverseg_engine::progress::bar(order.len().div_ceil(p.batch_size) as u64, &format!("{name} {epoch}/{}", p.epochs), self.ctx.show_progress);
            let stats = fit::train_epoch(&self.model, &mut self.opt, train_set.clone(), order, p.batch_size, self.device, p.loss, self.bf16, online, &mut || bar.inc(1))?;
            bar.finish_and_clear();
            let train_secs = t0.elapsed().as_secs_f64();
            let (val_loss, vconf) = fit::evaluate(&self.model, val_set, p.batch_size, self.device, p.loss, self.bf16);
            let row = epoch_row(epoch, lr, &stats, val_loss, &vconf, t0.elapsed().as_secs_f64(), train_secs);
            self.report(&row);
            self.keep_if_best(epoch, &row);
            self.plateau();
            self.progress.epochs_done = epoch;
            self.progress.step = self.opt.step;
            self.pruned = self.prunes(&row);
            self.progress.rows.push(row);
            write_checkpoint(&self.scratch, &self.vs, &self.best, &self.opt, &self.progress)?;
            if self.pruned && self.ctx.show_progress {
                eprintln!("pruned at epoch {epoch}: {} worse than the median of completed trials", self.p.prune_metric);
            }
            Ok(())
        }

        fn report(&self, row: &EpochRow) {
            if self.ctx.show_progress {
                eprintln!(
                    "Epoch {}/{} [{}] Train Loss: {:.4}, Train PA: {:.4}, Train IoU: {:.4} | Validation Loss: {:.4}, Validation PA: {:.4}, Validation IoU: {:.4} | Dice {:.4} | {:.1} s, {:.1} img/s",
                    row.epoch, self.p.epochs, self.label, row.train_loss, row.train_pa, row.train_miou, row.val_loss, row.val_pa, row.val_miou, row.val_dice, row.seconds, row.train_images_per_s
                );
            }
        }

        /// Early stopping's bookkeeping: a better stop_metric keeps these weights.
        fn keep_if_best(&mut self, epoch: i64, row: &EpochRow) {
            let (prog, show, metric) = (&mut self.progress, self.ctx.show_progress, self.p.stop_metric);
            let score = metric.to_minimise(row.val_dice, row.val_loss);
            // NaN (no liver in any validation slice) never counts as better.
            if score < prog.best_score {
                if show {
                    match metric {
                        Objective::ValLoss if prog.best_score.is_finite() => eprintln!("Loss decreased from {:.4} to {:.4}, saving the model", prog.best_score, score),
                        Objective::ValLoss => eprintln!("Loss decreased from inf to {score:.4}, saving the model"),
                        Objective::ValDice => eprintln!("Validation Dice rose from {:.4} to {:.4}, saving the model", metric.reported(prog.best_score).max(0.0), row.val_dice),
                    }
                }
                (prog.best_score, prog.best_loss, prog.best_epoch, prog.bad_epochs) = (score, row.val_loss, epoch, 0);
                self.best = fit::snapshot(&self.vs);
            } else {
                prog.bad_epochs += 1;
                if show {
                    let what = if metric == Objective::ValLoss { "Loss not decreased" } else { "Validation Dice not risen" };
                    eprintln!("{what} for {} epoch(s) (best {:.4} at epoch {})", prog.bad_epochs, metric.reported(prog.best_score), prog.best_epoch);
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
            if self.ctx.show_progress && self.stop_reason() == Some(StopReason::EarlyStop) {
                let what = if self.p.stop_metric == Objective::ValLoss { "lower validation loss" } else { "higher validation Dice" };
                eprintln!("early stopping: no {what} for {} epochs", self.p.patience);
            }
        }

        /// The artifact: the best epoch's weights, the per-epoch table, the
        /// model card and the summary.
        fn finish(
            self,
            norm: &NormalisedSet,
            (input_stats, input_histogram): (InputStats, IntensityHistogram),
            scaling: InputScaling,
            started: Instant,
        ) -> Result<(Summary, ModelCard, Vec<EpochRow>)> {
            let ctx = self.ctx;
            fit::restore(&self.vs, &self.best, "")?;
            let stop = self.stop_reason().unwrap_or(StopReason::MaxEpochs);
            let rows = &self.progress.rows;
            write_parquet(&self.out.join("metrics.parquet"), &mut metrics_frame(rows, Some(stop))?, &ctx.provenance())?;
            let parameters = trainable_parameters(&self.vs);
            let card = ModelCard {
                spec: ModelSpecCard { arch: self.p.arch, encoder: self.p.encoder, in_channels: 1, classes: 2 },
                size: norm.size as i64,
                unit: norm.unit().to_owned(),
                window: norm.params.window.clone(),
                minmax_8bit: norm.params.minmax_8bit,
                parameters,
                best_epoch: self.progress.best_epoch,
                best_val_loss: self.progress.best_loss,
                train_stage_key: ctx.key.to_owned(),
                input_stats: Some(input_stats),
                input_histogram: Some(input_histogram),
                scaling,
                folds: 0,
                training_data: super::TrainingData::from_lineage(ctx)?,
            };
            let card_path = self.out.join("model.json");
            std::fs::write(&card_path, serde_json::to_vec_pretty(&card)?).with_context(|| format!("cannot write {}", card_path.display()))?;
            if self.p.save_model {
                self.save_weights(&card)?;
            }
            let mut s = Summary::new();
            s.insert("parameters".into(), parameters.into());
            s.insert("epochs_run".into(), (rows.len() as i64).into());
            s.insert("stop_reason".into(), stop.name().into());
            s.insert("best_epoch".into(), self.progress.best_epoch.into());
            s.insert("best_val_loss".into(), json_f(self.progress.best_loss));
            if let Some(r) = rows.iter().find(|r| r.epoch == self.progress.best_epoch) {
                s.insert("train_loss".into(), json_f(r.train_loss));
                s.insert("val_dice".into(), json_f(r.val_dice));
                s.insert("val_miou".into(), json_f(r.val_miou));
                s.insert("val_pa".into(), json_f(r.val_pa));
                s.insert("val_liver_iou".into(), json_f(r.val_liver_iou));
            }
            s.insert("train_seconds".into(), json_f(rows.iter().map(|r| r.seconds).sum::<f64>()));
            s.insert("wall_seconds_this_run".into(), json_f(started.elapsed().as_secs_f64()));
            s.insert("device".into(), format!("{:?}", self.device).into());
            // Out of the key when `threads` is 0 (the allocation decides): recorded here.
            s.insert("cpu_threads".into(), tch::get_num_threads().into());
            s.insert("pruned".into(), self.pruned.into());
            let used = serde_json::to_value(&self.p)?;
            for k in ["lr", "batch_size", "optimizer", "weight_decay", "loss"] {
                s.insert(format!("used.{k}"), used[k].clone());
            }
            Ok((s, card, self.progress.rows.clone()))
        }
    }

    impl Run<'_> {
        /// model.safetensors with smp's names, and in its metadata the key,
        /// the params that ran, the network and the preprocessing, so the
        /// weights file alone says how to use it.
        fn save_weights(&self, card: &ModelCard) -> Result<()> {
            let ctx = self.ctx;
            let tensors: Vec<NamedTensor> = weights::state_dict(&self.vs, self.opt.step)?
                .into_iter()
                .map(|t| NamedTensor::new(&t.name, if t.is_f32 { safetensors::Dtype::F32 } else { safetensors::Dtype::I64 }, t.shape, t.bytes))
                .collect();
            let mut meta: BTreeMap<String, String> = ctx.provenance().into_iter().collect();
            let effective = ctx.effective().unwrap_or_else(|| ctx.params.clone());
            meta.insert("liverseg.effective_params".into(), effective.canonical_json());
            meta.insert(CARD_METADATA.into(), serde_json::to_string(card)?);
            meta.insert("arch".into(), card.spec.arch.name().into());
            meta.insert("encoder".into(), card.spec.encoder.name().into());
            meta.insert("input_size".into(), card.size.to_string());
            meta.insert("input_unit".into(), card.unit.clone());
            meta.insert("window".into(), serde_json::to_string(&card.window)?);
            meta.insert("minmax_8bit".into(), card.minmax_8bit.to_string());
            meta.insert("scaling".into(), "HU window mapped to 0..255 (8-bit: as is, or each image's min..max when minmax_8bit), bilinear resize into input_size², aspect kept (non-square slices padded with 0); then input_scaling".into());
            let window = (card.unit == "HU").then(|| (card.window[0], card.window[1]));
            meta.insert("input_scaling".into(), card.scaling.describe(window));
            write_with_metadata(&self.out.join("model.safetensors"), &tensors, &meta)
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

    /// The per-epoch table; `stop` goes on the last row.
    fn metrics_frame(rows: &[EpochRow], stop: Option<StopReason>) -> Result<DataFrame> {
        let col_f = |f: fn(&EpochRow) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
        let df = DataFrame::new_infer_height(vec![
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
            // Why training stopped, on the last epoch's row.
            Column::new("stop_reason".into(), (0..rows.len()).map(|i| stop.filter(|_| i + 1 == rows.len()).map(|s| s.name())).collect::<Vec<_>>()),
        ])?;
        Ok(df)
    }

    fn write_checkpoint(dir: &Path, vs: &nn::VarStore, best: &BTreeMap<String, Tensor>, opt: &Optimizer, progress: &Progress) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, v)| (format!("model.{k}"), v.to_device(Device::Cpu))).collect();
        named.extend(best.iter().map(|(k, v)| (format!("best.{k}"), v.shallow_clone())));
        named.extend(opt.named_state().into_iter().map(|(k, v)| (k, v.to_device(Device::Cpu))));
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let tmp = dir.join("checkpoint.safetensors.tmp");
        Tensor::write_safetensors(&refs, &tmp).map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))?;
        let progress_tmp = dir.join("progress.json.tmp");
        std::fs::write(&progress_tmp, serde_json::to_vec(progress)?).with_context(|| format!("cannot write {}", progress_tmp.display()))?;
        // Tensors first, then the progress that points at them.
        let rename = |from: &Path, to: &str| std::fs::rename(from, dir.join(to)).with_context(|| format!("cannot move {} into place", from.display()));
        rename(&tmp, "checkpoint.safetensors")?;
        rename(&progress_tmp, "progress.json")
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
