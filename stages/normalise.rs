//! normalise: window HU (or scale 8-bit) to [0, 1], resize to the profile's
//! resolution, choose slices, and stream them case by case into one file.
//!
//! inputs: ingest (slices.parquet, cases/*.safetensors)
//! outputs: data.safetensors (images, masks: [N, S, S] uint8), index.parquet
//! read downstream through [`NormalisedSet`].

use crate::ingest::{CaseImage, CaseView, IngestedCases};
use anyhow::{bail, Context, Result};
use liverseg_engine::params::Params;
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_engine::store::Artifact;
use liverseg_engine::tables::{read_parquet, write_parquet};
use liverseg_engine::tensors::{TensorFile, TensorFileWriter};
use liverseg_imaging::liver_count;
use liverseg_imaging::resize::{self, Fit};
use liverseg_recipe::choices;
use liverseg_rng::Rng;
use polars::prelude::{Column, DataFrame, IdxSize};
use rayon::prelude::*;

/// 2: a slice whose field of view is not square keeps its aspect (letterboxed).
pub const VERSION: u32 = 2;

/// The largest `size`: a 1024² slice is four times a CT's native 512².
const MAX_SIZE: usize = 1024;

choices!(
    /// Which slices normalise keeps.
    SlicePolicy { All = "all", Liver = "liver", LiverPlusEmpty = "liver_plus_empty" }
);

liverseg_engine::params! {
    pub struct NormaliseParams {
        size: usize = int "128", "output side in pixels (a multiple of 16 for the models)";
        window: Vec<f64> = floats "[-100, 400]", "HU window mapped to [0, 1]";
        minmax_8bit: bool = bool "false", "8-bit input: stretch each image to its own min..max";
        slices: SlicePolicy = choice "all", "which slices to keep";
        empty_fraction: f64 = float "0.1", "liver_plus_empty: kept fraction of liver-free slices";
        seed: u64 = int "0", "seed for choosing liver-free slices";
    }
}

impl NormaliseParams {
    /// The HU window as (low, high), checked.
    pub fn window(&self) -> Result<(f32, f32)> {
        match self.window[..] {
            [lo, hi] if lo < hi => Ok((lo as f32, hi as f32)),
            _ => bail!("normalise.window must be [low, high] with low < high, got {:?}", self.window),
        }
    }
}

pub static INFO: StageInfo = StageInfo {
    name: "normalise",
    version: VERSION,
    about: "window, resize and select slices",
    inputs: &["ingest"],
    optional_inputs: &[],
    collects: &[],
    per_dataset: true,
    dataset_requires: &[],
    outputs: &["data.safetensors", "index.parquet"],
    params: NormaliseParams::SPECS,
    placement: Placement::InProcess,
};

pub struct Normalise;

