//! normalise: window HU (or scale 8-bit) to [0, 1], resize to the profile's
//! resolution, choose slices, and stream them case by case into one file.
//!
//! inputs: ingest (slices.parquet, cases/*.safetensors)
//! outputs: data.safetensors (images, masks: [N, S, S] uint8), index.parquet

use anyhow::{bail, Context, Result};
use crate::engine::params::{param, ParamType::*, ParamSpec};
use crate::engine::stage::{Stage, StageContext, StageInfo, Summary};
use crate::engine::table::{read_parquet, write_parquet, TensorFile, TensorFileWriter};
use crate::imaging::{liver_count, resize, unpack_mask_row};
use crate::rng::Rng;
use polars::prelude::{Column, DataFrame, IdxSize};
use rayon::prelude::*;

pub const VERSION: u32 = 1;
const PARAMS: &[ParamSpec] = &[
    param("size", Int, "128", "output side in pixels (a multiple of 16 for the models)"),
    param("window", FloatList, "[-100, 400]", "HU window mapped to [0, 1]"),
    param("minmax_8bit", Bool, "false", "8-bit input: stretch each image to its own min..max"),
    param("slices", Choice(&["all", "liver", "liver_plus_empty"]), "all", "which slices to keep"),
    param("empty_fraction", Float, "0.1", "liver_plus_empty: kept fraction of liver-free slices"),
    param("seed", Int, "0", "seed for choosing liver-free slices"),
];

pub static INFO: StageInfo = StageInfo {
    name: "normalise",
    version: VERSION,
    inputs: &["ingest"],
    outputs: &["data.safetensors", "index.parquet"],
    params: PARAMS,
    about: "window, resize and select slices",
};

pub struct Normalise;

/// A case's source pixels, borrowed from ingest's file: HU as little-endian
/// i16, or 8-bit.
enum Raw<'a> {
    I16(&'a [[u8; 2]]),
    U8(&'a [u8]),
}

/// One slice to [0, 1] (HU window, its own min..max, or /255) and resized to
/// size², as uint8. `predict` uses it too, so new scans get exactly this.
pub fn scaled_resize<T: Copy + Into<f32>>(src: &[T], hu: bool, minmax: bool, window: (f32, f32), shape: (usize, usize), size: usize) -> Vec<u8> {
    scaled_resize_with(src, |v| v.into(), hu, minmax, window, shape, size)
}

/// `scaled_resize` of pixels that `value` turns into numbers (e.g. i16 bytes).
fn scaled_resize_with<T: Copy>(src: &[T], value: impl Fn(T) -> f32 + Copy, hu: bool, minmax: bool, window: (f32, f32), shape: (usize, usize), size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size * size];
    scaled_resize_into(src, value, hu, minmax, window, shape, &mut out);
    out
}

/// `scaled_resize_with` into `out` (size², size = √out.len()).
fn scaled_resize_into<T: Copy>(src: &[T], value: impl Fn(T) -> f32 + Copy, hu: bool, minmax: bool, (lo, hi): (f32, f32), (h, w): (usize, usize), out: &mut [u8]) {
    let (off, span) = if hu {
        (lo, hi - lo)
    } else if minmax {
        let (mn, mx) = src.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(value(v)), b.max(value(v))));
        (mn, (mx - mn).max(1.0))
    } else {
        (0.0, 255.0)
    };
    let size = out.len().isqrt();
    resize::bilinear_map_into_u8(src, |v| ((value(v) - off) / span).clamp(0.0, 1.0), h, w, out, size);
}

/// One case of ingest, borrowed from its mapped file.
struct CaseView<'a> {
    n: usize,
    h: usize,
    w: usize,
    image: Raw<'a>,
    /// The liver mask, 8 pixels per byte (see ingest).
    mask_bits: &'a [u8],
}

