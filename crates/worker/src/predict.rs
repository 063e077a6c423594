//! `predict`: liver masks for new scans, as nnU-Net users expect them. Inputs
//! are found by content (NIfTI, DICOM series by SeriesInstanceUID, PNG/JPEG;
//! a folder of any mix), all checked before inference; each case is
//! preprocessed exactly as the models' lineage says, segmented by one model
//! or an ensemble (softmax averaged) with test-time mirroring, resampled back
//! to its own grid (bilinear on the probabilities), reduced to its largest
//! connected component, and written beside its source's geometry: NIfTI,
//! PNG, or a DICOM Segmentation object.

use crate::inputs::{self, Case, Scan};
use anyhow::{bail, Context, Result};
use liverseg_imaging::components::keep_largest;
use liverseg_imaging::resize::{unfit_bilinear, Fit};
use liverseg_imaging::{dicom, dicom_seg, nifti, Volume};
use liverseg_metrics::{IntensityHistogram, INTENSITY_SHIFT_WARN};
use liverseg_model::{fit as infer, SegmentationModel};
use liverseg_stages::evaluate::measure::{load_model, Loaded};
use liverseg_stages::normalise::scaled_resize;
use liverseg_stages::train::ModelCard;
use std::path::{Path, PathBuf};

/// What the user asked for.
pub struct Options {
    pub models: Vec<PathBuf>,
    pub input: PathBuf,
    pub output: PathBuf,
    pub dicom_seg: bool,
    pub probabilities: bool,
    pub mirror: bool,
    pub largest_component: bool,
    pub device: tch::Device,
    pub bf16: bool,
    pub force: bool,
    pub batch: usize,
    /// Skip cases whose outputs and sidecar a run before wrote (`--continue`).
    pub resume: bool,
    /// Replace outputs that exist; without it (or `resume`) they are an error.
    pub overwrite: bool,
}

/// The model folder (model.safetensors, and model.json or the card in the
/// weights' metadata; or a cross-validated model's folds/) for a folder or
/// a weights file.
fn model_dir(model: &Path) -> Result<PathBuf> {
    if !model.exists() {
        bail!("no model at {}", model.display());
    }
    let dir = if model.is_dir() { model.to_path_buf() } else { model.parent().map(Path::to_path_buf).unwrap_or_default() };
    if !dir.join("model.safetensors").is_file() && !dir.join("folds/fold0/model.safetensors").is_file() {
        bail!("no model at {} (no model.safetensors there)", model.display());
    }
    Ok(dir)
}

pub fn predict(o: &Options) -> Result<Vec<PathBuf>> {
    let mut models: Vec<Loaded> = o.models.iter().enumerate().map(|(i, m)| load_model(&format!("model{i}"), &model_dir(m)?, o.device)).collect::<Result<_>>()?;
    let card = same_preprocessing(&models)?;
    for (m, path) in models.iter().zip(&o.models) {
        if let Some(w) = m.card.data_warning() {
            eprintln!("warning: {}: {w}", path.display());
        }
    }
    let provenance = Provenance::of(o, &models)?;
    let cases = checked_cases(o, &card)?;
    std::fs::create_dir_all(&o.output).with_context(|| format!("cannot create the output folder {}", o.output.display()))?;
    let kind = if o.bf16 { tch::Kind::BFloat16 } else { tch::Kind::Float };
    models.iter_mut().for_each(|m| m.for_inference(kind));
    let nets: Vec<&SegmentationModel> = models.iter().flat_map(|m| &m.nets).collect();
    let mut written = Vec::new();
    for (case, scan) in cases {
        let scan = match scan {
            Some(scan) => scan,
            None => inputs::read(&case)?,
        };
        let outputs = segment_case(o, &nets, &card, &case, scan, &provenance)?;
        // The sidecar last: its presence marks the case finished for --continue.
        written.push(provenance.write_sidecar(o, &case, &outputs)?);
        written.extend(outputs);
    }
    Ok(written)
}

/// Where a prediction came from: the models (key, weights hash, params,
/// training data) and the options. Written beside every output as
/// `<case>_liver.json`, with the case's input and output hashes, and into
/// each NIfTI output's comment extension.
struct Provenance {
    models: Vec<serde_json::Value>,
    options: serde_json::Value,
    /// `liverseg 0.1.0 model <key>`: the NIfTI descrip and the SEG's algorithm name.
    algorithm: String,
}

