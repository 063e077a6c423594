//! Medical image readers and writers, resampling and synthetic phantoms.

pub mod augment;
pub mod components;
pub mod dicom;
pub mod dicom_seg;
pub mod nifti;
pub mod nrrd;
pub mod resize;
pub mod slices2d;
pub mod synth;

/// A 3D scalar volume, x fastest, with its voxel-to-world (RAS, mm) affine.
/// Voxels are f32 unless a reader keeps the file's own integer type.
#[derive(Debug, Clone)]
pub struct Volume<T = f32> {
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
    pub affine: [[f64; 4]; 4],
    pub data: Vec<T>,
}

impl<T: Copy> Volume<T> {
    /// The same grid with other voxel data.
    pub fn with_data<U>(&self, data: Vec<U>) -> Volume<U> {
        Volume { dims: self.dims, spacing: self.spacing, affine: self.affine, data }
    }

    pub fn voxel(&self, x: usize, y: usize, z: usize) -> T {
        self.data[x + self.dims[0] * (y + self.dims[1] * z)]
    }

    /// The voxel axis that runs most nearly along the world S axis: slices are
    /// taken across it, whatever order the file stores its axes in.
    pub fn axial_axis(&self) -> usize {
        let mut best = (2, -1.0);
        for j in 0..3 {
            let col = [self.affine[0][j], self.affine[1][j], self.affine[2][j]];
            let norm = (col[0] * col[0] + col[1] * col[1] + col[2] * col[2]).sqrt().max(1e-12);
            let s = col[2].abs() / norm;
            if s > best.1 {
                best = (j, s);
            }
        }
        best.0
    }

    /// Three-letter orientation code (RAS convention) of the voxel axes, e.g. "LPS".
    pub fn orientation(&self) -> String {
        (0..3)
            .map(|j| {
                let col = [self.affine[0][j], self.affine[1][j], self.affine[2][j]];
                let (i, v) = col.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).map(|(i, v)| (i, *v)).unwrap_or((0, 1.0));
                match (i, v >= 0.0) {
                    (0, true) => 'R',
                    (0, false) => 'L',
                    (1, true) => 'A',
                    (1, false) => 'P',
                    (_, true) => 'S',
                    (_, false) => 'I',
                }
            })
            .collect()
    }

    pub fn num_slices(&self) -> usize {
        self.dims[self.axial_axis()]
    }

    /// In-plane (rows, cols) of an axial slice and the (row, col) spacing.
    pub fn slice_shape(&self) -> ((usize, usize), (f64, f64)) {
        let (a, b) = self.inplane_axes();
        ((self.dims[b], self.dims[a]), (self.spacing[b], self.spacing[a]))
    }

    fn inplane_axes(&self) -> (usize, usize) {
        match self.axial_axis() {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        }
    }

    /// Axial slice `k` as a row-major (rows, cols) image.
    pub fn slice(&self, k: usize) -> Vec<T> {
        self.slice_of(&self.data, k)
    }

    /// Axial slice `k` of any array laid out on this volume's grid (a mask).
    pub fn slice_of<V: Copy>(&self, data: &[V], k: usize) -> Vec<V> {
        let ax = self.axial_axis();
        let [nx, ny, _] = self.dims;
        if ax == 2 {
            // The usual layout: an axial slice is one contiguous block.
            return data[k * nx * ny..(k + 1) * nx * ny].to_vec();
        }
        let (a, b) = self.inplane_axes();
        let ((rows, cols), _) = self.slice_shape();
        let stride = [1, nx, nx * ny];
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let base = k * stride[ax] + r * stride[b];
            out.extend((0..cols).map(|c| data[base + c * stride[a]]));
        }
        out
    }

    /// Write a row-major axial slice `k` into `data` laid out on this grid
    /// (the inverse of `slice_of`).
    pub fn put_slice<V: Copy>(&self, data: &mut [V], k: usize, values: &[V]) {
        let ax = self.axial_axis();
        let [nx, ny, _] = self.dims;
        let (a, b) = self.inplane_axes();
        let ((rows, cols), _) = self.slice_shape();
        let stride = [1, nx, nx * ny];
        for r in 0..rows {
            for c in 0..cols {
                data[k * stride[ax] + r * stride[b] + c * stride[a]] = values[r * cols + c];
            }
        }
    }
}

