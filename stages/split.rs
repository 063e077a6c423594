//! split: 70/16/14 train/validation/test by patient, never by slice,
//! stratified by liver area. Slices exported twice (flipped and mirrored
//! copies of one slice) are found by content; if such a pair spans two
//! patients, those patients are kept in one split.
//!
//! inputs: normalise (data.safetensors, index.parquet)
//! outputs: assignment.parquet, counts.parquet, duplicates.parquet

use anyhow::{bail, Result};
use crate::engine::params::{param, ParamType::*, ParamSpec};
use crate::engine::stage::{Stage, StageContext, StageInfo, Summary};
use crate::engine::table::{read_parquet, write_parquet, TensorFile};
use crate::rng::Rng;
use polars::prelude::{Column, DataFrame};
use std::collections::BTreeMap;

pub const VERSION: u32 = 1;
pub const SPLITS: [&str; 3] = ["train", "val", "test"];
const PARAMS: &[ParamSpec] = &[
    param("fractions", FloatList, "[0.70, 0.16, 0.14]", "train, validation, test shares of patients"),
    param("seed", Int, "42", "split seed"),
    param("duplicate_tolerance", Float, "3.0", "mean absolute pixel difference (0..255), after undoing a flip, under which two slices are one"),
];

pub static INFO: StageInfo = StageInfo {
    name: "split",
    version: VERSION,
    inputs: &["normalise"],
    outputs: &["assignment.parquet", "counts.parquet", "duplicates.parquet"],
    params: PARAMS,
    about: "patient-level 70/16/14 split, stratified by liver area",
};

pub struct Split;

const THUMB: usize = 16;

/// 16×16 mean-pooled thumbnail of a square u8 image.
fn thumbnail(img: &[u8], size: usize) -> [f32; THUMB * THUMB] {
    let mut t = [0f32; THUMB * THUMB];
    let cell = size / THUMB;
    for ty in 0..THUMB {
        for tx in 0..THUMB {
            let mut sum = 0u32;
            for y in ty * cell..(ty + 1) * cell {
                for x in tx * cell..(tx + 1) * cell {
                    sum += img[y * size + x] as u32;
                }
            }
            t[ty * THUMB + tx] = sum as f32 / (cell * cell) as f32;
        }
    }
    t
}

/// The thumbnail under the four flips (none, vertical, horizontal, both).
fn flips(t: &[f32; THUMB * THUMB]) -> [[f32; THUMB * THUMB]; 4] {
    let mut out = [[0f32; THUMB * THUMB]; 4];
    for y in 0..THUMB {
        for x in 0..THUMB {
            let v = t[y * THUMB + x];
            out[0][y * THUMB + x] = v;
            out[1][(THUMB - 1 - y) * THUMB + x] = v;
            out[2][y * THUMB + THUMB - 1 - x] = v;
            out[3][(THUMB - 1 - y) * THUMB + THUMB - 1 - x] = v;
        }
    }
    out
}

/// Between `a` under flip `f` (0 none, 1 vertical, 2 horizontal, 3 both) and
/// `b`: the mean absolute difference over pixels that are not black in both
/// (so empty air does not make noisy neighbours look alike), and the Dice of
/// the masks (nearest-neighbour resizing shifts flipped masks by a pixel).
fn flipped_difference(a: &[u8], am: &[u8], b: &[u8], bm: &[u8], size: usize, f: usize) -> (f32, f64) {
    let (mut sum, mut count, mut inter, mut total) = (0u64, 0u64, 0u64, 0u64);
    for y in 0..size {
        let sy = if f == 1 || f == 3 { size - 1 - y } else { y };
        for x in 0..size {
            let sx = if f == 2 || f == 3 { size - 1 - x } else { x };
            let (ia, ib) = (sy * size + sx, y * size + x);
            if a[ia] > 0 || b[ib] > 0 {
                sum += a[ia].abs_diff(b[ib]) as u64;
                count += 1;
            }
            inter += u64::from(am[ia] > 0 && bm[ib] > 0);
            total += am[ia] as u64 + bm[ib] as u64;
        }
    }
    let dice = if total == 0 { 1.0 } else { 2.0 * inter as f64 / total as f64 };
    (sum as f32 / count.max(1) as f32, dice)
}

fn find(parent: &mut [usize], i: usize) -> usize {
    let mut r = i;
    while parent[r] != r {
        r = parent[r];
    }
    let mut j = i;
    while parent[j] != r {
        let next = parent[j];
        parent[j] = r;
        j = next;
    }
    r
}

