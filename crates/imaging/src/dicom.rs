//! DICOM CT series: slices ordered by position along the slice normal,
//! rescale slope and intercept applied to give Hounsfield units.

use super::Volume;
use anyhow::{anyhow, bail, Context, Result};
use dicom_object::{open_file, InMemDicomObject, Tag};
use std::path::{Path, PathBuf};

/// The largest Rows or Columns a slice may have.
const MAX_SIDE: i64 = 8192;

struct Slice {
    path: PathBuf,
    series_uid: Option<String>,
    uids: SliceRef,
    position: [f64; 3],
    hu: Vec<f32>,
    rows: usize,
    cols: usize,
    spacing: [f64; 2],
    orientation: [f64; 6],
}

/// A source slice as a derived object (a DICOM SEG) must reference it.
#[derive(Debug, Clone, Default)]
pub struct SliceRef {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub position: [f64; 3],
}

/// What a derived object copies from its source series (patient, study,
/// frame of reference), by tag, as text; and its slices in volume order.
#[derive(Debug, Clone, Default)]
pub struct SeriesInfo {
    pub attributes: Vec<(Tag, String)>,
    pub slices: Vec<SliceRef>,
    pub orientation: [f64; 6],
    pub pixel_spacing: [f64; 2],
    pub spacing_between_slices: f64,
}

/// The series-level attributes a derived object keeps.
pub const SERIES_TAGS: &[(u16, u16)] = &[
    (0x0008, 0x0020), // StudyDate
    (0x0008, 0x0030), // StudyTime
    (0x0008, 0x0050), // AccessionNumber
    (0x0008, 0x0090), // ReferringPhysicianName
    (0x0010, 0x0010), // PatientName
    (0x0010, 0x0020), // PatientID
    (0x0010, 0x0030), // PatientBirthDate
    (0x0010, 0x0040), // PatientSex
    (0x0020, 0x000D), // StudyInstanceUID
    (0x0020, 0x000E), // SeriesInstanceUID
    (0x0020, 0x0010), // StudyID
    (0x0020, 0x0052), // FrameOfReferenceUID
];

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.element(tag).ok().and_then(|e| e.to_str().ok()).map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
}

/// The SeriesInstanceUID of a DICOM file, read from its header alone;
/// `None` where it is empty (anonymised exports blank it).
pub fn series_uid(path: &Path) -> Result<Option<String>> {
    Ok(probe(path)?.series_uid)
}

/// What a DICOM file is, from its header alone.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub series_uid: Option<String>,
    /// Set for an object that is not an image slice (a SEG, SR, RTSTRUCT,
    /// presentation state...): its modality, or its SOP class.
    pub not_an_image: Option<String>,
}

