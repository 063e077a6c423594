//! NIfTI-1 single-file (.nii, .nii.gz) reader and writer.

use super::Volume;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::Path;

const HEADER_LEN: usize = 348;

/// A volume with the raw header it came from, so a mask written for it keeps
/// the same geometry (affine, qform/sform codes, units).
pub struct NiftiFile {
    pub volume: Volume,
    pub header: Vec<u8>,
    pub datatype: i16,
}

/// The most voxel bytes a volume may declare: 1 GiB, a 512×512×2048 int16
/// CT. A header asking for more (or a gzip stream inflating past what its
/// header declares) is refused before anything that size is allocated.
pub const MAX_VOXEL_BYTES: usize = 1 << 30;

/// The file's bytes, inflated if gzipped: the header first, then no more
/// than the header declares, so a gzip bomb cannot inflate past it.
fn inflated(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let corrupt = || format!("{}: truncated or corrupt gzip stream", path.display());
    let mut dec = flate2::read::MultiGzDecoder::new(&raw[..]);
    let mut out = Vec::with_capacity(HEADER_LEN);
    (&mut dec).take(HEADER_LEN as u64).read_to_end(&mut out).with_context(corrupt)?;
    if out.len() < HEADER_LEN {
        return Ok(out); // the caller reports the short header
    }
    let need = Layout::of(path, &out)?.need;
    out.reserve_exact(need - HEADER_LEN);
    dec.take((need - HEADER_LEN) as u64).read_to_end(&mut out).with_context(corrupt)?;
    Ok(out)
}

/// Where a header puts its voxels, checked against every bound before use.
struct Layout {
    e: Endian,
    dims: [usize; 3],
    datatype: i16,
    vox_offset: usize,
    /// vox_offset plus the voxel bytes: the file's least length.
    need: usize,
}

impl Layout {
    fn of(path: &Path, bytes: &[u8]) -> Result<Layout> {
        let p = path.display();
        if bytes.len() < HEADER_LEN {
            bail!("{p}: truncated: {} bytes, a NIfTI-1 header alone is 348", bytes.len());
        }
        let e = if i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == 348 {
            Endian(true)
        } else if i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == 348 {
            Endian(false)
        } else {
            bail!("{p}: not a NIfTI-1 file (sizeof_hdr is not 348)");
        };
        let ndim = e.i16(bytes, 40);
        if !(2..=7).contains(&ndim) {
            bail!("{p}: unsupported number of dimensions {ndim}");
        }
        let mut dims = [1usize; 3];
        for (i, d) in dims.iter_mut().enumerate().take(ndim.min(3) as usize) {
            let v = e.i16(bytes, 42 + 2 * i);
            if v <= 0 {
                bail!("{p}: dimension {} is {v}", i + 1);
            }
            *d = v as usize;
        }
        for i in 3..ndim as usize {
            if e.i16(bytes, 42 + 2 * i) > 1 {
                bail!("{p}: a 4D or higher volume is not a CT scan with one value per voxel");
            }
        }
        let datatype = e.i16(bytes, 70);
        let bpv = match datatype {
            2 | 256 => 1,
            4 | 512 => 2,
            8 | 16 | 768 => 4,
            64 => 8,
            other => bail!("{p}: unsupported NIfTI datatype code {other}"),
        };
        let offset = e.f32(bytes, 108);
        if !offset.is_finite() || offset < 0.0 || offset > (64 << 20) as f32 {
            bail!("{p}: vox_offset {offset} is not a plausible byte offset (0 to 64 MiB)");
        }
        let vox_offset = (offset as usize).max(352);
        let voxel_bytes = dims[0] * dims[1] * dims[2] * bpv; // each dim < 2^15: no overflow
        if voxel_bytes > MAX_VOXEL_BYTES {
            bail!("{p}: the header declares {}×{}×{} voxels of {bpv} bytes ({} MiB); volumes over {} MiB are refused", dims[0], dims[1], dims[2], voxel_bytes >> 20, MAX_VOXEL_BYTES >> 20);
        }
        Ok(Layout { e, dims, datatype, vox_offset, need: vox_offset + voxel_bytes })
    }
}

struct Endian(bool); // true = little

