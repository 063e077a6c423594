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
    let mut pixels = Vec::new();
    let (rows, cols) = grey_from_bytes(path, bytes, &mut pixels)?;
    Ok((pixels, rows, cols))
}

/// `grey` of the bytes of the file at `path` (named in errors), appending the
/// pixels to `out` (a JPEG is decoded in place there).
pub fn grey_from_bytes(path: &Path, bytes: Vec<u8>, out: &mut Vec<u8>) -> Result<(usize, usize)> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        // zune-jpeg fills a cut-off scan with grey rather than failing: a
        // complete JPEG ends with its EOI marker (some writers pad with zeros).
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if !bytes[..end].ends_with(&[0xFF, 0xD9]) {
            bail!("{}: not a decodable PNG/JPEG image (truncated JPEG: no end-of-image marker)", path.display());
        }
        use zune_core::{bytestream::ZCursor, colorspace::ColorSpace, options::DecoderOptions};
        let bad = |e| anyhow::anyhow!("{}: not a decodable PNG/JPEG image (truncated or corrupt?): {e:?}", path.display());
        let opts = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::Luma);
        let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(&bytes[..]), opts);
        dec.decode_headers().map_err(bad)?;
        let info = dec.info().ok_or_else(|| anyhow::anyhow!("{}: JPEG without a frame header", path.display()))?;
        let (rows, cols) = (info.height as usize, info.width as usize);
        let len = dec.output_buffer_size().unwrap_or(0);
        if len != rows * cols {
            bail!("{}: decoder wants {len} bytes for {rows}×{cols} luma pixels", path.display());
        }
        let start = out.len();
        out.resize(start + len, 0);
        if let Err(e) = dec.decode_into(&mut out[start..]) {
            out.truncate(start);
            return Err(bad(e));
        }
        return Ok((rows, cols));
    }
    let img = open_any(path, bytes)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    match img.color() {
        image::ColorType::L8 | image::ColorType::La8 => out.extend_from_slice(img.to_luma8().as_raw()),
        // Grey stored as RGB is common and exact; real colour is not a CT intensity.
        image::ColorType::Rgb8 | image::ColorType::Rgba8 => {
            let rgb = img.to_rgb8();
            if let Some((i, p)) = rgb.pixels().enumerate().find(|(_, p)| p.0[0] != p.0[1] || p.0[1] != p.0[2]) {
                bail!("{}: a colour image (pixel {i} is RGB {:?}); CT exports are grey, and a colour mask needs data.mask_rule rgb:R,G,B", path.display(), p.0);
            }
            out.extend(rgb.pixels().map(|p| p.0[0]));
        }
        other => bail!("{}: a {other:?} image; liverseg reads 8-bit grey exports (a 16-bit PNG's intensity unit is unknown: convert it, or give the volume as NIfTI or DICOM)", path.display()),
    }
    Ok((h, w))
}

fn open_any(path: &Path, bytes: Vec<u8>) -> Result<image::DynamicImage> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .decode()
        .with_context(|| format!("{}: not a decodable PNG/JPEG image (truncated or corrupt?)", path.display()))
}

/// A lossless mask holding only 0 and 1 is a label map (liver = 1), which
/// `threshold:T` with T ≥ 1 would read as empty. JPEG masks are left alone:
/// their compression noise near 0 is no label.
fn check_not_a_label_map(mask_path: &Path, grey: &[u8], t: u8) -> Result<()> {
    let lossless = mask_path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if lossless && t >= 1 && grey.iter().all(|&v| v <= 1) && grey.contains(&1) {
        bail!("{}: a label map (pixel values 0 and 1 only), which data.mask_rule threshold:{t} reads as empty; set data.mask_rule to threshold:0", mask_path.display());
    }
    Ok(())
}

pub fn read_pair(image_path: &Path, mask_path: &Path, rule: MaskRule) -> Result<Pair> {
    let (mut image, mut mask) = (Vec::new(), Vec::new());
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()));
    let (rows, cols) = read_pair_into(image_path, mask_path, rule, &read, &mut image, &mut mask, &mut Vec::new())?;
    Ok(Pair { rows, cols, image, mask })
}

/// `read_pair`, appending the image to `image` and the binary mask to `mask`
/// (`scratch` holds the mask's grey values); on error neither is extended.
/// `read` gives a file's bytes.
pub fn read_pair_into(
    image_path: &Path,
    mask_path: &Path,
    rule: MaskRule,
    read: &dyn Fn(&Path) -> Result<Vec<u8>>,
    image: &mut Vec<u8>,
    mask: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<(usize, usize)> {
    let start = image.len();
    let (h, w) = grey_from_bytes(image_path, read(image_path)?, image)?;
    let (mh, mw) = match rule {
        MaskRule::Threshold(t) => {
            scratch.clear();
            let shape = read(mask_path).and_then(|bytes| grey_from_bytes(mask_path, bytes, scratch)).inspect_err(|_| image.truncate(start))?;
            if shape == (h, w) {
                check_not_a_label_map(mask_path, scratch, t).inspect_err(|_| image.truncate(start))?;
                mask.extend(scratch.iter().map(|&v| u8::from(v > t)));
            }
            shape
        }
        MaskRule::Colour(c, tol) => {
            let img = read(mask_path).and_then(|bytes| open_any(mask_path, bytes)).inspect_err(|_| image.truncate(start))?;
            if !matches!(img.color(), image::ColorType::Rgb8 | image::ColorType::Rgba8 | image::ColorType::L8 | image::ColorType::La8) {
                image.truncate(start);
                bail!("{}: a {:?} mask; masks are 8-bit", mask_path.display(), img.color());
            }
            let rgb = img.to_rgb8();
            let (mw, mh) = rgb.dimensions();
            if (mh as usize, mw as usize) == (h, w) {
                mask.extend(rgb.pixels().map(|p| u8::from((0..3).all(|i| p.0[i].abs_diff(c[i]) <= tol))));
            }
            (mh as usize, mw as usize)
        }
    };
    if (mh, mw) != (h, w) {
        image.truncate(start);
        bail!("{}: mask is {mw}×{mh} but its image {} is {w}×{h}", mask_path.display(), image_path.display());
    }
    Ok((h, w))
}
