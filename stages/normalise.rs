//! normalise: window HU (or scale 8-bit) to [0, 1], resize to the profile's
//! resolution, choose slices, and store everything as one uint8 tensor.
//!
//! inputs: ingest (slices.parquet, cases/*.safetensors)
//! outputs: data.safetensors (images, masks: [N, S, S] uint8), index.parquet

use anyhow::{bail, Context, Result};
use crate::engine::params::{param, ParamType::*, ParamSpec};
use crate::engine::stage::{Stage, StageContext, StageInfo, Summary};
use crate::engine::table::{read_parquet, write_parquet, write_safetensors, NamedTensor, TensorFile};
use crate::imaging::resize;
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
fn scaled_resize_with<T: Copy>(src: &[T], value: impl Fn(T) -> f32 + Copy, hu: bool, minmax: bool, (lo, hi): (f32, f32), (h, w): (usize, usize), size: usize) -> Vec<u8> {
    let (off, span) = if hu {
        (lo, hi - lo)
    } else if minmax {
        let (mn, mx) = src.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(value(v)), b.max(value(v))));
        (mn, (mx - mn).max(1.0))
    } else {
        (0.0, 255.0)
    };
    resize::bilinear_map_to_u8(src, |v| ((value(v) - off) / span).clamp(0.0, 1.0), h, w, size, size)
}

struct Kept {
    row: usize,
    image: Vec<u8>,
    mask: Vec<u8>,
    liver: u64,
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
        let bar = crate::progress::bar(groups.len() as u64, "normalise", ctx.show_progress);
        let per_case: Vec<Vec<Kept>> = groups
            .par_iter()
            .map(|(case, rows)| {
                let path = ingest.file(&format!("cases/{case}.safetensors"));
                let tf = TensorFile::open(&path)?;
                let (mshape, masks) = tf.u8_ref("mask")?;
                let (n, h, w) = (mshape[0], mshape[1], mshape[2]);
                if n != rows.len() {
                    bail!("{}: {n} slices but slices.parquet lists {}", path.display(), rows.len());
                }
                let hu = units.get(rows[0]) == Some("HU");
                // Intensities are mapped to [0, 1] row by row inside the resize
                // (no converted copy of the volume).
                let image = match tf.get("image")? {
                    (_, bytes, safetensors::Dtype::I16) => Raw::I16(bytes.as_chunks::<2>().0),
                    _ => Raw::U8(tf.u8_ref("image")?.1),
                };
                let mut out = Vec::with_capacity(n);
                for (k, &row) in rows.iter().enumerate() {
                    let range = k * h * w..(k + 1) * h * w;
                    let image = match &image {
                        Raw::I16(v) => scaled_resize_with(&v[range], |b| f32::from(i16::from_le_bytes(b)), hu, minmax, (lo, hi), (h, w), size),
                        Raw::U8(v) => scaled_resize(&v[range], hu, minmax, (lo, hi), (h, w), size),
                    };
                    let mask = resize::nearest(&masks[k * h * w..(k + 1) * h * w], h, w, size, size);
                    let liver = mask.iter().map(|&v| v as u64).sum();
                    out.push(Kept { row, image, mask, liver });
                }
                bar.inc(1);
                Ok(out)
            })
            .collect::<Result<_>>()?;
        bar.finish_and_clear();

        let total: usize = per_case.iter().map(Vec::len).sum();
        let mut kept: Vec<Kept> = Vec::with_capacity(total);
        let (mut dropped_empty, mut kept_empty) = (0u64, 0u64);
        let mut rng = Rng::new(seed);
        for k in per_case.into_iter().flatten() {
            let keep = match policy {
                "all" => true,
                "liver" => k.liver > 0,
                _ => k.liver > 0 || rng.f64() < empty_fraction,
            };
            if keep {
                kept_empty += u64::from(k.liver == 0);
                kept.push(k);
            } else {
                dropped_empty += 1;
            }
        }
        if kept.is_empty() {
            bail!("normalise: the slice policy `{policy}` kept no slices");
        }
        let n = kept.len();
        let mut images = Vec::with_capacity(n * size * size);
        let mut masks = Vec::with_capacity(n * size * size);
        for k in &kept {
            images.extend_from_slice(&k.image);
            masks.extend_from_slice(&k.mask);
        }
        write_safetensors(
            &ctx.out("data.safetensors"),
            &[NamedTensor::u8("images", vec![n, size, size], images), NamedTensor::u8("masks", vec![n, size, size], masks)],
            &ctx.provenance(),
        )?;
        let take = |name: &str| -> Result<Column> {
            let idx: Vec<IdxSize> = kept.iter().map(|k| k.row as IdxSize).collect();
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
            Column::new("src_rows".into(), kept.iter().map(|k| table.column("rows").ok().and_then(|c| c.u64().ok()?.get(k.row)).unwrap_or(0)).collect::<Vec<_>>()),
            Column::new("liver_pixels".into(), kept.iter().map(|k| k.liver).collect::<Vec<_>>()),
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
