//! evaluate: every trained model on the test split, with per-slice and
//! per-case (per-patient) tables, as nnU-Net reports them. Runs in the
//! `liverseg-torch` worker.
//!
//! Rules: Dice and IoU are 1 when prediction and truth are both empty; HD95
//! pools each case's 2D surface distances (mm where the spacing is known,
//! otherwise pixels) and is undefined (null) when exactly one is empty; the
//! 95% CI of per-case Dice is a percentile bootstrap over cases.
//!
//! Extra datasets (`external:` in pipeline.yaml) arrive as upstream dataset
//! instances `normalise.NAME`, preprocessed with the pipeline's normalise
//! params; every slice of each is evaluated with the same metrics, and a
//! model whose training window differs from the data's is refused.
//!
//! inputs: normalise, split (optional), every upstream with a trained model,
//!         normalise.NAME (extra datasets)
//! outputs: table1.parquet, per_case.parquet, per_slice.parquet, predictions/<model>.safetensors,
//!   examples.parquet + gradcam/<model>.safetensors (best/median/worst case, liver Grad-CAM),
//!   external/NAME/{table1,per_case,per_slice}.parquet

use anyhow::Result;
use liverseg_engine::params::Params;
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_recipe::{choices, Device};

pub const VERSION: u32 = 2;

choices!(
    /// Which slices evaluate measures.
    EvalSplit { Test = "test", Val = "val", All = "all" }
);

liverseg_engine::params! {
    pub struct EvaluateParams {
        split: EvalSplit = choice "test", "which split to evaluate (test for reporting; all = every slice, for external data without a split upstream)";
        models: Vec<String> = strs "[]", "extra trained models to evaluate (artifact folders), besides upstream train/baseline";
        models_blake3: Vec<String> = strs "[]", "content hashes of `models` (their model.safetensors), so the key changes with the weights";
        bootstrap: usize = int "2000", "bootstrap resamples for the per-case Dice CI";
        seed: u64 = int "0", "bootstrap seed";
        batch_size: usize = int "16", "inference batch size";
        device: Device = choice "auto", "auto = CUDA when available";
    }
}

