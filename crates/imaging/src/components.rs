//! Connected components of binary masks: nnU-Net's post-processing keeps
//! the largest one (the liver) and drops stray islands.

use std::collections::VecDeque;

/// Keep only the largest connected component of `mask` ([z, y, x] 0/1):
/// 26-connectivity when `in_3d` (a volume), else 8-connectivity within each
/// slice separately. Returns the number of voxels removed.
pub fn keep_largest(mask: &mut [u8], [nz, ny, nx]: [usize; 3], in_3d: bool) -> usize {
    if in_3d {
        keep_largest_in(mask, [nz, ny, nx], true)
    } else {
        mask.chunks_mut(ny * nx).map(|s| keep_largest_in(s, [1, ny, nx], false)).sum()
    }
}

fn keep_largest_in(mask: &mut [u8], dims: [usize; 3], in_3d: bool) -> usize {
    let [nz, ny, nx] = dims;
    let mut label = vec![0u32; mask.len()];
    let mut sizes: Vec<usize> = vec![0]; // label 0: background
    let mut queue = VecDeque::new();
    for start in 0..mask.len() {
        if mask[start] == 0 || label[start] != 0 {
            continue;
        }
        let id = sizes.len() as u32;
        sizes.push(0);
        label[start] = id;
        queue.push_back(start);
        while let Some(i) = queue.pop_front() {
            sizes[id as usize] += 1;
            let (z, y, x) = (i / (ny * nx), (i / nx) % ny, i % nx);
            let dz = if in_3d { -1..=1 } else { 0..=0 };
            for oz in dz {
                for oy in -1i64..=1 {
                    for ox in -1i64..=1 {
                        let (zz, yy, xx) = (z as i64 + oz, y as i64 + oy, x as i64 + ox);
                        if zz < 0 || yy < 0 || xx < 0 || zz >= nz as i64 || yy >= ny as i64 || xx >= nx as i64 {
                            continue;
                        }
                        let j = (zz as usize * ny + yy as usize) * nx + xx as usize;
                        if mask[j] != 0 && label[j] == 0 {
                            label[j] = id;
                            queue.push_back(j);
                        }
                    }
                }
            }
        }
    }
    let Some((largest, _)) = sizes.iter().enumerate().skip(1).max_by_key(|&(i, &n)| (n, std::cmp::Reverse(i))) else {
        return 0;
    };
    let mut removed = 0;
    for (m, &l) in mask.iter_mut().zip(&label) {
        if *m != 0 && l as usize != largest {
            *m = 0;
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_planted_blob_is_removed_and_diagonals_connect() {
        // A 4×4 liver and a 2×2 false positive far from it, in a 10×10 slice.
        let mut m = vec![0u8; 100];
        for y in 1..5 {
            for x in 1..5 {
                m[y * 10 + x] = 1;
            }
        }
        for (y, x) in [(8, 8), (8, 9), (9, 8), (9, 9)] {
            m[y * 10 + x] = 1;
        }
        assert_eq!(super::keep_largest(&mut m, [1, 10, 10], false), 4);
        assert_eq!(m.iter().filter(|&&v| v == 1).count(), 16);
        // Touching at a corner is connected (8-connectivity), in 3D across slices too.
        let mut d = vec![0u8; 2 * 9];
        d[0] = 1; // slice 0, (0, 0)
        d[9 + 4] = 1; // slice 1, (1, 1)
        assert_eq!(super::keep_largest(&mut d, [2, 3, 3], true), 0);
        // Slice by slice, each slice keeps its own largest part.
        assert_eq!(super::keep_largest(&mut d, [2, 3, 3], false), 0);
    }
}
