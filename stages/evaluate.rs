//! evaluate: every trained model on the test split, scored per case on the
//! case's own grid, as nnU-Net and MONAI report it. Runs in the
//! `liverseg-torch` worker.
//!
//! Each case is read from ingest at its original resolution, preprocessed as
//! normalise would (the models' own window, scaling and size), segmented, and
//! the liver probabilities are resampled back to the original grid
//! (bilinear) and thresholded at 0.5. Every slice of a case is scored,
//! whatever slices normalise kept for training.
//!
//! Rules (see liverseg-metrics): Dice, IoU, precision and recall are NaN when
//! their denominator is zero (means skip them and the tables count them);
//! HD95 is MONAI's, in mm where the spacing is known, on the whole 3D case
//! for volumes and pooled over the case's slices for 2D slice datasets, and
//! the grid's diagonal where exactly one of prediction and truth is empty;
//! the 95% CI of per-case Dice is a percentile bootstrap over cases, shown
//! from 10 cases. The loss column is the cross-entropy on the models' grid.
//!
//! Extra datasets (`external:`) arrive as upstream dataset instances
//! `ingest.NAME` and `normalise.NAME`; every case of each is scored alike,
//! and a model whose preprocessing or intensity unit differs from the data's
//! is refused.
//!
//! inputs: ingest, normalise, split (optional), every upstream with a trained model,
//!         ingest.NAME + normalise.NAME (extra datasets)
//! outputs: table1.parquet, per_case.parquet, per_slice.parquet,
//!   predictions/<model>/<case>.safetensors (masks on the original grid, as bits),
//!   examples.parquet + examples/<model>.safetensors (best/median/worst case: image,
//!   truth, prediction and liver Grad-CAM on the model's grid),
//!   external/NAME/{table1,per_case,per_slice}.parquet and predictions

use anyhow::Result;
use liverseg_engine::params::Params;
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_recipe::{choices, Device};

/// 3: scored on the original grid, per 3D case; NaN for empty masks; HD95
/// never null. 4: probabilities resampled as normalise fits slices;
/// mirroring, largest component and ensemble measured on validation.
/// 5: intensity distance of the inputs from each model's training data.
pub const VERSION: u32 = 5;

/// Fewer cases than this get no confidence interval.
pub const MIN_CASES_FOR_CI: usize = 10;

choices!(
    /// Which cases evaluate scores.
    EvalSplit { Test = "test", Val = "val", All = "all" }
);

choices!(
    /// Where Table 1's mirroring and largest-component settings come from.
    PostProcess { Validation = "validation", Fixed = "fixed" }
);

liverseg_engine::params! {
    pub struct EvaluateParams {
        split: EvalSplit = choice "test", "which split to evaluate (test for reporting; all = every case, for external data without a split upstream)";
        models: Vec<String> = strs "[]", "extra trained models to evaluate (artifact folders), besides upstream train/baseline";
        models_blake3: Vec<String> = strs "[]", "content hashes of `models` (their model.safetensors), so the key changes with the weights";
        bootstrap: usize = int "2000", "bootstrap resamples for the per-case Dice CI (at least 100)";
        seed: u64 = int "0", "bootstrap seed";
        batch_size: usize = int "16", "inference batch size";
        device: Device = choice "auto", "auto = CUDA when available";
        force_unit: bool = bool "false", "evaluate models on data of another intensity unit (HU against 8-bit exports) with a warning instead of refusing";
        postprocess: PostProcess = choice "validation", "Table 1's mirroring and largest component: validation = per model, whichever of the four combinations scores the highest Dice per case on the validation patients (options.parquet; needs options and split), as predict applies both by default; fixed = the mirror and largest_component params";
        mirror: bool = bool "false", "postprocess fixed: test-time mirroring in the reported scores (average the softmax over left-right and up-down flips)";
        largest_component: bool = bool "false", "postprocess fixed: keep only the largest connected component (3D for volumes, per slice for 2D slices) in the reported scores";
        options: bool = bool "true", "also measure mirroring, the largest component and the ensemble of all models on the validation split (options.parquet)";
        shifts: bool = bool "true", "also score the validation patients under simulated other exports (CT windows, gamma, contrast; shift.parquet), the measure for choosing an intensity-robust recipe without looking at other hospitals' data";
        threads: i64 = int "0", "CPU threads for inference (0 = the Slurm job's allocation, else all cores; the count then used is not in the key, and libtorch's sums, so the scores' last bits, depend on it: declare a count for the same bytes on every machine)";
    }
}

pub static INFO: StageInfo = StageInfo {
    name: "evaluate",
    version: VERSION,
    about: "per-case metrics on the original grid, per slice and per model",
    inputs: &["ingest", "normalise"],
    optional_inputs: &["split", "train", "baseline"],
    collects: &["ingest", "normalise"],
    per_dataset: false,
    dataset_requires: &[],
    outputs: &["table1.parquet", "per_case.parquet", "per_slice.parquet", "predictions/", "examples.parquet", "examples/", "options.parquet?", "shift.parquet?", "external/?"],
    params: EvaluateParams::SPECS,
    placement: Placement::Worker,
};

pub struct Evaluate;

impl Stage for Evaluate {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn check(&self, params: &Params) -> Result<()> {
        let p: EvaluateParams = params.typed()?;
        if p.batch_size == 0 {
            anyhow::bail!("batch_size must be at least 1");
        }
        if p.bootstrap < 100 {
            anyhow::bail!("bootstrap must be at least 100 resamples (got {}); a percentile CI from fewer is noise", p.bootstrap);
        }
        if p.models.len() != p.models_blake3.len() {
            anyhow::bail!("models and models_blake3 must list the same number of entries");
        }
        if p.threads < 0 {
            anyhow::bail!("threads must be 0 (the allocation) or a positive count, got {}", p.threads);
        }
        Ok(())
    }

    fn threads(&self, params: &Params) -> usize {
        params.typed::<EvaluateParams>().map_or(0, |p| p.threads.max(0) as usize)
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        #[cfg(feature = "torch")]
        return measure::evaluate(ctx);
        #[cfg(not(feature = "torch"))]
        anyhow::bail!("stage `{}` runs in the liverseg-torch worker (this build has no libtorch)", ctx.stage.name)
    }
}

#[cfg(feature = "torch")]
pub mod measure {
    //! Segment every case with every model and score it on its own grid.

