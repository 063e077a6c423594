//! NRRD reader (attached header, raw or gzip data) for label maps that come
//! beside DICOM series.

use super::Volume;
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

fn parse_vector(s: &str) -> Option<[f64; 3]> {
    let v: Vec<f64> = s.trim().trim_start_matches('(').trim_end_matches(')').split(',').map(|x| x.trim().parse().ok()).collect::<Option<_>>()?;
    (v.len() == 3).then(|| [v[0], v[1], v[2]])
}

pub fn read(path: &Path) -> Result<Volume> {
    let p = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("{p}: cannot read"))?;
    if !bytes.starts_with(b"NRRD000") {
        bail!("{p}: not an NRRD file (no NRRD000x magic)");
    }
    let header_end = bytes.windows(2).position(|w| w == b"\n\n").ok_or_else(|| anyhow::anyhow!("{p}: truncated: no end of header"))?;
    let header = std::str::from_utf8(&bytes[..header_end]).with_context(|| format!("{p}: header is not text"))?;
    let (mut kind, mut sizes, mut encoding, mut endian_little) = (String::new(), Vec::new(), "raw".to_owned(), true);
    let (mut dirs, mut origin, mut lps) = (None, [0.0; 3], true);
    for line in header.lines().skip(1) {
        if line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim_start_matches('=').trim();
        match k.trim() {
            "type" => kind = v.to_owned(),
            "dimension" if v != "3" => bail!("{p}: dimension {v}, expected a 3D label map"),
            "sizes" => sizes = v.split_whitespace().map(|s| s.parse::<usize>()).collect::<std::result::Result<_, _>>().with_context(|| format!("{p}: bad sizes `{v}`"))?,
            "encoding" => encoding = v.to_owned(),
            "endian" => endian_little = v == "little",
            "space" => lps = !v.contains("right-anterior"),
            "space directions" => {
                let d: Vec<[f64; 3]> = v.split(") (").map(parse_vector).collect::<Option<_>>().ok_or_else(|| anyhow::anyhow!("{p}: bad space directions `{v}`"))?;
                if d.len() != 3 {
                    bail!("{p}: expected 3 space directions, got {}", d.len());
                }
                dirs = Some(d);
            }
            "space origin" => origin = parse_vector(v).ok_or_else(|| anyhow::anyhow!("{p}: bad space origin `{v}`"))?,
            "data file" | "datafile" => bail!("{p}: detached NRRD data files are not supported"),
            _ => {}
        }
    }
    if sizes.len() != 3 {
        bail!("{p}: sizes must list 3 dimensions");
    }
    let (bpv, conv): (usize, fn(&[u8], bool) -> f32) = match kind.as_str() {
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => (1, |b, _| b[0] as f32),
        "signed char" | "int8" | "int8_t" => (1, |b, _| b[0] as i8 as f32),
        "short" | "short int" | "signed short" | "int16" | "int16_t" => (2, |b, le| if le { i16::from_le_bytes([b[0], b[1]]) } else { i16::from_be_bytes([b[0], b[1]]) } as f32),
        "ushort" | "unsigned short" | "uint16" | "uint16_t" => (2, |b, le| if le { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) } as f32),
        "int" | "int32" | "int32_t" => (4, |b, le| {
            let a = [b[0], b[1], b[2], b[3]];
            (if le { i32::from_le_bytes(a) } else { i32::from_be_bytes(a) }) as f32
        }),
        "float" => (4, |b, le| {
            let a = [b[0], b[1], b[2], b[3]];
            if le {
                f32::from_le_bytes(a)
            } else {
                f32::from_be_bytes(a)
            }
        }),
        other => bail!("{p}: unsupported type `{other}`"),
    };
    // Bounded before anything that size is allocated or inflated.
    let n = sizes.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&n| n.checked_mul(bpv).is_some_and(|b| b <= super::nifti::MAX_VOXEL_BYTES));
    let Some(n) = n else {
        bail!("{p}: sizes {sizes:?} of {bpv}-byte values exceed {} MiB; refused", super::nifti::MAX_VOXEL_BYTES >> 20);
    };
    let body = &bytes[header_end + 2..];
    let data = match encoding.as_str() {
        "raw" => body.to_vec(),
        "gzip" | "gz" => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body).take((n * bpv) as u64).read_to_end(&mut out).with_context(|| format!("{p}: truncated or corrupt gzip data"))?;
            out
        }
        other => bail!("{p}: unsupported encoding `{other}`"),
    };
    if data.len() < n * bpv {
        bail!("{p}: truncated: {} data bytes, sizes need {}", data.len(), n * bpv);
    }
    let values: Vec<f32> = data[..n * bpv].chunks_exact(bpv).map(|c| conv(c, endian_little)).collect();
    let d = dirs.unwrap_or_else(|| vec![[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
    let sign = if lps { -1.0 } else { 1.0 };
    let mut affine = [[0.0; 4]; 4];
    for j in 0..3 {
        affine[0][j] = sign * d[j][0];
        affine[1][j] = sign * d[j][1];
        affine[2][j] = d[j][2];
    }
    affine[0][3] = sign * origin[0];
    affine[1][3] = sign * origin[1];
    affine[2][3] = origin[2];
    affine[3][3] = 1.0;
    let spacing = [0, 1, 2].map(|j| (d[j][0].powi(2) + d[j][1].powi(2) + d[j][2].powi(2)).sqrt());
    Ok(Volume { dims: [sizes[0], sizes[1], sizes[2]], spacing, affine, data: values })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    /// A header declaring more than the voxel limit is refused before its
    /// gzip body is inflated, whatever that body holds; one that declares
    /// less than its body reads only what it declares.
    #[test]
    fn declared_sizes_bound_what_is_read() {
        let dir = std::env::temp_dir().join(format!("liverseg-nrrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut zeros = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        zeros.write_all(&vec![0u8; 8 << 20]).unwrap();
        let body = zeros.finish().unwrap();
        for (sizes, ok) in [("100000 100000 100000", false), ("18446744073709551615 2 1", false), ("4 4 2", true)] {
            let path = dir.join("mask.nrrd");
            let mut file = format!("NRRD0004\ntype: uchar\ndimension: 3\nsizes: {sizes}\nencoding: gzip\n\n").into_bytes();
            file.extend_from_slice(&body);
            std::fs::write(&path, file).unwrap();
            match super::read(&path) {
                Ok(v) => assert!(ok && v.data.len() == 32, "{sizes}: read {} voxels", v.data.len()),
                Err(e) => assert!(!ok && format!("{e:#}").contains("refused"), "{sizes}: {e:#}"),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
