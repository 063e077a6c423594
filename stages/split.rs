//! split: 70/16/14 train/validation/test by patient, never by slice,
//! stratified by liver area. Slices exported twice (flipped and mirrored
//! copies of one slice) are found by content; if such a pair spans two
//! patients, those patients are kept in one split.
//!
//! inputs: normalise (data.safetensors, index.parquet)
//! outputs: assignment.parquet, counts.parquet, duplicates.parquet
//! read downstream through [`SplitAssignment`].

use crate::normalise::NormalisedSet;
use anyhow::{bail, Result};
use liverseg_engine::params::Params;
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_engine::store::Artifact;
use liverseg_engine::tables::{read_parquet, write_parquet};
use liverseg_recipe::choices;
use liverseg_rng::Rng;
use polars::prelude::{Column, DataFrame};
use std::collections::BTreeMap;

pub const VERSION: u32 = 1;

choices!(
    /// A part of the patient-level split.
    Part { Train = "train", Val = "val", Test = "test" }
);

liverseg_engine::params! {
    pub struct SplitParams {
        fractions: Vec<f64> = floats "[0.70, 0.16, 0.14]", "train, validation, test shares of patients";
        seed: u64 = int "42", "split seed";
        duplicate_tolerance: f64 = float "3.0", "mean absolute pixel difference (0..255), after undoing a flip, under which two slices are one";
    }
}