/// Modalities of DICOM objects that carry no image of the patient.
const NON_IMAGE_MODALITIES: &[&str] = &["SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "PR", "KO", "REG", "DOC", "PLAN", "FID"];

/// SOP classes of the same (the prefix covers the family: SR's 88.x, PR's 11.x).
const NON_IMAGE_SOP_CLASSES: &[&str] = &["1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.104."];

pub fn probe(path: &Path) -> Result<Probe> {
    let obj = dicom_object::OpenFileOptions::new().read_until(Tag(0x7FE0, 0x0010)).open_file(path).map_err(|e| anyhow!("{}: not a readable DICOM file: {e}", path.display()))?;
    let modality = text(&obj, Tag(0x0008, 0x0060)).unwrap_or_default();
    let sop_class = uid_or_meta(&obj, Tag(0x0008, 0x0016), &obj.meta().media_storage_sop_class_uid);
    let not_an_image = if NON_IMAGE_MODALITIES.contains(&modality.as_str()) {
        Some(format!("modality {modality}"))
    } else if NON_IMAGE_SOP_CLASSES.iter().any(|c| sop_class.starts_with(c)) {
        Some(format!("SOP class {sop_class}"))
    } else {
        None
    };
    Ok(Probe { series_uid: text(&obj, Tag(0x0020, 0x000E)).filter(|s| !s.is_empty()), not_an_image })
}

/// A UID attribute, or where an anonymiser blanked it, its copy in the file
/// meta group (MediaStorageSOPClass/InstanceUID).
fn uid_or_meta(obj: &dicom_object::FileDicomObject<InMemDicomObject>, tag: Tag, meta: &str) -> String {
    text(obj, tag).filter(|s| !s.is_empty()).unwrap_or_else(|| meta.trim_end_matches(['\0', ' ']).to_owned())
}

fn read_slice(path: &Path) -> Result<Slice> {
    let p = path.display();
    let obj = open_file(path).map_err(|e| anyhow!("{p}: not a readable DICOM file: {e}"))?;
    let get = |tag: Tag, name: &str| obj.element(tag).map_err(|_| anyhow!("{p}: missing {name}"));
    let floats = |tag: Tag, name: &str| -> Result<Vec<f64>> { get(tag, name)?.to_multi_float64().map_err(|e| anyhow!("{p}: bad {name}: {e}")) };
    let int = |tag: Tag, name: &str| -> Result<i64> { get(tag, name)?.to_int::<i64>().map_err(|e| anyhow!("{p}: bad {name}: {e}")) };
    let ts = obj.meta().transfer_syntax().trim_end_matches('\0').to_owned();
    let native = matches!(ts.as_str(), "1.2.840.10008.1.2" | "1.2.840.10008.1.2.1" | "1.2.840.10008.1.2.2");
    let (rows, cols) = (int(Tag(0x0028, 0x0010), "Rows")?, int(Tag(0x0028, 0x0011), "Columns")?);
    if !(1..=MAX_SIDE).contains(&rows) || !(1..=MAX_SIDE).contains(&cols) {
        bail!("{p}: Rows × Columns is {rows}×{cols}; a CT slice has 1 to {MAX_SIDE} of each");
    }
    let (rows, cols) = (rows as usize, cols as usize);
    let frames = text(&obj, Tag(0x0028, 0x0008)).and_then(|v| v.trim().parse::<i64>().ok()).unwrap_or(1);
    if frames > 1 {
        bail!("{p}: a multi-frame object ({frames} frames); liverseg reads one slice per file (export the series as single-frame CT images)");
    }
    let bits = int(Tag(0x0028, 0x0100), "BitsAllocated")?;
    let signed = int(Tag(0x0028, 0x0103), "PixelRepresentation").unwrap_or(0) == 1;
    let samples = int(Tag(0x0028, 0x0002), "SamplesPerPixel").unwrap_or(1);
    if samples != 1 {
        bail!("{p}: {samples} samples per pixel; a CT slice has one");
    }
    let slope = floats(Tag(0x0028, 0x1053), "RescaleSlope").ok().and_then(|v| v.first().copied()).unwrap_or(1.0);
    if slope == 0.0 || !slope.is_finite() {
        bail!("{p}: RescaleSlope is {slope}: every pixel would become the intercept");
    }
    let intercept = floats(Tag(0x0028, 0x1052), "RescaleIntercept").ok().and_then(|v| v.first().copied()).unwrap_or(0.0);
    let position: Vec<f64> = floats(Tag(0x0020, 0x0032), "ImagePositionPatient")?;
    let orientation: Vec<f64> = floats(Tag(0x0020, 0x0037), "ImageOrientationPatient")?;
    let spacing: Vec<f64> = floats(Tag(0x0028, 0x0030), "PixelSpacing")?;
    if position.len() != 3 || orientation.len() != 6 || spacing.len() != 2 {
        bail!("{p}: malformed geometry tags");
    }
    // Native pixel data is read as is; compressed syntaxes (JPEG, JPEG 2000,
    // RLE) go through dicom-pixeldata's decoders.
    get(Tag(0x7FE0, 0x0010), "PixelData")?;
    let pixels: Vec<u8> = if native {
        get(Tag(0x7FE0, 0x0010), "PixelData")?.to_bytes().map_err(|e| anyhow!("{p}: unreadable PixelData: {e}"))?.into_owned()
    } else {
        use dicom_pixeldata::PixelDecoder;
        let decoded = obj.decode_pixel_data().map_err(|e| anyhow!("{p}: cannot decode pixel data of transfer syntax {ts}: {e}"))?;
        decoded.data().to_vec()
    };
    let n = rows * cols;
    let hu: Vec<f32> = match (bits, signed) {
        (16, true) if pixels.len() >= 2 * n => pixels.chunks_exact(2).take(n).map(|c| i16::from_le_bytes([c[0], c[1]]) as f64 * slope + intercept).map(|v| v as f32).collect(),
        (16, false) if pixels.len() >= 2 * n => pixels.chunks_exact(2).take(n).map(|c| u16::from_le_bytes([c[0], c[1]]) as f64 * slope + intercept).map(|v| v as f32).collect(),
        (8, _) if pixels.len() >= n => pixels.iter().take(n).map(|&v| (v as f64 * slope + intercept) as f32).collect(),
        (16 | 8, _) => bail!("{p}: truncated: PixelData has {} bytes for {rows}×{cols} pixels", pixels.len()),
        (b, _) => bail!("{p}: {b} bits allocated is not supported"),
    };
    let uids = SliceRef {
        sop_class_uid: uid_or_meta(&obj, Tag(0x0008, 0x0016), &obj.meta().media_storage_sop_class_uid),
        sop_instance_uid: uid_or_meta(&obj, Tag(0x0008, 0x0018), &obj.meta().media_storage_sop_instance_uid),
        position: [position[0], position[1], position[2]],
    };
    Ok(Slice {
        path: path.to_path_buf(),
        series_uid: text(&obj, Tag(0x0020, 0x000E)).filter(|s| !s.is_empty()),
        uids,
        position: [position[0], position[1], position[2]],
        hu,
        rows,
        cols,
        spacing: [spacing[0], spacing[1]],
        orientation: [orientation[0], orientation[1], orientation[2], orientation[3], orientation[4], orientation[5]],
    })
}

/// Read every file of a series directory into one volume (RAS affine); any
/// bad file is an error naming it.
pub fn read_series(dir: &Path) -> Result<Volume> {
    let (vol, bad) = read_series_lenient(dir)?;
    match bad.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(vol),
    }
}

