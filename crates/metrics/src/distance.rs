//! Surfaces of binary masks and the exact Euclidean distance transform
//! (Felzenszwalb & Huttenlocher 2012), separable over the axes, in the voxel
//! spacing: what scipy's `binary_erosion` and `distance_transform_edt(sampling=)`
//! give MONAI.

/// Stands in for infinity in the parabola envelope, where ∞ − ∞ would be NaN.
const FAR: f64 = 1e30;

/// The surface of a mask on a [z, y, x] grid: voxels of the mask with a
/// 6-neighbour outside it, the grid's border counting as outside. Axes of
/// size 1 are not axes (a single image is eroded in 2D, as MONAI does for a
/// 2D array).
pub fn surface(mask: &[u8], dims: [usize; 3]) -> Vec<bool> {
    let [nz, ny, nx] = dims;
    let at = |z: usize, y: usize, x: usize| mask[(z * ny + y) * nx + x] > 0;
    let mut out = vec![false; mask.len()];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                if !at(z, y, x) {
                    continue;
                }
                let outside = |n: usize, i: usize| n > 1 && (i == 0 || i == n - 1);
                let edge = outside(nz, z)
                    || outside(ny, y)
                    || outside(nx, x)
                    || (nz > 1 && (!at(z - 1, y, x) || !at(z + 1, y, x)))
                    || (ny > 1 && (!at(z, y - 1, x) || !at(z, y + 1, x)))
                    || (nx > 1 && (!at(z, y, x - 1) || !at(z, y, x + 1)));
                out[(z * ny + y) * nx + x] = edge;
            }
        }
    }
    out
}

/// Squared Euclidean distance from every voxel to the nearest `feature`
/// voxel, on a [z, y, x] grid with `spacing` in the same order. Without any
/// feature voxel every distance is huge (1e30).
pub fn edt_squared(feature: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut d: Vec<f64> = feature.iter().map(|&f| if f { 0.0 } else { FAR }).collect();
    let [nz, ny, nx] = dims;
    let strides = [ny * nx, nx, 1];
    for axis in [2, 1, 0] {
        let n = dims[axis];
        if n < 2 {
            continue;
        }
        let (mut line, mut out) = (vec![0.0; n], vec![0.0; n]);
        let (mut v, mut z) = (vec![0usize; n], vec![0.0; n + 1]);
        // Every line along `axis`: its start index, then step by the axis' stride.
        let starts: Vec<usize> = (0..nz).flat_map(|a| (0..ny).flat_map(move |b| (0..nx).map(move |c| (a * ny + b) * nx + c))).filter(|&i| (i / strides[axis]) % n == 0).collect();
        for start in starts {
            for (k, l) in line.iter_mut().enumerate() {
                *l = d[start + k * strides[axis]];
            }
            lower_envelope(&line, spacing[axis], &mut out, &mut v, &mut z);
            for (k, o) in out.iter().enumerate() {
                d[start + k * strides[axis]] = *o;
            }
        }
    }
    d
}

/// One-dimensional squared distance transform of sampled function `f` with
/// sample spacing `s`: out[p] = min_q ((p - q)·s)² + f[q].
fn lower_envelope(f: &[f64], s: f64, out: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let x = |q: usize| q as f64 * s;
    let meet = |q: usize, p: usize| ((f[q] + x(q) * x(q)) - (f[p] + x(p) * x(p))) / (2.0 * (x(q) - x(p)));
    let mut k = 0;
    v[0] = 0;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in 1..n {
        let mut sq = meet(q, v[k]);
        while sq <= z[k] {
            k -= 1;
            sq = meet(q, v[k]);
        }
        k += 1;
        v[k] = q;
        z[k] = sq;
        z[k + 1] = f64::INFINITY;
    }
    k = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while z[k + 1] < x(q) {
            k += 1;
        }
        let dx = x(q) - x(v[k]);
        *o = (dx * dx + f[v[k]]).min(FAR);
    }
}