/// Assign units (groups of patients) to splits: targets by count, and within
/// that, units sorted by liver area are dealt to the split furthest below its
/// target, so each split gets small and large livers alike.
pub fn assign(units: &[(String, u64)], fractions: &[f64], seed: u64) -> Vec<usize> {
    let n = units.len();
    let mut targets: Vec<usize> = fractions.iter().map(|f| (f * n as f64).floor() as usize).collect();
    // Hand the remainder to the splits with the largest fractional parts.
    let mut rem: Vec<(f64, usize)> = fractions.iter().enumerate().map(|(i, f)| (f * n as f64 - (f * n as f64).floor(), i)).collect();
    rem.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut left = n - targets.iter().sum::<usize>();
    for (_, i) in rem {
        if left == 0 {
            break;
        }
        targets[i] += 1;
        left -= 1;
    }
    // Every split gets at least one unit, taken from the largest.
    for s in 0..targets.len() {
        if targets[s] == 0 {
            let (big, _) = targets.iter().enumerate().max_by_key(|(_, &t)| t).expect("non-empty");
            if targets[big] > 1 {
                targets[big] -= 1;
                targets[s] = 1;
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    rng.shuffle(&mut order);
    // Stable sort by liver area keeps the seeded order among ties.
    order.sort_by_key(|&i| std::cmp::Reverse(units[i].1));
    // Within blocks of ~10 similar livers, a seeded shuffle varies who goes where.
    for block in order.chunks_mut(10) {
        rng.shuffle(block);
    }
    let mut counts = vec![0usize; fractions.len()];
    let mut out = vec![0usize; n];
    for (pos, &i) in order.iter().enumerate() {
        let done = pos as f64 / n as f64;
        let s = (0..fractions.len())
            .filter(|&s| counts[s] < targets[s])
            .max_by(|&a, &b| {
                let da = targets[a] as f64 * done.max(1e-9) - counts[a] as f64 + targets[a] as f64 / n as f64;
                let db = targets[b] as f64 * done.max(1e-9) - counts[b] as f64 + targets[b] as f64 / n as f64;
                da.total_cmp(&db).then(b.cmp(&a))
            })
            .expect("targets sum to n");
        counts[s] += 1;
        out[i] = s;
    }
    out
}

impl Stage for Split {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p = ctx.params;
        let fractions = p.f64_list("fractions")?;
        if fractions.len() != 3 || fractions.iter().any(|f| *f <= 0.0) || (fractions.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
            bail!("split.fractions must be three positive shares summing to 1, got {fractions:?}");
        }
        let tol = p.f64("duplicate_tolerance")? as f32;
        let norm = ctx.upstream("normalise")?;
        let index = read_parquet(&norm.file("index.parquet"))?;
        let data = TensorFile::open(&norm.file("data.safetensors"))?;
        let (shape, images) = data.u8("images")?;
        let (n, size) = (shape[0], shape[1]);
        let cases: Vec<String> = index.column("case_id")?.str()?.iter().map(|c| c.unwrap_or_default().to_owned()).collect();
        let liver: Vec<u64> = index.column("liver_pixels")?.u64()?.iter().map(|v| v.unwrap_or(0)).collect();
        if cases.len() != n {
            bail!("normalise artifact is inconsistent: {n} images, {} index rows", cases.len());
        }

        // Duplicate slices: compare flip-variants of thumbnails, only between
        // slices with similar liver area (flip-invariant), sorted by it.
        let thumbs: Vec<[f32; THUMB * THUMB]> = (0..n).map(|i| thumbnail(&images[i * size * size..(i + 1) * size * size], size)).collect();
        let mut by_liver: Vec<usize> = (0..n).collect();
        by_liver.sort_by_key(|&i| (liver[i], i));
        let (_, masks) = data.u8("masks")?;
        let px = size * size;
        let mut dups: Vec<(usize, usize, f32)> = Vec::new();
        for a in 0..n {
            let i = by_liver[a];
            let variants = flips(&thumbs[i]);
            for &j in &by_liver[a + 1..] {
                if liver[j] as f64 > liver[i] as f64 * 1.05 + 16.0 {
                    break;
                }
                // Cheap thumbnail screen, then the full images and masks decide.
                for (f, v) in variants.iter().enumerate() {
                    let thumb_mad = v.iter().zip(thumbs[j].iter()).map(|(x, y)| (x - y).abs()).sum::<f32>() / (THUMB * THUMB) as f32;
                    if thumb_mad >= tol {
                        continue;
                    }
                    let (mad, mask_dice) = flipped_difference(&images[i * px..(i + 1) * px], &masks[i * px..(i + 1) * px], &images[j * px..(j + 1) * px], &masks[j * px..(j + 1) * px], size, f);
                    if mad < tol && mask_dice >= 0.9 {
                        dups.push((i.min(j), i.max(j), mad));
                        break;
                    }
                }
            }
        }
        dups.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));

        // Units: patients joined by cross-patient duplicates.
        let patients: Vec<String> = {
            let mut v = cases.clone();
            v.sort();
            v.dedup();
            v
        };
        let pid: BTreeMap<&str, usize> = patients.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
        let mut parent: Vec<usize> = (0..patients.len()).collect();
        let mut crossing = 0;
        for &(i, j, _) in &dups {
            let (a, b) = (pid[cases[i].as_str()], pid[cases[j].as_str()]);
            if a != b {
                crossing += 1;
                let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
                parent[ra.max(rb)] = ra.min(rb);
                if ctx.show_progress && crossing <= 10 {
                    eprintln!("split: slice {i} (patient {}) duplicates slice {j} (patient {}); keeping both patients in one split", cases[i], cases[j]);
                }
            }
        }
        let mut unit_of = vec![0usize; patients.len()];
        let mut units: Vec<(String, u64)> = Vec::new();
        let mut root_unit: BTreeMap<usize, usize> = BTreeMap::new();
        for (pi, name) in patients.iter().enumerate() {
            let r = find(&mut parent, pi);
            let u = *root_unit.entry(r).or_insert_with(|| {
                units.push((name.clone(), 0));
                units.len() - 1
            });
            unit_of[pi] = u;
        }
        for i in 0..n {
            units[unit_of[pid[cases[i].as_str()]]].1 += liver[i];
        }
        if units.len() < 3 {
            bail!("split needs at least 3 independent patients, found {}", units.len());
        }
        let unit_split = assign(&units, &fractions, p.u64("seed")?);
        let split_of_slice: Vec<usize> = (0..n).map(|i| unit_split[unit_of[pid[cases[i].as_str()]]]).collect();

        let mut assignment = DataFrame::new_infer_height(vec![
            Column::new("idx".into(), (0..n as u64).collect::<Vec<_>>()),
            Column::new("case_id".into(), cases.clone()),
            Column::new("split".into(), split_of_slice.iter().map(|&s| SPLITS[s]).collect::<Vec<_>>()),
        ])?;
        write_parquet(&ctx.out("assignment.parquet"), &mut assignment, &ctx.provenance())?;
        let mut summary = Summary::new();
        let (mut c_cases, mut c_slices, mut c_liver) = (vec![], vec![], vec![]);
        for (s, name) in SPLITS.iter().enumerate() {
            let pats: std::collections::BTreeSet<&str> = (0..n).filter(|&i| split_of_slice[i] == s).map(|i| cases[i].as_str()).collect();
            let slices = split_of_slice.iter().filter(|&&x| x == s).count();
            let lv: u64 = (0..n).filter(|&i| split_of_slice[i] == s).map(|i| liver[i]).sum();
            summary.insert(format!("{name}_cases"), pats.len().into());
            summary.insert(format!("{name}_slices"), slices.into());
            c_cases.push(pats.len() as u64);
            c_slices.push(slices as u64);
            c_liver.push(lv);
        }
        let mut counts = DataFrame::new_infer_height(vec![
            Column::new("split".into(), SPLITS.to_vec()),
            Column::new("cases".into(), c_cases),
            Column::new("slices".into(), c_slices),
            Column::new("liver_pixels".into(), c_liver),
        ])?;
        write_parquet(&ctx.out("counts.parquet"), &mut counts, &ctx.provenance())?;
        let mut dup_df = DataFrame::new_infer_height(vec![
            Column::new("idx_a".into(), dups.iter().map(|d| d.0 as u64).collect::<Vec<_>>()),
            Column::new("idx_b".into(), dups.iter().map(|d| d.1 as u64).collect::<Vec<_>>()),
            Column::new("case_a".into(), dups.iter().map(|d| cases[d.0].clone()).collect::<Vec<_>>()),
            Column::new("case_b".into(), dups.iter().map(|d| cases[d.1].clone()).collect::<Vec<_>>()),
            Column::new("thumb_mad".into(), dups.iter().map(|d| d.2).collect::<Vec<_>>()),
        ])?;
        write_parquet(&ctx.out("duplicates.parquet"), &mut dup_df, &ctx.provenance())?;
        summary.insert("duplicate_pairs".into(), dups.len().into());
        summary.insert("duplicate_pairs_across_patients".into(), crossing.into());
        if ctx.show_progress && !dups.is_empty() {
            eprintln!("split: {} duplicate slice pair(s), {crossing} across patients (listed in duplicates.parquet)", dups.len());
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_within_one_of_the_fractions() {
        for n in [10usize, 17, 50, 101] {
            let units: Vec<(String, u64)> = (0..n).map(|i| (i.to_string(), (i * 37 % 11) as u64)).collect();
            let a = assign(&units, &[0.7, 0.16, 0.14], 1);
            for (s, f) in [0.7, 0.16, 0.14].iter().enumerate() {
                let c = a.iter().filter(|&&x| x == s).count() as f64;
                assert!((c - f * n as f64).abs() <= 1.0, "n={n} split {s}: {c}");
            }
        }
    }
}
