//! ingest (source stage): walk `data.root`, read CT with liver masks from
//! NIfTI, DICOM or 2D image pairs (or generate phantoms), and store one
//! tensor file per case plus a slice table.
//!
//! inputs: raw files under data.root (none for `synthetic`)
//! outputs: slices.parquet, quarantine.parquet, cases/<case>.safetensors
//! (`image` [slice, row, col] as i16 HU or u8, and `mask_bits`, the binary
//! liver mask packed 8 pixels per byte as numpy.packbits(mask, axis=-1)),
//! read downstream through [`IngestedCases`].

use anyhow::{anyhow, bail, Context, Result};
use liverseg_engine::params::Params;
use liverseg_engine::scan::RawSource;
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_engine::store::Artifact;
use liverseg_engine::tables::{read_parquet, write_parquet};
use liverseg_engine::tensors::{write_safetensors, NamedTensor, TensorFile};
use liverseg_imaging::{self as imaging, liver_count, pack_mask_rows, slices2d::MaskRule, unpack_mask_row, Volume};
use liverseg_recipe::choices;
use polars::prelude::{Column, DataFrame};
use rayon::prelude::*;
use regex::Regex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// 2: masks stored as bits. 3: symlinks followed, unreadable files and
/// masks without images reported, odd-size slices quarantined alone,
/// clipped voxels counted, non-UTF-8 names kept.
pub const VERSION: u32 = 3;

choices!(
    /// Where slices come from.
    DataSource { Synthetic = "synthetic", Nifti = "nifti", Dicom = "dicom", Slices2d = "slices2d" }
);

choices!(
    /// What a bad input file does to the run.
    OnError { Fail = "fail", Skip = "skip" }
);

liverseg_engine::params! {
    pub struct IngestParams {
        source as "data.source": DataSource = choice "synthetic", "where slices come from";
        root as "data.root": String = str "data", "dataset folder, relative to pipeline.yaml";
        synthetic_cases as "data.synthetic_cases": u64 = int "16", "phantom patients generated for `synthetic`";
        synthetic_size as "data.synthetic_size": usize = int "128", "phantom in-plane size (pixels)";
        synthetic_slices as "data.synthetic_slices": usize = int "20", "phantom slices per patient";
        synthetic_seed as "data.synthetic_seed": u64 = int "7", "phantom seed";
        liver_labels as "data.liver_labels": Vec<f64> = floats "[1, 2]", "mask labels that count as liver (LiTS: 1 liver, 2 tumour; TotalSegmentator: 5)";
        max_label as "data.max_label": i64 = int "2", "labels above this are outside the label map and rejected";
        case_regex as "data.case_regex": String = str "'(?:flipped|mirrored)_(\\d+)_(\\d+)'", "2D pairs: regex on the file stem, group 1 = patient, group 2 = slice";
        image_dir as "data.image_dir": String = str "images", "2D pairs: image folder under root";
        mask_dir as "data.mask_dir": String = str "masks", "2D pairs: mask folder under root";
        mask_rule as "data.mask_rule": String = str "'threshold:127'", "2D pairs: `threshold:T` (liver if > T) or `rgb:R,G,B`";
        dicom_pairs as "data.dicom_pairs": Vec<DicomPair> = any "[]", "DICOM: list of {series: DIR, mask: FILE} relative to root";
        on_error: OnError = choice "fail", "bad input file: stop (fail) or quarantine it and go on (skip)";
    }
}

/// One DICOM series and its mask file, relative to data.root.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomPair {
    pub series: String,
    pub mask: String,
}

impl IngestParams {
    fn root(&self, project_root: &Path) -> PathBuf {
        project_root.join(&self.root)
    }

    fn mask_rule(&self) -> Result<MaskRule> {
        let r = self.mask_rule.as_str();
        Ok(match r {
            r if r.starts_with("threshold:") => MaskRule::Threshold(r[10..].trim().parse().map_err(|_| anyhow!("data.mask_rule `{r}`: threshold must be 0..255"))?),
            r if r.starts_with("rgb:") => {
                let c: Vec<u8> = r[4..].split(',').map(|x| x.trim().parse()).collect::<std::result::Result<_, _>>().map_err(|_| anyhow!("data.mask_rule `{r}`: expected rgb:R,G,B"))?;
                if c.len() != 3 {
                    bail!("data.mask_rule `{r}`: expected rgb:R,G,B");
                }
                MaskRule::Colour([c[0], c[1], c[2]], 40)
            }
            r => bail!("data.mask_rule `{r}`: expected threshold:T or rgb:R,G,B"),
        })
    }

    fn case_regex(&self) -> Result<Regex> {
        let re = Regex::new(&self.case_regex).context("data.case_regex is not a valid regex")?;
        if re.captures_len() < 3 {
            bail!("data.case_regex needs two groups: patient and slice");
        }
        Ok(re)
    }
}

pub static INFO: StageInfo = StageInfo {
    name: "ingest",
    version: VERSION,
    about: "read CT slices and liver masks (NIfTI, DICOM, 2D pairs, or phantoms)",
    inputs: &[],
    optional_inputs: &[],
    collects: &[],
    per_dataset: true,
    dataset_requires: &["source"],
    outputs: &["slices.parquet", "quarantine.parquet", "cases/"],
    params: IngestParams::SPECS,
    placement: Placement::InProcess,
};

pub struct Ingest;

/// One unit of input: a volume/mask pair, a DICOM series, or one patient's 2D pairs.
#[derive(Debug, Clone)]
enum Item {
    Synthetic { case: u64 },
    Nifti { case: String, image: PathBuf, mask: Option<PathBuf> },
    Dicom { case: String, series: PathBuf, mask: PathBuf },
    Slices { case: String, pairs: Vec<(String, PathBuf, Option<PathBuf>)> }, // (slice, image, mask)
}