    use super::{EvalSplit, EvaluateParams, PostProcess, MIN_CASES_FOR_CI};
    use crate::ingest::IngestedCases;
    use crate::normalise::{model_input, model_mask, NormaliseParams, NormalisedSet};
    use crate::split::{Part, SplitAssignment};
    use crate::train::ModelCard;
    use anyhow::{anyhow, bail, Context, Result};
    use liverseg_engine::stage::{StageContext, Summary};
    use liverseg_engine::store::{read_manifest, Manifest, MANIFEST};
    use liverseg_engine::tables::write_parquet;
    use liverseg_engine::tensors::{write_safetensors, NamedTensor};
    use liverseg_imaging::components::keep_largest;
    use liverseg_imaging::pack_mask_rows;
    use liverseg_imaging::resize::{unfit_bilinear, Fit};
    use liverseg_metrics::{bootstrap_ci, nan_mean, score_case as score_case_metrics, CaseGeometry, Confusion, Hd95, Hd95Rule, IntensityHistogram, INTENSITY_SHIFT_WARN};
    use liverseg_model::{device_for, fit, weights, ModelSpec, SegmentationModel};
    use polars::prelude::{Column, DataFrame};
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};
    use tch::nn;

    /// A trained model, loaded once: its card, its network (the folds of a
    /// cross-validated model, used as their ensemble) and the manifest of
    /// the artifact it came from (how it was trained), where there is one.
    pub struct Loaded {
        pub name: String,
        pub card: ModelCard,
        pub nets: Vec<SegmentationModel>,
        pub manifest: Option<Manifest>,
        /// Where its training figures sit in the manifest's metrics: "" or `fold<k>.`.
        pub metrics_prefix: String,
        pub dir: PathBuf,
        /// Evaluate's mirroring and largest component for this model.
        pub post: Post,
        /// Own the weights `nets` use.
        _vs: Vec<nn::VarStore>,
    }

    /// Test-time mirroring and keeping the largest component.
    #[derive(Debug, Clone, Copy, Default, PartialEq)]
    pub struct Post {
        pub mirror: bool,
        pub largest: bool,
    }

    impl Post {
        fn name(self) -> &'static str {
            match (self.mirror, self.largest) {
                (false, false) => "none",
                (true, false) => "mirror",
                (false, true) => "largest_component",
                (true, true) => "mirror+largest_component",
            }
        }
    }

    /// Load the trained model in `dir`: model.safetensors and its card, or
    /// for a cross-validated one every `folds/fold<k>/model.safetensors`.
    pub fn load_model(name: &str, dir: &Path, device: tch::Device) -> Result<Loaded> {
        let card = ModelCard::read(dir)?;
        let files: Vec<PathBuf> = if card.folds > 0 { (0..card.folds).map(|k| dir.join(format!("folds/fold{k}/model.safetensors"))).collect() } else { vec![dir.join("model.safetensors")] };
        let (mut nets, mut stores) = (Vec::new(), Vec::new());
        for file in &files {
            let mut vs = nn::VarStore::new(device);
            nets.push(SegmentationModel::new(&vs.root(), &ModelSpec::from(&card.spec))?);
            weights::load(&mut vs, file, true)?;
            stores.push(vs);
        }
        let manifest = read_manifest(&dir.join(MANIFEST)).ok();
        Ok(Loaded { name: name.to_owned(), card, nets, manifest, metrics_prefix: String::new(), dir: dir.to_path_buf(), post: Post::default(), _vs: stores })
    }

    /// Fold `k` of the cross-validated model in `dir`, on its own, named `name`.
    fn load_fold(name: &str, dir: &Path, k: usize, device: tch::Device) -> Result<Loaded> {
        let mut fold = load_model(name, &dir.join(format!("folds/fold{k}")), device)?;
        fold.manifest = read_manifest(&dir.join(MANIFEST)).ok();
        fold.metrics_prefix = format!("fold{k}.");
        Ok(fold)
    }

    impl Loaded {
        /// A second copy of the model, prepared for inference in `kind`.
        pub fn reloaded(&self, kind: tch::Kind, device: tch::Device) -> Result<Loaded> {
            let mut copy = load_model(&self.name, &self.dir, device)?;
            (copy.manifest, copy.metrics_prefix, copy.post) = (self.manifest.clone(), self.metrics_prefix.clone(), self.post);
            copy.for_inference(kind);
            Ok(copy)
        }

        /// Cast the weights for inference in `kind` (see `fit::for_inference`).
        pub fn for_inference(&mut self, kind: tch::Kind) {
            self._vs.iter_mut().for_each(|vs| fit::for_inference(vs, kind));
        }

        /// Predict `images` ([n, size, size] u8) at the model's size; returns
        /// the masks on the model's grid (an ensemble's mean softmax above 0.5).
        pub fn predict(&self, images: &[u8], n: usize, size: usize, batch: usize, device: tch::Device) -> Result<Vec<u8>> {
            if self.card.size as usize != size {
                bail!("model {} was trained at {}×{}, data is {size}×{size}", self.name, self.card.size, self.card.size);
            }
            if let [net] = &self.nets[..] {
                return Ok(fit::predict_u8(net, images, None, n, size, batch, device, &self.card.scaling)?.0);
            }
            let how = fit::Inference { scaling: self.card.scaling, ..fit::Inference::fp32(batch, device, false) };
            let nets: Vec<&SegmentationModel> = self.nets.iter().collect();
            Ok(fit::liver_probabilities(&nets, images, None, n, size, &how)?.liver.iter().map(|&v| u8::from(v > 0.5)).collect())
        }

        /// The model's preprocessing must be the data's, and so must its unit
        /// (`force` turns a unit mismatch into a warning).
        fn check_fits(&self, data: &NormaliseParams, unit: &str, label: &str, force: bool) -> Result<()> {
            let c = &self.card;
            if data.window != c.window || data.minmax_8bit != c.minmax_8bit || data.size as i64 != c.size {
                bail!(
                    "{label}: model {} was trained on {}² slices with window {:?} (min-max {}), but these are normalised to {}² with window {:?} (min-max {})",
                    self.name,
                    c.size,
                    c.window,
                    c.minmax_8bit,
                    data.size,
                    data.window,
                    data.minmax_8bit
                );
            }
            if unit != c.unit {
                let msg = format!("{label}: model {} was trained on {} input, these cases are {unit}", self.name, c.unit);
                if !force {
                    bail!("{msg} (evaluate.force_unit, or --force, evaluates anyway)");
                }
                eprintln!("warning: {msg}; evaluating anyway (force_unit)");
            }
            Ok(())
        }
    }

    /// One dataset to score: its ingested cases, the preprocessing, which
    /// cases, and where its tables go.
    struct Dataset {
        label: String,
        cases: IngestedCases,
        params: NormaliseParams,
        selected: Vec<usize>,
        out: PathBuf,
        prefix: String,
        /// `mm` when every selected case has its spacing, else `px`.
        unit: &'static str,
        provenance: Vec<(String, String)>,
        /// Where the cases came from (`data.root`, or the source for phantoms).
        origin: String,
    }

    impl Dataset {
        fn new(ctx: &StageContext, label: String, ingest: &liverseg_engine::store::Artifact, norm: &NormalisedSet, wanted: Option<BTreeSet<String>>, out: PathBuf, prefix: String) -> Result<Self> {
            let cases = IngestedCases::open(ingest)?;
            let selected: Vec<usize> = (0..cases.groups.len()).filter(|&g| wanted.as_ref().is_none_or(|w| w.contains(&cases.groups[g].0))).collect();
            if selected.is_empty() {
                bail!("{label}: no case to evaluate");
            }
            let unit = if selected.iter().all(|&g| cases.spacing(g).iter().all(|v| v.is_finite())) { "mm" } else { "px" };
            let param = |k: &str| ingest.manifest.params.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            let origin = if param("data.source") == "synthetic" { "synthetic phantoms".to_owned() } else { param("data.root") };
            Ok(Dataset { label, cases, params: norm.params.clone(), selected, out, prefix, unit, provenance: ctx.provenance(), origin })
        }

        /// The cases' intensity unit (`HU`, `8bit` or `mixed`).
        fn intensity_unit(&self) -> &str {
            let units: BTreeSet<&str> = self.selected.iter().filter_map(|&g| self.cases.unit(g)).collect();
            match units.len() {
                1 => units.into_iter().next().unwrap_or("none"),
                _ => "mixed",
            }
        }
    }

    /// A case as the models see it and as it is scored.
    #[derive(Clone)]
    struct CaseInput {
        id: String,
        n: usize,
        h: usize,
        w: usize,
        /// [n, S, S] model inputs and masks (what normalise would write).
        images: Vec<u8>,
        grid_masks: Vec<u8>,
        /// [n, h, w] truth on the original grid.
        masks: Vec<u8>,
        /// (slice, row, col) spacing in mm, or 1 px each.
        spacing: [f64; 3],
        /// A contiguous volume (HU, spacing known): scored in 3D.
        volume: bool,
        slice_index: Vec<i64>,
        /// How the slices fill the models' square.
        fit: Fit,
    }

    fn case_input(ds: &Dataset, g: usize) -> Result<CaseInput> {
        let (cases, p) = (&ds.cases, &ds.params);
        let tf = cases.open_case(g)?;
        let view = cases.view(&tf, g)?;
        let fit = cases.fit(g, &view, p.size);
        let (size, plane) = (p.size, p.size * p.size);
        let hu = cases.unit(g) == Some("HU");
        let window = p.window()?;
        let (mut images, mut grid_masks, mut masks) = (vec![0u8; view.n * plane], vec![0u8; view.n * plane], Vec::with_capacity(view.n * view.h * view.w));
        let mut full = Vec::new();
        for k in 0..view.n {
            model_input(&view, k, hu, p.minmax_8bit, window, &fit, &mut images[k * plane..(k + 1) * plane]);
            model_mask(&view, k, &fit, &mut full, &mut grid_masks[k * plane..(k + 1) * plane]);
            masks.extend_from_slice(&full);
        }
        debug_assert_eq!(size * size, plane);
        let [sr, sc, ss] = cases.spacing(g);
        let known = ds.unit == "mm";
        let spacing = if known { [if ss.is_finite() { ss } else { 1.0 }, sr, sc] } else { [1.0; 3] };
        Ok(CaseInput {
            id: cases.groups[g].0.clone(),
            n: view.n,
            h: view.h,
            w: view.w,
            images,
            grid_masks,
            masks,
            spacing,
            volume: known && hu && ss.is_finite(),
            slice_index: cases.slice_indices(g),
            fit,
        })
    }

    /// One model's scores on one case.
    struct CaseScore {
        case: String,
        slice_index: Vec<i64>,
        per_slice: Vec<Confusion>,
        confusion: Confusion,
        hd95: Hd95,
        /// Liver volume predicted and true: ml when the spacing is known, else pixels.
        volume_pred: f64,
        volume_true: f64,
        loss_sum: f64,
        /// Grey levels of the case's model inputs.
        intensity: IntensityHistogram,
    }

    /// Liver probabilities of `nets` on the model's grid (averaged, with
    /// mirroring if asked), and the first net's cross-entropy.
    /// Each model's input scaled as its card says; an ensemble of models
    /// with different scalings averages their separate probabilities.
    fn probabilities(nets: &[&Loaded], input: &CaseInput, size: usize, how: &fit::Inference) -> Result<fit::Probabilities> {
        let run = |models: &[&Loaded]| {
            let how = fit::Inference { scaling: models[0].card.scaling, ..*how };
            let nets: Vec<&SegmentationModel> = models.iter().flat_map(|m| &m.nets).collect();
            fit::liver_probabilities(&nets, &input.images, Some(&input.grid_masks), input.n, size, &how)
        };
        if nets.iter().all(|m| m.card.scaling == nets[0].card.scaling) {
            return run(nets);
        }
        let mut first = run(&nets[..1])?;
        for m in &nets[1..] {
            first.liver.iter_mut().zip(run(&[m])?.liver).for_each(|(a, b)| *a += b);
        }
        first.liver.iter_mut().for_each(|a| *a /= nets.len() as f32);
        Ok(first)
    }

    /// The mask on the case's own grid: probabilities resampled as the slices
    /// were fitted, thresholded at 0.5, and with `largest` only the largest
    /// connected component kept.
    fn mask_of(liver: &[f32], input: &CaseInput, largest: bool) -> Vec<u8> {
        let plane = input.fit.size * input.fit.size;
        let mut full: Vec<u8> = liver.chunks_exact(plane).flat_map(|p| unfit_bilinear(p, &input.fit)).map(|v| u8::from(v > 0.5)).collect();
        if largest {
            keep_largest(&mut full, [input.n, input.h, input.w], input.volume);
        }
        full
    }

    fn score(full: &[u8], input: &CaseInput, ds: &Dataset, loss_sum: f64) -> CaseScore {
        let geometry = if input.volume { CaseGeometry::Volume(input.spacing) } else { CaseGeometry::Slices((input.spacing[1], input.spacing[2])) };
        let voxel = if ds.unit == "mm" { input.spacing.iter().product::<f64>() / 1000.0 } else { 1.0 };
        let m = score_case_metrics(full, &input.masks, [input.n, input.h, input.w], geometry, voxel);
        CaseScore {
            case: input.id.clone(),
            slice_index: input.slice_index.clone(),
            per_slice: m.per_slice,
            confusion: m.confusion,
            hd95: m.hd95,
            volume_pred: m.volume_pred,
            volume_true: m.volume_true,
            loss_sum,
            intensity: IntensityHistogram::of(&input.images),
        }
    }

    fn score_case(model: &Loaded, input: &CaseInput, ds: &Dataset, p: &EvaluateParams, device: tch::Device) -> Result<CaseScore> {
        let probs = probabilities(&[model], input, ds.params.size, &fit::Inference::fp32(p.batch_size, device, model.post.mirror))?;
        let full = mask_of(&probs.liver, input, model.post.largest);
        write_prediction(ds, &model.name, input, &full)?;
        Ok(score(&full, input, ds, probs.loss_sum))
    }

    /// The case's mask on its original grid, as bits (ingest's layout).
    fn write_prediction(ds: &Dataset, model: &str, input: &CaseInput, full: &[u8]) -> Result<()> {
        let dir = ds.out.join("predictions").join(model);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let bits = NamedTensor::u8("mask_bits", vec![input.n, input.h, input.w.div_ceil(8)], pack_mask_rows(full, input.w));
        write_safetensors(&dir.join(format!("{}.safetensors", input.id)), &[bits], &ds.provenance)
    }

    /// Everything Table 1 says of one model on one dataset.
    struct ModelScores {
        cases: Vec<CaseScore>,
    }

    impl ModelScores {
        fn overall(&self) -> Confusion {
            let mut c = Confusion::default();
            self.cases.iter().for_each(|s| c.add(&s.confusion));
            c
        }

        fn slices(&self) -> usize {
            self.cases.iter().map(|c| c.per_slice.len()).sum()
        }

        /// Every case's inputs pooled.
        fn intensity(&self) -> IntensityHistogram {
            let mut h = IntensityHistogram::default();
            self.cases.iter().for_each(|c| h.add(&c.intensity));
            h
        }

        fn row(&self, model: &Loaded, p: &EvaluateParams) -> BTreeMap<&'static str, serde_json::Value> {
            let o = self.overall();
            let case_dice: Vec<f64> = self.cases.iter().map(|c| c.confusion.dice()).filter(|d| d.is_finite()).collect();
            let slice_dice: Vec<f64> = self.cases.iter().flat_map(|c| c.per_slice.iter().map(Confusion::dice)).collect();
            let hd: Vec<f64> = self.cases.iter().map(|c| c.hd95.value).collect();
            let (lo, hi) = if case_dice.len() >= MIN_CASES_FOR_CI { bootstrap_ci(&case_dice, p.bootstrap, p.seed) } else { (f64::NAN, f64::NAN) };
            let trained = model.manifest.as_ref().map(|m| &m.metrics);
            let got = |k: &str| trained.and_then(|m| m.get(&format!("{}{k}", model.metrics_prefix))).cloned().unwrap_or(serde_json::Value::Null);
            let mut row: BTreeMap<&'static str, serde_json::Value> = BTreeMap::new();
            row.insert("model", model.name.clone().into());
            row.insert("arch", model.card.spec.arch.name().into());
            row.insert("cases", self.cases.len().into());
            row.insert("slices", self.slices().into());
            row.insert("miou", jf(o.miou()));
            row.insert("pixel_accuracy", jf(o.pixel_accuracy()));
            row.insert("loss", jf(self.cases.iter().map(|c| c.loss_sum).sum::<f64>() / self.slices().max(1) as f64));
            row.insert("liver_iou", jf(o.liver_iou()));
            row.insert("dice_global", jf(o.dice()));
            row.insert("dice_per_slice", jf(nan_mean(&slice_dice)));
            row.insert("slices_both_empty", slice_dice.iter().filter(|d| d.is_nan()).count().into());
            row.insert("dice_per_case", jf(nan_mean(&case_dice)));
            row.insert("dice_per_case_ci_low", jf(lo));
            row.insert("dice_per_case_ci_high", jf(hi));
            row.insert("precision", jf(o.precision()));
            row.insert("recall", jf(o.recall()));
            row.insert("hd95_mean", jf(nan_mean(&hd)));
            row.insert("hd95_one_empty_cases", self.cases.iter().filter(|c| c.hd95.rule == Hd95Rule::OneEmpty).count().into());
            row.insert("intensity_distance", jf(intensity_distance(model, &self.intensity())));
            row.insert("parameters", model.card.parameters.into());
            row.insert("train_loss", got("train_loss"));
            row.insert("epochs_run", got("epochs_run"));
            row.insert("stop_reason", got("stop_reason"));
            row.insert("params_used", used_params(model).into());
            row.insert("postprocess", model.post.name().into());
            row
        }
    }

    /// The training params that matter for a comparison, as they ran.
    fn used_params(model: &Loaded) -> String {
        let Some(m) = &model.manifest else {
            return String::new();
        };
        let p = m.effective_params.as_ref().unwrap_or(&m.params);
        let pick: serde_json::Map<String, serde_json::Value> =
            ["lr", "batch_size", "optimizer", "weight_decay", "loss", "epochs"].iter().filter_map(|k| p.get(*k).map(|v| (k.to_string(), v.clone()))).collect();
        serde_json::Value::Object(pick).to_string()
    }

    /// Jensen–Shannon divergence of `h` from the model's training inputs
    /// (NaN for a card that predates the histogram).
    fn intensity_distance(model: &Loaded, h: &IntensityHistogram) -> f64 {
        model.card.input_histogram.as_ref().map_or(f64::NAN, |train| h.js_divergence(train))
    }

    /// Inputs whose grey levels lie far from a model's training data: the
    /// dataset's distance and the cases beyond the bar, named.
    fn warn_if_far(ds: &Dataset, model: &Loaded, scores: &ModelScores, summary: &mut Summary) {
        let d = intensity_distance(model, &scores.intensity());
        let far: Vec<String> = scores.cases.iter().filter(|c| intensity_distance(model, &c.intensity) > INTENSITY_SHIFT_WARN).map(|c| c.case.clone()).collect();
        if d > INTENSITY_SHIFT_WARN || !far.is_empty() {
            let named = if far.len() > 5 { format!("{}, ...", far[..5].join(", ")) } else { far.join(", ") };
            let message = format!(
                "{} ({}): the inputs' intensity histogram is {d:.3} from model {}'s training data (Jensen-Shannon divergence in bits; above {INTENSITY_SHIFT_WARN} warns); {} of {} cases are beyond it ({named}): another scanner or export mapping, so expect lower accuracy than on the training source",
                ds.label,
                ds.origin,
                model.name,
                far.len(),
                scores.cases.len()
            );
            liverseg_engine::stage::warn(summary, message);
        }
    }

    fn jf(v: f64) -> serde_json::Value {
        serde_json::Number::from_f64(v).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
    }

    /// Every model on every selected case of `ds`: tables, predictions and summary.
    fn evaluate_dataset(ctx: &StageContext, ds: &Dataset, models: &[Loaded], p: &EvaluateParams, device: tch::Device, summary: &mut Summary) -> Result<Vec<ModelScores>> {
        let unit = ds.intensity_unit();
        for m in models {
            m.check_fits(&ds.params, unit, &ds.label, p.force_unit)?;
        }
        let mut scores: Vec<ModelScores> = models.iter().map(|_| ModelScores { cases: Vec::new() }).collect();
        let bar = liverseg_engine::progress::bar(ds.selected.len() as u64, &format!("evaluate {}", ds.label), ctx.show_progress);
        for &g in &ds.selected {
            let input = case_input(ds, g)?;
            for (m, s) in models.iter().zip(scores.iter_mut()) {
                s.cases.push(score_case(m, &input, ds, p, device)?);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let rows: Vec<BTreeMap<&str, serde_json::Value>> = models.iter().zip(&scores).map(|(m, s)| s.row(m, p)).collect();
        // Fold members share their ensemble's card: one warning for the ensemble.
        models.iter().zip(&scores).filter(|(m, _)| m.metrics_prefix.is_empty()).for_each(|(m, s)| warn_if_far(ds, m, s, summary));
        for row in &rows {
            let name = row["model"].as_str().unwrap_or_default();
            for (k, v) in row {
                if !matches!(*k, "model" | "arch" | "params_used") {
                    summary.insert(format!("{}{name}.{k}", ds.prefix), v.clone());
                }
            }
            if ctx.show_progress {
                say(ds, row);
            }
        }
        write_table1(ctx, &ds.out, &rows)?;
        write_per_case(ctx, ds, models, &scores)?;
        write_per_slice(ctx, &ds.out, models, &scores)?;
        summary.insert(format!("{}cases", ds.prefix), ds.selected.len().into());
        summary.insert(format!("{}slices", ds.prefix), scores.first().map(ModelScores::slices).unwrap_or(0).into());
        summary.insert(format!("{}hd95_unit", ds.prefix), ds.unit.into());
        Ok(scores)
    }

    fn say(ds: &Dataset, row: &BTreeMap<&str, serde_json::Value>) {
        let g = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        let ci = if g("dice_per_case_ci_low").is_finite() { format!(" [{:.4}, {:.4}]", g("dice_per_case_ci_low"), g("dice_per_case_ci_high")) } else { String::new() };
        eprintln!(
            "{} {}: Dice per case {:.4}{ci} (n = {}), global {:.4}, mIoU {:.4}, liver IoU {:.4}, PA {:.4}, HD95 {:.2} {}, intensity distance {:.3}",
            ds.label,
            row["model"].as_str().unwrap_or(""),
            g("dice_per_case"),
            row["cases"],
            g("dice_global"),
            g("miou"),
            g("liver_iou"),
            g("pixel_accuracy"),
            g("hd95_mean"),
            ds.unit,
            g("intensity_distance")
        );
    }

    fn write_table1(ctx: &StageContext, out: &Path, rows: &[BTreeMap<&str, serde_json::Value>]) -> Result<()> {
        let f = |k: &str| -> Column { Column::new(k.into(), rows.iter().map(|r| r[k].as_f64().unwrap_or(f64::NAN)).collect::<Vec<f64>>()) };
        let s = |k: &str| -> Column { Column::new(k.into(), rows.iter().map(|r| r[k].as_str().map(str::to_owned)).collect::<Vec<Option<String>>>()) };
        let i = |k: &str| -> Column { Column::new(k.into(), rows.iter().map(|r| r[k].as_i64()).collect::<Vec<Option<i64>>>()) };
        let mut table1 = DataFrame::new_infer_height(vec![
            s("model"),
            s("arch"),
            i("cases"),
            i("slices"),
            f("miou"),
            f("pixel_accuracy"),
            f("loss"),
            f("liver_iou"),
            f("dice_global"),
            f("dice_per_slice"),
            i("slices_both_empty"),
            f("dice_per_case"),
            f("dice_per_case_ci_low"),
            f("dice_per_case_ci_high"),
            f("precision"),
            f("recall"),
            f("hd95_mean"),
            i("hd95_one_empty_cases"),
            f("intensity_distance"),
            i("parameters"),
            f("train_loss"),
            i("epochs_run"),
            s("stop_reason"),
            s("params_used"),
            s("postprocess"),
        ])?;
        write_parquet(&out.join("table1.parquet"), &mut table1, &ctx.provenance())
    }

    fn write_per_case(ctx: &StageContext, ds: &Dataset, models: &[Loaded], scores: &[ModelScores]) -> Result<()> {
        let rows: Vec<(&str, &CaseScore, f64)> = models.iter().zip(scores).flat_map(|(m, s)| s.cases.iter().map(move |c| (m.name.as_str(), c, intensity_distance(m, &c.intensity)))).collect();
        let vol = if ds.unit == "mm" { "ml" } else { "px" };
        let rule = |h: &Hd95| match h.rule {
            Hd95Rule::Measured => "measured",
            Hd95Rule::OneEmpty => "one_empty",
            Hd95Rule::BothEmpty => "both_empty",
        };
        let mut df = DataFrame::new_infer_height(vec![
            Column::new("model".into(), rows.iter().map(|r| r.0.to_owned()).collect::<Vec<_>>()),
            Column::new("case_id".into(), rows.iter().map(|r| r.1.case.clone()).collect::<Vec<_>>()),
            Column::new("slices".into(), rows.iter().map(|r| r.1.per_slice.len() as u64).collect::<Vec<_>>()),
            Column::new("dice".into(), rows.iter().map(|r| r.1.confusion.dice()).collect::<Vec<_>>()),
            Column::new("liver_iou".into(), rows.iter().map(|r| r.1.confusion.liver_iou()).collect::<Vec<_>>()),
            Column::new("precision".into(), rows.iter().map(|r| r.1.confusion.precision()).collect::<Vec<_>>()),
            Column::new("recall".into(), rows.iter().map(|r| r.1.confusion.recall()).collect::<Vec<_>>()),
            Column::new(format!("hd95_{}", ds.unit).into(), rows.iter().map(|r| r.1.hd95.value).collect::<Vec<_>>()),
            Column::new("hd95_rule".into(), rows.iter().map(|r| rule(&r.1.hd95)).collect::<Vec<_>>()),
            Column::new(format!("volume_pred_{vol}").into(), rows.iter().map(|r| r.1.volume_pred).collect::<Vec<_>>()),
            Column::new(format!("volume_true_{vol}").into(), rows.iter().map(|r| r.1.volume_true).collect::<Vec<_>>()),
            Column::new(format!("volume_diff_{vol}").into(), rows.iter().map(|r| r.1.volume_pred - r.1.volume_true).collect::<Vec<_>>()),
            Column::new("intensity_distance".into(), rows.iter().map(|r| r.2).collect::<Vec<_>>()),
        ])?;
        write_parquet(&ds.out.join("per_case.parquet"), &mut df, &ctx.provenance())
    }

    fn write_per_slice(ctx: &StageContext, out: &Path, models: &[Loaded], scores: &[ModelScores]) -> Result<()> {
        let rows: Vec<(&str, &CaseScore, usize)> =
            models.iter().zip(scores).flat_map(|(m, s)| s.cases.iter().flat_map(move |c| (0..c.per_slice.len()).map(move |k| (m.name.as_str(), c, k)))).collect();
        let conf = |r: &(&str, &CaseScore, usize)| r.1.per_slice[r.2];
        let mut df = DataFrame::new_infer_height(vec![
            Column::new("model".into(), rows.iter().map(|r| r.0.to_owned()).collect::<Vec<_>>()),
            Column::new("case_id".into(), rows.iter().map(|r| r.1.case.clone()).collect::<Vec<_>>()),
            Column::new("slice_index".into(), rows.iter().map(|r| r.1.slice_index.get(r.2).copied().unwrap_or(-1)).collect::<Vec<_>>()),
            Column::new("dice".into(), rows.iter().map(|r| conf(r).dice()).collect::<Vec<_>>()),
            Column::new("liver_iou".into(), rows.iter().map(|r| conf(r).liver_iou()).collect::<Vec<_>>()),
            Column::new("both_empty".into(), rows.iter().map(|r| conf(r).both_empty()).collect::<Vec<_>>()),
            Column::new("tp".into(), rows.iter().map(|r| conf(r).tp).collect::<Vec<_>>()),
            Column::new("fp".into(), rows.iter().map(|r| conf(r).fp).collect::<Vec<_>>()),
            Column::new("fn".into(), rows.iter().map(|r| conf(r).fn_).collect::<Vec<_>>()),
            Column::new("tn".into(), rows.iter().map(|r| conf(r).tn).collect::<Vec<_>>()),
        ])?;
        write_parquet(&out.join("per_slice.parquet"), &mut df, &ctx.provenance())
    }

    /// Each inference option's effect on the validation split: every model,
    /// and the ensemble of all of them (softmax averaged), plain, mirrored,
    /// with only the largest component kept, and both; each in fp32 and
    /// bf16, with bf16's masks compared to fp32's (options.parquet).
    /// Returns, per model measured, the fp32 settings with the highest
    /// validation Dice per case (ties go to the simpler).
    fn inference_options(ctx: &StageContext, ds: &Dataset, models: &[Loaded], p: &EvaluateParams, device: tch::Device) -> Result<BTreeMap<String, Post>> {
        // Cross-validated models trained on the validation patients: measured
        // there, they would not be held out.
        let models: Vec<&Loaded> = models.iter().filter(|m| m.card.folds == 0 && m.metrics_prefix.is_empty()).collect();
        if models.is_empty() {
            return Ok(BTreeMap::new());
        }
        let bf16_models = models.iter().map(|m| m.reloaded(tch::Kind::BFloat16, device)).collect::<Result<Vec<_>>>()?;
        let mut variants: Vec<(String, Vec<&Loaded>, Vec<&Loaded>)> = models.iter().zip(&bf16_models).map(|(m, b)| (m.name.clone(), vec![*m], vec![b])).collect();
        if models.len() > 1 {
            variants.push(("ensemble".into(), models.clone(), bf16_models.iter().collect()));
        }
        let mut scores: BTreeMap<OptionKey, (Vec<CaseScore>, Confusion)> = BTreeMap::new();
        let bar = liverseg_engine::progress::bar(ds.selected.len() as u64, "inference options (val)", ctx.show_progress);
        for &g in &ds.selected {
            let input = case_input(ds, g)?;
            for (v, (_, fp32_nets, bf16_nets)) in variants.iter().enumerate() {
                for mirror in [false, true] {
                    let fp32 = probabilities(fp32_nets, &input, ds.params.size, &fit::Inference::fp32(p.batch_size, device, mirror))?;
                    let bf16_how = fit::Inference { kind: tch::Kind::BFloat16, channels_last: true, ..fit::Inference::fp32(p.batch_size, device, mirror) };
                    let bf16 = probabilities(bf16_nets, &input, ds.params.size, &bf16_how)?;
                    for largest in [false, true] {
                        let reference = mask_of(&fp32.liver, &input, largest);
                        for (bf, probs) in [(false, &fp32), (true, &bf16)] {
                            let full = if bf { mask_of(&probs.liver, &input, largest) } else { reference.clone() };
                            let entry = scores.entry(OptionKey { variant: v, bf16: bf, mirror, largest }).or_default();
                            entry.0.push(score(&full, &input, ds, 0.0));
                            entry.1.add(&Confusion::from_masks(&full, &reference));
                        }
                    }
                }
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let names: Vec<String> = variants.iter().map(|v| v.0.clone()).collect();
        let chosen = best_settings(&names[..models.len()], &scores);
        write_options(ctx, &names, scores)?;
        Ok(chosen)
    }

    /// Of each model's fp32 rows, in the order none, largest, mirror, both:
    /// the first with the highest Dice per case.
    fn best_settings(names: &[String], scores: &BTreeMap<OptionKey, (Vec<CaseScore>, Confusion)>) -> BTreeMap<String, Post> {
        let mut best: BTreeMap<String, (f64, Post)> = BTreeMap::new();
        for (k, (cases, _)) in scores.iter().filter(|(k, _)| !k.bf16 && k.variant < names.len()) {
            let dice = nan_mean(&cases.iter().map(|c| c.confusion.dice()).collect::<Vec<_>>());
            let entry = best.entry(names[k.variant].clone()).or_insert((f64::NEG_INFINITY, Post::default()));
            if dice > entry.0 {
                *entry = (dice, Post { mirror: k.mirror, largest: k.largest });
            }
        }
        best.into_iter().map(|(name, (_, post))| (name, post)).collect()
    }

    /// The validation patients as exported, then under each simulated other
    /// export, scored with Table 1's settings (mirroring, largest component):
    /// shift.parquet, and per model `val.M.dice_per_case` beside
    /// `val_shift.M.dice_per_case` (the mean over the exports) and its worst.
    fn shifted_validation(ctx: &StageContext, ds: &Dataset, models: &[Loaded], p: &EvaluateParams, device: tch::Device, summary: &mut Summary) -> Result<()> {
        // Cross-validated models trained on the validation patients.
        let models: Vec<&Loaded> = models.iter().filter(|m| m.card.folds == 0 && m.metrics_prefix.is_empty()).collect();
        // 8-bit exports are taken as the MSD export's window, HU clipped to [0, 255].
        let source = if ds.intensity_unit() == "HU" { ds.params.window().map(|(lo, hi)| (lo as f64, hi as f64))? } else { (0.0, 255.0) };
        let mut exports = vec![("none", Vec::new())];
        exports.extend(liverseg_imaging::augment::simulated_exports(source));
        let size = ds.params.size;
        let mut scores: Vec<Vec<ModelScores>> = models.iter().map(|_| exports.iter().map(|_| ModelScores { cases: Vec::new() }).collect()).collect();
        let bar = liverseg_engine::progress::bar(ds.selected.len() as u64, "simulated exports (val)", ctx.show_progress);
        for &g in &ds.selected {
            let input = case_input(ds, g)?;
            for (e, (_, ops)) in exports.iter().enumerate() {
                let mut shifted = input.clone();
                shifted.images = input.images.chunks_exact(size * size).flat_map(|slice| liverseg_imaging::augment::intensity_u8(ops, slice, size)).collect();
                for (m, model) in models.iter().enumerate() {
                    let probs = probabilities(&[model], &shifted, size, &fit::Inference::fp32(p.batch_size, device, model.post.mirror))?;
                    scores[m][e].cases.push(score(&mask_of(&probs.liver, &shifted, model.post.largest), &shifted, ds, probs.loss_sum));
                }
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let dice = |s: &ModelScores| nan_mean(&s.cases.iter().map(|c| c.confusion.dice()).collect::<Vec<_>>());
        for (model, rows) in models.iter().zip(&scores) {
            let shifted: Vec<(f64, &str)> = rows.iter().zip(&exports).skip(1).map(|(s, e)| (dice(s), e.0)).collect();
            let worst = shifted.iter().copied().fold((f64::INFINITY, ""), |w, d| if d.0 < w.0 { d } else { w });
            summary.insert(format!("val.{}.dice_per_case", model.name), jf(dice(&rows[0])));
            summary.insert(format!("val_shift.{}.dice_per_case", model.name), jf(nan_mean(&shifted.iter().map(|d| d.0).collect::<Vec<_>>())));
            summary.insert(format!("val_shift.{}.worst_export", model.name), worst.1.into());
            if ctx.show_progress {
                eprintln!(
                    "val {}: Dice per case {:.4} as exported, {:.4} under simulated other exports (worst {} {:.4})",
                    model.name,
                    dice(&rows[0]),
                    nan_mean(&shifted.iter().map(|d| d.0).collect::<Vec<_>>()),
                    worst.1,
                    worst.0
                );
            }
        }
        let rows: Vec<(&Loaded, &str, &ModelScores)> = models.iter().zip(&scores).flat_map(|(m, r)| r.iter().zip(&exports).map(move |(s, e)| (*m, e.0, s))).collect();
        let mut df = DataFrame::new_infer_height(vec![
            Column::new("model".into(), rows.iter().map(|r| r.0.name.clone()).collect::<Vec<_>>()),
            Column::new("export".into(), rows.iter().map(|r| r.1).collect::<Vec<_>>()),
            Column::new("cases".into(), rows.iter().map(|r| r.2.cases.len() as u64).collect::<Vec<_>>()),
            Column::new("dice_per_case".into(), rows.iter().map(|r| dice(r.2)).collect::<Vec<_>>()),
            Column::new("dice_global".into(), rows.iter().map(|r| r.2.overall().dice()).collect::<Vec<_>>()),
            Column::new("pixel_accuracy".into(), rows.iter().map(|r| r.2.overall().pixel_accuracy()).collect::<Vec<_>>()),
            Column::new("intensity_distance".into(), rows.iter().map(|r| intensity_distance(r.0, &r.2.intensity())).collect::<Vec<_>>()),
        ])?;
        write_parquet(&ctx.out("shift.parquet"), &mut df, &ctx.provenance())
    }

    /// One row of options.parquet.
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    struct OptionKey {
        variant: usize,
        bf16: bool,
        mirror: bool,
        largest: bool,
    }

    fn write_options(ctx: &StageContext, names: &[String], scores: BTreeMap<OptionKey, (Vec<CaseScore>, Confusion)>) -> Result<()> {
        let rows: Vec<(OptionKey, ModelScores, Confusion)> = scores.into_iter().map(|(k, (cases, agree))| (k, ModelScores { cases }, agree)).collect();
        let dice = |s: &ModelScores| nan_mean(&s.cases.iter().map(|c| c.confusion.dice()).collect::<Vec<_>>());
        let hd = |s: &ModelScores| nan_mean(&s.cases.iter().map(|c| c.hd95.value).collect::<Vec<_>>());
        let mut df = DataFrame::new_infer_height(vec![
            Column::new("model".into(), rows.iter().map(|r| names[r.0.variant].clone()).collect::<Vec<_>>()),
            Column::new("precision".into(), rows.iter().map(|r| if r.0.bf16 { "bf16" } else { "fp32" }).collect::<Vec<_>>()),
            Column::new("mirror".into(), rows.iter().map(|r| r.0.mirror).collect::<Vec<_>>()),
            Column::new("largest_component".into(), rows.iter().map(|r| r.0.largest).collect::<Vec<_>>()),
            Column::new("cases".into(), rows.iter().map(|r| r.1.cases.len() as u64).collect::<Vec<_>>()),
            Column::new("dice_per_case".into(), rows.iter().map(|r| dice(&r.1)).collect::<Vec<_>>()),
            Column::new("dice_global".into(), rows.iter().map(|r| r.1.overall().dice()).collect::<Vec<_>>()),
            Column::new("hd95_mean".into(), rows.iter().map(|r| hd(&r.1)).collect::<Vec<_>>()),
            Column::new("dice_vs_fp32".into(), rows.iter().map(|r| r.2.dice()).collect::<Vec<_>>()),
        ])?;
        write_parquet(&ctx.out("options.parquet"), &mut df, &ctx.provenance())
    }

    /// The report's qualitative figure: for each model its best, median and
    /// worst case by Dice, the slice with the most liver of each, on the
    /// model's grid: image, truth, prediction and a liver Grad-CAM map.
    fn examples(ctx: &StageContext, ds: &Dataset, models: &[Loaded], scores: &[ModelScores], p: &EvaluateParams, device: tch::Device) -> Result<()> {
        let size = ds.params.size;
        let plane = size * size;
        let mut rows: Vec<(String, &str, String, i64, f64)> = Vec::new();
        let examples = ctx.out("examples");
        std::fs::create_dir_all(&examples).with_context(|| format!("cannot create {}", examples.display()))?;
        for (model, s) in models.iter().zip(scores) {
            let mut t: [Vec<u8>; 4] = Default::default();
            for (label, case, dice) in picks(s) {
                let g = ds.selected.iter().copied().find(|&g| ds.cases.groups[g].0 == case).ok_or_else(|| anyhow!("case {case} vanished"))?;
                let input = case_input(ds, g)?;
                // Most liver; the first such slice on ties.
                let liver = |k: usize| input.grid_masks[k * plane..(k + 1) * plane].iter().map(|&v| v as u64).sum::<u64>();
                let k = (0..input.n).fold(0, |best, k| if liver(k) > liver(best) { k } else { best });
                let image = &input.images[k * plane..(k + 1) * plane];
                t[0].extend_from_slice(image);
                t[1].extend_from_slice(&input.grid_masks[k * plane..(k + 1) * plane]);
                t[2].extend(model.predict(image, 1, size, p.batch_size, device)?);
                // An ensemble's map is its first fold's.
                t[3].extend(fit::grad_cam_u8(&model.nets[0], image, 1, size, device, &model.card.scaling)?);
                rows.push((model.name.clone(), label, case.to_owned(), input.slice_index.get(k).copied().unwrap_or(-1), dice));
            }
            let n = t[0].len() / plane;
            let named: Vec<NamedTensor> = ["image", "truth", "prediction", "gradcam"].iter().zip(t).map(|(name, data)| NamedTensor::u8(name, vec![n, size, size], data)).collect();
            write_safetensors(&ctx.out(&format!("examples/{}.safetensors", model.name)), &named, &ctx.provenance())?;
        }
        let mut df = DataFrame::new_infer_height(vec![
            Column::new("model".into(), rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()),
            Column::new("label".into(), rows.iter().map(|r| r.1.to_owned()).collect::<Vec<_>>()),
            Column::new("case_id".into(), rows.iter().map(|r| r.2.clone()).collect::<Vec<_>>()),
            Column::new("slice_index".into(), rows.iter().map(|r| r.3).collect::<Vec<_>>()),
            Column::new("dice".into(), rows.iter().map(|r| r.4).collect::<Vec<_>>()),
        ])?;
        write_parquet(&ctx.out("examples.parquet"), &mut df, &ctx.provenance())
    }

    /// The best, median and worst case by Dice: (label, case, Dice). With
    /// fewer than three cases, a case is shown once, under its first label.
    fn picks(s: &ModelScores) -> Vec<(&'static str, &str, f64)> {
        let mut ranked: Vec<(f64, &str)> = s.cases.iter().map(|c| (c.confusion.dice(), c.case.as_str())).filter(|c| c.0.is_finite()).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (label, r) in [("best", 0), ("median", ranked.len() / 2), ("worst", ranked.len().saturating_sub(1))] {
            if r >= ranked.len() || seen.contains(&r) {
                continue;
            }
            seen.push(r);
            out.push((label, ranked[r].1, ranked[r].0));
        }
        out
    }

    /// Every model of `dirs`; a cross-validated one as its ensemble, followed
    /// by each fold on its own (`train.fold0`, …).
    fn load_models(dirs: &[(String, PathBuf)], device: tch::Device) -> Result<Vec<Loaded>> {
        let mut models = Vec::new();
        for (name, dir) in dirs {
            let m = load_model(name, dir, device)?;
            let folds = m.card.folds;
            models.push(m);
            for k in 0..folds {
                models.push(load_fold(&format!("{name}.fold{k}"), dir, k, device)?);
            }
        }
        Ok(models)
    }

    /// Every upstream that holds a trained model, and the extra models named by params.
    fn model_dirs(ctx: &StageContext, p: &EvaluateParams) -> Vec<(String, PathBuf)> {
        let has_model = |a: &&liverseg_engine::store::Artifact| a.manifest.outputs.contains_key("model.safetensors") || a.manifest.outputs.contains_key("folds/fold0/model.safetensors");
        let mut dirs: Vec<(String, PathBuf)> = ctx.upstream.iter().filter(|(_, a)| has_model(a)).map(|(n, a)| (n.clone(), a.dir.clone())).collect();
        for m in &p.models {
            let dir = ctx.project_root.join(m);
            let name = dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| m.clone());
            dirs.push((name, dir));
        }
        dirs
    }

    /// The cases of split part `which` (None: every case).
    fn wanted_cases(ctx: &StageContext, norm: &NormalisedSet, which: EvalSplit) -> Result<Option<BTreeSet<String>>> {
        let part = match which {
            EvalSplit::All => return Ok(None),
            EvalSplit::Test => Part::Test,
            EvalSplit::Val => Part::Val,
        };
        let split = SplitAssignment::read(ctx.upstream("split").context("evaluate.split names a split part, so evaluate needs the split stage upstream")?)?;
        split.check_covers(norm)?;
        Ok(Some(split.rows(part).into_iter().map(|i| split.case_id[i].clone()).collect()))
    }

    pub fn evaluate(ctx: &StageContext) -> Result<Summary> {
        let p: EvaluateParams = ctx.params.typed()?;
        let device = device_for(p.device)?;
        // Each model is loaded once and serves every dataset and the examples.
        let models = load_models(&model_dirs(ctx, &p), device)?;
        if models.is_empty() {
            bail!("evaluate: no upstream stage holds a trained model");
        }
        if let (EvalSplit::Val, Some(m)) = (p.split, models.iter().find(|m| m.card.folds > 0)) {
            bail!("evaluate.split val: model {} is cross-validated ({} folds of train+validation), so the validation patients are not held out from it; evaluate it on test", m.name, m.card.folds);
        }
        let mut summary = Summary::new();
        let norm = NormalisedSet::open(ctx.upstream("normalise")?)?;
        let mut models = models;
        models.iter_mut().for_each(|m| m.post = Post { mirror: p.mirror, largest: p.largest_component });
        // The options on validation first: Table 1 may take its settings from them.
        if p.options && ctx.upstream.contains_key("split") {
            let val = wanted_cases(ctx, &norm, EvalSplit::Val)?;
            let ds = Dataset::new(ctx, "val".into(), ctx.upstream("ingest")?, &norm, val, ctx.out_dir.to_path_buf(), "options.".into())?;
            let chosen = inference_options(ctx, &ds, &models, &p, device)?;
            if p.postprocess == PostProcess::Validation {
                models.iter_mut().for_each(|m| m.post = chosen.get(&m.name).copied().unwrap_or(m.post));
            }
        }
        let wanted = wanted_cases(ctx, &norm, p.split)?;
        let ds = Dataset::new(ctx, p.split.name().to_owned(), ctx.upstream("ingest")?, &norm, wanted, ctx.out_dir.to_path_buf(), String::new())?;
        let scores = evaluate_dataset(ctx, &ds, &models, &p, device, &mut summary)?;
        examples(ctx, &ds, &models, &scores, &p, device)?;
        summary.insert("split".into(), p.split.name().into());
        // Out of the key when `threads` is 0 (the allocation decides): recorded here.
        summary.insert("cpu_threads".into(), tch::get_num_threads().into());
        if p.shifts && ctx.upstream.contains_key("split") {
            let val = wanted_cases(ctx, &norm, EvalSplit::Val)?;
            let ds = Dataset::new(ctx, "val".into(), ctx.upstream("ingest")?, &norm, val, ctx.out_dir.to_path_buf(), "shift.".into())?;
            shifted_validation(ctx, &ds, &models, &p, device, &mut summary)?;
        }
        summary.insert("min_cases_for_ci".into(), MIN_CASES_FOR_CI.into());

        // Extra datasets (pipeline.yaml `external:`): every case, same models, same metrics.
        let mut external = Vec::new();
        let ingests: BTreeMap<&str, &liverseg_engine::store::Artifact> = ctx.instances_of("ingest").into_iter().collect();
        for (name, a) in ctx.instances_of("normalise") {
            let ingest = ingests.get(name).with_context(|| format!("extra dataset {name}: evaluate needs ingest.{name} upstream too"))?;
            let out = ctx.out(&format!("external/{name}"));
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let ds = Dataset::new(ctx, format!("external {name}"), ingest, &NormalisedSet::open(a)?, None, out, format!("external.{name}."))?;
            evaluate_dataset(ctx, &ds, &models, &p, device, &mut summary)?;
            external.push(name.to_owned());
        }
        summary.insert("external".into(), external.into());
        Ok(summary)
    }
}