/// Read a series, leaving out the files that cannot be used (unreadable,
/// another size or orientation than most, a position taken twice) and
/// returning them with the reason. The rest is used when its slices still
/// lie evenly along the normal; a gap left by a missing slice is an error.
pub fn read_series_lenient(dir: &Path) -> Result<(Volume, Vec<(PathBuf, anyhow::Error)>)> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list the DICOM series", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    let (vol, _, bad) = read_series_files(&files, dir)?;
    Ok((vol, bad))
}

/// `read_series_lenient` of the files of one series (`label` names it in
/// errors), with what a derived object needs of the series.
pub fn read_series_files(files: &[PathBuf], label: &Path) -> Result<(Volume, SeriesInfo, Vec<(PathBuf, anyhow::Error)>)> {
    let dir = label;
    let mut files = files.to_vec();
    files.sort();
    if files.is_empty() {
        bail!("{}: empty DICOM series folder", dir.display());
    }
    let mut bad = Vec::new();
    let mut slices: Vec<Slice> = Vec::new();
    for f in &files {
        match read_slice(f) {
            Ok(s) => slices.push(s),
            Err(e) => bad.push((f.clone(), e)),
        }
    }
    check_one_series(&slices, dir)?;
    // The series' geometry is its majority's: size and orientation.
    let key = |s: &Slice| (s.rows, s.cols, s.orientation.map(|v| (v * 1e4).round() as i64));
    let common = {
        let mut counts: Vec<(_, usize)> = Vec::new();
        for s in &slices {
            match counts.iter_mut().find(|c| c.0 == key(s)) {
                Some(c) => c.1 += 1,
                None => counts.push((key(s), 1)),
            }
        }
        counts.iter().rev().max_by_key(|c| c.1).map(|c| c.0).ok_or_else(|| anyhow!("{}: no readable DICOM slice", dir.display()))?
    };
    let (keep, odd): (Vec<Slice>, Vec<Slice>) = slices.into_iter().partition(|s| key(s) == common);
    for s in odd {
        let e = anyhow!("{}: {}×{} pixels, orientation {:?}; most of the series is {}×{}", s.path.display(), s.rows, s.cols, s.orientation, common.0, common.1);
        bad.push((s.path, e));
    }
    let mut slices = keep;
    let first = &slices[0];
    let (rows, cols, o) = (first.rows, first.cols, first.orientation);
    let normal = [o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3]];
    let along = |s: &Slice| s.position[0] * normal[0] + s.position[1] * normal[1] + s.position[2] * normal[2];
    slices.sort_by(|a, b| along(a).total_cmp(&along(b)));
    // A position taken twice: the later file is left out.
    let mut unique: Vec<Slice> = Vec::with_capacity(slices.len());
    for s in slices {
        match unique.last() {
            Some(prev) if (along(prev) - along(&s)).abs() < 1e-3 => {
                let e = anyhow!("{}: the same position as {}", s.path.display(), prev.path.display());
                bad.push((s.path, e));
            }
            _ => unique.push(s),
        }
    }
    let slices = unique;
    // A gap is most often a file left out above: name it first.
    check_even(&slices, &along, dir).map_err(|e| match bad.first() {
        Some((f, why)) => anyhow!("{why:#}; without {}, {e:#}", f.display()),
        None => e,
    })?;
    let gap = if slices.len() > 1 { (along(&slices[slices.len() - 1]) - along(&slices[0])) / (slices.len() - 1) as f64 } else { 1.0 };
    let gap = if gap.abs() < 1e-6 { 1.0 } else { gap };
    let (row_sp, col_sp) = (slices[0].spacing[0], slices[0].spacing[1]);
    let p0 = slices[0].position;
    // LPS (DICOM) to RAS: negate x and y.
    let lps_cols = [[o[0] * col_sp, o[1] * col_sp, o[2] * col_sp], [o[3] * row_sp, o[4] * row_sp, o[5] * row_sp], [normal[0] * gap, normal[1] * gap, normal[2] * gap]];
    let mut affine = [[0.0; 4]; 4];
    for j in 0..3 {
        affine[0][j] = -lps_cols[j][0];
        affine[1][j] = -lps_cols[j][1];
        affine[2][j] = lps_cols[j][2];
    }
    affine[0][3] = -p0[0];
    affine[1][3] = -p0[1];
    affine[2][3] = p0[2];
    affine[3][3] = 1.0;
    let mut data = Vec::with_capacity(rows * cols * slices.len());
    for s in &slices {
        data.extend_from_slice(&s.hu);
    }
    let first = open_file(&slices[0].path).map_err(|e| anyhow!("{}: not a readable DICOM file: {e}", slices[0].path.display()))?;
    let info = SeriesInfo {
        attributes: SERIES_TAGS.iter().filter_map(|&(g, e)| text(&first, Tag(g, e)).map(|v| (Tag(g, e), v))).collect(),
        slices: slices.iter().map(|s| s.uids.clone()).collect(),
        orientation: o,
        pixel_spacing: [row_sp, col_sp],
        spacing_between_slices: gap.abs(),
    };
    Ok((Volume { dims: [cols, rows, slices.len()], spacing: [col_sp, row_sp, gap.abs()], affine, data }, info, bad))
}

