//! `predict`: masks for new scans with a trained model, preprocessed exactly
//! as the model's lineage says (window, resolution), written in formats
//! viewers open: NIfTI with the input's geometry, or PNG.

use anyhow::{bail, Context, Result};
use liverseg_imaging::{dicom, nifti, resize, slices2d, Volume};
use liverseg_stages::evaluate::measure::{load_model, Loaded};
use liverseg_stages::normalise::scaled_resize;
use std::path::{Path, PathBuf};

/// The model folder (model.safetensors + model.json) for a folder or file.
fn model_dir(model: &Path) -> Result<PathBuf> {
    let dir = if model.is_dir() { model.to_path_buf() } else { model.parent().map(Path::to_path_buf).unwrap_or_default() };
    if !dir.join("model.safetensors").is_file() || !dir.join("model.json").is_file() {
        bail!("{}: expected a trained model (model.safetensors with model.json beside it)", model.display());
    }
    Ok(dir)
}

/// Predict every axial slice of a volume in HU; returns a 0/1 mask on its grid.
fn predict_volume(m: &Loaded, vol: &Volume, device: tch::Device) -> Result<Vec<u8>> {
    let ((rows, cols), _) = vol.slice_shape();
    let size = m.card.size as usize;
    let window = (m.card.window[0] as f32, m.card.window[1] as f32);
    let n = vol.num_slices();
    let mut x = Vec::with_capacity(n * size * size);
    for k in 0..n {
        x.extend(scaled_resize(&vol.slice(k), true, false, window, (rows, cols), size));
    }
    let pred = m.predict(&x, n, size, 16, device)?;
    let mut out = vec![0u8; vol.data.len()];
    for k in 0..n {
        let m = resize::nearest(&pred[k * size * size..(k + 1) * size * size], size, size, rows, cols);
        vol.put_slice(&mut out, k, &m);
    }
    Ok(out)
}

pub fn predict(model: &Path, input: &Path, output: &Path, device: tch::Device) -> Result<Vec<PathBuf>> {
    let m = load_model("model", &model_dir(model)?, device)?;
    let c = &m.card;
    let name = input.to_string_lossy();
    let mut written = Vec::new();
    if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        let f = nifti::read(input)?;
        let mask = predict_volume(&m, &f.volume, device)?;
        nifti::write_u8_or_i16(output, f.volume.dims, &f.volume.affine, nifti::VoxelData::U8(&mask), Some(&f.header))?;
        written.push(output.to_path_buf());
    } else if input.is_dir() && std::fs::read_dir(input)?.flatten().any(|e| e.path().extension().is_none() || e.path().extension().is_some_and(|x| x == "dcm")) && !input.join("images").is_dir() {
        let vol = dicom::read_series(input)?;
        let mask = predict_volume(&m, &vol, device)?;
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
            let (image, rows, cols) = slices2d::grey(&f)?;
            let x = scaled_resize(&image, false, c.minmax_8bit, (0.0, 255.0), (rows, cols), size);
            let pred = m.predict(&x, 1, size, 1, device)?;
            let mask: Vec<u8> = resize::nearest(&pred, size, size, rows, cols).into_iter().map(|v| v * 255).collect();
            let out = output.join(f.file_stem().map(|s| format!("{}.png", s.to_string_lossy())).unwrap_or_else(|| "mask.png".into()));
            image::GrayImage::from_raw(cols as u32, rows as u32, mask).expect("sized").save(&out).with_context(|| format!("cannot write {}", out.display()))?;
            written.push(out);
        }
    }
    Ok(written)
}