impl<'a> CaseView<'a> {
    fn new(tf: &'a TensorFile, path: &std::path::Path, listed: usize) -> Result<Self> {
        let what = || path.display().to_string();
        let (image, shape) = match tf.get("image").with_context(what)? {
            (shape, bytes, safetensors::Dtype::I16) => (Raw::I16(bytes.as_chunks::<2>().0), shape),
            (shape, bytes, safetensors::Dtype::U8) => (Raw::U8(bytes), shape),
            (_, _, dtype) => bail!("{}: image tensor is {dtype:?}, expected I16 or U8", path.display()),
        };
        let (mask_shape, mask_bits) = tf.u8_ref("mask_bits").with_context(what)?;
        let [n, h, w] = shape[..] else { bail!("{}: image tensor has shape {shape:?}, expected [slices, rows, cols]", path.display()) };
        if mask_shape != [n, h, w.div_ceil(8)] {
            bail!("{}: mask_bits has shape {mask_shape:?}, but {n}×{h}×{w} image pixels need [{n}, {h}, {}]", path.display(), w.div_ceil(8));
        }
        if n != listed {
            bail!("{}: {n} slices but slices.parquet lists {listed}", path.display());
        }
        Ok(CaseView { n, h, w, image, mask_bits })
    }

    /// Slice `k`'s mask as 0/1 bytes, into `out`.
    fn mask_into(&self, k: usize, out: &mut Vec<u8>) {
        let row_bytes = self.w.div_ceil(8);
        out.resize(self.h * self.w, 0);
        let bits = &self.mask_bits[k * self.h * row_bytes..(k + 1) * self.h * row_bytes];
        for (row, row_bits) in out.chunks_exact_mut(self.w).zip(bits.chunks_exact(row_bytes)) {
            unpack_mask_row(row_bits, row);
        }
    }
}

impl Stage for Normalise {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p = ctx.params;
        let size = p.usize("size")?;
        if size == 0 || size % 16 != 0 {
            bail!("normalise.size must be a positive multiple of 16 (DeepLabV3+ has output stride 16), got {size}");
        }
        let window = p.f64_list("window")?;
        if window.len() != 2 || window[0] >= window[1] {
            bail!("normalise.window must be [low, high] with low < high, got {window:?}");
        }
        let (lo, hi) = (window[0] as f32, window[1] as f32);
        let minmax = p.bool("minmax_8bit")?;
        let policy = p.str("slices")?;
        let empty_fraction = p.f64("empty_fraction")?;
        let seed = p.u64("seed")?;

        let ingest = ctx.upstream("ingest")?;
        let table = read_parquet(&ingest.file("slices.parquet"))?;
        let cases = table.column("case_id")?.str()?.clone();
        let units = table.column("unit")?.str()?.clone();
        // Rows of one case are contiguous and in tensor order.
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for i in 0..table.height() {
            let c = cases.get(i).unwrap_or_default().to_owned();
            match groups.last_mut() {
                Some((last, rows)) if *last == c => rows.push(i),
                _ => groups.push((c, vec![i])),
            }
        }
        let case_path = |case: &str| ingest.file(&format!("cases/{case}.safetensors"));
        let plane = size * size;

        // Which slices to keep depends on the resized masks' liver pixels, so
        // a policy other than `all` counts them first (masks are cheap).
        let livers: Option<Vec<Vec<u64>>> = if policy == "all" {
            None
        } else {
            let counted = groups
                .par_iter()
                .map(|(case, rows)| {
                    let path = case_path(case);
                    let tf = TensorFile::open(&path)?;
                    let view = CaseView::new(&tf, &path, rows.len())?;
                    let (mut full, mut mask) = (Vec::new(), vec![0u8; plane]);
                    Ok((0..view.n)
                        .map(|k| {
                            view.mask_into(k, &mut full);
                            resize::nearest_into(&full, view.h, view.w, &mut mask, size);
                            liver_count(&mask)
                        })
                        .collect())
                })
                .collect::<Result<_>>()?;
            Some(counted)
        };
        let mut rng = Rng::new(seed);
        let keep: Vec<Vec<usize>> = groups
            .iter()
            .enumerate()
            .map(|(g, (_, rows))| {
                (0..rows.len())
                    .filter(|&k| match &livers {
                        None => true,
                        Some(l) if policy == "liver" => l[g][k] > 0,
                        Some(l) => l[g][k] > 0 || rng.f64() < empty_fraction,
                    })
                    .collect()
            })
            .collect();
        let total = table.height();
        let n: usize = keep.iter().map(Vec::len).sum();
        if n == 0 {
            bail!("normalise: the slice policy `{policy}` kept no slices");
        }

