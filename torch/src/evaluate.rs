//! The evaluate stage's work: predict the held-out split with every upstream
//! model and measure it per slice, per case and overall.

use crate::model::{self, SegmentationModel};
use crate::training::run::{device_for, ModelCard};
use anyhow::{anyhow, bail, Context, Result};
use liverseg::engine::stage::{StageContext, Summary};
use liverseg::engine::table::{read_parquet, write_parquet, write_safetensors, NamedTensor, TensorFile};
use liverseg::metrics::{bootstrap_ci, percentile, surface_distances, Confusion};
use polars::prelude::{Column, DataFrame};
use std::collections::BTreeMap;
use tch::{nn, Kind, Reduction, Tensor};

pub struct ModelResult {
    pub name: String,
    pub card: ModelCard,
    pub loss: f64,
    pub overall: Confusion,
    pub per_slice: Vec<Confusion>,
    pub predictions: Vec<u8>,
}

/// Predict `images` ([n, size, size] u8) with the model in `dir`; returns the
/// masks and the mean cross-entropy against `masks`.
pub fn predict(dir: &std::path::Path, images: &[u8], masks: Option<&[u8]>, n: usize, size: usize, batch: usize, device: tch::Device) -> Result<(ModelCard, Vec<u8>, f64)> {
    let card: ModelCard = serde_json::from_slice(&std::fs::read(dir.join("model.json")).with_context(|| format!("{}: no model.json", dir.display()))?)
        .with_context(|| format!("{}: bad model.json", dir.display()))?;
    if card.size as usize != size {
        bail!("{}: model was trained at {}×{}, data is {size}×{size}", dir.display(), card.size, card.size);
    }
    let mut vs = nn::VarStore::new(device);
    let net = SegmentationModel::new(&vs.root(), &card.spec)?;
    model::io::load(&mut vs, &dir.join("model.safetensors"), true)?;
    let px = size * size;
    let mut out = vec![0u8; n * px];
    let mut loss_sum = 0.0;
    tch::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(batch.max(1)) {
            let end = (start + batch).min(n);
            let b = (end - start) as i64;
            let x = Tensor::from_slice(&images[start * px..end * px]).view([b, 1, size as i64, size as i64]).to_kind(Kind::Float).to_device(device) / 255.0;
            let logits = net.forward(&x, false).to_kind(Kind::Float);
            if let Some(m) = masks {
                let y = Tensor::from_slice(&m[start * px..end * px]).view([b, size as i64, size as i64]).to_kind(Kind::Int64).to_device(device);
                loss_sum += logits.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0).double_value(&[]) * b as f64;
            }
            let pred = logits.argmax(1, false).to_kind(Kind::Uint8).to_device(tch::Device::Cpu).flatten(0, -1);
            let v: Vec<u8> = Vec::try_from(&pred).map_err(|e| anyhow!("{e}"))?;
            out[start * px..end * px].copy_from_slice(&v);
        }
        Ok(())
    })?;
    Ok((card, out, loss_sum / n.max(1) as f64))
}

fn jf(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
}

