//! The evaluate stage's work: predict the held-out split with every upstream
//! model and measure it per slice, per case and overall.

use crate::model::{self, SegmentationModel};
use crate::training::run::{device_for, ModelCard};
use anyhow::{anyhow, bail, Context, Result};
use liverseg::engine::stage::{StageContext, Summary};
use liverseg::engine::store::Artifact;
use liverseg::engine::table::{read_parquet, write_parquet, write_safetensors, NamedTensor, TensorFile};
use liverseg::metrics::{bootstrap_ci, percentile, surface_distances, Confusion};
use polars::prelude::{Column, DataFrame};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Reduction, Tensor};

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
    let card: ModelCard = serde_json::from_slice(&std::fs::read(dir.join("model.json")).with_context(|| format!("{}: no model.json", dir.display()))?)
        .with_context(|| format!("{}: bad model.json", dir.display()))?;
    let mut vs = nn::VarStore::new(device);
    let net = SegmentationModel::new(&vs.root(), &card.spec)?;
    model::io::load(&mut vs, &dir.join("model.safetensors"), true)?;
    Ok(Loaded { name: name.to_owned(), card, net, _vs: vs })
}

fn to_input(images: &[u8], b: usize, size: usize, device: tch::Device) -> Tensor {
    Tensor::from_slice(images).view([b as i64, 1, size as i64, size as i64]).to_kind(Kind::Float).to_device(device) / 255.0
}

/// Predict `images` ([n, size, size] u8); returns the masks and the mean
/// cross-entropy against `masks`.
pub fn predict(m: &Loaded, images: &[u8], masks: Option<&[u8]>, n: usize, size: usize, batch: usize, device: tch::Device) -> Result<(Vec<u8>, f64)> {
    if m.card.size as usize != size {
        bail!("model {} was trained at {}×{}, data is {size}×{size}", m.name, m.card.size, m.card.size);
    }
    let px = size * size;
    let mut out = vec![0u8; n * px];
    let mut loss_sum = 0.0;
    tch::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(batch.max(1)) {
            let end = (start + batch).min(n);
            let b = (end - start) as i64;
            let x = to_input(&images[start * px..end * px], end - start, size, device);
            let logits = m.net.forward(&x, false).to_kind(Kind::Float);
            if let Some(masks) = masks {
                let y = Tensor::from_slice(&masks[start * px..end * px]).view([b, size as i64, size as i64]).to_kind(Kind::Int64).to_device(device);
                loss_sum += logits.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0).double_value(&[]) * b as f64;
            }
            let pred = logits.argmax(1, false).to_kind(Kind::Uint8).to_device(tch::Device::Cpu).flatten(0, -1);
            let v: Vec<u8> = Vec::try_from(&pred).map_err(|e| anyhow!("{e}"))?;
            out[start * px..end * px].copy_from_slice(&v);
        }
        Ok(())
    })?;
    Ok((out, loss_sum / n.max(1) as f64))
}

/// Liver-class Grad-CAM maps of `images` ([n, size, size] u8), as u8 (255 = the image's maximum).
pub fn grad_cam(m: &Loaded, images: &[u8], n: usize, size: usize, device: tch::Device) -> Result<Vec<u8>> {
    let cam = m.net.grad_cam(&to_input(images, n, size, device), 1);
    let cam = (cam * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).to_device(tch::Device::Cpu).flatten(0, -1);
    Vec::try_from(&cam).map_err(|e| anyhow!("{e}"))
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
    /// The normalise params the slices went through (size, window, ...).
    preprocessing: serde_json::Value,
}

impl EvalSet {
    fn len(&self) -> usize {
        self.rows.len()
    }

