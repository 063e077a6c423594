//! augment: N randomly transformed copies of every training slice (rotation,
//! shift, mirroring; optional intensity jitter, elastic deformation and, via
//! `transforms`, nnU-Net's scaling and intensity set).
//! Validation and test slices are never read here, so no augmented copy of
//! a held-out image can reach training.
//!
//! inputs: normalise (data.safetensors), split (assignment.parquet)
//! outputs: augmented.safetensors (images, masks: [M, S, S] uint8), index.parquet
//! read downstream through [`AugmentedSet`].

use crate::normalise::NormalisedSet;
use crate::split::{Part, SplitAssignment};
use anyhow::{bail, Result};
use liverseg_engine::params::Params;
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_engine::store::Artifact;
use liverseg_engine::tables::{read_parquet, write_parquet};
use liverseg_engine::tensors::{write_safetensors, NamedTensor, TensorFile};
use liverseg_imaging::augment::{apply_u8, draw_scale_and_intensity, elastic_grid, Chance, Transform, Transforms};
use liverseg_rng::Rng;
use polars::prelude::{Column, DataFrame};
use rayon::prelude::*;

pub const VERSION: u32 = 1;

/// The most copies per training slice.
const MAX_COPIES: usize = 100;
/// The most memory the augmented set may take (images and masks).
const MAX_AUGMENTED_BYTES: u64 = 8 << 30;

liverseg_engine::params! {
    pub struct AugmentParams {
        copies: usize = int "2", "augmented copies per training slice";
        rotation_deg: f64 = float "15", "rotation drawn from ±this many degrees";
        shift: f64 = float "0.1", "translation drawn from ±this fraction of the side";
        mirror: bool = bool "true", "mirror left-right with probability 1/2";
        intensity_jitter: f64 = float "0.0", "contrast and brightness jitter (fraction), 0 = off";
        elastic_alpha: f64 = float "0.0", "elastic displacement in pixels, 0 = off";
        transforms: serde_json::Value = any "null", "scaling and intensity transforms of each copy, drawn after the ones above: null, nnunet (its scale, noise, blur, brightness, contrast, low_res and gamma), or {scale: [p, lo, hi], gamma: [p, lo, hi], ...}";
        seed: u64 = int "1", "augmentation seed";
    }
}

pub static INFO: StageInfo = StageInfo {
    name: "augment",
    version: VERSION,
    about: "augment the training split only",
    inputs: &["normalise", "split"],
    optional_inputs: &[],
    collects: &[],
    per_dataset: false,
    dataset_requires: &[],
    outputs: &["augmented.safetensors", "index.parquet"],
    params: AugmentParams::SPECS,
    placement: Placement::InProcess,
};

pub struct Augment;