impl Stage for Normalise {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn check(&self, params: &Params) -> Result<()> {
        let p: NormaliseParams = params.typed()?;
        if p.size == 0 || p.size % 16 != 0 || p.size > MAX_SIZE {
            bail!("size must be a positive multiple of 16 (DeepLabV3+ has output stride 16) up to {MAX_SIZE}, got {}", p.size);
        }
        p.window()?;
        if !(0.0..=1.0).contains(&p.empty_fraction) {
            bail!("empty_fraction must be in [0, 1], got {}", p.empty_fraction);
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p: NormaliseParams = ctx.params.typed()?;
        let cases = IngestedCases::open(ctx.upstream("ingest")?)?;
        let keep = choose_slices(&cases, &p)?;
        let n: usize = keep.iter().map(Vec::len).sum();
        if n == 0 {
            bail!("normalise: the slice policy `{}` kept no slices", p.slices);
        }
        let livers = write_images(ctx, &cases, &keep, &p)?;
        let kept: Vec<(usize, u64)> = cases.groups.iter().zip(&keep).zip(&livers).flat_map(|(((_, rows), ks), ls)| ks.iter().zip(ls).map(|(&k, &l)| (rows[k], l))).collect();
        write_index(ctx, &cases, &kept)?;
        let total = cases.table.height();
        let mut s = Summary::new();
        s.insert("slices_in".into(), total.into());
        s.insert("slices_kept".into(), n.into());
        s.insert("empty_slices_kept".into(), (kept.iter().filter(|k| k.1 == 0).count() as u64).into());
        s.insert("empty_slices_dropped".into(), ((total - n) as u64).into());
        s.insert("size".into(), p.size.into());
        Ok(s)
    }
}

/// The slices each case keeps, by position in the case. A policy other than
/// `all` depends on the resized masks' liver pixels, so it counts them first
/// (masks are cheap).
fn choose_slices(cases: &IngestedCases, p: &NormaliseParams) -> Result<Vec<Vec<usize>>> {
    let size = p.size;
    let livers: Option<Vec<Vec<u64>>> = match p.slices {
        SlicePolicy::All => None,
        _ => Some(
            (0..cases.groups.len())
                .into_par_iter()
                .map(|g| {
                    let tf = cases.open_case(g)?;
                    let view = cases.view(&tf, g)?;
                    let fit = cases.fit(g, &view, size);
                    let (mut full, mut mask) = (Vec::new(), vec![0u8; size * size]);
                    Ok((0..view.n)
                        .map(|k| {
                            model_mask(&view, k, &fit, &mut full, &mut mask);
                            liver_count(&mask)
                        })
                        .collect())
                })
                .collect::<Result<_>>()?,
        ),
    };
    let mut rng = Rng::new(p.seed);
    Ok(cases
        .groups
        .iter()
        .enumerate()
        .map(|(g, (_, rows))| {
            (0..rows.len())
                .filter(|&k| match (&livers, p.slices) {
                    (None, _) => true,
                    (Some(l), SlicePolicy::Liver) => l[g][k] > 0,
                    (Some(l), _) => l[g][k] > 0 || rng.f64() < p.empty_fraction,
                })
                .collect()
        })
        .collect())
}

/// Resize each case into its own buffers and write it straight to its place
/// in data.safetensors: memory stays at a few cases, however large the
/// dataset. Returns the kept slices' liver pixels at the new size.
fn write_images(ctx: &StageContext, cases: &IngestedCases, keep: &[Vec<usize>], p: &NormaliseParams) -> Result<Vec<Vec<u64>>> {
    let (size, plane) = (p.size, p.size * p.size);
    let n: usize = keep.iter().map(Vec::len).sum();
    let (lo, hi) = p.window()?;
    let tensors = [("images", safetensors::Dtype::U8, vec![n, size, size]), ("masks", safetensors::Dtype::U8, vec![n, size, size])];
    let out = TensorFileWriter::create(&ctx.out("data.safetensors"), &tensors, &ctx.provenance())?;
    let starts: Vec<usize> = keep
        .iter()
        .scan(0, |acc, k| {
            let s = *acc;
            *acc += k.len();
            Some(s)
        })
        .collect();
    let bar = liverseg_engine::progress::bar(cases.groups.len() as u64, "normalise", ctx.show_progress);
    let livers = (0..cases.groups.len())
        .into_par_iter()
        // Each worker reuses its buffers from case to case (every byte is
        // overwritten, so they are zeroed only when they grow).
        .map_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(images, masks, full_mask), g| {
                let ks = &keep[g];
                let tf = cases.open_case(g)?;
                let view = cases.view(&tf, g)?;
                let fit = cases.fit(g, &view, size);
                let hu = cases.unit(g) == Some("HU");
                for buf in [&mut *images, &mut *masks] {
                    buf.resize(ks.len() * plane, 0);
                }
                let mut livers = Vec::with_capacity(ks.len());
                for ((&k, image), mask) in ks.iter().zip(images.chunks_exact_mut(plane)).zip(masks.chunks_exact_mut(plane)) {
                    model_input(&view, k, hu, p.minmax_8bit, (lo, hi), &fit, image);
                    model_mask(&view, k, &fit, full_mask, mask);
                    livers.push(liver_count(mask));
                }
                out.write_at("images", starts[g] * plane, images)?;
                out.write_at("masks", starts[g] * plane, masks)?;
                bar.inc(1);
                Ok(livers)
            },
        )
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    out.finish()?;
    Ok(livers)
}

