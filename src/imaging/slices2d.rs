//! 2D image/mask pairs (PNG or JPEG) exported from CT.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// How a mask pixel becomes liver.
#[derive(Debug, Clone, Copy)]
pub enum MaskRule {
    /// Grey value above the threshold (JPEG masks are lossy: 127 by default).
    Threshold(u8),
    /// An exact RGB colour (±tolerance per channel).
    Colour([u8; 3], u8),
}

pub struct Pair {
    pub rows: usize,
    pub cols: usize,
    pub image: Vec<u8>,
    pub mask: Vec<u8>,
}

fn open(path: &Path) -> Result<image::DynamicImage> {
    image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .decode()
        .with_context(|| format!("{}: not a decodable PNG/JPEG image (truncated or corrupt?)", path.display()))
}

pub fn read_pair(image_path: &Path, mask_path: &Path, rule: MaskRule) -> Result<Pair> {
    let img = open(image_path)?.to_luma8();
    let mask_img = open(mask_path)?;
    let (w, h) = img.dimensions();
    if mask_img.width() != w || mask_img.height() != h {
        bail!("{}: mask is {}×{} but its image {} is {w}×{h}", mask_path.display(), mask_img.width(), mask_img.height(), image_path.display());
    }
    let mask = match rule {
        MaskRule::Threshold(t) => mask_img.to_luma8().into_raw().into_iter().map(|v| u8::from(v > t)).collect(),
        MaskRule::Colour(c, tol) => mask_img
            .to_rgb8()
            .pixels()
            .map(|p| u8::from((0..3).all(|i| p.0[i].abs_diff(c[i]) <= tol)))
            .collect(),
    };
    Ok(Pair { rows: h as usize, cols: w as usize, image: img.into_raw(), mask })
}