impl Endian {
    fn i16(&self, b: &[u8], o: usize) -> i16 {
        let a = [b[o], b[o + 1]];
        if self.0 {
            i16::from_le_bytes(a)
        } else {
            i16::from_be_bytes(a)
        }
    }
    fn f32(&self, b: &[u8], o: usize) -> f32 {
        let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if self.0 {
            f32::from_le_bytes(a)
        } else {
            f32::from_be_bytes(a)
        }
    }
}

/// Voxels in the file's own type where that is exact (u8 or i16 without
/// scaling), so ingest need not convert a whole volume to f32 and back.
pub enum NativeVolume {
    U8(Volume<u8>),
    I16(Volume<i16>),
    F32(Volume<f32>),
}

impl NativeVolume {
    pub fn dims(&self) -> [usize; 3] {
        match self {
            NativeVolume::U8(v) => v.dims,
            NativeVolume::I16(v) => v.dims,
            NativeVolume::F32(v) => v.dims,
        }
    }

    pub fn into_f32(self) -> Volume {
        match self {
            NativeVolume::U8(v) => v.with_data(v.data.iter().map(|&x| x as f32).collect()),
            NativeVolume::I16(v) => v.with_data(v.data.iter().map(|&x| x as f32).collect()),
            NativeVolume::F32(v) => v,
        }
    }
}

pub fn read(path: &Path) -> Result<NiftiFile> {
    let raw = read_raw(path)?;
    let (header, datatype) = (raw.header.clone(), raw.datatype);
    Ok(NiftiFile { volume: raw.into_native()?.into_f32(), header, datatype })
}

/// A NIfTI file as stored: the grid, the raw header, and the voxel bytes
/// (header and extensions removed) with what it takes to read them.
pub struct RawNifti {
    pub grid: Volume<()>,
    pub header: Vec<u8>,
    pub datatype: i16,
    little_endian: bool,
    slope: f32,
    inter: f32,
    voxels: Vec<u8>,
    path: std::path::PathBuf,
}

impl RawNifti {
    /// The voxel bytes when they already are little-endian i16 HU (the
    /// common CT layout), which is exactly ingest's tensor format.
    pub fn into_i16_le_bytes(self) -> std::result::Result<Vec<u8>, Self> {
        if self.datatype == 4 && self.little_endian && self.slope == 1.0 && self.inter == 0.0 {
            Ok(self.voxels)
        } else {
            Err(self)
        }
    }

    /// The voxels in their own type where that is exact, else as f32.
    pub fn into_native(self) -> Result<NativeVolume> {
        let (d, e, grid) = (&self.voxels, Endian(self.little_endian), &self.grid);
        if self.slope == 1.0 && self.inter == 0.0 {
            match self.datatype {
                2 => return Ok(NativeVolume::U8(grid.with_data(self.voxels))),
                4 => {
                    // One branch per volume, not per voxel, so the copy vectorises.
                    let data = if e.0 { d.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect() } else { d.chunks_exact(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect() };
                    return Ok(NativeVolume::I16(grid.with_data(data)));
                }
                _ => {}
            }
        }
        let raw: Vec<f32> = match self.datatype {
            2 => d.iter().map(|&v| v as f32).collect(),
            256 => d.iter().map(|&v| v as i8 as f32).collect(),
            4 => d.chunks_exact(2).map(|c| e.i16(c, 0) as f32).collect(),
            512 => d.chunks_exact(2).map(|c| if e.0 { u16::from_le_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], c[1]]) } as f32).collect(),
            8 => d
                .chunks_exact(4)
                .map(|c| {
                    let a = [c[0], c[1], c[2], c[3]];
                    (if e.0 { i32::from_le_bytes(a) } else { i32::from_be_bytes(a) }) as f32
                })
                .collect(),
            768 => d
                .chunks_exact(4)
                .map(|c| {
                    let a = [c[0], c[1], c[2], c[3]];
                    (if e.0 { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }) as f32
                })
                .collect(),
            16 => d.chunks_exact(4).map(|c| e.f32(c, 0)).collect(),
            64 => d
                .chunks_exact(8)
                .map(|c| {
                    let a: [u8; 8] = c.try_into().expect("8 bytes");
                    (if e.0 { f64::from_le_bytes(a) } else { f64::from_be_bytes(a) }) as f32
                })
                .collect(),
            other => bail!("{}: unsupported NIfTI datatype code {other}", self.path.display()),
        };
        let (slope, inter) = (self.slope, self.inter);
        let data: Vec<f32> = if slope != 1.0 || inter != 0.0 { raw.iter().map(|v| v * slope + inter).collect() } else { raw };
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            bail!("{}: voxel {i} is NaN or infinite", self.path.display());
        }
        Ok(NativeVolume::F32(grid.with_data(data)))
    }
}