        // Each case is resized into its own buffers and written straight to
        // its place in the output file: memory stays at a few cases, however
        // large the dataset.
        let out = TensorFileWriter::create(&ctx.out("data.safetensors"), &[("images", safetensors::Dtype::U8, vec![n, size, size]), ("masks", safetensors::Dtype::U8, vec![n, size, size])], &ctx.provenance())?;
        let starts: Vec<usize> = keep.iter().scan(0, |acc, k| { let s = *acc; *acc += k.len(); Some(s) }).collect();
        let bar = crate::progress::bar(groups.len() as u64, "normalise", ctx.show_progress);
        let kept_livers: Vec<Vec<u64>> = groups
            .par_iter()
            .zip(&keep)
            .zip(&starts)
            // Each worker reuses its buffers from case to case (every byte is
            // overwritten, so they are zeroed only when they grow).
            .map_init(|| (Vec::new(), Vec::new(), Vec::new()), |(images, masks, full_mask), (((case, rows), ks), &start)| {
                let path = case_path(case);
                let tf = TensorFile::open(&path)?;
                let view = CaseView::new(&tf, &path, rows.len())?;
                let hu = units.get(rows[0]) == Some("HU");
                for buf in [&mut *images, &mut *masks] {
                    buf.resize(ks.len() * plane, 0);
                }
                let mut livers = Vec::with_capacity(ks.len());
                for ((&k, image), mask) in ks.iter().zip(images.chunks_exact_mut(plane)).zip(masks.chunks_exact_mut(plane)) {
                    // Intensities are mapped to [0, 1] row by row inside the
                    // resize (no converted copy of the volume).
                    let range = k * view.h * view.w..(k + 1) * view.h * view.w;
                    match &view.image {
                        Raw::I16(v) => scaled_resize_into(&v[range], |b| f32::from(i16::from_le_bytes(b)), hu, minmax, (lo, hi), (view.h, view.w), image),
                        Raw::U8(v) => scaled_resize_into(&v[range], f32::from, hu, minmax, (lo, hi), (view.h, view.w), image),
                    }
                    view.mask_into(k, full_mask);
                    resize::nearest_into(full_mask, view.h, view.w, mask, size);
                    livers.push(liver_count(mask));
                }
                out.write_at("images", start * plane, images)?;
                out.write_at("masks", start * plane, masks)?;
                bar.inc(1);
                Ok(livers)
            })
            .collect::<Result<_>>()?;
        bar.finish_and_clear();
        out.finish()?;
        let kept: Vec<(usize, u64)> = groups.iter().zip(&keep).zip(&kept_livers).flat_map(|(((_, rows), ks), ls)| ks.iter().zip(ls).map(|(&k, &l)| (rows[k], l))).collect();
        let kept_empty = kept.iter().filter(|k| k.1 == 0).count() as u64;
        let dropped_empty = (total - n) as u64;
        let take = |name: &str| -> Result<Column> {
            let idx: Vec<IdxSize> = kept.iter().map(|k| k.0 as IdxSize).collect();
            Ok(table.column(name)?.take_slice(&idx)?)
        };
        let mut index = DataFrame::new_infer_height(vec![
            Column::new("idx".into(), (0..n as u64).collect::<Vec<_>>()),
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
        write_parquet(&ctx.out("index.parquet"), &mut index, &ctx.provenance())?;
        let mut s = Summary::new();
        s.insert("slices_in".into(), total.into());
        s.insert("slices_kept".into(), n.into());
        s.insert("empty_slices_kept".into(), kept_empty.into());
        s.insert("empty_slices_dropped".into(), dropped_empty.into());
        s.insert("size".into(), size.into());
        Ok(s)
    }
}
