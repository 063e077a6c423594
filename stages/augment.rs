//! augment: N randomly transformed copies of every training slice (rotation,
//! shift, mirroring; optional intensity jitter and elastic deformation).
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
use liverseg_rng::Rng;
use polars::prelude::{Column, DataFrame};
use rayon::prelude::*;

pub const VERSION: u32 = 1;

liverseg_engine::params! {
    pub struct AugmentParams {
        copies: usize = int "2", "augmented copies per training slice";
        rotation_deg: f64 = float "15", "rotation drawn from ±this many degrees";
        shift: f64 = float "0.1", "translation drawn from ±this fraction of the side";
        mirror: bool = bool "true", "mirror left-right with probability 1/2";
        intensity_jitter: f64 = float "0.0", "contrast and brightness jitter (fraction), 0 = off";
        elastic_alpha: f64 = float "0.0", "elastic displacement in pixels, 0 = off";
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

pub struct Transform {
    pub angle: f32,
    pub dx: f32,
    pub dy: f32,
    pub mirror: bool,
    pub gain: f32,
    pub bias: f32,
    /// Coarse 4×4 displacement grid (dx, dy) in pixels, upsampled bilinearly.
    pub elastic: Option<[[(f32, f32); 4]; 4]>,
}

/// Apply `t` to an image (bilinear) and its mask (nearest), both size×size.
pub fn apply(t: &Transform, img: &[u8], mask: &[u8], size: usize) -> (Vec<u8>, Vec<u8>) {
    let (c, s) = (t.angle.cos(), t.angle.sin());
    let mid = (size as f32 - 1.0) / 2.0;
    let mut oi = vec![0u8; size * size];
    let mut om = vec![0u8; size * size];
    for y in 0..size {
        for x in 0..size {
            let (mut fx, mut fy) = (x as f32, y as f32);
            if let Some(g) = &t.elastic {
                let gx = fx / (size - 1) as f32 * 3.0;
                let gy = fy / (size - 1) as f32 * 3.0;
                let (x0, y0) = ((gx as usize).min(2), (gy as usize).min(2));
                let (wx, wy) = (gx - x0 as f32, gy - y0 as f32);
                let lerp = |k: usize| {
                    let v = |a: usize, b: usize| if k == 0 { g[b][a].0 } else { g[b][a].1 };
                    (v(x0, y0) * (1.0 - wx) + v(x0 + 1, y0) * wx) * (1.0 - wy) + (v(x0, y0 + 1) * (1.0 - wx) + v(x0 + 1, y0 + 1) * wx) * wy
                };
                fx += lerp(0);
                fy += lerp(1);
            }
            if t.mirror {
                fx = size as f32 - 1.0 - fx;
            }
            // Inverse mapping: output pixel -> source position.
            let (px, py) = (fx - mid - t.dx, fy - mid - t.dy);
            let sx = c * px + s * py + mid;
            let sy = -s * px + c * py + mid;
            let i = y * size + x;
            if sx < 0.0 || sy < 0.0 || sx > (size - 1) as f32 || sy > (size - 1) as f32 {
                continue; // outside: air (0) and background
            }
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
            let (wx, wy) = (sx - x0 as f32, sy - y0 as f32);
            let at = |xx: usize, yy: usize| img[yy * size + xx] as f32;
            let v = (at(x0, y0) * (1.0 - wx) + at(x1, y0) * wx) * (1.0 - wy) + (at(x0, y1) * (1.0 - wx) + at(x1, y1) * wx) * wy;
            oi[i] = (v * t.gain + t.bias * 255.0).round().clamp(0.0, 255.0) as u8;
            om[i] = mask[(sy.round() as usize).min(size - 1) * size + (sx.round() as usize).min(size - 1)];
        }
    }
    (oi, om)
}

impl Stage for Augment {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn check(&self, params: &Params) -> Result<()> {
        let p: AugmentParams = params.typed()?;
        if !(0.0..=0.5).contains(&p.shift) || p.rotation_deg < 0.0 || p.intensity_jitter < 0.0 || p.elastic_alpha < 0.0 {
            bail!("shift must be in [0, 0.5] and rotation_deg, intensity_jitter, elastic_alpha ≥ 0");
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
        let jobs: Vec<(usize, usize)> = train.iter().flat_map(|&i| (0..p.copies).map(move |k| (i, k))).collect();
        let out: Vec<(Vec<u8>, Vec<u8>)> = jobs
            .par_iter()
            .map(|&(i, k)| {
                let t = draw(&p, Rng::derive(p.seed, (i * p.copies + k) as u64), size);
                let px = size * size;
                apply(&t, &images[i * px..(i + 1) * px], &masks[i * px..(i + 1) * px], size)
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

/// One random transform, drawn in a fixed order from `r`.
fn draw(p: &AugmentParams, mut r: Rng, size: usize) -> Transform {
    let (rot, shift, jitter, alpha) = (p.rotation_deg.to_radians() as f32, p.shift as f32, p.intensity_jitter as f32, p.elastic_alpha as f32);
    Transform {
        angle: r.range(-1.0, 1.0) as f32 * rot,
        dx: r.range(-1.0, 1.0) as f32 * shift * size as f32,
        dy: r.range(-1.0, 1.0) as f32 * shift * size as f32,
        mirror: p.mirror && r.f64() < 0.5,
        gain: 1.0 + r.range(-1.0, 1.0) as f32 * jitter,
        bias: r.range(-1.0, 1.0) as f32 * jitter * 0.5,
        elastic: (alpha > 0.0).then(|| {
            let mut g = [[(0f32, 0f32); 4]; 4];
            for row in g.iter_mut() {
                for cell in row.iter_mut() {
                    *cell = (r.normal() as f32 * alpha, r.normal() as f32 * alpha);
                }
            }
            g
        }),
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