impl Provenance {
    fn of(o: &Options, models: &[Loaded]) -> Result<Self> {
        let mut described = Vec::new();
        for (m, path) in models.iter().zip(&o.models) {
            let weights = if m.card.folds > 0 { m.dir.join("folds/fold0/model.safetensors") } else { m.dir.join("model.safetensors") };
            let params = m.manifest.as_ref().map(|x| x.effective_params.clone().unwrap_or_else(|| x.params.clone()));
            described.push(serde_json::json!({
                "path": path,
                "train_stage_key": m.card.train_stage_key,
                "weights_blake3": liverseg_engine::hash::hash_file(&weights)?,
                "arch": m.card.spec.arch.name(),
                "size": m.card.size,
                "folds": m.card.folds,
                "params": params,
                "training_data": m.card.training_data,
            }));
        }
        let options = serde_json::json!({
            "mirror": o.mirror, "largest_component": o.largest_component, "precision": if o.bf16 { "bf16" } else { "fp32" },
            "batch": o.batch, "device": format!("{:?}", o.device), "probabilities": o.probabilities, "dicom_seg": o.dicom_seg,
        });
        let keys: Vec<&str> = models.iter().map(|m| m.card.train_stage_key.as_str()).collect();
        let algorithm = format!("liverseg {} model {}", env!("CARGO_PKG_VERSION"), keys.iter().map(|k| &k[..k.len().min(16)]).collect::<Vec<_>>().join("+"));
        Ok(Provenance { models: described, options, algorithm })
    }

    /// What a case's outputs say about themselves, its input files hashed.
    fn of_case(&self, case: &Case) -> Result<serde_json::Value> {
        let inputs: Vec<serde_json::Value> = case_files(case)
            .iter()
            .map(|f| {
                let size = std::fs::metadata(f).with_context(|| format!("cannot stat {}", f.display()))?.len();
                Ok(serde_json::json!({"path": f, "size": size, "blake3": liverseg_engine::hash::hash_file(f)?}))
            })
            .collect::<Result<_>>()?;
        let mut v = serde_json::json!({
            "liverseg": env!("CARGO_PKG_VERSION"), "case": case.name(), "models": self.models, "options": self.options, "inputs": inputs,
        });
        if !case.is_image() {
            v["voxel_order"] = VOXEL_ORDER.into();
        }
        Ok(v)
    }

