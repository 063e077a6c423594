//! train / baseline: train DeepLabV3+ (stage `train`) or the plain ResNet
//! segmenter (stage `baseline`) on the train split plus its augmented copies,
//! with early stopping on validation loss. Runs in the `liverseg-torch` worker.
//!
//! inputs: normalise (data.safetensors), split (assignment.parquet), augment
//! outputs: model.safetensors (best epoch, smp state_dict names),
//!          metrics.parquet (per epoch), model.json (spec + preprocessing)

use crate::engine::params::{param, ParamType::*, ParamSpec};
use crate::engine::stage::{Stage, StageContext, StageInfo, Summary};
use anyhow::Result;

pub const VERSION: u32 = 1;

macro_rules! train_params {
    ($arch:literal) => {
        &[
            param("arch", Choice(&["deeplabv3plus", "resnet"]), $arch, "deeplabv3plus, or resnet (the plain baseline)"),
            param("encoder", Choice(&["resnet18", "resnet34", "resnet50"]), "resnet34", "ResNet encoder"),
            param("epochs", Int, "12", "maximum epochs"),
            param("patience", Int, "5", "early stopping: epochs without a lower validation loss"),
            param("time_budget_min", Float, "0", "stop starting new epochs after this many minutes of training (0 = no limit)"),
            param("batch_size", Int, "16", "batch size"),
            param("lr", Float, "1e-3", "learning rate"),
            param("weight_decay", Float, "0", "weight decay (L2 for adam/sgd/rmsprop, decoupled for adamw)"),
            param("optimizer", Choice(&["adam", "adamw", "sgd", "rmsprop"]), "adam", "optimizer"),
            param("momentum", Float, "0.9", "sgd/rmsprop momentum"),
            param("nesterov", Bool, "false", "sgd: Nesterov momentum"),
            param("loss", Choice(&["ce", "dice", "ce_dice"]), "ce", "loss"),
            param("schedule", Choice(&["constant", "cosine", "plateau"]), "constant", "learning-rate schedule"),
            param("online_flip", Bool, "false", "also mirror training batches at random (online augmentation)"),
            param("use_augmented", Bool, "true", "train on the augment stage's copies too"),
            param("max_train_slices", Int, "0", "use at most this many training slices (0 = all), for cheap trials"),
            param("init_weights", Str, "''", "safetensors file (smp names) to start from, e.g. exported ImageNet encoder weights"),
            param("seed", Int, "0", "seed for initialisation, order and dropout"),
            param("save_model", Bool, "true", "write model.safetensors (tune trials skip it)"),
            param("prune_epoch", Int, "0", "median pruning: check at this epoch (0 = never); set by tune"),
            param("prune_threshold", Float, "0", "median pruning: stop if the objective at prune_epoch is worse than this"),
            param("prune_metric", Choice(&["val_loss", "val_dice"]), "val_loss", "objective checked by pruning"),
            param("threads", Int, "0", "CPU threads (0 = all cores)"),
            param("device", Choice(&["auto", "cpu", "cuda"]), "auto", "auto = CUDA when available"),
            param("bf16", Bool, "false", "CUDA only: bf16 autocast"),
        ]
    };
}

const DEEPLAB_PARAMS: &[ParamSpec] = train_params!("deeplabv3plus");
const BASELINE_PARAMS: &[ParamSpec] = train_params!("resnet");

pub static TRAIN: StageInfo = StageInfo {
    name: "train",
    version: VERSION,
    inputs: &["normalise", "split", "augment"],
    outputs: &["model.safetensors", "metrics.parquet", "model.json"],
    params: DEEPLAB_PARAMS,
    about: "train DeepLabV3+ with early stopping",
};

pub static BASELINE: StageInfo = StageInfo {
    name: "baseline",
    version: VERSION,
    inputs: &["normalise", "split", "augment"],
    outputs: &["model.safetensors", "metrics.parquet", "model.json"],
    params: BASELINE_PARAMS,
    about: "train the plain ResNet segmenter the study compares with",
};

pub struct Train(pub &'static StageInfo);

impl Stage for Train {
    fn info(&self) -> &'static StageInfo {
        self.0
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        crate::engine::worker::run_in_worker(ctx)
    }
}