pub static INFO: StageInfo = StageInfo {
    name: "split",
    version: VERSION,
    about: "patient-level 70/16/14 split, stratified by liver area",
    inputs: &["normalise"],
    optional_inputs: &[],
    collects: &[],
    per_dataset: false,
    dataset_requires: &[],
    outputs: &["assignment.parquet", "counts.parquet", "duplicates.parquet"],
    params: SplitParams::SPECS,
    placement: Placement::InProcess,
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

    fn check(&self, params: &Params) -> Result<()> {
        let p: SplitParams = params.typed()?;
        let f = &p.fractions;
        if f.len() != 3 || f.iter().any(|f| *f <= 0.0) || (f.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
            bail!("fractions must be three positive shares summing to 1, got {f:?}");
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p: SplitParams = ctx.params.typed()?;
        let set = NormalisedSet::open(ctx.upstream("normalise")?)?;
        let dups = find_duplicates(&set, p.duplicate_tolerance as f32);
        let (unit_of_slice, units, crossing) = units(ctx, &set, &dups);
        if units.len() < 3 {
            bail!("split needs at least 3 independent patients, found {}", units.len());
        }
        let unit_split = assign(&units, &p.fractions, p.seed);
        let part: Vec<usize> = unit_of_slice.iter().map(|&u| unit_split[u]).collect();
        let mut summary = write_assignment(ctx, &set, &part)?;
        write_duplicates(ctx, &set, &dups)?;
        summary.insert("duplicate_pairs".into(), dups.len().into());
        summary.insert("duplicate_pairs_across_patients".into(), crossing.into());
        if ctx.show_progress && !dups.is_empty() {
            eprintln!("split: {} duplicate slice pair(s), {crossing} across patients (listed in duplicates.parquet)", dups.len());
        }
        Ok(summary)
    }
}

/// Pairs of slices that are one slice exported twice: (a, b, thumbnail
/// difference), a < b. Flip variants of thumbnails are compared only between
/// slices with similar liver area (flip-invariant), sorted by it.
fn find_duplicates(set: &NormalisedSet, tol: f32) -> Vec<(usize, usize, f32)> {
    let (n, size, px) = (set.n, set.size, set.size * set.size);
    let (images, masks, liver) = (set.images(), set.masks(), &set.liver_pixels);
    let thumbs: Vec<[f32; THUMB * THUMB]> = (0..n).map(|i| thumbnail(&images[i * px..(i + 1) * px], size)).collect();
    let mut by_liver: Vec<usize> = (0..n).collect();
    by_liver.sort_by_key(|&i| (liver[i], i));
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
    dups
}

/// Units are patients joined by duplicates across patients, with their
/// total liver area. Returns (unit of each slice, units, pairs across patients).
fn units(ctx: &StageContext, set: &NormalisedSet, dups: &[(usize, usize, f32)]) -> (Vec<usize>, Vec<(String, u64)>, usize) {
    let cases = &set.case_id;
    let mut patients = cases.clone();
    patients.sort();
    patients.dedup();
    let pid: BTreeMap<&str, usize> = patients.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let mut parent: Vec<usize> = (0..patients.len()).collect();
    let mut crossing = 0;
    for &(i, j, _) in dups {
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
    let unit_of_slice: Vec<usize> = cases.iter().map(|c| unit_of[pid[c.as_str()]]).collect();
    for (i, &u) in unit_of_slice.iter().enumerate() {
        units[u].1 += set.liver_pixels[i];
    }
    (unit_of_slice, units, crossing)
}

/// assignment.parquet and counts.parquet; returns the per-part counts as summary.
fn write_assignment(ctx: &StageContext, set: &NormalisedSet, part: &[usize]) -> Result<Summary> {
    let (n, cases) = (set.n, &set.case_id);
    let mut assignment = DataFrame::new_infer_height(vec![
        Column::new("idx".into(), (0..n as u64).collect::<Vec<_>>()),
        Column::new("case_id".into(), cases.clone()),
        Column::new("split".into(), part.iter().map(|&s| Part::NAMES[s]).collect::<Vec<_>>()),
    ])?;
    write_parquet(&ctx.out("assignment.parquet"), &mut assignment, &ctx.provenance())?;
    let mut summary = Summary::new();
    let (mut c_cases, mut c_slices, mut c_liver) = (vec![], vec![], vec![]);
    for (s, name) in Part::NAMES.iter().enumerate() {
        let pats: std::collections::BTreeSet<&str> = (0..n).filter(|&i| part[i] == s).map(|i| cases[i].as_str()).collect();
        let slices = part.iter().filter(|&&x| x == s).count();
        let lv: u64 = (0..n).filter(|&i| part[i] == s).map(|i| set.liver_pixels[i]).sum();
        summary.insert(format!("{name}_cases"), pats.len().into());
        summary.insert(format!("{name}_slices"), slices.into());
        c_cases.push(pats.len() as u64);
        c_slices.push(slices as u64);
        c_liver.push(lv);
    }
    let mut counts = DataFrame::new_infer_height(vec![
        Column::new("split".into(), Part::NAMES.to_vec()),
        Column::new("cases".into(), c_cases),
        Column::new("slices".into(), c_slices),
        Column::new("liver_pixels".into(), c_liver),
    ])?;
    write_parquet(&ctx.out("counts.parquet"), &mut counts, &ctx.provenance())?;
    Ok(summary)
}

fn write_duplicates(ctx: &StageContext, set: &NormalisedSet, dups: &[(usize, usize, f32)]) -> Result<()> {
    let cases = &set.case_id;
    let mut dup_df = DataFrame::new_infer_height(vec![
        Column::new("idx_a".into(), dups.iter().map(|d| d.0 as u64).collect::<Vec<_>>()),
        Column::new("idx_b".into(), dups.iter().map(|d| d.1 as u64).collect::<Vec<_>>()),
        Column::new("case_a".into(), dups.iter().map(|d| cases[d.0].clone()).collect::<Vec<_>>()),
        Column::new("case_b".into(), dups.iter().map(|d| cases[d.1].clone()).collect::<Vec<_>>()),
        Column::new("thumb_mad".into(), dups.iter().map(|d| d.2).collect::<Vec<_>>()),
    ])?;
    write_parquet(&ctx.out("duplicates.parquet"), &mut dup_df, &ctx.provenance())
}

/// split's output as downstream stages read it: the part of every normalise row.
pub struct SplitAssignment {
    pub part: Vec<Part>,
    pub case_id: Vec<String>,
}

impl SplitAssignment {
    pub fn read(a: &Artifact) -> Result<Self> {
        let t = read_parquet(&a.file("assignment.parquet"))?;
        let part = t.column("split")?.str()?.iter().map(|s| s.unwrap_or_default().parse::<Part>()).collect::<std::result::Result<Vec<_>, _>>();
        let part = part.map_err(|e| anyhow::anyhow!("{}: {e}", a.file("assignment.parquet").display()))?;
        let case_id = t.column("case_id")?.str()?.iter().map(|s| s.unwrap_or_default().to_owned()).collect();
        Ok(SplitAssignment { part, case_id })
    }

    /// The normalise rows in `part`, in order.
    pub fn rows(&self, part: Part) -> Vec<usize> {
        (0..self.part.len()).filter(|&i| self.part[i] == part).collect()
    }

    /// Check that it assigns exactly the rows of `set`.
    pub fn check_covers(&self, set: &NormalisedSet) -> Result<()> {
        if self.part.len() != set.n {
            bail!("split assignment lists {} slices, normalise has {}", self.part.len(), set.n);
        }
        Ok(())
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