/// Read and check the header, and keep the voxel bytes as stored.
pub fn read_raw(path: &Path) -> Result<RawNifti> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    read_raw_from(path, bytes)
}

/// `read_raw` of the file's bytes (`path` names it in errors).
pub fn read_raw_from(path: &Path, file: Vec<u8>) -> Result<RawNifti> {
    let p = path.display();
    let mut bytes = inflated(path, file)?;
    let Layout { e, dims, datatype, vox_offset, need } = Layout::of(path, &bytes)?;
    let pix: Vec<f64> = (0..3).map(|i| e.f32(&bytes, 80 + 4 * i).abs() as f64).collect();
    let spacing = [pix[0].max(1e-6), pix[1].max(1e-6), pix[2].max(1e-6)];
    let (mut slope, inter) = (e.f32(&bytes, 112), e.f32(&bytes, 116));
    if slope == 0.0 || !slope.is_finite() {
        slope = 1.0;
    }
    if bytes.len() < need {
        bail!("{p}: truncated: {} bytes, header says {need} ({}×{}×{} voxels of type {datatype} at offset {vox_offset})", bytes.len(), dims[0], dims[1], dims[2]);
    }
    let affine = header_affine(&bytes, &e, spacing);
    let header = bytes[..HEADER_LEN].to_vec();
    // Drop the header in place: no second volume-sized buffer.
    bytes.copy_within(vox_offset..need, 0);
    bytes.truncate(need - vox_offset);
    Ok(RawNifti { grid: Volume { dims, spacing, affine, data: Vec::new() }, header, datatype, little_endian: e.0, slope, inter, voxels: bytes, path: path.to_path_buf() })
}

/// sform if set, else qform, else spacing only (NIfTI method 1).
fn header_affine(b: &[u8], e: &Endian, spacing: [f64; 3]) -> [[f64; 4]; 4] {
    let qform_code = e.i16(b, 252);
    let sform_code = e.i16(b, 254);
    let mut a = super::scaled_identity(spacing);
    if sform_code > 0 {
        for r in 0..3 {
            for c in 0..4 {
                a[r][c] = e.f32(b, 280 + 16 * r + 4 * c) as f64;
            }
        }
    } else if qform_code > 0 {
        let (qb, qc, qd) = (e.f32(b, 256) as f64, e.f32(b, 260) as f64, e.f32(b, 264) as f64);
        let qa = (1.0 - (qb * qb + qc * qc + qd * qd)).max(0.0).sqrt();
        let qfac = if e.f32(b, 76) < 0.0 { -1.0 } else { 1.0 };
        let r = [
            [qa * qa + qb * qb - qc * qc - qd * qd, 2.0 * (qb * qc - qa * qd), 2.0 * (qb * qd + qa * qc)],
            [2.0 * (qb * qc + qa * qd), qa * qa + qc * qc - qb * qb - qd * qd, 2.0 * (qc * qd - qa * qb)],
            [2.0 * (qb * qd - qa * qc), 2.0 * (qc * qd + qa * qb), qa * qa + qd * qd - qc * qc - qb * qb],
        ];
        let s = [spacing[0], spacing[1], spacing[2] * qfac];
        for i in 0..3 {
            for j in 0..3 {
                a[i][j] = r[i][j] * s[j];
            }
            a[i][3] = e.f32(b, 268 + 4 * i) as f64;
        }
    }
    a
}

/// Write a volume as NIfTI-1. With `template`, its header (geometry, codes,
/// description) is kept and only the data fields change.
pub fn write_u8_or_i16(path: &Path, dims: [usize; 3], affine: &[[f64; 4]; 4], data: VoxelData, template: Option<&[u8]>) -> Result<()> {
    write_described(path, dims, affine, data, template, &Described::default())
}

/// What a written file says about where it came from: the header's 80-byte
/// `descrip`, and a comment extension (code 6, NIFTI_ECODE_COMMENT) of any
/// length, as nibabel's `header.extensions` reads it.
#[derive(Default)]
pub struct Described<'a> {
    pub descrip: &'a str,
    pub comment: Option<&'a [u8]>,
}