    /// The slices of normalise artifact `norm` in split `which` (`all`: every slice).
    fn load(norm: &Artifact, split: Option<&Artifact>, which: &str) -> Result<EvalSet> {
        let data = TensorFile::open(&norm.file("data.safetensors"))?;
        let (shape, images) = data.u8("images")?;
        let (_, masks) = data.u8("masks")?;
        let size = shape[1];
        let px = size * size;
        let index = read_parquet(&norm.file("index.parquet"))?;
        let splits: Vec<String> = match split {
            Some(split) if which != "all" => {
                let assignment = read_parquet(&split.file("assignment.parquet"))?;
                assignment.column("split")?.str()?.iter().map(|s| s.unwrap_or_default().to_owned()).collect()
            }
            _ => vec!["all".to_owned(); shape[0]],
        };
        let cases: Vec<String> = index.column("case_id")?.str()?.iter().map(|s| s.unwrap_or_default().to_owned()).collect();
        let spacing: Vec<f64> = index.column("spacing_row_mm")?.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
        let src_rows: Vec<u64> = index.column("src_rows")?.u64()?.iter().map(|v| v.unwrap_or(0)).collect();
        let rows: Vec<usize> = (0..splits.len()).filter(|&i| splits[i] == which).collect();
        if rows.is_empty() {
            bail!("{}@{}: the {which} split is empty", norm.stage, norm.key);
        }
        let mut set = EvalSet {
            images: Vec::with_capacity(rows.len() * px),
            masks: Vec::with_capacity(rows.len() * px),
            cases: rows.iter().map(|&i| cases[i].clone()).collect(),
            mm: rows.iter().map(|&i| (spacing[i].is_finite() && src_rows[i] > 0).then(|| spacing[i] * src_rows[i] as f64 / size as f64)).collect(),
            rows,
            size,
            preprocessing: norm.manifest.params.clone(),
        };
        for &i in &set.rows {
            set.images.extend_from_slice(&images[i * px..(i + 1) * px]);
            set.masks.extend_from_slice(&masks[i * px..(i + 1) * px]);
        }
        Ok(set)
    }
}

/// One model's measurements on one set.
struct Measured {
    row: BTreeMap<&'static str, serde_json::Value>,
    /// (case, confusion, HD95, slices), cases sorted.
    per_case: Vec<(String, Confusion, Option<f64>, u64)>,
}