    fn write_sidecar(&self, o: &Options, case: &Case, outputs: &[PathBuf]) -> Result<PathBuf> {
        let mut v = self.of_case(case)?;
        let files: Vec<serde_json::Value> = outputs
            .iter()
            .map(|f| Ok(serde_json::json!({"file": f.file_name().map(|n| n.to_string_lossy().into_owned()), "size": std::fs::metadata(f)?.len(), "blake3": liverseg_engine::hash::hash_file(f)?})))
            .collect::<Result<_>>()?;
        v["outputs"] = files.into();
        let path = sidecar(o, case);
        std::fs::write(&path, serde_json::to_vec_pretty(&v)?).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

/// How a volume's voxels are ordered in the NIfTI outputs (docs/guide.md, "Inference").
const VOXEL_ORDER: &str = "as the input: a NIfTI input's own order and affine; a DICOM series as stored, i along each slice's columns, j down its rows, k by position along the slice normal (ascending), with the affine mapping them to RAS+ mm. dcm2niix flips j, so compare arrays through the affines, not index by index";

fn sidecar(o: &Options, case: &Case) -> PathBuf {
    o.output.join(format!("{}_liver.json", case.name()))
}

/// The files a case is read from.
fn case_files(case: &Case) -> Vec<PathBuf> {
    match case {
        Case::Nifti(p) | Case::Image(p) => vec![p.clone()],
        Case::Dicom { files, .. } => files.clone(),
    }
}

/// The outputs a case gets, sidecar aside; and the ones an earlier run
/// with other options may have left, which this run removes.
fn outputs_of(o: &Options, case: &Case) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let name = case.name();
    let at = |suffix: &str| o.output.join(format!("{name}{suffix}"));
    let mask = if case.is_image() { at("_liver.png") } else { at("_liver.nii.gz") };
    let (mut planned, mut stale) = (vec![mask], Vec::new());
    let prob = at("_liver_prob.nii.gz");
    if o.probabilities {
        planned.push(prob)
    } else {
        stale.push(prob)
    }
    if matches!(case, Case::Dicom { .. }) && o.dicom_seg {
        planned.push(at("_liver.dcm"));
    }
    (planned, stale)
}

/// An ensemble's models must prepare their inputs alike.
fn same_preprocessing(models: &[Loaded]) -> Result<ModelCard> {
    let first = &models.first().context("predict needs at least one --model")?.card;
    for m in &models[1..] {
        let c = &m.card;
        if (c.size, &c.window, c.minmax_8bit, &c.unit) != (first.size, &first.window, first.minmax_8bit, &first.unit) {
            bail!("the models of an ensemble must share their preprocessing: {}² window {:?} ({}) against {}² window {:?} ({})", first.size, first.window, first.unit, c.size, c.window, c.unit);
        }
        if c.scaling != first.scaling {
            bail!("the models of an ensemble must share their input scaling: {:?} against {:?}", first.scaling, c.scaling);
        }
    }
    Ok(first.clone())
}

/// Every case found and read through, its unit checked and its output name
/// free: all problems at once, before anything is written.
fn checked_cases(o: &Options, card: &ModelCard) -> Result<Vec<(Case, Option<Scan>)>> {
    let (cases, mut problems) = inputs::discover(&o.input)?;
    let mut names = std::collections::BTreeSet::new();
    let mut checked = Vec::with_capacity(cases.len());
    let mut kept_bytes = 0;
    let not_dicom = cases.iter().filter(|c| !matches!(c, Case::Dicom { .. })).count();
    if o.dicom_seg && not_dicom > 0 {
        eprintln!("note: --format dicom-seg: {not_dicom} input(s) are not DICOM series; they get NIfTI (or PNG) outputs only");
    }
    for case in cases {
        if !names.insert(case.name()) {
            problems.push(format!("{}: a second case named {}; give the cases distinct names", case_path(&case).display(), case.name()));
            continue;
        }
        let (planned, stale) = outputs_of(o, &case);
        let finished = sidecar(o, &case).is_file() && planned.iter().all(|p| p.is_file());
        if o.resume && finished {
            eprintln!("skipped {}: finished by an earlier run ({})", case.name(), sidecar(o, &case).display());
            continue;
        }
        // An unfinished case (no sidecar) is redone under --continue.
        if !o.overwrite && !(o.resume && !finished) {
            let mut there = planned.iter().chain(&stale).chain(std::iter::once(&sidecar(o, &case))).filter(|p| p.exists()).map(|p| p.display().to_string()).collect::<Vec<_>>();
            if !there.is_empty() {
                there.sort();
                problems.push(format!("{}: output exists ({}); --overwrite replaces it, --continue skips finished cases", case_path(&case).display(), there.join(", ")));
                continue;
            }
        }
        // Scans read here are kept for inference, up to a memory budget, so
        // that a single volume is not decompressed twice.
        match inputs::read(&case) {
            Ok(scan) if kept_bytes + scan.bytes() <= KEEP_SCANS_BYTES => {
                kept_bytes += scan.bytes();
                checked.push((case, Some(scan)));
            }
            Ok(_) => checked.push((case, None)),
            Err(e) => {
                problems.push(format!("{e:#}"));
                continue;
            }
        }
        let case = &checked.last().expect("just pushed").0;
        let unit = if case.is_image() { "8bit" } else { "HU" };
        if unit != card.unit {
            let msg = format!("{}: {unit} input, but the model was trained on {} input", case_path(case).display(), card.unit);
            if o.force {
                eprintln!("warning: {msg}; predicting anyway (--force)");
            } else {
                problems.push(format!("{msg} (--force predicts anyway)"));
            }
        }
    }
    if !problems.is_empty() {
        bail!("{} problem(s) in {}; nothing was predicted or written:\n  {}", problems.len(), o.input.display(), problems.join("\n  "));
    }
    Ok(checked)
}

/// How much of the scans read while checking is kept for inference.
const KEEP_SCANS_BYTES: usize = 2 << 30;

fn case_path(case: &Case) -> PathBuf {
    match case {
        Case::Nifti(p) | Case::Image(p) => p.clone(),
        Case::Dicom { files, .. } => files[0].parent().map(Path::to_path_buf).unwrap_or_default(),
    }
}

/// Liver probabilities of stacked slices, each fitted into the models'
/// square, back on their own grid; and the thresholded mask.
fn segment_slices(o: &Options, nets: &[&SegmentationModel], card: &ModelCard, images: &[u8], fit: &Fit, n: usize, label: &str) -> Result<(Vec<f32>, Vec<u8>)> {
    let size = card.size as usize;
    let bar = liverseg_engine::progress::bar(n.div_ceil(o.batch) as u64, label, true);
    let mut probs = Vec::with_capacity(n * fit.h * fit.w);
    let kind = if o.bf16 { tch::Kind::BFloat16 } else { tch::Kind::Float };
    let how = infer::Inference { batch: o.batch, device: o.device, mirror: o.mirror, kind, channels_last: true, scaling: card.scaling };
    for start in (0..n).step_by(o.batch) {
        let end = (start + o.batch).min(n);
        let p = infer::liver_probabilities(nets, &images[start * size * size..end * size * size], None, end - start, size, &how)?;
        probs.extend(p.liver.chunks_exact(size * size).flat_map(|s| unfit_bilinear(s, fit)));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mask: Vec<u8> = probs.iter().map(|&v| u8::from(v > 0.5)).collect();
    Ok((probs, mask))
}

/// Segment one case and write its outputs; returns the files written.
fn segment_case(o: &Options, nets: &[&SegmentationModel], card: &ModelCard, case: &Case, scan: Scan, provenance: &Provenance) -> Result<Vec<PathBuf>> {
    let name = case.name();
    for old in outputs_of(o, case).1.iter().chain(std::iter::once(&sidecar(o, case))).filter(|p| p.exists()) {
        std::fs::remove_file(old).with_context(|| format!("cannot remove the earlier {}", old.display()))?;
    }
    match scan {
        Scan::Image { pixels, rows, cols } => segment_image(o, nets, card, case_path(case).as_path(), &name, (&pixels, rows, cols)),
        Scan::Volume { volume, header, series } => {
            let (mask, probs) = segment_volume(o, nets, card, &volume, (case_path(case).as_path(), &name))?;
            let comment = serde_json::to_vec(&provenance.of_case(case)?)?;
            let described = nifti::Described { descrip: &provenance.algorithm, comment: Some(&comment) };
            let mut out = write_volume(o, &name, &volume, (&mask, &probs), header.as_deref(), &described)?;
            if let (true, Some(info)) = (o.dicom_seg, series) {
                out.push(write_seg(o, card, case, &name, &volume, &info, &mask, &provenance.algorithm)?);
            }
            Ok(out)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_seg(o: &Options, card: &ModelCard, case: &Case, name: &str, vol: &Volume, info: &dicom::SeriesInfo, mask: &[u8], algorithm: &str) -> Result<PathBuf> {
    let missing = dicom_seg::missing_uids(info);
    if !missing.is_empty() {
        eprintln!(
            "warning: {}: the series has no {} (anonymised?); the DICOM SEG gets made-up UIDs in their place and will not file with its images in a PACS",
            case_path(case).display(),
            missing.join(", ")
        );
    }
    let [cols, rows, _] = vol.dims;
    let path = o.output.join(format!("{name}_liver.dcm"));
    let seed = format!("{}/{}/{}", card.train_stage_key, name, info.slices.first().map(|s| s.sop_instance_uid.as_str()).unwrap_or(""));
    dicom_seg::write(&dicom_seg::Seg { series: info, rows, cols, mask, seed: &seed, software: env!("CARGO_PKG_VERSION"), algorithm }, &path)?;
    Ok(path)
}

/// Every axial slice of a volume in HU; the mask and probabilities on its grid.
fn segment_volume(o: &Options, nets: &[&SegmentationModel], card: &ModelCard, vol: &Volume, (path, name): (&Path, &str)) -> Result<(Vec<u8>, Vec<f32>)> {
    let ((rows, cols), spacing) = vol.slice_shape();
    let size = card.size as usize;
    let fit = Fit::new(rows, cols, spacing, size);
    let window = (card.window[0] as f32, card.window[1] as f32);
    let n = vol.num_slices();
    let mut x = Vec::with_capacity(n * size * size);
    for k in 0..n {
        x.extend(scaled_resize(&vol.slice(k), true, false, window, &fit));
    }
    warn_if_far_from_training(card, &x, path);
    let (probs, mut mask) = segment_slices(o, nets, card, &x, &fit, n, name)?;
    if o.largest_component {
        keep_largest(&mut mask, [n, rows, cols], true);
    }
    // Back from [slice, row, col] to the volume's own voxel order.
    let (mut out_mask, mut out_probs) = (vec![0u8; vol.data.len()], vec![0f32; vol.data.len()]);
    let plane = rows * cols;
    for k in 0..n {
        vol.put_slice(&mut out_mask, k, &mask[k * plane..(k + 1) * plane]);
        vol.put_slice(&mut out_probs, k, &probs[k * plane..(k + 1) * plane]);
    }
    Ok((out_mask, out_probs))
}

fn write_volume(o: &Options, name: &str, vol: &Volume, (mask, probs): (&[u8], &[f32]), header: Option<&[u8]>, described: &nifti::Described) -> Result<Vec<PathBuf>> {
    let path = o.output.join(format!("{name}_liver.nii.gz"));
    nifti::write_described(&path, vol.dims, &vol.affine, nifti::VoxelData::U8(mask), header, described)?;
    let mut out = vec![path];
    if o.probabilities {
        let path = o.output.join(format!("{name}_liver_prob.nii.gz"));
        nifti::write_described(&path, vol.dims, &vol.affine, nifti::VoxelData::F32(probs), header, described)?;
        out.push(path);
    }
    Ok(out)
}

/// A PNG or JPEG slice: a PNG mask (0 or 255) of its size.
fn segment_image(o: &Options, nets: &[&SegmentationModel], card: &ModelCard, path: &Path, name: &str, (image, rows, cols): (&[u8], usize, usize)) -> Result<Vec<PathBuf>> {
    let fit = Fit::new(rows, cols, (f64::NAN, f64::NAN), card.size as usize);
    let x = scaled_resize(image, false, card.minmax_8bit, (0.0, 255.0), &fit);
    warn_if_far_from_training(card, &x, path);
    let (probs, mut mask) = segment_slices(o, nets, card, &x, &fit, 1, name)?;
    if o.largest_component {
        keep_largest(&mut mask, [1, rows, cols], false);
    }
    let out = o.output.join(format!("{name}_liver.png"));
    let png = image::GrayImage::from_raw(cols as u32, rows as u32, mask.iter().map(|v| v * 255).collect()).context("mask size")?;
    png.save(&out).with_context(|| format!("cannot write {}", out.display()))?;
    let mut written = vec![out];
    if o.probabilities {
        let p = o.output.join(format!("{name}_liver_prob.nii.gz"));
        nifti::write_u8_or_i16(&p, [cols, rows, 1], &liverseg_imaging::scaled_identity([1.0; 3]), nifti::VoxelData::F32(&probs), None)?;
        written.push(p);
    }
    Ok(written)
}

/// An input whose grey levels (as the model sees them) lie far from the
/// training data's, from another scanner, window or export mapping, is
/// segmented, with a warning naming the distance.
fn warn_if_far_from_training(card: &ModelCard, input: &[u8], path: &Path) {
    let Some(train) = &card.input_histogram else {
        return warn_if_scaled_differently(card, input, path);
    };
    let here = IntensityHistogram::of(input);
    let d = here.js_divergence(train);
    if d > INTENSITY_SHIFT_WARN {
        eprintln!(
            "warning: {}: its intensity histogram is {d:.3} from the model's training data (Jensen-Shannon divergence in bits; above {INTENSITY_SHIFT_WARN} warns; median grey level {} here, {} in training): another scanner or export mapping, so check the mask",
            path.display(),
            here.median(),
            train.median()
        );
    }
}

/// Cards from before the histogram: body intensity percentiles only.
fn warn_if_scaled_differently(card: &ModelCard, input: &[u8], path: &Path) {
    let Some(train) = &card.input_stats else {
        return;
    };
    let here = liverseg_stages::train::InputStats::of(input);
    if (here.p50 - train.p50).abs() > 30.0 || (here.p95 - train.p95).abs() > 40.0 {
        eprintln!(
            "warning: {}: body intensities (median {:.0}, 95th percentile {:.0} of 255) differ from the model's training data (median {:.0}, 95th percentile {:.0}); it may have another window or scaling",
            path.display(), here.p50, here.p95, train.p50, train.p95
        );
    }
}