/// The extension block after the header: the 4-byte extender, then one
/// comment extension padded to a multiple of 16 bytes, as the standard asks.
fn extensions(comment: Option<&[u8]>) -> Vec<u8> {
    let Some(text) = comment else {
        return vec![0u8; 4];
    };
    let esize = (8 + text.len()).div_ceil(16) * 16;
    let mut out = vec![1u8, 0, 0, 0];
    out.extend_from_slice(&(esize as i32).to_le_bytes());
    out.extend_from_slice(&6i32.to_le_bytes());
    out.extend_from_slice(text);
    out.resize(4 + esize, 0);
    out
}

pub fn write_described(path: &Path, dims: [usize; 3], affine: &[[f64; 4]; 4], data: VoxelData, template: Option<&[u8]>, described: &Described) -> Result<()> {
    let mut h = match template {
        Some(t) if t.len() >= HEADER_LEN && i32::from_le_bytes([t[0], t[1], t[2], t[3]]) == 348 => t[..HEADER_LEN].to_vec(),
        _ => {
            let mut h = vec![0u8; HEADER_LEN];
            h[0..4].copy_from_slice(&348i32.to_le_bytes());
            h[344..348].copy_from_slice(b"n+1\0");
            // sform from the affine, code 1 (scanner anatomical); qform unset.
            h[254..256].copy_from_slice(&1i16.to_le_bytes());
            for r in 0..3 {
                for c in 0..4 {
                    h[280 + 16 * r + 4 * c..284 + 16 * r + 4 * c].copy_from_slice(&(affine[r][c] as f32).to_le_bytes());
                }
            }
            for j in 0..3 {
                let s = (affine[0][j].powi(2) + affine[1][j].powi(2) + affine[2][j].powi(2)).sqrt();
                h[80 + 4 * j..84 + 4 * j].copy_from_slice(&(s as f32).to_le_bytes());
            }
            h[76..80].copy_from_slice(&1f32.to_le_bytes());
            h[123] = 2 | 8; // xyzt_units: mm, s
            h
        }
    };
    let dim: [i16; 8] = [3, dims[0] as i16, dims[1] as i16, dims[2] as i16, 1, 1, 1, 1];
    for (i, d) in dim.iter().enumerate() {
        h[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    let (code, bitpix, bytes): (i16, i16, Vec<u8>) = match data {
        VoxelData::U8(v) => (2, 8, v.to_vec()),
        VoxelData::I16(v) => (4, 16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        VoxelData::F32(v) => (16, 32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    };
    if bytes.len() != dims[0] * dims[1] * dims[2] * (bitpix as usize / 8) {
        bail!("{}: data length does not match dims {:?}", path.display(), dims);
    }
    h[70..72].copy_from_slice(&code.to_le_bytes());
    h[72..74].copy_from_slice(&bitpix.to_le_bytes());
    let ext = extensions(described.comment);
    h[108..112].copy_from_slice(&((HEADER_LEN + ext.len()) as f32).to_le_bytes());
    if !described.descrip.is_empty() {
        let d = described.descrip.as_bytes();
        h[148..228].fill(0);
        h[148..148 + d.len().min(79)].copy_from_slice(&d[..d.len().min(79)]);
    }
    h[112..116].copy_from_slice(&1f32.to_le_bytes()); // scl_slope
    h[116..120].copy_from_slice(&0f32.to_le_bytes()); // scl_inter
    h[124..132].copy_from_slice(&[0u8; 8]); // cal_max, cal_min
    let mut out = Vec::with_capacity(HEADER_LEN + ext.len() + bytes.len());
    out.extend_from_slice(&h);
    out.extend_from_slice(&ext);
    out.extend_from_slice(&bytes);
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    if path.to_string_lossy().ends_with(".gz") {
        let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::new(6));
        gz.write_all(&out).and_then(|_| gz.finish().map(|_| ())).with_context(|| format!("cannot write {}", path.display()))?;
    } else {
        let mut f = file;
        f.write_all(&out).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

pub enum VoxelData<'a> {
    U8(&'a [u8]),
    I16(&'a [i16]),
    F32(&'a [f32]),
}