struct SliceRow {
    case_id: String,
    slice_index: i64,
    source_file: String,
    source_blake3: String,
    source_size: u64,
    spacing: [f64; 3],
    unit: &'static str,
    liver_pixels: u64,
    rows: usize,
    cols: usize,
    orientation: String,
    /// Voxels outside the i16 range, clipped to it (out-of-range values).
    clipped: u64,
}

/// A path relative to the dataset root, as the store records it (lossless
/// for names that are not UTF-8).
fn rel(root: &Path, p: &Path) -> String {
    liverseg_engine::paths::encode(p.strip_prefix(root).unwrap_or(p))
}

/// Names of the files ingest reads; a folder with such a name is reported, not skipped.
fn looks_like_input(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".dcm", ".nrrd"].iter().any(|e| n.ends_with(e))
}

fn is_nifti(name: &str) -> bool {
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

fn nifti_stem(name: &str) -> &str {
    name.trim_end_matches(".gz").trim_end_matches(".nii")
}

/// Every file under `dir` (symlinks followed, hidden names skipped), named
/// relative to `root`. What cannot be walked into (a symlink loop, an
/// unreadable folder) and folders named like input files are listed too:
/// hashing them fails, and the stage reports them by name instead of
/// skipping them.
fn tree(dir: PathBuf, root: &Path) -> RawSource {
    RawSource::Tree { dir, base: root.to_path_buf(), list_folder_if: looks_like_input }
}

/// Input items found among the raw files, and files quarantined on the way
/// as (file, reason).
type Discovered = (Vec<Item>, Vec<(String, String)>);

/// Discover the input items among `files` (the raw inputs the engine listed
/// and hashed, so the folders are not walked twice).
fn discover(p: &IngestParams, root: &Path, raw: &[liverseg_engine::stage::RawFile]) -> Result<Discovered> {
    use liverseg_engine::hash::UNREADABLE;
    // Files the engine could not read (no permission, a folder, a symlink
    // loop) are reported by name, never skipped.
    let mut unreadable = Vec::new();
    let files: Vec<PathBuf> = raw
        .iter()
        .filter_map(|r| match r.blake3.strip_prefix(UNREADABLE) {
            Some(why) => {
                unreadable.push((r.path.clone(), format!("cannot read: {why}")));
                None
            }
            None => Some(root.join(liverseg_engine::paths::decode(&r.path))),
        })
        .collect();
    let all: Vec<PathBuf> = raw.iter().map(|r| root.join(liverseg_engine::paths::decode(&r.path))).collect();
    let (items, mut bad) = discover_items(p, root, &files, &all)?;
    bad.extend(unreadable);
    if items.is_empty() && bad.is_empty() {
        bail!("{}: no input files found for data.source `{}`", root.display(), p.source);
    }
    Ok((items, bad))
}

/// Items among the readable `files`; `all` (readable or not) says what exists.
fn discover_items(p: &IngestParams, root: &Path, files: &[PathBuf], all: &[PathBuf]) -> Result<Discovered> {
    if p.source == DataSource::Synthetic {
        if p.synthetic_cases == 0 {
            bail!("data.synthetic_cases must be at least 1");
        }
        return Ok(((0..p.synthetic_cases).map(|case| Item::Synthetic { case }).collect(), Vec::new()));
    }
    if !root.is_dir() {
        bail!("{}: data.root is not a folder", root.display());
    }
    let (items, bad) = match p.source {
        DataSource::Nifti => discover_nifti(root, files, all),
        DataSource::Dicom => (p.dicom_pairs.iter().map(|d| Item::Dicom { case: d.series.replace('/', "_"), series: root.join(&d.series), mask: root.join(&d.mask) }).collect(), Vec::new()),
        DataSource::Slices2d => discover_slices(p, root, files, all)?,
        DataSource::Synthetic => unreachable!("handled above"),
    };
    Ok((items, bad))
}

/// The first entry where two affines differ by more than a thousandth of a
/// voxel (or of a millimetre at the origin): (row, column).
fn affine_mismatch(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> Option<(usize, usize)> {
    (0..3).flat_map(|r| (0..4).map(move |c| (r, c))).find(|&(r, c)| (a[r][c] - b[r][c]).abs() > 1e-3 * a[r][c].abs().max(1.0))
}

/// LiTS (`volume-N` beside `segmentation-N`) and MSD (`imagesTr/X` with `labelsTr/X`) layouts.
fn discover_nifti(root: &Path, files: &[PathBuf], all: &[PathBuf]) -> Discovered {
    let present: std::collections::HashSet<&Path> = all.iter().map(PathBuf::as_path).collect();
    let by_name: BTreeMap<String, PathBuf> = files.iter().map(|p| (rel(root, p), p.clone())).collect();
    let (mut items, mut bad) = (Vec::new(), Vec::new());
    for (name, path) in &by_name {
        // The name as lossless text (see paths::encode), so a name that is
        // not UTF-8 still finds its mask and keeps a unique case id.
        let file = path.file_name().map(|f| liverseg_engine::paths::encode(Path::new(f))).unwrap_or_default();
        if !is_nifti(&file) {
            continue;
        }
        let stem = nifti_stem(&file);
        let parent = path.parent().unwrap_or(root);
        let find_mask = |dir: &Path, stem: &str| ["nii.gz", "nii"].iter().map(|ext| dir.join(liverseg_engine::paths::decode(&format!("{stem}.{ext}")))).find(|p| present.contains(p.as_path()));
        if let Some(n) = stem.strip_prefix("volume-") {
            let mask = find_mask(parent, &format!("segmentation-{n}"));
            items.push(Item::Nifti { case: n.to_owned(), image: path.clone(), mask });
        } else if parent.file_name().is_some_and(|d| d == "imagesTr") {
            let labels = parent.parent().unwrap_or(root).join("labelsTr");
            // nnU-Net names a case's channels `<case>_0000`, `<case>_0001`...
            // beside `labelsTr/<case>`; MSD names both `<case>`.
            match (find_mask(&labels, stem), nnunet_channel(stem)) {
                (Some(mask), _) => items.push(Item::Nifti { case: stem.to_owned(), image: path.clone(), mask: Some(mask) }),
                (None, Some((case, 0))) => items.push(Item::Nifti { case: case.to_owned(), image: path.clone(), mask: find_mask(&labels, case) }),
                (None, Some((case, k))) => bad.push((name.clone(), format!("channel {k} of nnU-Net case `{case}`: liverseg reads one channel, the CT (`{case}_0000`)"))),
                (None, None) => items.push(Item::Nifti { case: stem.to_owned(), image: path.clone(), mask: None }),
            }
        } else if !(stem.starts_with("segmentation-") || parent.file_name().is_some_and(|d| d == "labelsTr")) {
            bad.push((name.clone(), "NIfTI file that is neither volume-N nor imagesTr/X (no way to pair it with a mask)".to_owned()));
        }
    }
    // Two files for one case id (volume-1.nii beside volume-1.nii.gz): which
    // is the case is not ours to guess, so neither is used.
    let mut by_case: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for item in &items {
        if let Item::Nifti { case, image, .. } = item {
            by_case.entry(case.clone()).or_default().push(image.clone());
        }
    }
    let twice: BTreeMap<String, Vec<PathBuf>> = by_case.into_iter().filter(|(_, v)| v.len() > 1).collect();
    items.retain(|item| !matches!(item, Item::Nifti { case, .. } if twice.contains_key(case)));
    for (case, paths) in twice {
        let names: Vec<String> = paths.iter().map(|p| rel(root, p)).collect();
        for name in &names {
            bad.push((name.clone(), format!("case id `{case}` is given by {} files ({}); keep one", names.len(), names.join(", "))));
        }
    }
    (items, bad)
}

/// `liver_001_0000` -> (`liver_001`, 0): nnU-Net's channel suffix.
fn nnunet_channel(stem: &str) -> Option<(&str, u32)> {
    let (case, k) = stem.rsplit_once('_')?;
    (k.len() == 4 && k.bytes().all(|b| b.is_ascii_digit()) && !case.is_empty()).then(|| (case, k.parse().unwrap_or(0)))
}

/// 2D image/mask pairs of the same name, grouped into patients by data.case_regex.
fn discover_slices(p: &IngestParams, root: &Path, files: &[PathBuf], all: &[PathBuf]) -> Result<Discovered> {
    let present: std::collections::HashSet<&Path> = all.iter().map(PathBuf::as_path).collect();
    let re = p.case_regex()?;
    let images = root.join(&p.image_dir);
    let masks = root.join(&p.mask_dir);
    if !images.is_dir() {
        bail!("{}: image folder not found (data.image_dir)", images.display());
    }
    let mut bad = Vec::new();
    let mut by_case: BTreeMap<String, Vec<(String, PathBuf, Option<PathBuf>)>> = BTreeMap::new();
    for img in files.iter().filter(|f| f.starts_with(&images)) {
        let name = img.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let stem = Path::new(&name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(c) = re.captures(&stem) else {
            bad.push((rel(root, img), format!("file name does not match data.case_regex `{}`", re.as_str())));
            continue;
        };
        let mask = masks.join(img.strip_prefix(&images).unwrap_or(img));
        let mask = present.contains(mask.as_path()).then_some(mask);
        by_case.entry(c[1].to_owned()).or_default().push((c[2].to_owned(), img.clone(), mask));
    }
    // A mask whose image is missing is reported, not ignored.
    for m in files.iter().filter(|f| f.starts_with(&masks)) {
        if !present.contains(images.join(m.strip_prefix(&masks).unwrap_or(m)).as_path()) {
            bad.push((rel(root, m), format!("mask without an image (expected {} in data.image_dir)", m.file_name().map(|f| f.to_string_lossy()).unwrap_or_default())));
        }
    }
    Ok((by_case.into_iter().map(|(case, pairs)| Item::Slices { case, pairs }).collect(), bad))
}

/// Map a label volume to a binary liver mask, rejecting labels outside the map.
fn liver_mask(labels: &[f32], liver: &[f64], max_label: i64, what: &str) -> Result<Vec<u8>> {
    // One lookup per voxel: label -> is liver, for every label in the map.
    let table: Vec<u8> = (0..=max_label.max(0)).map(|l| u8::from(liver.contains(&(l as f64)))).collect();
    let mut out = Vec::with_capacity(labels.len());
    for &l in labels {
        let i = l as i64; // saturating; NaN becomes 0 and is caught by the round trip below
        if i < 0 || i > max_label || i as f32 != l {
            bail!("{what}: label {l} is outside the label map (0..={max_label}); set data.max_label if it is valid");
        }
        out.push(table[i as usize]);
    }
    Ok(out)
}

fn native_liver_mask(labels: &imaging::nifti::NativeVolume, liver: &[f64], max_label: i64, what: &str) -> Result<Vec<u8>> {
    use imaging::nifti::NativeVolume::*;
    match labels {
        U8(v) => liver_mask_u8(&v.data, liver, max_label, what),
        // Rare for label files: the general path.
        I16(v) => liver_mask(&v.data.iter().map(|&l| f32::from(l)).collect::<Vec<_>>(), liver, max_label, what),
        F32(v) => liver_mask(&v.data, liver, max_label, what),
    }
}

/// `liver_mask` for u8 labels (the usual label file). When the liver labels
/// form one run lo..=hi (LiTS 1..=2, TotalSegmentator 5..=5) it is two
/// comparisons per voxel, which vectorise; otherwise a 256-entry table.
fn liver_mask_u8(labels: &[u8], liver: &[f64], max_label: i64, what: &str) -> Result<Vec<u8>> {
    let top = max_label.clamp(-1, 255);
    if let Some(&l) = labels.iter().find(|&&l| i64::from(l) > top) {
        bail!("{what}: label {l} is outside the label map (0..={max_label}); set data.max_label if it is valid");
    }
    let is_liver: Vec<bool> = (0..=255u8).map(|l| liver.contains(&f64::from(l))).collect();
    let (lo, hi) = (is_liver.iter().position(|&b| b), is_liver.iter().rposition(|&b| b));
    Ok(match (lo, hi) {
        (Some(lo), Some(hi)) if is_liver[lo..=hi].iter().all(|&b| b) => {
            let (lo, span) = (lo as u8, (hi - lo) as u8);
            labels.iter().map(|&l| u8::from(l.wrapping_sub(lo) <= span)).collect()
        }
        _ => labels.iter().map(|&l| u8::from(is_liver[usize::from(l)])).collect(),
    })
}

/// HU as i16 (CT values are integers in every format), and the voxels of
/// each axial slice that lay outside i16 and were clipped to its range.
fn native_hu(image: imaging::nifti::NativeVolume) -> (Volume<i16>, Vec<u64>) {
    use imaging::nifti::NativeVolume::*;
    match image {
        U8(v) => {
            let n = v.num_slices();
            (v.with_data(v.data.iter().map(|&x| i16::from(x)).collect()), vec![0; n])
        }
        I16(v) => {
            let n = v.num_slices();
            (v, vec![0; n])
        }
        F32(v) => float_hu(v),
    }
}

fn float_hu(v: Volume) -> (Volume<i16>, Vec<u64>) {
    let mut clipped = vec![0u64; v.num_slices()];
    let (ax, [nx, ny, _]) = (v.axial_axis(), v.dims);
    for (i, &x) in v.data.iter().enumerate() {
        let r = (x + 0.5).floor();
        if r < f32::from(i16::MIN) || r > f32::from(i16::MAX) {
            clipped[[i % nx, (i / nx) % ny, i / (nx * ny)][ax]] += 1;
        }
    }
    (v.with_data(v.data.iter().map(|&x| (x + 0.5).floor() as i16).collect()), clipped)
}

/// A grid-ordered array as [slice, row, col] (no copy when z is the axial axis).
fn axial_order<T: Copy, V: Copy>(grid: &Volume<T>, data: Vec<V>) -> Vec<V> {
    if grid.axial_axis() == 2 {
        return data;
    }
    (0..grid.num_slices()).flat_map(|k| grid.slice_of(&data, k)).collect()
}

fn i16_le_bytes(v: &[i16]) -> Vec<u8> {
    let mut bytes = vec![0u8; v.len() * 2];
    for (b, x) in bytes.chunks_exact_mut(2).zip(v) {
        b.copy_from_slice(&x.to_le_bytes());
    }
    bytes
}

/// HU of a volume as ingest's tensor bytes (little-endian i16, [slice,
/// row, col]), with each slice's clipped voxels.
fn hu_tensor<T: Copy>(grid: &Volume<T>, (hu, clipped): (Volume<i16>, Vec<u64>)) -> (Vec<u8>, Vec<u64>) {
    (i16_le_bytes(&axial_order(grid, hu.data)), clipped)
}

/// The case's binary mask as its `mask_bits` tensor.
fn mask_bits(mask: &[u8], n: usize, rows: usize, cols: usize) -> NamedTensor {
    NamedTensor::u8("mask_bits", vec![n, rows, cols.div_ceil(8)], pack_mask_rows(mask, cols))
}

struct CaseOut {
    rows: Vec<SliceRow>,
    image: NamedTensor,
    mask: NamedTensor,
}

/// A case from a volume: `image` is the HU tensor bytes ([slice, row, col],
/// little-endian i16), `mask` the binary liver mask on the volume's grid.
fn volume_case<T: Copy>(case: &str, grid: &Volume<T>, (image, clipped): (Vec<u8>, Vec<u64>), mask: Vec<u8>, source: (String, String, u64)) -> Result<CaseOut> {
    let n = grid.num_slices();
    let ((rows, cols), (sr, sc)) = grid.slice_shape();
    let plane = rows * cols;
    let (orientation, slice_mm) = (grid.orientation(), grid.spacing[grid.axial_axis()]);
    let mask = axial_order(grid, mask);
    let out_rows = (0..n)
        .map(|k| SliceRow {
            case_id: case.to_owned(),
            slice_index: k as i64,
            source_file: source.0.clone(),
            source_blake3: source.1.clone(),
            source_size: source.2,
            spacing: [sr, sc, slice_mm],
            unit: "HU",
            liver_pixels: liver_count(&mask[k * plane..(k + 1) * plane]),
            rows,
            cols,
            orientation: orientation.clone(),
            clipped: clipped.get(k).copied().unwrap_or(0),
        })
        .collect();
    Ok(CaseOut { rows: out_rows, image: NamedTensor { name: "image".into(), dtype: safetensors::Dtype::I16, shape: vec![n, rows, cols], data: image }, mask: mask_bits(&mask, n, rows, cols) })
}

impl Stage for Ingest {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn check(&self, params: &Params) -> Result<()> {
        let p: IngestParams = params.typed()?;
        p.mask_rule()?;
        if p.source == DataSource::Synthetic && (!(16..=1024).contains(&p.synthetic_size) || !(1..=1000).contains(&p.synthetic_slices) || p.synthetic_cases > 10_000) {
            bail!(
                "data.synthetic_size must be 16 to 1024 (got {}), data.synthetic_slices 1 to 1000 (got {}), data.synthetic_cases at most 10000 (got {})",
                p.synthetic_size,
                p.synthetic_slices,
                p.synthetic_cases
            );
        }
        if p.source == DataSource::Slices2d {
            p.case_regex()?;
        }
        Ok(())
    }

    fn raw_inputs(&self, params: &Params, project_root: &Path) -> Result<Vec<RawSource>> {
        let p: IngestParams = params.typed()?;
        let root = p.root(project_root);
        Ok(match p.source {
            DataSource::Synthetic => Vec::new(),
            DataSource::Dicom => {
                let mut f = Vec::new();
                for d in &p.dicom_pairs {
                    f.push(tree(root.join(&d.series), &root));
                    let mask = root.join(&d.mask);
                    f.push(RawSource::File { rel: rel(&root, &mask), path: mask });
                }
                f
            }
            DataSource::Slices2d => {
                let images = root.join(&p.image_dir);
                if !images.is_dir() {
                    bail!("{}: image folder not found (data.image_dir)", images.display());
                }
                let masks = root.join(&p.mask_dir);
                let mut f = vec![tree(images, &root)];
                if masks.is_dir() {
                    f.push(tree(masks, &root));
                }
                f
            }
            DataSource::Nifti => {
                if !root.is_dir() {
                    bail!("{}: data.root is not a folder", root.display());
                }
                vec![tree(root.clone(), &root)]
            }
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p: IngestParams = ctx.params.typed()?;
        let root = p.root(ctx.project_root);
        let (items, mut quarantine) = discover(&p, &root, ctx.raw_files)?;
        if p.on_error == OnError::Fail {
            if let Some((file, reason)) = quarantine.first() {
                bail!("{}: {reason}", root.join(file).display());
            }
        }
        let reader = Reader::new(ctx, &p, root.clone())?;
        let cases = ctx.out("cases");
        std::fs::create_dir_all(&cases).with_context(|| format!("cannot create {}", cases.display()))?;
        // Cases are independent: read, convert and write each in parallel, one
        // volume per worker at a time, so memory stays bounded by the worker count.
        let bar = liverseg_engine::progress::bar(items.len() as u64, "ingest", ctx.show_progress);
        let results: Vec<Result<Outcome>> = items
            .par_iter()
            .map(|it| {
                let r = reader.item(it);
                bar.inc(1);
                r
            })
            .collect();
        bar.finish_and_clear();
        let mut rows = Vec::new();
        for r in results {
            let (kept, bad) = r?;
            rows.extend(kept);
            quarantine.extend(bad);
        }
        if rows.is_empty() {
            bail!("{}: every input was rejected; nothing to ingest", root.display());
        }
        quarantine.sort();
        write_tables(ctx, &rows, &quarantine)?;
        Ok(summary(ctx, &rows, &quarantine))
    }
}

fn summary(ctx: &StageContext, rows: &[SliceRow], quarantine: &[(String, String)]) -> Summary {
    let cases: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.case_id.as_str()).collect();
    let mut s = Summary::new();
    s.insert("cases".into(), cases.len().into());
    s.insert("slices".into(), rows.len().into());
    s.insert("liver_pixels".into(), rows.iter().map(|r| r.liver_pixels).sum::<u64>().into());
    s.insert("quarantined".into(), quarantine.len().into());
    let clipped: u64 = rows.iter().map(|r| r.clipped).sum();
    s.insert("clipped_voxels".into(), clipped.into());
    if !quarantine.is_empty() && ctx.show_progress {
        eprintln!("ingest: quarantined {} file(s); see quarantine.parquet", quarantine.len());
    }
    if clipped > 0 && ctx.show_progress {
        eprintln!("ingest: {clipped} voxel(s) outside the int16 range were clipped to it; see slices.parquet (clipped_voxels)");
    }
    s
}

/// An item's kept slice rows, and the files it quarantined.
type Outcome = (Vec<SliceRow>, Vec<(String, String)>);

/// A failure that concerns one input file: (file relative to root, error).
type FileError = (String, anyhow::Error);

/// Reads items into case files: what every item needs to know.
struct Reader<'a> {
    ctx: &'a StageContext<'a>,
    p: &'a IngestParams,
    root: PathBuf,
    rule: MaskRule,
    hashes: BTreeMap<&'a str, (&'a str, u64)>,
    provenance: Vec<(String, String)>,
}

impl<'a> Reader<'a> {
    fn new(ctx: &'a StageContext<'a>, p: &'a IngestParams, root: PathBuf) -> Result<Self> {
        let hashes = ctx.raw_files.iter().map(|r| (r.path.as_str(), (r.blake3.as_str(), r.size))).collect();
        Ok(Reader { ctx, p, root, rule: p.mask_rule()?, hashes, provenance: ctx.provenance() })
    }

    fn rel(&self, path: &Path) -> String {
        rel(&self.root, path)
    }

    /// (path relative to root, blake3, size) of a raw file.
    fn source(&self, path: &Path) -> (String, String, u64) {
        let r = self.rel(path);
        let (h, s) = self.hashes.get(r.as_str()).copied().unwrap_or(("", 0));
        (r, h.to_owned(), s)
    }

    fn skip(&self) -> bool {
        self.p.on_error == OnError::Skip
    }

    fn item(&self, item: &Item) -> Result<Outcome> {
        let (case, out) = match item {
            Item::Synthetic { case } => (format!("{case:03}"), self.synthetic(*case).map(|c| (c, Vec::new()))),
            Item::Nifti { case, image, mask } => (case.clone(), self.nifti(case, image, mask.as_deref()).map(|c| (c, Vec::new()))),
            Item::Dicom { case, series, mask } => (case.clone(), self.dicom(case, series, mask)),
            Item::Slices { case, pairs } => return self.slices(case, pairs),
        };
        match out {
            Ok((c, bad)) => {
                self.write_case(&case, c.image, c.mask)?;
                Ok((c.rows, bad))
            }
            Err((file, e)) if self.skip() => Ok((Vec::new(), vec![(file, format!("{e:#}"))])),
            Err((_, e)) => Err(e),
        }
    }

    fn write_case(&self, case: &str, image: NamedTensor, mask: NamedTensor) -> Result<()> {
        write_safetensors(&self.ctx.out(&format!("cases/{case}.safetensors")), &[image, mask], &self.provenance)
    }

    fn synthetic(&self, case: u64) -> std::result::Result<CaseOut, FileError> {
        let ph = imaging::synth::phantom(self.p.synthetic_seed, case, self.p.synthetic_size, self.p.synthetic_slices);
        let mut affine = imaging::scaled_identity(ph.spacing);
        affine[0][0] = -ph.spacing[0];
        affine[1][1] = -ph.spacing[1];
        let vol = Volume { dims: ph.dims, spacing: ph.spacing, affine, data: ph.hu };
        let name = format!("synthetic/volume-{case}");
        let r = liver_mask_u8(&ph.labels, &self.p.liver_labels, self.p.max_label, &name).and_then(|m| {
            let grid = vol.with_data(Vec::<()>::new());
            let n = grid.num_slices();
            volume_case(&format!("{case:03}"), &grid, hu_tensor(&grid, (vol, vec![0; n])), m, (name.clone(), String::new(), 0))
        });
        r.map_err(|e| (name, e))
    }

    fn nifti(&self, case: &str, image: &Path, mask: Option<&Path>) -> std::result::Result<CaseOut, FileError> {
        let (p, ctx) = (self.p, self.ctx);
        let mask = mask.ok_or_else(|| (self.rel(image), anyhow!("{}: missing mask (no segmentation file beside it)", image.display())))?;
        let raw = ctx.read_raw(image).and_then(|b| imaging::nifti::read_raw_from(image, b)).map_err(|e| (self.rel(image), e))?;
        let grid = raw.grid.clone();
        // The usual CT file (int16, z axial) already holds ingest's tensor bytes.
        let raw = if grid.axial_axis() == 2 { raw.into_i16_le_bytes() } else { Err(raw) };
        let hu = match raw {
            Ok(bytes) => (bytes, vec![0; grid.num_slices()]),
            Err(raw) => hu_tensor(&grid, native_hu(raw.into_native().map_err(|e| (self.rel(image), e))?)),
        };
        let m = ctx.read_raw(mask).and_then(|b| imaging::nifti::read_raw_from(mask, b)).map_err(|e| (self.rel(mask), e))?;
        if grid.dims != m.grid.dims {
            return Err((self.rel(mask), anyhow!("{}: image is {:?} voxels but mask is {:?}", mask.display(), grid.dims, m.grid.dims)));
        }
        // Voxel (i, j, k) of the mask must be voxel (i, j, k) of the image: a
        // mask written with another orientation (a mirrored axis) is not.
        if let Some((r, c)) = affine_mismatch(&grid.affine, &m.grid.affine) {
            return Err((
                self.rel(mask),
                anyhow!(
                    "{}: its affine differs from the image's at row {r}, column {c} ({:.3} vs {:.3}): the mask is not aligned with {} voxel for voxel (resample it onto the image's grid)",
                    mask.display(),
                    m.grid.affine[r][c],
                    grid.affine[r][c],
                    image.display()
                ),
            ));
        }
        let m = m.into_native().map_err(|e| (self.rel(mask), e))?;
        let bin = native_liver_mask(&m, &p.liver_labels, p.max_label, &mask.display().to_string()).map_err(|e| (self.rel(mask), e))?;
        volume_case(case, &grid, hu, bin, self.source(image)).map_err(|e| (self.rel(image), e))
    }

    /// A DICOM series: a bad file costs that file (quarantined under
    /// `skip`), when the rest of the series keeps an even geometry.
    fn dicom(&self, case: &str, series: &Path, mask: &Path) -> std::result::Result<(CaseOut, Vec<(String, String)>), FileError> {
        let p = self.p;
        let (img, bad_files) = imaging::dicom::read_series_lenient(series).map_err(|e| (self.rel(series), e))?;
        let mut bad = Vec::new();
        for (f, e) in bad_files {
            if !self.skip() {
                return Err((self.rel(&f), e));
            }
            bad.push((self.rel(&f), format!("{e:#}")));
        }
        if !mask.is_file() {
            return Err((self.rel(mask), anyhow!("{}: missing mask for DICOM series {}", mask.display(), series.display())));
        }
        let name = mask.to_string_lossy();
        let m = if name.ends_with(".nrrd") { imaging::nrrd::read(mask) } else { imaging::nifti::read(mask).map(|f| f.volume) }.map_err(|e| (self.rel(mask), e))?;
        let labels = imaging::dicom::resample_nearest(&m, &img).map_err(|e| (self.rel(mask), e))?;
        let bin = liver_mask(&labels, &p.liver_labels, p.max_label, &mask.display().to_string()).map_err(|e| (self.rel(mask), e))?;
        let grid = img.with_data(Vec::<()>::new());
        let out = volume_case(case, &grid, hu_tensor(&grid, float_hu(img)), bin, (self.rel(series), String::new(), 0)).map_err(|e| (self.rel(series), e))?;
        Ok((out, bad))
    }

    /// One patient's 2D pairs, decoded straight into the case's tensors; a
    /// bad pair fails the run, or with `skip` is quarantined alone. Slices
    /// must agree in size: the odd ones out (not the majority) are bad.
    fn slices(&self, case: &str, pairs: &[(String, PathBuf, Option<PathBuf>)]) -> Result<Outcome> {
        let (mut img_data, mut mask_data, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        // (slice, image, byte offset, shape) of each pair that decoded.
        let mut decoded: Vec<(&str, &Path, usize, (usize, usize))> = Vec::new();
        let mut bad = Vec::new();
        for (slice, image, mask) in pairs {
            let start = img_data.len();
            let r: std::result::Result<_, FileError> = (|| {
                let mask = mask.as_ref().ok_or_else(|| (self.rel(image), anyhow!("{}: missing mask (expected one of the same name in data.mask_dir)", image.display())))?;
                imaging::slices2d::read_pair_into(image, mask, self.rule, &|p: &Path| self.ctx.read_raw(p), &mut img_data, &mut mask_data, &mut scratch).map_err(|e| (self.rel(image), e))
            })();
            match r {
                Ok(shape) => {
                    if decoded.is_empty() {
                        // Room for the whole case, so the tensors are not regrown and copied.
                        img_data.reserve(pairs.len() * shape.0 * shape.1);
                        mask_data.reserve(pairs.len() * shape.0 * shape.1);
                    }
                    decoded.push((slice, image, start, shape));
                }
                Err((f, e)) if self.skip() => bad.push((f, format!("{e:#}"))),
                Err((_, e)) => return Err(e),
            }
        }
        let Some(shape) = majority(decoded.iter().map(|d| d.3)) else {
            return Ok((Vec::new(), bad));
        };
        let odd: Vec<usize> = (0..decoded.len()).filter(|&i| decoded[i].3 != shape).collect();
        for &i in &odd {
            let (_, image, _, (h, w)) = decoded[i];
            let e = anyhow!("{}: {h}×{w} pixels, most slices of patient {case} are {}×{}", image.display(), shape.0, shape.1);
            if !self.skip() {
                return Err(e);
            }
            bad.push((self.rel(image), format!("{e:#}")));
        }
        if !odd.is_empty() {
            (img_data, mask_data) = keep_slices(&img_data, &mask_data, &decoded, shape);
            decoded.retain(|d| d.3 == shape);
        }
        let (h, w) = shape;
        let plane = h * w;
        let rows: Vec<SliceRow> = decoded.iter().enumerate().map(|(k, d)| slice_row(case, d.0, self.source(d.1), liver_count(&mask_data[k * plane..(k + 1) * plane]), h, w)).collect();
        self.write_case(case, NamedTensor::u8("image", vec![rows.len(), h, w], img_data), mask_bits(&mask_data, rows.len(), h, w))?;
        Ok((rows, bad))
    }
}

/// The most common shape (the first seen on ties).
fn majority(shapes: impl Iterator<Item = (usize, usize)>) -> Option<(usize, usize)> {
    let mut counts: Vec<((usize, usize), usize)> = Vec::new();
    for s in shapes {
        match counts.iter_mut().find(|c| c.0 == s) {
            Some(c) => c.1 += 1,
            None => counts.push((s, 1)),
        }
    }
    counts.iter().rev().max_by_key(|c| c.1).map(|c| c.0)
}

/// The image and mask bytes of the slices of `shape` only.
fn keep_slices(images: &[u8], masks: &[u8], decoded: &[(&str, &Path, usize, (usize, usize))], shape: (usize, usize)) -> (Vec<u8>, Vec<u8>) {
    let (mut ki, mut km) = (Vec::new(), Vec::new());
    for &(_, _, start, s) in decoded.iter().filter(|d| d.3 == shape) {
        let len = s.0 * s.1;
        ki.extend_from_slice(&images[start..start + len]);
        km.extend_from_slice(&masks[start..start + len]);
    }
    (ki, km)
}

/// The slice table row of one 2D pair (8-bit, no spacing).
fn slice_row(case: &str, slice: &str, (file, hash, size): (String, String, u64), liver_pixels: u64, rows: usize, cols: usize) -> SliceRow {
    SliceRow {
        case_id: case.to_owned(),
        slice_index: slice.parse().unwrap_or(-1),
        source_file: file,
        source_blake3: hash,
        source_size: size,
        spacing: [f64::NAN, f64::NAN, f64::NAN],
        unit: "8bit",
        liver_pixels,
        rows,
        cols,
        orientation: String::new(),
        clipped: 0,
    }
}

fn write_tables(ctx: &StageContext, rows: &[SliceRow], quarantine: &[(String, String)]) -> Result<()> {
    let mut df = DataFrame::new_infer_height(vec![
        Column::new("case_id".into(), rows.iter().map(|r| r.case_id.clone()).collect::<Vec<_>>()),
        Column::new("slice_index".into(), rows.iter().map(|r| r.slice_index).collect::<Vec<_>>()),
        Column::new("source_file".into(), rows.iter().map(|r| r.source_file.clone()).collect::<Vec<_>>()),
        Column::new("source_blake3".into(), rows.iter().map(|r| r.source_blake3.clone()).collect::<Vec<_>>()),
        Column::new("source_size".into(), rows.iter().map(|r| r.source_size).collect::<Vec<_>>()),
        Column::new("spacing_row_mm".into(), rows.iter().map(|r| r.spacing[0]).collect::<Vec<_>>()),
        Column::new("spacing_col_mm".into(), rows.iter().map(|r| r.spacing[1]).collect::<Vec<_>>()),
        Column::new("spacing_slice_mm".into(), rows.iter().map(|r| r.spacing[2]).collect::<Vec<_>>()),
        Column::new("unit".into(), rows.iter().map(|r| r.unit).collect::<Vec<_>>()),
        Column::new("liver_pixels".into(), rows.iter().map(|r| r.liver_pixels).collect::<Vec<_>>()),
        Column::new("rows".into(), rows.iter().map(|r| r.rows as u64).collect::<Vec<_>>()),
        Column::new("cols".into(), rows.iter().map(|r| r.cols as u64).collect::<Vec<_>>()),
        Column::new("orientation".into(), rows.iter().map(|r| r.orientation.clone()).collect::<Vec<_>>()),
        Column::new("clipped_voxels".into(), rows.iter().map(|r| r.clipped).collect::<Vec<_>>()),
    ])?;
    write_parquet(&ctx.out("slices.parquet"), &mut df, &ctx.provenance())?;
    let mut q = DataFrame::new_infer_height(vec![
        Column::new("file".into(), quarantine.iter().map(|q| q.0.clone()).collect::<Vec<_>>()),
        Column::new("reason".into(), quarantine.iter().map(|q| q.1.clone()).collect::<Vec<_>>()),
    ])?;
    write_parquet(&ctx.out("quarantine.parquet"), &mut q, &ctx.provenance())
}

/// ingest's output as downstream stages read it: the slice table, grouped
/// into cases, and each case's tensor file on demand.
pub struct IngestedCases {
    pub table: DataFrame,
    /// (case id, slice table rows), in table order; a case's rows are
    /// contiguous and in tensor order.
    pub groups: Vec<(String, Vec<usize>)>,
    units: Vec<Option<String>>,
    dir: PathBuf,
}

impl IngestedCases {
    pub fn open(a: &Artifact) -> Result<Self> {
        let table = read_parquet(&a.file("slices.parquet"))?;
        let cases = table.column("case_id")?.str()?.clone();
        let units = table.column("unit")?.str()?.iter().map(|u| u.map(str::to_owned)).collect();
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for i in 0..table.height() {
            let c = cases.get(i).unwrap_or_default().to_owned();
            match groups.last_mut() {
                Some((last, rows)) if *last == c => rows.push(i),
                _ => groups.push((c, vec![i])),
            }
        }
        Ok(IngestedCases { table, groups, units, dir: a.dir.clone() })
    }

    /// The intensity unit of case `g` (`HU` or `8bit`).
    pub fn unit(&self, g: usize) -> Option<&str> {
        self.units.get(self.groups[g].1[0]).and_then(|u| u.as_deref())
    }

    /// (row, col, slice) spacing in mm of case `g`; NaN where unknown.
    pub fn spacing(&self, g: usize) -> [f64; 3] {
        let row = self.groups[g].1[0];
        let get = |c: &str| self.table.column(c).ok().and_then(|c| c.f64().ok()?.get(row)).unwrap_or(f64::NAN);
        [get("spacing_row_mm"), get("spacing_col_mm"), get("spacing_slice_mm")]
    }

    /// The slice index (in its source volume or export) of each slice of case `g`.
    pub fn slice_indices(&self, g: usize) -> Vec<i64> {
        let col = self.table.column("slice_index").ok().and_then(|c| c.i64().ok().cloned());
        self.groups[g].1.iter().map(|&r| col.as_ref().and_then(|c| c.get(r)).unwrap_or(-1)).collect()
    }

    /// How case `g`'s slices fill the models' square of side `size`.
    pub fn fit(&self, g: usize, view: &CaseView, size: usize) -> liverseg_imaging::resize::Fit {
        let [sr, sc, _] = self.spacing(g);
        liverseg_imaging::resize::Fit::new(view.h, view.w, (sr, sc), size)
    }

    pub fn case_path(&self, g: usize) -> PathBuf {
        self.dir.join(format!("cases/{}.safetensors", self.groups[g].0))
    }

    /// Case `g`'s tensor file, mapped.
    pub fn open_case(&self, g: usize) -> Result<TensorFile> {
        TensorFile::open(&self.case_path(g))
    }

    /// Case `g` borrowed from its mapped file, checked against the table.
    pub fn view<'t>(&self, tf: &'t TensorFile, g: usize) -> Result<CaseView<'t>> {
        CaseView::new(tf, &self.case_path(g), self.groups[g].1.len())
    }
}

/// A case's source pixels, borrowed from ingest's file: HU as little-endian
/// i16, or 8-bit.
pub enum CaseImage<'a> {
    I16(&'a [[u8; 2]]),
    U8(&'a [u8]),
}

/// One case of ingest, borrowed from its mapped file.
pub struct CaseView<'a> {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub image: CaseImage<'a>,
    /// The liver mask, 8 pixels per byte.
    mask_bits: &'a [u8],
}

impl<'a> CaseView<'a> {
    fn new(tf: &'a TensorFile, path: &Path, listed: usize) -> Result<Self> {
        let what = || path.display().to_string();
        let (image, shape) = match tf.get("image").with_context(what)? {
            (shape, bytes, safetensors::Dtype::I16) => (CaseImage::I16(bytes.as_chunks::<2>().0), shape),
            (shape, bytes, safetensors::Dtype::U8) => (CaseImage::U8(bytes), shape),
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
    pub fn mask_into(&self, k: usize, out: &mut Vec<u8>) {
        let row_bytes = self.w.div_ceil(8);
        out.resize(self.h * self.w, 0);
        let bits = &self.mask_bits[k * self.h * row_bytes..(k + 1) * self.h * row_bytes];
        for (row, row_bits) in out.chunks_exact_mut(self.w).zip(bits.chunks_exact(row_bytes)) {
            unpack_mask_row(row_bits, row);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn u8_liver_masks_agree_with_the_general_path() {
        let labels: Vec<u8> = (0..=7u8).cycle().take(64).collect();
        let as_f32: Vec<f32> = labels.iter().map(|&l| f32::from(l)).collect();
        // A run (compared) and a set with a gap (table), then a label too large.
        for liver in [vec![1.0, 2.0], vec![5.0], vec![1.0, 3.0], vec![]] {
            let fast = super::liver_mask_u8(&labels, &liver, 7, "x").unwrap();
            assert_eq!(fast, super::liver_mask(&as_f32, &liver, 7, "x").unwrap(), "liver labels {liver:?}");
            assert_eq!(fast.iter().filter(|&&v| v == 1).count(), 8 * liver.len());
        }
        let err = super::liver_mask_u8(&labels, &[1.0], 6, "seg.nii").unwrap_err().to_string();
        assert!(err.contains("seg.nii: label 7 is outside the label map"), "{err}");
    }
}
