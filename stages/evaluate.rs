//! evaluate: every trained model on the test split, with per-slice and
//! per-case (per-patient) tables, as nnU-Net reports them. Runs in the
//! `liverseg-torch` worker.
//!
//! Rules: Dice and IoU are 1 when prediction and truth are both empty; HD95
//! pools each case's 2D surface distances (mm where the spacing is known,
//! otherwise pixels) and is undefined (null) when exactly one is empty; the
//! 95% CI of per-case Dice is a percentile bootstrap over cases.
//!
//! External datasets (`external:` in pipeline.yaml) arrive as upstream
//! `normalise.NAME` instances, preprocessed with the pipeline's normalise
//! params; every slice of each is evaluated with the same metrics, and a
//! model whose training window differs from the data's is refused.
//!
//! inputs: normalise, split, train, baseline, normalise.NAME (external)
//! outputs: table1.parquet, per_case.parquet, per_slice.parquet, predictions/<model>.safetensors,
//!   examples.parquet + gradcam/<model>.safetensors (best/median/worst case, liver Grad-CAM),
//!   external/NAME/{table1,per_case,per_slice}.parquet

use crate::engine::params::{param, ParamType::*, ParamSpec};
use crate::engine::stage::{Stage, StageContext, StageInfo, Summary};
use anyhow::Result;

pub const VERSION: u32 = 2;
const PARAMS: &[ParamSpec] = &[
    param("split", Choice(&["test", "val", "all"]), "test", "which split to evaluate (test for reporting; all = every slice, for external data without a split upstream)"),
    param("models", StrList, "[]", "extra trained models to evaluate (artifact folders), besides upstream train/baseline"),
    param("models_blake3", StrList, "[]", "content hashes of `models` (their model.safetensors), so the key changes with the weights"),
    param("bootstrap", Int, "2000", "bootstrap resamples for the per-case Dice CI"),
    param("seed", Int, "0", "bootstrap seed"),
    param("batch_size", Int, "16", "inference batch size"),
    param("device", Choice(&["auto", "cpu", "cuda"]), "auto", "auto = CUDA when available"),
];

pub static INFO: StageInfo = StageInfo {
    name: "evaluate",
    version: VERSION,
    inputs: &["normalise"],
    outputs: &["table1.parquet", "per_case.parquet", "per_slice.parquet", "predictions/", "examples.parquet", "gradcam/", "external/"],
    params: PARAMS,
    about: "test-split metrics per slice, per case and per model",
};

pub struct Evaluate;

impl Stage for Evaluate {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        crate::engine::worker::run_in_worker(ctx)
    }
}
