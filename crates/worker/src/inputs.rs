//! What `predict` reads: files recognised by their content, not their names.
//! A NIfTI file is one case, a DICOM series (files sharing a
//! SeriesInstanceUID, found by the `DICM` marker at byte 128) is one case,
//! a PNG or JPEG is one case; a folder may hold any mix, at any depth.
//! Every case is read through once before inference, so a bad file stops
//! the run before anything is written.

use anyhow::{anyhow, Result};
use liverseg_imaging::{dicom, nifti, slices2d, Volume};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One case to segment.
#[derive(Debug, Clone)]
pub enum Case {
    Nifti(PathBuf),
    Dicom { name: String, files: Vec<PathBuf> },
    Image(PathBuf),
}

impl Case {
    /// A name for its outputs.
    pub fn name(&self) -> String {
        match self {
            Case::Nifti(p) => file_name(p).trim_end_matches(".gz").trim_end_matches(".nii").to_owned(),
            Case::Dicom { name, .. } => name.clone(),
            Case::Image(p) => p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        }
    }

    pub fn is_image(&self) -> bool {
        matches!(self, Case::Image(_))
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Nifti,
    Dicom,
    Image,
}

/// What a file is, from its first bytes.
fn sniff(path: &Path) -> Result<Option<Kind>> {
    let mut head = [0u8; 352];
    let mut f = std::fs::File::open(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(anyhow!("{}: cannot read: {e}", path.display())),
        }
    }
    let head = &head[..n];
    Ok(if head.len() >= 132 && &head[128..132] == b"DICM" {
        Some(Kind::Dicom)
    } else if head.starts_with(b"\x89PNG") || head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Kind::Image)
    } else if head.starts_with(&[0x1f, 0x8b]) || (head.len() >= 348 && (head[..4] == 348i32.to_le_bytes() || head[..4] == 348i32.to_be_bytes())) {
        // A NIfTI-1 header, or gzip (a .nii.gz: its header is checked when read).
        Some(Kind::Nifti)
    } else {
        None
    })
}

/// The cases under `input` (a file or a folder), and every file that is
/// not one, with the reason.
pub fn discover(input: &Path) -> Result<(Vec<Case>, Vec<String>)> {
    if !input.exists() {
        return Err(anyhow!("{}: no such file or folder", input.display()));
    }
    let files: Vec<PathBuf> = if input.is_dir() {
        let mut v = Vec::new();
        for e in walkdir::WalkDir::new(input).follow_links(true).sort_by_file_name() {
            let e = e.map_err(|e| anyhow!("cannot walk {}: {e}", input.display()))?;
            if e.file_type().is_file() && !file_name(e.path()).starts_with('.') {
                v.push(e.into_path());
            }
        }
        v
    } else {
        vec![input.to_path_buf()]
    };
    let (mut cases, mut problems) = (Vec::new(), Vec::new());
    let mut series: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for f in files {
        match sniff(&f) {
            Ok(Some(Kind::Nifti)) => cases.push(Case::Nifti(f)),
            Ok(Some(Kind::Image)) => cases.push(Case::Image(f)),
            Ok(Some(Kind::Dicom)) => match dicom::probe(&f) {
                // A SEG or report stored beside its series is not a slice of it.
                Ok(dicom::Probe { not_an_image: Some(what), .. }) => eprintln!("warning: {}: skipped, a DICOM object without an image ({what})", f.display()),
                Ok(probe) => series.entry(series_key(&f, probe.series_uid)).or_default().push(f),
                Err(e) => problems.push(format!("{e:#}")),
            },
            Ok(None) => problems.push(format!("{}: not a NIfTI, DICOM, PNG or JPEG file", f.display())),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    // A series is named after its folder, and where a folder holds several,
    // after the end of its UID too.
    let folders: Vec<PathBuf> = series.values().map(|files| files[0].parent().map(Path::to_path_buf).unwrap_or_default()).collect();
    for ((key, files), folder) in series.into_iter().zip(&folders) {
        let mut name = file_name(folder);
        if folders.iter().filter(|f| *f == folder).count() > 1 || name.is_empty() {
            name = format!("{name}_{}", &key[key.len().saturating_sub(8)..]).trim_start_matches('_').to_owned();
        }
        cases.push(Case::Dicom { name, files });
    }
    if cases.is_empty() && problems.is_empty() {
        problems.push(format!("{}: no NIfTI, DICOM, PNG or JPEG file", input.display()));
    }
    Ok((cases, problems))
}

/// Files of one series share a SeriesInstanceUID; files without one (an
/// anonymised export) are taken as one series per folder.
fn series_key(file: &Path, uid: Option<String>) -> String {
    uid.unwrap_or_else(|| format!("folder {}", file.parent().unwrap_or(Path::new("")).display()))
}

/// A case's pixels, read.
pub enum Scan {
    /// A NIfTI volume (with its header) or a DICOM series (with what a SEG needs).
    Volume { volume: Volume, header: Option<Vec<u8>>, series: Option<dicom::SeriesInfo> },
    /// A PNG or JPEG slice, grey, row-major.
    Image { pixels: Vec<u8>, rows: usize, cols: usize },
}

impl Scan {
    pub fn bytes(&self) -> usize {
        match self {
            Scan::Volume { volume, .. } => volume.data.len() * 4,
            Scan::Image { pixels, .. } => pixels.len(),
        }
    }
}

/// Read a case through, as inference will; a DICOM series with any bad
/// file is an error naming every one.
pub fn read(case: &Case) -> Result<Scan> {
    Ok(match case {
        Case::Nifti(p) => {
            let f = nifti::read(p)?;
            Scan::Volume { volume: f.volume, header: Some(f.header), series: None }
        }
        Case::Dicom { files, name } => {
            let (volume, info, bad) = dicom::read_series_files(files, Path::new(name))?;
            if !bad.is_empty() {
                return Err(anyhow!("{}", bad.iter().map(|(_, e)| format!("{e:#}")).collect::<Vec<_>>().join("\n  ")));
            }
            Scan::Volume { volume, header: None, series: Some(info) }
        }
        Case::Image(p) => {
            let (pixels, rows, cols) = slices2d::grey(p)?;
            Scan::Image { pixels, rows, cols }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files are recognised by content, names aside; anything else is a
    /// problem named with its path, not skipped.
    #[test]
    fn files_are_found_by_content() {
        let dir = std::env::temp_dir().join(format!("liverseg-inputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("deeper")).unwrap();
        image::GrayImage::from_raw(4, 4, vec![9; 16]).unwrap().save_with_format(dir.join("deeper/slice_without_extension"), image::ImageFormat::Png).unwrap();
        let volume = liverseg_imaging::Volume { dims: [4, 4, 2], spacing: [1.0; 3], affine: liverseg_imaging::scaled_identity([1.0; 3]), data: vec![0i16; 32] };
        nifti::write_u8_or_i16(&dir.join("volume.bin"), volume.dims, &volume.affine, nifti::VoxelData::I16(&volume.data), None).unwrap();
        std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
        let (cases, problems) = discover(&dir).unwrap();
        let names: Vec<String> = cases.iter().map(Case::name).collect();
        assert_eq!(names, ["slice_without_extension", "volume.bin"]);
        assert!(matches!(cases[0], Case::Image(_)) && matches!(cases[1], Case::Nifti(_)));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("notes.txt: not a NIfTI, DICOM, PNG or JPEG file"), "{problems:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