pub fn evaluate(ctx: &StageContext) -> Result<Summary> {
    let p = ctx.params;
    let which = p.str("split")?;
    let device = device_for(p.str("device")?)?;
    let batch = p.usize("batch_size")?;
    let norm = ctx.upstream("normalise")?;
    let data = TensorFile::open(&norm.file("data.safetensors"))?;
    let (shape, images) = data.u8("images")?;
    let (_, masks) = data.u8("masks")?;
    let size = shape[1];
    let px = size * size;
    let index = read_parquet(&norm.file("index.parquet"))?;
    let splits: Vec<String> = if which == "all" {
        vec!["all".to_owned(); shape[0]]
    } else {
        let split = ctx.upstream("split")?;
        let assignment = read_parquet(&split.file("assignment.parquet"))?;
        assignment.column("split")?.str()?.iter().map(|s| s.unwrap_or_default().to_owned()).collect()
    };
    let cases: Vec<String> = index.column("case_id")?.str()?.iter().map(|s| s.unwrap_or_default().to_owned()).collect();
    let spacing: Vec<f64> = index.column("spacing_row_mm")?.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
    let src_rows: Vec<u64> = index.column("src_rows")?.u64()?.iter().map(|v| v.unwrap_or(0)).collect();
    let sel: Vec<usize> = (0..splits.len()).filter(|&i| splits[i] == which).collect();
    if sel.is_empty() {
        bail!("the {which} split is empty");
    }
    let mut x = Vec::with_capacity(sel.len() * px);
    let mut y = Vec::with_capacity(sel.len() * px);
    for &i in &sel {
        x.extend_from_slice(&images[i * px..(i + 1) * px]);
        y.extend_from_slice(&masks[i * px..(i + 1) * px]);
    }
    // mm per pixel at this resolution, where the source spacing is known.
    let mm: Vec<Option<f64>> = sel.iter().map(|&i| (spacing[i].is_finite() && src_rows[i] > 0).then(|| spacing[i] * src_rows[i] as f64 / size as f64)).collect();
    let unit = if mm.iter().all(Option::is_some) { "mm" } else { "px" };

    let mut results = Vec::new();
    let mut model_dirs: Vec<(String, std::path::PathBuf)> = ctx.upstream.iter().filter(|(_, a)| a.file("model.safetensors").is_file()).map(|(n, a)| (n.clone(), a.dir.clone())).collect();
    for m in p.str_list("models")? {
        let dir = ctx.project_root.join(&m);
        let name = dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| m.clone());
        model_dirs.push((name, dir));
    }
    for (name, dir) in &model_dirs {
        let (card, pred, loss) = predict(dir, &x, Some(&y), sel.len(), size, batch, device)?;
        let per_slice: Vec<Confusion> = (0..sel.len()).map(|k| Confusion::from_masks(&pred[k * px..(k + 1) * px], &y[k * px..(k + 1) * px])).collect();
        let mut overall = Confusion::default();
        per_slice.iter().for_each(|c| overall.add(c));
        results.push(ModelResult { name: name.clone(), card, loss, overall, per_slice, predictions: pred });
    }
    if results.is_empty() {
        bail!("evaluate: no upstream stage holds a trained model");
    }

    let case_names: Vec<String> = {
        let mut v: Vec<String> = sel.iter().map(|&i| cases[i].clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let (mut t1, mut pc, mut ps): (Vec<BTreeMap<&str, serde_json::Value>>, Vec<(String, String, Confusion, Option<f64>, u64)>, Vec<(String, usize, Confusion)>) = (vec![], vec![], vec![]);
    let mut summary = Summary::new();
    for r in &results {
        let mut by_case: BTreeMap<&str, (Confusion, Vec<f64>, bool, usize)> = BTreeMap::new();
        for (k, &i) in sel.iter().enumerate() {
            let e = by_case.entry(cases[i].as_str()).or_insert((Confusion::default(), Vec::new(), true, 0));
            e.0.add(&r.per_slice[k]);
            e.3 += 1;
            let sp = mm[k].unwrap_or(1.0);
            match surface_distances(&r.predictions[k * px..(k + 1) * px], &y[k * px..(k + 1) * px], size, size, (sp, sp)) {
                Some(d) => e.1.extend(d),
                None => e.2 = false,
            }
            ps.push((r.name.clone(), i, r.per_slice[k]));
        }
        let mut case_dice = Vec::new();
        let mut case_hd = Vec::new();
        for c in &case_names {
            let (conf, dists, defined, slices) = &by_case[c.as_str()];
            let hd95 = (*defined).then(|| if dists.is_empty() { 0.0 } else { percentile(dists, 95.0) });
            case_dice.push(conf.dice());
            if let Some(h) = hd95 {
                case_hd.push(h);
            }
            pc.push((r.name.clone(), c.clone(), *conf, hd95, *slices as u64));
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (lo, hi) = bootstrap_ci(&case_dice, p.usize("bootstrap")?, p.u64("seed")?);
        let slice_dice: Vec<f64> = r.per_slice.iter().map(Confusion::dice).collect();
        let o = &r.overall;
        let mut row: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
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
        for (k, v) in &row {
            if *k != "model" && *k != "arch" {
                summary.insert(format!("{}.{k}", r.name), v.clone());
            }
        }
        t1.push(row);
        std::fs::create_dir_all(ctx.out("predictions"))?;
        write_safetensors(&ctx.out(&format!("predictions/{}.safetensors", r.name)), &[NamedTensor::u8("predictions", vec![sel.len(), size, size], r.predictions.clone())], &ctx.provenance())?;
        if ctx.show_progress {
            eprintln!(
                "{}: Dice per case {:.4} [{lo:.4}, {hi:.4}], global {:.4}, mIoU {:.4}, liver IoU {:.4}, PA {:.4}, HD95 {:.2} {unit} ({} cases, {} slices)",
                r.name, mean(&case_dice), o.dice(), o.miou(), o.liver_iou(), o.pixel_accuracy(), if case_hd.is_empty() { f64::NAN } else { mean(&case_hd) }, case_names.len(), sel.len()
            );
        }
    }
    let f = |k: &str| -> Column { Column::new(k.into(), t1.iter().map(|r| r[k].as_f64().unwrap_or(f64::NAN)).collect::<Vec<f64>>()) };
    let mut table1 = DataFrame::new_infer_height(vec![
        Column::new("model".into(), t1.iter().map(|r| r["model"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>()),
        Column::new("arch".into(), t1.iter().map(|r| r["arch"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>()),
        f("miou"), f("pixel_accuracy"), f("loss"), f("liver_iou"), f("dice_global"), f("dice_per_slice"), f("dice_per_case"),
        f("dice_per_case_ci_low"), f("dice_per_case_ci_high"), f("precision"), f("recall"), f("hd95_mean"),
        Column::new("parameters".into(), t1.iter().map(|r| r["parameters"].as_i64().unwrap_or(0)).collect::<Vec<_>>()),
    ])?;
    write_parquet(&ctx.out("table1.parquet"), &mut table1, &ctx.provenance())?;
    let mut per_case = DataFrame::new_infer_height(vec![
        Column::new("model".into(), pc.iter().map(|r| r.0.clone()).collect::<Vec<_>>()),
        Column::new("case_id".into(), pc.iter().map(|r| r.1.clone()).collect::<Vec<_>>()),
        Column::new("slices".into(), pc.iter().map(|r| r.4).collect::<Vec<_>>()),
        Column::new("dice".into(), pc.iter().map(|r| r.2.dice()).collect::<Vec<_>>()),
        Column::new("liver_iou".into(), pc.iter().map(|r| r.2.liver_iou()).collect::<Vec<_>>()),
        Column::new("precision".into(), pc.iter().map(|r| r.2.precision()).collect::<Vec<_>>()),
        Column::new("recall".into(), pc.iter().map(|r| r.2.recall()).collect::<Vec<_>>()),
        Column::new(format!("hd95_{unit}").into(), pc.iter().map(|r| r.3).collect::<Vec<Option<f64>>>()),
    ])?;
    write_parquet(&ctx.out("per_case.parquet"), &mut per_case, &ctx.provenance())?;
    let mut per_slice = DataFrame::new_infer_height(vec![
        Column::new("model".into(), ps.iter().map(|r| r.0.clone()).collect::<Vec<_>>()),
        Column::new("idx".into(), ps.iter().map(|r| r.1 as u64).collect::<Vec<_>>()),
        Column::new("case_id".into(), ps.iter().map(|r| cases[r.1].clone()).collect::<Vec<_>>()),
        Column::new("dice".into(), ps.iter().map(|r| r.2.dice()).collect::<Vec<_>>()),
        Column::new("liver_iou".into(), ps.iter().map(|r| r.2.liver_iou()).collect::<Vec<_>>()),
        Column::new("tp".into(), ps.iter().map(|r| r.2.tp).collect::<Vec<_>>()),
        Column::new("fp".into(), ps.iter().map(|r| r.2.fp).collect::<Vec<_>>()),
        Column::new("fn".into(), ps.iter().map(|r| r.2.fn_).collect::<Vec<_>>()),
    ])?;
    write_parquet(&ctx.out("per_slice.parquet"), &mut per_slice, &ctx.provenance())?;
    summary.insert("cases".into(), case_names.len().into());
    summary.insert("slices".into(), sel.len().into());
    summary.insert("split".into(), which.into());
    summary.insert("hd95_unit".into(), unit.into());
    Ok(summary)
}