/// Slice `k` of an ingested case as the models see it: intensities mapped
/// to [0, 1] (row by row inside the resize, no converted copy of the
/// volume) and resized to the side of `out` (size²). What normalise writes,
/// and what evaluation and prediction feed a model.
pub fn model_input(view: &CaseView, k: usize, hu: bool, minmax: bool, window: (f32, f32), fit: &Fit, out: &mut [u8]) {
    let range = k * view.h * view.w..(k + 1) * view.h * view.w;
    match &view.image {
        CaseImage::I16(v) => scaled_resize_into(&v[range], |b| f32::from(i16::from_le_bytes(b)), hu, minmax, window, fit, out),
        CaseImage::U8(v) => scaled_resize_into(&v[range], f32::from, hu, minmax, window, fit, out),
    }
}

/// Slice `k`'s liver mask, nearest-resized as `fit` places it into `out`;
/// `full` receives it at its own size.
pub fn model_mask(view: &CaseView, k: usize, fit: &Fit, full: &mut Vec<u8>, out: &mut [u8]) {
    view.mask_into(k, full);
    resize::fit_nearest_into(full, fit, out);
}

/// index.parquet: one row per kept slice, with ingest's columns for it.
fn write_index(ctx: &StageContext, cases: &IngestedCases, kept: &[(usize, u64)]) -> Result<()> {
    let table = &cases.table;
    let take = |name: &str| -> Result<Column> {
        let idx: Vec<IdxSize> = kept.iter().map(|k| k.0 as IdxSize).collect();
        Ok(table.column(name)?.take_slice(&idx)?)
    };
    let mut index = DataFrame::new_infer_height(vec![
        Column::new("idx".into(), (0..kept.len() as u64).collect::<Vec<_>>()),
        take("case_id")?,
        take("slice_index")?,
        take("source_file")?,
        take("spacing_row_mm")?,
        take("spacing_col_mm")?,
        take("unit")?,
        Column::new("src_rows".into(), kept.iter().map(|k| table.column("rows").ok().and_then(|c| c.u64().ok()?.get(k.0)).unwrap_or(0)).collect::<Vec<_>>()),
        Column::new("liver_pixels".into(), kept.iter().map(|k| k.1).collect::<Vec<_>>()),
    ])
    .context("cannot build index table")?;
    write_parquet(&ctx.out("index.parquet"), &mut index, &ctx.provenance())
}

/// One slice to [0, 1] (HU window, its own min..max, or /255) and resized
/// into the models' square as `fit` places it, as uint8. `predict` uses it
/// too, so new scans get exactly this.
pub fn scaled_resize<T: Copy + Into<f32>>(src: &[T], hu: bool, minmax: bool, window: (f32, f32), fit: &Fit) -> Vec<u8> {
    let mut out = vec![0u8; fit.size * fit.size];
    scaled_resize_into(src, |v| v.into(), hu, minmax, window, fit, &mut out);
    out
}

/// `scaled_resize` of pixels that `value` turns into numbers (e.g. i16 bytes), into `out`.
fn scaled_resize_into<T: Copy>(src: &[T], value: impl Fn(T) -> f32 + Copy, hu: bool, minmax: bool, (lo, hi): (f32, f32), fit: &Fit, out: &mut [u8]) {
    let (off, span) = if hu {
        (lo, hi - lo)
    } else if minmax {
        let (mn, mx) = src.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(value(v)), b.max(value(v))));
        (mn, (mx - mn).max(1.0))
    } else {
        (0.0, 255.0)
    };
    resize::fit_map_into_u8(src, |v| ((value(v) - off) / span).clamp(0.0, 1.0), fit, out);
}