fn measure(set: &EvalSet, r: &ModelResult, bootstrap: usize, seed: u64) -> Measured {
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
    let per_case: Vec<(String, Confusion, Option<f64>, u64)> = by_case
        .into_iter()
        .map(|(c, (conf, dists, defined, slices))| (c.to_owned(), conf, defined.then(|| if dists.is_empty() { 0.0 } else { percentile(&dists, 95.0) }), slices))
        .collect();
    let case_dice: Vec<f64> = per_case.iter().map(|c| c.1.dice()).collect();
    let case_hd: Vec<f64> = per_case.iter().filter_map(|c| c.2).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (lo, hi) = bootstrap_ci(&case_dice, bootstrap, seed);
    let slice_dice: Vec<f64> = r.per_slice.iter().map(Confusion::dice).collect();
    let o = &r.overall;
    let mut row: BTreeMap<&'static str, serde_json::Value> = BTreeMap::new();
    row.insert("model", r.name.clone().into());
    row.insert("arch", r.card.spec.arch.clone().into());
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

/// Every model on `set`: table1, per_case and per_slice Parquet and the
/// predictions under `out` (the artifact folder, or external/NAME in it).
fn evaluate_set(ctx: &StageContext, set: &EvalSet, models: &[Loaded], out: &Path, label: &str, summary_prefix: &str, summary: &mut Summary) -> Result<Vec<(ModelResult, Measured)>> {
    let p = ctx.params;
    let device = device_for(p.str("device")?)?;
    let px = set.size * set.size;
    let unit = if set.mm.iter().all(Option::is_some) { "mm" } else { "px" };
    let mut done = Vec::new();
    for model in models {
        let (name, card) = (&model.name, &model.card);
        // Preprocessing must be the model's own: same window and intensity rule as its training data.
        let window: Vec<f64> = set.preprocessing["window"].as_array().map(|a| a.iter().filter_map(|v| v.as_f64()).collect()).unwrap_or_default();
        if window != card.window || set.preprocessing["minmax_8bit"].as_bool() != Some(card.minmax_8bit) {
            bail!("{label}: model {name} was trained with window {:?} (min-max {}), but these slices were normalised with window {window:?} (min-max {})", card.window, card.minmax_8bit, set.preprocessing["minmax_8bit"]);
        }
        let (pred, loss) = predict(model, &set.images, Some(&set.masks), set.len(), set.size, p.usize("batch_size")?, device)?;
        let per_slice: Vec<Confusion> = (0..set.len()).map(|k| Confusion::from_masks(&pred[k * px..(k + 1) * px], &set.masks[k * px..(k + 1) * px])).collect();
        let mut overall = Confusion::default();
        per_slice.iter().for_each(|c| overall.add(c));
        let r = ModelResult { name: name.clone(), card: card.clone(), loss, overall, per_slice, predictions: pred };
        let m = measure(set, &r, p.usize("bootstrap")?, p.u64("seed")?);
        for (k, v) in &m.row {
            if *k != "model" && *k != "arch" {
                summary.insert(format!("{summary_prefix}{name}.{k}"), v.clone());
            }
        }
        if ctx.show_progress {
            let g = |k: &str| m.row[k].as_f64().unwrap_or(f64::NAN);
            eprintln!(
                "{label} {name}: Dice per case {:.4} [{:.4}, {:.4}], global {:.4}, mIoU {:.4}, liver IoU {:.4}, PA {:.4}, HD95 {:.2} {unit} ({} cases, {} slices)",
                g("dice_per_case"), g("dice_per_case_ci_low"), g("dice_per_case_ci_high"), g("dice_global"), g("miou"), g("liver_iou"), g("pixel_accuracy"), g("hd95_mean"), m.per_case.len(), set.len()
            );
        }
        done.push((r, m));
    }
    std::fs::create_dir_all(out.join("predictions"))?;
    for (r, _) in &done {
        write_safetensors(&out.join(format!("predictions/{}.safetensors", r.name)), &[NamedTensor::u8("predictions", vec![set.len(), set.size, set.size], r.predictions.clone())], &ctx.provenance())?;
    }
    let t1: Vec<&BTreeMap<&str, serde_json::Value>> = done.iter().map(|(_, m)| &m.row).collect();
    let f = |k: &str| -> Column { Column::new(k.into(), t1.iter().map(|r| r[k].as_f64().unwrap_or(f64::NAN)).collect::<Vec<f64>>()) };
    let mut table1 = DataFrame::new_infer_height(vec![
        Column::new("model".into(), t1.iter().map(|r| r["model"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>()),
        Column::new("arch".into(), t1.iter().map(|r| r["arch"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>()),
        f("miou"), f("pixel_accuracy"), f("loss"), f("liver_iou"), f("dice_global"), f("dice_per_slice"), f("dice_per_case"),
        f("dice_per_case_ci_low"), f("dice_per_case_ci_high"), f("precision"), f("recall"), f("hd95_mean"),
        Column::new("parameters".into(), t1.iter().map(|r| r["parameters"].as_i64().unwrap_or(0)).collect::<Vec<_>>()),
    ])?;
    write_parquet(&out.join("table1.parquet"), &mut table1, &ctx.provenance())?;
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
    write_parquet(&out.join("per_slice.parquet"), &mut per_slice, &ctx.provenance())?;
    summary.insert(format!("{summary_prefix}cases"), done.first().map(|d| d.1.per_case.len()).unwrap_or(0).into());
    summary.insert(format!("{summary_prefix}slices"), set.len().into());
    summary.insert(format!("{summary_prefix}hd95_unit"), unit.into());
    Ok(done)
}

/// The report's qualitative figure: for each model its best, median and worst
/// case by Dice, the slice with the most liver of each, and a liver Grad-CAM
/// map of that slice (examples.parquet, gradcam/<model>.safetensors).
fn examples(ctx: &StageContext, set: &EvalSet, models: &[Loaded], done: &[(ModelResult, Measured)]) -> Result<()> {
    let device = device_for(ctx.params.str("device")?)?;
    let (size, px) = (set.size, set.size * set.size);
    let mut rows: Vec<(String, &str, String, f64, usize, usize)> = Vec::new();
    std::fs::create_dir_all(ctx.out("gradcam"))?;
    for (model, (_, m)) in models.iter().zip(done) {
        let name = &model.name;
        let mut ranked: Vec<(f64, &str)> = m.per_case.iter().map(|c| (c.1.dice(), c.0.as_str())).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        let picks = [("best", 0), ("median", ranked.len() / 2), ("worst", ranked.len() - 1)];
        let mut images = Vec::new();
        let mut seen = Vec::new();
        for (label, r) in picks {
            // With fewer than three cases, a case is shown once, under its first label.
            if seen.contains(&r) {
                continue;
            }
            seen.push(r);
            let (dice, case) = ranked[r];
            let liver = |k: usize| set.masks[k * px..(k + 1) * px].iter().map(|&v| v as u64).sum::<u64>();
            // Most liver; the first such slice on ties.
            let k = (0..set.len()).filter(|&k| set.cases[k] == case).fold(None, |best: Option<usize>, k| match best {
                Some(b) if liver(b) >= liver(k) => Some(b),
                _ => Some(k),
            });
            let Some(k) = k else { continue };
            images.extend_from_slice(&set.images[k * px..(k + 1) * px]);
            rows.push((name.clone(), label, case.to_owned(), dice, set.rows[k], k));
        }
        let n = images.len() / px;
        let cams = grad_cam(model, &images, n, size, device)?;
        write_safetensors(&ctx.out(&format!("gradcam/{name}.safetensors")), &[NamedTensor::u8("gradcam", vec![n, size, size], cams)], &ctx.provenance())?;
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

pub fn evaluate(ctx: &StageContext) -> Result<Summary> {
    let p = ctx.params;
    let which = p.str("split")?;
    let mut dirs: Vec<(String, PathBuf)> = ctx.upstream.iter().filter(|(_, a)| a.file("model.safetensors").is_file()).map(|(n, a)| (n.clone(), a.dir.clone())).collect();
    for m in p.str_list("models")? {
        let dir = ctx.project_root.join(&m);
        let name = dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| m.clone());
        dirs.push((name, dir));
    }
    // Each model is loaded once and serves every dataset and the Grad-CAM maps.
    let device = device_for(p.str("device")?)?;
    let models: Vec<Loaded> = dirs.iter().map(|(name, dir)| load_model(name, dir, device)).collect::<Result<_>>()?;
    if models.is_empty() {
        bail!("evaluate: no upstream stage holds a trained model");
    }
    let mut summary = Summary::new();
    let set = EvalSet::load(ctx.upstream("normalise")?, ctx.upstream.get("split"), which)?;
    let done = evaluate_set(ctx, &set, &models, ctx.out_dir, which, "", &mut summary)?;
    examples(ctx, &set, &models, &done)?;
    summary.insert("split".into(), which.into());

    // External datasets (pipeline.yaml `external:`): every slice, same models, same metrics.
    let mut external = Vec::new();
    for (dep, norm) in &ctx.upstream {
        let Some(name) = dep.strip_prefix(liverseg::engine::config::EXTERNAL_PREFIX) else { continue };
        let set = EvalSet::load(norm, None, "all")?;
        let out = ctx.out(&format!("external/{name}"));
        std::fs::create_dir_all(&out)?;
        evaluate_set(ctx, &set, &models, &out, &format!("external {name}"), &format!("external.{name}."), &mut summary)?;
        external.push(name.to_owned());
    }
    summary.insert("external".into(), external.into());
    Ok(summary)
}
