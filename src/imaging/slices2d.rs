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

/// 8-bit grey pixels and (rows, cols). JPEGs are decoded straight to luma
/// (the Y channel), skipping colour conversion: most exports are RGB JPEGs
/// of grey images, and that conversion would dominate ingest.
pub fn grey(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if bytes.starts_with(&[0xFF, 0xD8]) {
        use zune_core::{bytestream::ZCursor, colorspace::ColorSpace, options::DecoderOptions};
        let opts = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::Luma);
        let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(&bytes[..]), opts);
        let pixels = dec.decode().map_err(|e| anyhow::anyhow!("{}: not a decodable PNG/JPEG image (truncated or corrupt?): {e:?}", path.display()))?;
        let info = dec.info().ok_or_else(|| anyhow::anyhow!("{}: JPEG without a frame header", path.display()))?;
        let (rows, cols) = (info.height as usize, info.width as usize);
        if pixels.len() != rows * cols {
            bail!("{}: decoded {} bytes for {rows}×{cols} luma pixels", path.display(), pixels.len());
        }
        return Ok((pixels, rows, cols));
    }
    let img = open_any(path, bytes)?.to_luma8();
    let (w, h) = img.dimensions();
    Ok((img.into_raw(), h as usize, w as usize))
}

fn open_any(path: &Path, bytes: Vec<u8>) -> Result<image::DynamicImage> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .decode()
        .with_context(|| format!("{}: not a decodable PNG/JPEG image (truncated or corrupt?)", path.display()))
}


pub fn read_pair(image_path: &Path, mask_path: &Path, rule: MaskRule) -> Result<Pair> {
    let (image, h, w) = grey(image_path)?;
    let (mask, mh, mw) = match rule {
        MaskRule::Threshold(t) => {
            let (m, mh, mw) = grey(mask_path)?;
            (m.into_iter().map(|v| u8::from(v > t)).collect::<Vec<u8>>(), mh, mw)
        }
        MaskRule::Colour(c, tol) => {
            let bytes = std::fs::read(mask_path).with_context(|| format!("{}: cannot read", mask_path.display()))?;
            let rgb = open_any(mask_path, bytes)?.to_rgb8();
            let (mw, mh) = rgb.dimensions();
            (rgb.pixels().map(|p| u8::from((0..3).all(|i| p.0[i].abs_diff(c[i]) <= tol))).collect(), mh as usize, mw as usize)
        }
    };
    if (mh, mw) != (h, w) {
        bail!("{}: mask is {mw}×{mh} but its image {} is {w}×{h}", mask_path.display(), image_path.display());
    }
    Ok(Pair { rows: h, cols: w, image, mask })
}