/// Liver (non-zero) pixels of a mask. Counted in u16 over blocks too short
/// to overflow it, which vectorises 8 or 16 bytes at a time; a u64 count
/// went 2 bytes at a time and cost 8% of normalise.
pub fn liver_count(mask: &[u8]) -> u64 {
    mask.chunks(1 << 15).map(|block| u64::from(block.iter().map(|&v| u16::from(v != 0)).sum::<u16>())).sum()
}

/// A binary (0/1) mask [.., rows, cols] as bits, the layout of numpy's
/// `packbits(mask, axis=-1)`: each row padded to whole bytes, first pixel in
/// the most significant bit. An eighth of the bytes to write, hash and read
/// back (`np.unpackbits(bits, axis=-1, count=cols)` restores it).
pub fn pack_mask_rows(mask: &[u8], cols: usize) -> Vec<u8> {
    debug_assert!(mask.iter().all(|&v| v <= 1));
    let row_bytes = cols.div_ceil(8);
    let mut out = Vec::with_capacity(mask.len() / cols.max(1) * row_bytes);
    for row in mask.chunks_exact(cols.max(1)) {
        let (whole, tail) = row.as_chunks::<8>();
        // Eight 0/1 bytes to one byte with a multiply: byte i of the product's
        // top byte is pixel i's bit, pixel 0 highest (no carries reach it).
        out.extend(whole.iter().map(|eight| (u64::from_le_bytes(*eight).wrapping_mul(0x8040_2010_0804_0201) >> 56) as u8));
        if !tail.is_empty() {
            out.push(tail.iter().fold(0u8, |byte, &v| (byte << 1) | v) << (8 - tail.len()));
        }
    }
    out
}

/// Each byte value's 8 pixels as 0/1 bytes (little-endian u64: pixel 0 first).
const UNPACKED: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut pixel = 0;
        while pixel < 8 {
            table[byte] |= (((byte >> (7 - pixel)) & 1) as u64) << (8 * pixel);
            pixel += 1;
        }
        byte += 1;
    }
    table
};

/// One row of `pack_mask_rows` back to 0/1 bytes (`out.len()` = cols).
pub fn unpack_mask_row(bits: &[u8], out: &mut [u8]) {
    let (whole, tail) = out.as_chunks_mut::<8>();
    for (eight, &byte) in whole.iter_mut().zip(bits) {
        *eight = UNPACKED[byte as usize].to_le_bytes();
    }
    if let Some(&last) = bits.get(whole.len()) {
        tail.copy_from_slice(&UNPACKED[last as usize].to_le_bytes()[..tail.len()]);
    }
}

/// 4×4 identity with the given spacing on the diagonal.
pub fn scaled_identity(spacing: [f64; 3]) -> [[f64; 4]; 4] {
    let mut a = [[0.0; 4]; 4];
    for i in 0..3 {
        a[i][i] = spacing[i];
    }
    a[3][3] = 1.0;
    a
}

#[cfg(test)]
mod bit_masks {
    #[test]
    fn packed_rows_round_trip_in_numpy_layout() {
        // 2 rows of 10 pixels: numpy.packbits gives 2 bytes per row.
        let mask: Vec<u8> = vec![1, 0, 0, 0, 0, 0, 0, 1, 1, 1, /**/ 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        let bits = super::pack_mask_rows(&mask, 10);
        assert_eq!(bits, vec![0b1000_0001, 0b1100_0000, 0b0100_0000, 0b0100_0000]);
        let mut back = vec![9u8; 10];
        for (r, row) in bits.chunks(2).enumerate() {
            super::unpack_mask_row(row, &mut back);
            assert_eq!(back, &mask[r * 10..(r + 1) * 10]);
        }
        // Every byte value, and rows of whole bytes.
        let mask: Vec<u8> = (0..256 * 8).map(|i| ((i / 8) >> (7 - i % 8) & 1) as u8).collect();
        let bits = super::pack_mask_rows(&mask, 64);
        assert_eq!(bits, (0..=255u8).collect::<Vec<_>>());
        let mut back = vec![9u8; 64];
        for (r, row) in bits.chunks(8).enumerate() {
            super::unpack_mask_row(row, &mut back);
            assert_eq!(back, &mask[r * 64..(r + 1) * 64]);
        }
    }
}
