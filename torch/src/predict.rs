//! `predict`: masks for new scans with a trained model, preprocessed exactly
//! as the model's lineage says (window, resolution), written in formats
//! viewers open: NIfTI with the input's geometry, or PNG.

use crate::evaluate::predict as predict_slices;
use crate::training::run::ModelCard;
use anyhow::{bail, Context, Result};
use liverseg::imaging::{dicom, nifti, resize, slices2d, Volume};
use std::path::{Path, PathBuf};

/// The model folder (model.safetensors + model.json) for a folder or file.
fn model_dir(model: &Path) -> Result<PathBuf> {
    let dir = if model.is_dir() { model.to_path_buf() } else { model.parent().map(Path::to_path_buf).unwrap_or_default() };
    if !dir.join("model.safetensors").is_file() || !dir.join("model.json").is_file() {
        bail!("{}: expected a trained model (model.safetensors with model.json beside it)", model.display());
    }
    Ok(dir)
}

fn card(dir: &Path) -> Result<ModelCard> {
    serde_json::from_slice(&std::fs::read(dir.join("model.json"))?).with_context(|| format!("{}: bad model.json", dir.display()))
}

/// Predict every axial slice of a volume in HU; returns a 0/1 mask on its grid.
fn predict_volume(dir: &Path, c: &ModelCard, vol: &Volume, device: tch::Device) -> Result<Vec<u8>> {
    let ((rows, cols), _) = vol.slice_shape();
    let size = c.size as usize;
    let (lo, hi) = (c.window[0] as f32, c.window[1] as f32);
    let n = vol.num_slices();
    let mut x = Vec::with_capacity(n * size * size);
    for k in 0..n {
        let s: Vec<f32> = vol.slice(k).iter().map(|&v| ((v - lo) / (hi - lo)).clamp(0.0, 1.0)).collect();
        x.extend(resize::bilinear_to_u8(&s, rows, cols, size, size));
    }
    let (_, pred, _) = predict_slices(dir, &x, None, n, size, 16, device)?;
    let mut out = vec![0u8; vol.data.len()];
    for k in 0..n {
        let m = resize::nearest(&pred[k * size * size..(k + 1) * size * size], size, size, rows, cols);
        vol.put_slice(&mut out, k, &m);
    }
    Ok(out)
}

pub fn predict(model: &Path, input: &Path, output: &Path, device: tch::Device) -> Result<Vec<PathBuf>> {
    let dir = model_dir(model)?;
    let c = card(&dir)?;
    let name = input.to_string_lossy();
    let mut written = Vec::new();
    if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        let f = nifti::read(input)?;
        let mask = predict_volume(&dir, &c, &f.volume, device)?;
        nifti::write_u8_or_i16(output, f.volume.dims, &f.volume.affine, nifti::VoxelData::U8(&mask), Some(&f.header))?;
        written.push(output.to_path_buf());
    } else if input.is_dir() && std::fs::read_dir(input)?.flatten().any(|e| e.path().extension().is_none() || e.path().extension().is_some_and(|x| x == "dcm")) && !input.join("images").is_dir() {
        let vol = dicom::read_series(input)?;
        let mask = predict_volume(&dir, &c, &vol, device)?;
        nifti::write_u8_or_i16(output, vol.dims, &vol.affine, nifti::VoxelData::U8(&mask), None)?;
        written.push(output.to_path_buf());
    } else {
        // PNG/JPEG: one file or a folder of them; masks as PNG (0 or 255).
        let files: Vec<PathBuf> = if input.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(input)?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| ["png", "jpg", "jpeg"].contains(&x.to_string_lossy().to_lowercase().as_str()))).collect();
            v.sort();
            v
        } else {
            vec![input.to_path_buf()]
        };
        if files.is_empty() {
            bail!("{}: no PNG or JPEG images", input.display());
        }
        std::fs::create_dir_all(output).with_context(|| format!("cannot create {}", output.display()))?;
        let size = c.size as usize;
        for f in files {
            // The image stands in for its own mask: only its pixels are used.
            let pair = slices2d::read_pair(&f, &f, slices2d::MaskRule::Threshold(127))?;
            let s: Vec<f32> = if c.minmax_8bit {
                let (mn, mx) = pair.image.iter().fold((255u8, 0u8), |(a, b), &v| (a.min(v), b.max(v)));
                let span = (mx as f32 - mn as f32).max(1.0);
                pair.image.iter().map(|&v| (v as f32 - mn as f32) / span).collect()
            } else {
                pair.image.iter().map(|&v| v as f32 / 255.0).collect()
            };
            let x = resize::bilinear_to_u8(&s, pair.rows, pair.cols, size, size);
            let (_, pred, _) = predict_slices(&dir, &x, None, 1, size, 1, device)?;
            let m: Vec<u8> = resize::nearest(&pred, size, size, pair.rows, pair.cols).into_iter().map(|v| v * 255).collect();
            let out = output.join(f.file_stem().map(|s| format!("{}.png", s.to_string_lossy())).unwrap_or_else(|| "mask.png".into()));
            image::GrayImage::from_raw(pair.cols as u32, pair.rows as u32, m).expect("sized").save(&out).with_context(|| format!("cannot write {}", out.display()))?;
            written.push(out);
        }
    }
    Ok(written)
}