pub static INFO: StageInfo = StageInfo {
    name: "evaluate",
    version: VERSION,
    about: "test-split metrics per slice, per case and per model",
    inputs: &["normalise"],
    optional_inputs: &["split", "train", "baseline"],
    collects: &["normalise"],
    per_dataset: false,
    outputs: &["table1.parquet", "per_case.parquet", "per_slice.parquet", "predictions/", "examples.parquet", "gradcam/", "external/?"],
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
            anyhow::bail!("batch_size must be ≥ 1");
        }
        Ok(())
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
    //! Predict the held-out split with every upstream model and measure it
    //! per slice, per case and overall.

    use super::{EvalSplit, EvaluateParams};
    use crate::normalise::NormalisedSet;
    use crate::split::{Part, SplitAssignment};
    use crate::train::ModelCard;
    use anyhow::{anyhow, bail, Result};
    use liverseg_engine::stage::{StageContext, Summary};
    use liverseg_engine::tables::write_parquet;
    use liverseg_engine::tensors::{write_safetensors, NamedTensor};
    use liverseg_metrics::{bootstrap_ci, percentile, surface_distances, Confusion};
    use liverseg_model::{device_for, fit, weights, ModelSpec, SegmentationModel};
    use polars::prelude::{Column, DataFrame};
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use tch::nn;

    pub struct ModelResult {
        pub name: String,
        pub card: ModelCard,
        pub loss: f64,
        pub overall: Confusion,
        pub per_slice: Vec<Confusion>,
        pub predictions: Vec<u8>,
    }

    /// A trained model, loaded once: its card and network.
    pub struct Loaded {
        pub name: String,
        pub card: ModelCard,
        pub net: SegmentationModel,
        /// Owns the weights `net` uses.
        _vs: nn::VarStore,
    }

    /// Load the trained model in `dir` (model.json and model.safetensors).
    pub fn load_model(name: &str, dir: &Path, device: tch::Device) -> Result<Loaded> {
        let card = ModelCard::read(dir)?;
        let mut vs = nn::VarStore::new(device);
        let net = SegmentationModel::new(&vs.root(), &ModelSpec::from(&card.spec))?;
        weights::load(&mut vs, &dir.join("model.safetensors"), true)?;
        Ok(Loaded { name: name.to_owned(), card, net, _vs: vs })
    }

    impl Loaded {
        /// Predict `images` ([n, size, size] u8) at the model's size; returns
        /// the masks and the mean cross-entropy against `masks`.
        pub fn predict(&self, images: &[u8], masks: Option<&[u8]>, n: usize, size: usize, batch: usize, device: tch::Device) -> Result<(Vec<u8>, f64)> {
            if self.card.size as usize != size {
                bail!("model {} was trained at {}×{}, data is {size}×{size}", self.name, self.card.size, self.card.size);
            }
            fit::predict_u8(&self.net, images, masks, n, size, batch, device)
        }
    }

    fn jf(v: f64) -> serde_json::Value {
        serde_json::Number::from_f64(v).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
    }

    /// Slices to evaluate, with what per-case and HD95 need.
    struct EvalSet {
        images: Vec<u8>,
        masks: Vec<u8>,
        /// Case id and normalise row of each slice.
        cases: Vec<String>,
        rows: Vec<usize>,
        /// mm per pixel at this resolution, where the source spacing is known.
        mm: Vec<Option<f64>>,
        size: usize,
        /// The normalise params the slices went through (window, ...).
        window: Vec<f64>,
        minmax_8bit: bool,
    }

    impl EvalSet {
        fn len(&self) -> usize {
            self.rows.len()
        }

        /// The slices of `norm` in split `which` (`all`: every slice).
        fn new(norm: &NormalisedSet, split: Option<&SplitAssignment>, which: EvalSplit) -> Result<EvalSet> {
            let rows: Vec<usize> = match (which, split) {
                (EvalSplit::All, _) => (0..norm.n).collect(),
                (EvalSplit::Test, Some(s)) => s.rows(Part::Test),
                (EvalSplit::Val, Some(s)) => s.rows(Part::Val),
                (_, None) => Vec::new(),
            };
            if rows.is_empty() {
                bail!("{}@{}: the {which} split is empty", norm.stage, norm.key);
            }
            let size = norm.size;
            let (images, masks) = norm.select(&rows);
            let mm = rows.iter().map(|&i| (norm.spacing_row_mm[i].is_finite() && norm.src_rows[i] > 0).then(|| norm.spacing_row_mm[i] * norm.src_rows[i] as f64 / size as f64)).collect();
            Ok(EvalSet { images, masks, cases: rows.iter().map(|&i| norm.case_id[i].clone()).collect(), mm, rows, size, window: norm.params.window.clone(), minmax_8bit: norm.params.minmax_8bit })
        }
    }

    /// One model's measurements on one set.
    struct Measured {
        row: BTreeMap<&'static str, serde_json::Value>,
        /// (case, confusion, HD95, slices), cases sorted.
        per_case: Vec<(String, Confusion, Option<f64>, u64)>,
    }

    fn per_case(set: &EvalSet, r: &ModelResult) -> Vec<(String, Confusion, Option<f64>, u64)> {
        let (size, px) = (set.size, set.size * set.size);
        let mut by_case: BTreeMap<&str, (Confusion, Vec<f64>, bool, u64)> = BTreeMap::new();
        for k in 0..set.len() {
            let e = by_case.entry(set.cases[k].as_str()).or_insert((Confusion::default(), Vec::new(), true, 0));
            e.0.add(&r.per_slice[k]);
            e.3 += 1;
            let sp = set.mm[k].unwrap_or(1.0);
            match surface_distances(&r.predictions[k * px..(k + 1) * px], &set.masks[k * px..(k + 1) * px], size, size, (sp, sp)) {
                Some(d) => e.1.extend(d),
                None => e.2 = false,
            }
        }
        by_case
            .into_iter()
            .map(|(c, (conf, dists, defined, slices))| (c.to_owned(), conf, defined.then(|| if dists.is_empty() { 0.0 } else { percentile(&dists, 95.0) }), slices))
            .collect()
    }

    fn measure(set: &EvalSet, r: &ModelResult, bootstrap: usize, seed: u64) -> Measured {
        let per_case = per_case(set, r);
        let case_dice: Vec<f64> = per_case.iter().map(|c| c.1.dice()).collect();
        let case_hd: Vec<f64> = per_case.iter().filter_map(|c| c.2).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (lo, hi) = bootstrap_ci(&case_dice, bootstrap, seed);
        let slice_dice: Vec<f64> = r.per_slice.iter().map(Confusion::dice).collect();
        let o = &r.overall;
        let mut row: BTreeMap<&'static str, serde_json::Value> = BTreeMap::new();
        row.insert("model", r.name.clone().into());
        row.insert("arch", r.card.spec.arch.name().into());
        row.insert("miou", jf(o.miou()));
        row.insert("pixel_accuracy", jf(o.pixel_accuracy()));
        row.insert("loss", jf(r.loss));
        row.insert("liver_iou", jf(o.liver_iou()));
        row.insert("dice_global", jf(o.dice()));
        row.insert("dice_per_slice", jf(mean(&slice_dice)));
        row.insert("dice_per_case", jf(mean(&case_dice)));
        row.insert("dice_per_case_ci_low", jf(lo));
        row.insert("dice_per_case_ci_high", jf(hi));
        row.insert("precision", jf(o.precision()));
        row.insert("recall", jf(o.recall()));
        row.insert("hd95_mean", jf(if case_hd.is_empty() { f64::NAN } else { mean(&case_hd) }));
        row.insert("parameters", r.card.parameters.into());
        Measured { row, per_case }
    }

    /// Predict `set` with `model` after checking that the slices went through
    /// the model's own preprocessing.
    fn predict_set(set: &EvalSet, model: &Loaded, label: &str, p: &EvaluateParams, device: tch::Device) -> Result<ModelResult> {
        let (name, card) = (&model.name, &model.card);
        if set.window != card.window || set.minmax_8bit != card.minmax_8bit {
            bail!("{label}: model {name} was trained with window {:?} (min-max {}), but these slices were normalised with window {:?} (min-max {})", card.window, card.minmax_8bit, set.window, set.minmax_8bit);
        }
        let px = set.size * set.size;
        let (pred, loss) = model.predict(&set.images, Some(&set.masks), set.len(), set.size, p.batch_size, device)?;
        let per_slice: Vec<Confusion> = (0..set.len()).map(|k| Confusion::from_masks(&pred[k * px..(k + 1) * px], &set.masks[k * px..(k + 1) * px])).collect();
        let mut overall = Confusion::default();
        per_slice.iter().for_each(|c| overall.add(c));
        Ok(ModelResult { name: name.clone(), card: card.clone(), loss, overall, per_slice, predictions: pred })
    }

    fn say(set: &EvalSet, label: &str, name: &str, m: &Measured, unit: &str) {
        let g = |k: &str| m.row[k].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "{label} {name}: Dice per case {:.4} [{:.4}, {:.4}], global {:.4}, mIoU {:.4}, liver IoU {:.4}, PA {:.4}, HD95 {:.2} {unit} ({} cases, {} slices)",
            g("dice_per_case"), g("dice_per_case_ci_low"), g("dice_per_case_ci_high"), g("dice_global"), g("miou"), g("liver_iou"), g("pixel_accuracy"), g("hd95_mean"), m.per_case.len(), set.len()
        );
    }

    /// Every model on `set`: table1, per_case and per_slice Parquet and the
    /// predictions under `out` (the artifact folder, or external/NAME in it).
    fn evaluate_models(ctx: &StageContext, set: &EvalSet, models: &[Loaded], out: &Path, label: &str, summary_prefix: &str, summary: &mut Summary) -> Result<Vec<(ModelResult, Measured)>> {
        let p: EvaluateParams = ctx.params.typed()?;
        let device = device_for(p.device)?;
        let unit = if set.mm.iter().all(Option::is_some) { "mm" } else { "px" };
        let mut done = Vec::new();
        for model in models {
            let r = predict_set(set, model, label, &p, device)?;
            let m = measure(set, &r, p.bootstrap, p.seed);
            for (k, v) in &m.row {
                if *k != "model" && *k != "arch" {
                    summary.insert(format!("{summary_prefix}{}.{k}", model.name), v.clone());
                }
            }
            if ctx.show_progress {
                say(set, label, &model.name, &m, unit);
            }
            done.push((r, m));
        }
        write_tables(ctx, set, &done, out, unit)?;
        summary.insert(format!("{summary_prefix}cases"), done.first().map(|d| d.1.per_case.len()).unwrap_or(0).into());
        summary.insert(format!("{summary_prefix}slices"), set.len().into());
        summary.insert(format!("{summary_prefix}hd95_unit"), unit.into());
        Ok(done)
    }

    fn write_tables(ctx: &StageContext, set: &EvalSet, done: &[(ModelResult, Measured)], out: &Path, unit: &str) -> Result<()> {
        std::fs::create_dir_all(out.join("predictions"))?;
        for (r, _) in done {
            write_safetensors(&out.join(format!("predictions/{}.safetensors", r.name)), &[NamedTensor::u8("predictions", vec![set.len(), set.size, set.size], r.predictions.clone())], &ctx.provenance())?;
        }
        write_table1(ctx, done, out)?;
        let pc: Vec<(&str, &(String, Confusion, Option<f64>, u64))> = done.iter().flat_map(|(r, m)| m.per_case.iter().map(move |c| (r.name.as_str(), c))).collect();
        let mut per_case = DataFrame::new_infer_height(vec![
            Column::new("model".into(), pc.iter().map(|r| r.0.to_owned()).collect::<Vec<_>>()),
            Column::new("case_id".into(), pc.iter().map(|r| r.1 .0.clone()).collect::<Vec<_>>()),
            Column::new("slices".into(), pc.iter().map(|r| r.1 .3).collect::<Vec<_>>()),
            Column::new("dice".into(), pc.iter().map(|r| r.1 .1.dice()).collect::<Vec<_>>()),
            Column::new("liver_iou".into(), pc.iter().map(|r| r.1 .1.liver_iou()).collect::<Vec<_>>()),
            Column::new("precision".into(), pc.iter().map(|r| r.1 .1.precision()).collect::<Vec<_>>()),
            Column::new("recall".into(), pc.iter().map(|r| r.1 .1.recall()).collect::<Vec<_>>()),
            Column::new(format!("hd95_{unit}").into(), pc.iter().map(|r| r.1 .2).collect::<Vec<Option<f64>>>()),
        ])?;
        write_parquet(&out.join("per_case.parquet"), &mut per_case, &ctx.provenance())?;
        let ps: Vec<(&str, usize, &Confusion)> = done.iter().flat_map(|(r, _)| r.per_slice.iter().enumerate().map(move |(k, c)| (r.name.as_str(), k, c))).collect();
        let mut per_slice = DataFrame::new_infer_height(vec![
            Column::new("model".into(), ps.iter().map(|r| r.0.to_owned()).collect::<Vec<_>>()),
            Column::new("idx".into(), ps.iter().map(|r| set.rows[r.1] as u64).collect::<Vec<_>>()),
            Column::new("case_id".into(), ps.iter().map(|r| set.cases[r.1].clone()).collect::<Vec<_>>()),
            Column::new("dice".into(), ps.iter().map(|r| r.2.dice()).collect::<Vec<_>>()),
            Column::new("liver_iou".into(), ps.iter().map(|r| r.2.liver_iou()).collect::<Vec<_>>()),
            Column::new("tp".into(), ps.iter().map(|r| r.2.tp).collect::<Vec<_>>()),
            Column::new("fp".into(), ps.iter().map(|r| r.2.fp).collect::<Vec<_>>()),
            Column::new("fn".into(), ps.iter().map(|r| r.2.fn_).collect::<Vec<_>>()),
        ])?;
        write_parquet(&out.join("per_slice.parquet"), &mut per_slice, &ctx.provenance())
    }

    fn write_table1(ctx: &StageContext, done: &[(ModelResult, Measured)], out: &Path) -> Result<()> {
        let t1: Vec<&BTreeMap<&str, serde_json::Value>> = done.iter().map(|(_, m)| &m.row).collect();
        let f = |k: &str| -> Column { Column::new(k.into(), t1.iter().map(|r| r[k].as_f64().unwrap_or(f64::NAN)).collect::<Vec<f64>>()) };
        let s = |k: &str| -> Column { Column::new(k.into(), t1.iter().map(|r| r[k].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>()) };
        let mut table1 = DataFrame::new_infer_height(vec![
            s("model"), s("arch"),
            f("miou"), f("pixel_accuracy"), f("loss"), f("liver_iou"), f("dice_global"), f("dice_per_slice"), f("dice_per_case"),
            f("dice_per_case_ci_low"), f("dice_per_case_ci_high"), f("precision"), f("recall"), f("hd95_mean"),
            Column::new("parameters".into(), t1.iter().map(|r| r["parameters"].as_i64().unwrap_or(0)).collect::<Vec<_>>()),
        ])?;
        write_parquet(&out.join("table1.parquet"), &mut table1, &ctx.provenance())
    }

    /// The report's qualitative figure: for each model its best, median and worst
    /// case by Dice, the slice with the most liver of each, and a liver Grad-CAM
    /// map of that slice (examples.parquet, gradcam/<model>.safetensors).
    fn examples(ctx: &StageContext, set: &EvalSet, models: &[Loaded], done: &[(ModelResult, Measured)], device: tch::Device) -> Result<()> {
        let (size, px) = (set.size, set.size * set.size);
        let mut rows: Vec<(String, &str, String, f64, usize, usize)> = Vec::new();
        std::fs::create_dir_all(ctx.out("gradcam"))?;
        for (model, (_, m)) in models.iter().zip(done) {
            let mut images = Vec::new();
            for (label, case, dice) in picks(m) {
                let liver = |k: usize| set.masks[k * px..(k + 1) * px].iter().map(|&v| v as u64).sum::<u64>();
                // Most liver; the first such slice on ties.
                let k = (0..set.len()).filter(|&k| set.cases[k] == case).fold(None, |best: Option<usize>, k| match best {
                    Some(b) if liver(b) >= liver(k) => Some(b),
                    _ => Some(k),
                });
                let Some(k) = k else { continue };
                images.extend_from_slice(&set.images[k * px..(k + 1) * px]);
                rows.push((model.name.clone(), label, case.to_owned(), dice, set.rows[k], k));
            }
            let n = images.len() / px;
            let cams = fit::grad_cam_u8(&model.net, &images, n, size, device)?;
            write_safetensors(&ctx.out(&format!("gradcam/{}.safetensors", model.name)), &[NamedTensor::u8("gradcam", vec![n, size, size], cams)], &ctx.provenance())?;
        }
        let mut df = DataFrame::new_infer_height(vec![
            Column::new("model".into(), rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()),
            Column::new("label".into(), rows.iter().map(|r| r.1.to_owned()).collect::<Vec<_>>()),
            Column::new("case_id".into(), rows.iter().map(|r| r.2.clone()).collect::<Vec<_>>()),
            Column::new("dice".into(), rows.iter().map(|r| r.3).collect::<Vec<_>>()),
            Column::new("idx".into(), rows.iter().map(|r| r.4 as u64).collect::<Vec<_>>()),
            Column::new("position".into(), rows.iter().map(|r| r.5 as u64).collect::<Vec<_>>()),
        ])?;
        write_parquet(&ctx.out("examples.parquet"), &mut df, &ctx.provenance())
    }

    /// The best, median and worst case by Dice: (label, case, Dice). With
    /// fewer than three cases, a case is shown once, under its first label.
    fn picks(m: &Measured) -> Vec<(&'static str, &str, f64)> {
        let mut ranked: Vec<(f64, &str)> = m.per_case.iter().map(|c| (c.1.dice(), c.0.as_str())).collect();
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

    /// Every upstream that holds a trained model, and the extra models named by params.
    fn model_dirs(ctx: &StageContext, p: &EvaluateParams) -> Vec<(String, PathBuf)> {
        let mut dirs: Vec<(String, PathBuf)> = ctx.upstream.iter().filter(|(_, a)| a.manifest.outputs.contains_key("model.safetensors")).map(|(n, a)| (n.clone(), a.dir.clone())).collect();
        for m in &p.models {
            let dir = ctx.project_root.join(m);
            let name = dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| m.clone());
            dirs.push((name, dir));
        }
        dirs
    }

    pub fn evaluate(ctx: &StageContext) -> Result<Summary> {
        let p: EvaluateParams = ctx.params.typed()?;
        // Each model is loaded once and serves every dataset and the Grad-CAM maps.
        let device = device_for(p.device)?;
        let models: Vec<Loaded> = model_dirs(ctx, &p).iter().map(|(name, dir)| load_model(name, dir, device)).collect::<Result<_>>()?;
        if models.is_empty() {
            bail!("evaluate: no upstream stage holds a trained model");
        }
        let mut summary = Summary::new();
        let norm = NormalisedSet::open(ctx.upstream("normalise")?)?;
        let split = ctx.upstream.get("split").map(SplitAssignment::read).transpose()?;
        if let Some(s) = &split {
            s.check_covers(&norm)?;
        }
        let set = EvalSet::new(&norm, split.as_ref(), p.split)?;
        let done = evaluate_models(ctx, &set, &models, ctx.out_dir, p.split.name(), "", &mut summary)?;
        examples(ctx, &set, &models, &done, device)?;
        summary.insert("split".into(), p.split.name().into());

        // Extra datasets (pipeline.yaml `external:`): every slice, same models, same metrics.
        let mut external = Vec::new();
        for (name, a) in ctx.instances_of("normalise") {
            let set = EvalSet::new(&NormalisedSet::open(a)?, None, EvalSplit::All)?;
            let out = ctx.out(&format!("external/{name}"));
            std::fs::create_dir_all(&out)?;
            evaluate_models(ctx, &set, &models, &out, &format!("external {name}"), &format!("external.{name}."), &mut summary).map_err(|e| anyhow!("{e:#}"))?;
            external.push(name.to_owned());
        }
        summary.insert("external".into(), external.into());
        Ok(summary)
    }
}
