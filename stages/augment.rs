//! augment: N randomly transformed copies of every training slice (rotation,
//! shift, mirroring; optional intensity jitter and elastic deformation).
//! Validation and test slices are never read here, so no augmented copy of
//! a held-out image can reach training.
//!
//! inputs: normalise (data.safetensors), split (assignment.parquet)
//! outputs: augmented.safetensors (images, masks: [M, S, S] uint8), index.parquet

use anyhow::{bail, Result};
use crate::engine::params::{param, ParamType::*, ParamSpec};
use crate::engine::stage::{Stage, StageContext, StageInfo, Summary};
use crate::engine::table::{read_parquet, write_parquet, write_safetensors, NamedTensor, TensorFile};
use crate::rng::Rng;
use polars::prelude::{Column, DataFrame};
use rayon::prelude::*;

pub const VERSION: u32 = 1;
const PARAMS: &[ParamSpec] = &[
    param("copies", Int, "2", "augmented copies per training slice"),
    param("rotation_deg", Float, "15", "rotation drawn from ±this many degrees"),
    param("shift", Float, "0.1", "translation drawn from ±this fraction of the side"),
    param("mirror", Bool, "true", "mirror left-right with probability 1/2"),
    param("intensity_jitter", Float, "0.0", "contrast and brightness jitter (fraction), 0 = off"),
    param("elastic_alpha", Float, "0.0", "elastic displacement in pixels, 0 = off"),
    param("seed", Int, "1", "augmentation seed"),
];

pub static INFO: StageInfo = StageInfo {
    name: "augment",
    version: VERSION,
    inputs: &["normalise", "split"],
    outputs: &["augmented.safetensors", "index.parquet"],
    params: PARAMS,
    about: "augment the training split only",
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

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p = ctx.params;
        let copies = p.usize("copies")?;
        let rot = p.f64("rotation_deg")?.to_radians() as f32;
        let shift = p.f64("shift")? as f32;
        let mirror = p.bool("mirror")?;
        let jitter = p.f64("intensity_jitter")? as f32;
        let alpha = p.f64("elastic_alpha")? as f32;
        let seed = p.u64("seed")?;
        if !(0.0..=0.5).contains(&shift) || rot < 0.0 || jitter < 0.0 || alpha < 0.0 {
            bail!("augment: shift must be in [0, 0.5] and rotation_deg, intensity_jitter, elastic_alpha ≥ 0");
        }
        let norm = ctx.upstream("normalise")?;
        let split = ctx.upstream("split")?;
        let assignment = read_parquet(&split.file("assignment.parquet"))?;
        let train: Vec<usize> = assignment
            .column("split")?
            .str()?
            .iter()
            .enumerate()
            .filter(|(_, s)| *s == Some("train"))
            .map(|(i, _)| i)
            .collect();
        let data = TensorFile::open(&norm.file("data.safetensors"))?;
        let (shape, images) = data.u8("images")?;
        let (_, masks) = data.u8("masks")?;
        let size = shape[1];
        let jobs: Vec<(usize, usize)> = train.iter().flat_map(|&i| (0..copies).map(move |k| (i, k))).collect();
        let out: Vec<(Vec<u8>, Vec<u8>)> = jobs
            .par_iter()
            .map(|&(i, k)| {
                let mut r = Rng::derive(seed, (i * copies + k) as u64);
                let t = Transform {
                    angle: r.range(-1.0, 1.0) as f32 * rot,
                    dx: r.range(-1.0, 1.0) as f32 * shift * size as f32,
                    dy: r.range(-1.0, 1.0) as f32 * shift * size as f32,
                    mirror: mirror && r.f64() < 0.5,
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
                };
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
        write_safetensors(
            &ctx.out("augmented.safetensors"),
            &[NamedTensor::u8("images", vec![m, size, size], ai), NamedTensor::u8("masks", vec![m, size, size], am)],
            &ctx.provenance(),
        )?;
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