/// normalise's output as downstream stages read it: the slices (borrowed
/// from the mapped file), their index rows, and the params that made them.
pub struct NormalisedSet {
    data: TensorFile,
    pub n: usize,
    pub size: usize,
    pub case_id: Vec<String>,
    pub slice_index: Vec<i64>,
    pub liver_pixels: Vec<u64>,
    /// Row spacing of the source slice (NaN when unknown) and its rows.
    pub spacing_row_mm: Vec<f64>,
    pub src_rows: Vec<u64>,
    /// Intensity unit of each slice's source (`HU` or `8bit`).
    pub units: Vec<String>,
    pub params: NormaliseParams,
    pub stage: String,
    pub key: String,
}

impl NormalisedSet {
    pub fn open(a: &Artifact) -> Result<Self> {
        let data = TensorFile::open(&a.file("data.safetensors"))?;
        let (shape, _) = data.u8_ref("images").with_context(|| a.file("data.safetensors").display().to_string())?;
        let (mshape, _) = data.u8_ref("masks").with_context(|| a.file("data.safetensors").display().to_string())?;
        let [n, size, side] = shape[..] else { bail!("{}: images have shape {shape:?}, expected [n, size, size]", a.dir.display()) };
        if side != size || mshape != shape {
            bail!("{}: images {shape:?} and masks {mshape:?} are not [n, size, size] alike", a.dir.display());
        }
        let index = read_parquet(&a.file("index.parquet"))?;
        let strs = |c: &str| -> Result<Vec<String>> { Ok(index.column(c)?.str()?.iter().map(|v| v.unwrap_or_default().to_owned()).collect()) };
        let u64s = |c: &str| -> Result<Vec<u64>> { Ok(index.column(c)?.u64()?.iter().map(|v| v.unwrap_or(0)).collect()) };
        let set = NormalisedSet {
            n,
            size,
            case_id: strs("case_id")?,
            slice_index: index.column("slice_index")?.i64()?.iter().map(|v| v.unwrap_or(-1)).collect(),
            liver_pixels: u64s("liver_pixels")?,
            spacing_row_mm: index.column("spacing_row_mm")?.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect(),
            src_rows: u64s("src_rows")?,
            units: strs("unit")?,
            params: liverseg_engine::params::Params(serde_json::from_value(a.manifest.params.clone())?).typed()?,
            stage: a.stage.clone(),
            key: a.key.clone(),
            data,
        };
        if set.case_id.len() != n {
            bail!("{}: {n} images but {} index rows", a.dir.display(), set.case_id.len());
        }
        Ok(set)
    }

    /// The slices' intensity unit: `HU`, `8bit`, or `mixed`.
    pub fn unit(&self) -> &str {
        match self.units.first() {
            Some(u) if self.units.iter().all(|v| v == u) => u,
            Some(_) => "mixed",
            None => "none",
        }
    }

    /// Every image, [n, size, size].
    pub fn images(&self) -> &[u8] {
        self.data.u8_ref("images").map(|(_, b)| b).unwrap_or(&[])
    }

    /// Every mask (0/1), [n, size, size].
    pub fn masks(&self) -> &[u8] {
        self.data.u8_ref("masks").map(|(_, b)| b).unwrap_or(&[])
    }

    /// The images and masks of `rows`, in that order, copied out.
    pub fn select(&self, rows: &[usize]) -> (Vec<u8>, Vec<u8>) {
        let px = self.size * self.size;
        let (images, masks) = (self.images(), self.masks());
        let mut out = (Vec::with_capacity(rows.len() * px), Vec::with_capacity(rows.len() * px));
        for &i in rows {
            out.0.extend_from_slice(&images[i * px..(i + 1) * px]);
            out.1.extend_from_slice(&masks[i * px..(i + 1) * px]);
        }
        out
    }
}