/// Every slice of one folder must belong to one series: two series
/// (another reconstruction, a scout) would be merged into one volume.
fn check_one_series(slices: &[Slice], dir: &Path) -> Result<()> {
    // A blank UID (an anonymised export) is a series of its own beside a set one.
    let mut counts: std::collections::BTreeMap<&str, (usize, &Path)> = Default::default();
    for s in slices {
        counts.entry(s.series_uid.as_deref().unwrap_or("(blank)")).or_insert((0, &s.path)).0 += 1;
    }
    if counts.len() > 1 {
        let list: Vec<String> = counts.iter().map(|(uid, (n, first))| format!("{uid} ({n} files, e.g. {})", first.display())).collect();
        bail!("{}: holds {} DICOM series: {}; give each series its own folder", dir.display(), counts.len(), list.join(", "));
    }
    Ok(())
}

/// Slices must lie evenly along the normal: a missing one would shift every
/// slice after it in world coordinates (and the mask with them).
fn check_even(slices: &[Slice], along: &dyn Fn(&Slice) -> f64, dir: &Path) -> Result<()> {
    if slices.len() < 3 {
        return Ok(());
    }
    let mut steps: Vec<f64> = slices.windows(2).map(|w| along(&w[1]) - along(&w[0])).collect();
    let all = steps.clone();
    steps.sort_by(f64::total_cmp);
    let nominal = steps[steps.len() / 2];
    if let Some(i) = all.iter().position(|d| (d - nominal).abs() > 0.1 * nominal.abs().max(1e-6)) {
        bail!(
            "{}: the series has a gap of {:.2} mm between {} and {} (slices are {:.2} mm apart elsewhere); a slice is missing or unreadable",
            dir.display(),
            all[i],
            slices[i].path.display(),
            slices[i + 1].path.display(),
            nominal
        );
    }
    Ok(())
}