impl Stage for Augment {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn check(&self, params: &Params) -> Result<()> {
        let p: AugmentParams = params.typed()?;
        if !(0.0..=0.5).contains(&p.shift) || p.rotation_deg < 0.0 || p.intensity_jitter < 0.0 || p.elastic_alpha < 0.0 {
            bail!("shift must be in [0, 0.5] and rotation_deg, intensity_jitter, elastic_alpha ≥ 0");
        }
        extra_transforms(&p.transforms)?;
        if p.copies > MAX_COPIES {
            bail!("copies must be at most {MAX_COPIES}, got {} (each copy is a full training set in memory and on disk)", p.copies);
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p: AugmentParams = ctx.params.typed()?;
        let set = NormalisedSet::open(ctx.upstream("normalise")?)?;
        let assignment = SplitAssignment::read(ctx.upstream("split")?)?;
        assignment.check_covers(&set)?;
        let train = assignment.rows(Part::Train);
        let (images, masks, size) = (set.images(), set.masks(), set.size);
        // Refused before allocating: a u8 image and mask per copy, held twice
        // while the copies are gathered into one tensor each.
        let bytes = (train.len() as u128) * (p.copies as u128) * (size as u128).pow(2) * 4;
        if bytes > MAX_AUGMENTED_BYTES as u128 {
            bail!("{} training slices × {} copies at {size}² would take {} MiB; the limit is {} MiB (lower augment.copies)", train.len(), p.copies, bytes >> 20, MAX_AUGMENTED_BYTES >> 20);
        }
        let extra = extra_transforms(&p.transforms)?;
        let jobs: Vec<(usize, usize)> = train.iter().flat_map(|&i| (0..p.copies).map(move |k| (i, k))).collect();
        let out: Vec<(Vec<u8>, Vec<u8>)> = jobs
            .par_iter()
            .map(|&(i, k)| {
                let mut r = Rng::derive(p.seed, (i * p.copies + k) as u64);
                let mut t = draw(&p, &mut r, size);
                draw_scale_and_intensity(&extra, &mut r, &mut t);
                let px = size * size;
                apply_u8(&t, &images[i * px..(i + 1) * px], &masks[i * px..(i + 1) * px], size)
            })
            .collect();
        let m = out.len();
        let mut ai = Vec::with_capacity(m * size * size);
        let mut am = Vec::with_capacity(m * size * size);
        for (i, mk) in &out {
            ai.extend_from_slice(i);
            am.extend_from_slice(mk);
        }
        write_safetensors(&ctx.out("augmented.safetensors"), &[NamedTensor::u8("images", vec![m, size, size], ai), NamedTensor::u8("masks", vec![m, size, size], am)], &ctx.provenance())?;
        let mut index = DataFrame::new_infer_height(vec![
            Column::new("source_idx".into(), jobs.iter().map(|j| j.0 as u64).collect::<Vec<_>>()),
            Column::new("copy".into(), jobs.iter().map(|j| j.1 as u64).collect::<Vec<_>>()),
        ])?;
        write_parquet(&ctx.out("index.parquet"), &mut index, &ctx.provenance())?;
        let mut s = Summary::new();
        s.insert("train_slices".into(), train.len().into());
        s.insert("augmented_slices".into(), m.into());
        Ok(s)
    }
}

/// The `transforms` param: scaling and intensity only, since this stage's
/// own params draw rotation, shift, mirroring and the elastic grid.
fn extra_transforms(v: &serde_json::Value) -> Result<Transforms> {
    let Some(mut t) = Transforms::from_param(v)? else { return Ok(Transforms::default()) };
    if v.is_string() {
        (t.rotation, t.shift, t.elastic, t.mirror) = (Chance::OFF, Chance::OFF, Chance::OFF, 0.0);
    } else if t.rotation != Chance::OFF || t.shift != Chance::OFF || t.elastic != Chance::OFF || t.mirror != 0.0 {
        bail!("augment.transforms: rotation, shift, elastic and mirror are set by rotation_deg, shift, elastic_alpha and mirror here");
    }
    Ok(t)
}

/// One random transform, drawn in a fixed order from `r`.
fn draw(p: &AugmentParams, r: &mut Rng, size: usize) -> Transform {
    let (rot, shift, jitter, alpha) = (p.rotation_deg.to_radians() as f32, p.shift as f32, p.intensity_jitter as f32, p.elastic_alpha as f32);
    Transform {
        angle: r.range(-1.0, 1.0) as f32 * rot,
        dx: r.range(-1.0, 1.0) as f32 * shift * size as f32,
        dy: r.range(-1.0, 1.0) as f32 * shift * size as f32,
        mirror: p.mirror && r.f64() < 0.5,
        gain: 1.0 + r.range(-1.0, 1.0) as f32 * jitter,
        bias: r.range(-1.0, 1.0) as f32 * jitter * 0.5,
        elastic: (alpha > 0.0).then(|| elastic_grid(r, alpha)),
        scale: 1.0,
        intensity: Vec::new(),
    }
}

/// augment's output as downstream stages read it: the augmented copies and
/// the normalise row each was made from.
pub struct AugmentedSet {
    data: TensorFile,
    pub n: usize,
    pub size: usize,
    pub source_idx: Vec<usize>,
}

impl AugmentedSet {
    pub fn open(a: &Artifact) -> Result<Self> {
        let data = TensorFile::open(&a.file("augmented.safetensors"))?;
        let (shape, _) = data.u8_ref("images")?;
        let (mshape, _) = data.u8_ref("masks")?;
        let [n, size, _] = shape[..] else { bail!("{}: images have shape {shape:?}, expected [n, size, size]", a.dir.display()) };
        if mshape != shape {
            bail!("{}: images {shape:?} and masks {mshape:?} differ", a.dir.display());
        }
        let index = read_parquet(&a.file("index.parquet"))?;
        let source_idx: Vec<usize> = index.column("source_idx")?.u64()?.iter().map(|v| v.unwrap_or(0) as usize).collect();
        if source_idx.len() != n {
            bail!("{}: {n} copies but {} index rows", a.dir.display(), source_idx.len());
        }
        Ok(AugmentedSet { data, n, size, source_idx })
    }

    pub fn images(&self) -> &[u8] {
        self.data.u8_ref("images").map(|(_, b)| b).unwrap_or(&[])
    }

    pub fn masks(&self) -> &[u8] {
        self.data.u8_ref("masks").map(|(_, b)| b).unwrap_or(&[])
    }
}
