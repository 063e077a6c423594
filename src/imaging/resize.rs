//! Resampling of 2D slices: bilinear for intensities, nearest for masks.
//! Pixel centres are aligned as in PIL and `align_corners=False`.

pub fn bilinear(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let mut out = vec![0f32; oh * ow];
    let sy = h as f32 / oh as f32;
    let sx = w as f32 / ow as f32;
    for y in 0..oh {
        let fy = ((y as f32 + 0.5) * sy - 0.5).clamp(0.0, (h - 1) as f32);
        let y0 = fy.floor() as usize;
        let y1 = (y0 + 1).min(h - 1);
        let wy = fy - y0 as f32;
        for x in 0..ow {
            let fx = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, (w - 1) as f32);
            let x0 = fx.floor() as usize;
            let x1 = (x0 + 1).min(w - 1);
            let wx = fx - x0 as f32;
            let top = src[y0 * w + x0] * (1.0 - wx) + src[y0 * w + x1] * wx;
            let bot = src[y1 * w + x0] * (1.0 - wx) + src[y1 * w + x1] * wx;
            out[y * ow + x] = top * (1.0 - wy) + bot * wy;
        }
    }
    out
}

pub fn nearest(src: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<u8> {
    let mut out = vec![0u8; oh * ow];
    for y in 0..oh {
        let sy = (((y as f32 + 0.5) * h as f32 / oh as f32) as usize).min(h - 1);
        for x in 0..ow {
            let sx = (((x as f32 + 0.5) * w as f32 / ow as f32) as usize).min(w - 1);
            out[y * ow + x] = src[sy * w + sx];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn identity_and_constant() {
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(super::bilinear(&src, 4, 4, 4, 4), src);
        let c = vec![7.0f32; 36];
        assert!(super::bilinear(&c, 6, 6, 4, 4).iter().all(|&v| (v - 7.0).abs() < 1e-6));
        let m: Vec<u8> = vec![0, 1, 0, 1];
        assert_eq!(super::nearest(&m, 2, 2, 4, 4).iter().filter(|&&v| v == 1).count(), 8);
    }
}