/// Resample `mask` onto the voxel grid of `target` by world coordinates
/// (nearest neighbour), so a mask stored in another orientation lines up.
pub fn resample_nearest(mask: &Volume, target: &Volume) -> Result<Vec<f32>> {
    let inv = invert_affine(&mask.affine).ok_or_else(|| anyhow!("mask affine is singular"))?;
    let [nx, ny, nz] = target.dims;
    let t = &target.affine;
    let mut out = vec![0f32; nx * ny * nz];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let v = [x as f64, y as f64, z as f64];
                let w: Vec<f64> = (0..3).map(|r| t[r][0] * v[0] + t[r][1] * v[1] + t[r][2] * v[2] + t[r][3]).collect();
                let m: Vec<f64> = (0..3).map(|r| inv[r][0] * w[0] + inv[r][1] * w[1] + inv[r][2] * w[2] + inv[r][3]).collect();
                let (i, j, k) = (m[0].round(), m[1].round(), m[2].round());
                if i >= 0.0 && j >= 0.0 && k >= 0.0 && (i as usize) < mask.dims[0] && (j as usize) < mask.dims[1] && (k as usize) < mask.dims[2] {
                    out[x + nx * (y + ny * z)] = mask.voxel(i as usize, j as usize, k as usize);
                }
            }
        }
    }
    Ok(out)
}

fn invert_affine(a: &[[f64; 4]; 4]) -> Option<[[f64; 4]; 4]> {
    let m = [[a[0][0], a[0][1], a[0][2]], [a[1][0], a[1][1], a[1][2]], [a[2][0], a[2][1], a[2][2]]];
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0]) + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    if det.abs() < 1e-12 {
        return None;
    }
    let inv = [
        [(m[1][1] * m[2][2] - m[1][2] * m[2][1]) / det, (m[0][2] * m[2][1] - m[0][1] * m[2][2]) / det, (m[0][1] * m[1][2] - m[0][2] * m[1][1]) / det],
        [(m[1][2] * m[2][0] - m[1][0] * m[2][2]) / det, (m[0][0] * m[2][2] - m[0][2] * m[2][0]) / det, (m[0][2] * m[1][0] - m[0][0] * m[1][2]) / det],
        [(m[1][0] * m[2][1] - m[1][1] * m[2][0]) / det, (m[0][1] * m[2][0] - m[0][0] * m[2][1]) / det, (m[0][0] * m[1][1] - m[0][1] * m[1][0]) / det],
    ];
    let mut out = [[0.0; 4]; 4];
    for r in 0..3 {
        for c in 0..3 {
            out[r][c] = inv[r][c];
        }
        out[r][3] = -(inv[r][0] * a[0][3] + inv[r][1] * a[1][3] + inv[r][2] * a[2][3]);
    }
    out[3][3] = 1.0;
    Some(out)
}
