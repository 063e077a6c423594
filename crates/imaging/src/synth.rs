//! Synthetic abdominal CT phantoms with a liver mask, the embedded default
//! dataset. Neighbouring organs (spleen, kidneys, muscle) sit within a few
//! tens of HU of liver and the images are noisy, so a model has to learn
//! shape and position, not a threshold.

use liverseg_rng::Rng;

pub struct Phantom {
    /// (x, y, z) voxels, x fastest.
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
    pub hu: Vec<i16>,
    /// 0 background, 1 liver, 2 tumour (the LiTS labels).
    pub labels: Vec<u8>,
}

/// A closed shape with a radius that varies with angle.
struct Blob {
    cx: f64,
    cy: f64,
    rx: f64,
    ry: f64,
    harmonics: Vec<(f64, f64, f64)>, // (k, amplitude, phase)
}

impl Blob {
    fn ellipse(cx: f64, cy: f64, rx: f64, ry: f64) -> Self {
        Blob { cx, cy, rx, ry, harmonics: Vec::new() }
    }

    /// Fraction of a pixel of width `px` covered by the shape scaled by `s`.
    fn coverage(&self, u: f64, v: f64, s: f64, px: f64) -> f64 {
        if s <= 0.0 {
            return 0.0;
        }
        let (dx, dy) = ((u - self.cx) / (self.rx * s), (v - self.cy) / (self.ry * s));
        let rho = (dx * dx + dy * dy).sqrt();
        let theta = dy.atan2(dx);
        let mut r = 1.0;
        for (k, a, ph) in &self.harmonics {
            r += a * (k * theta + ph).cos();
        }
        // Distance to the boundary in normalised units, roughly.
        let d = (rho - r) * self.rx.min(self.ry) * s;
        (0.5 - d / px).clamp(0.0, 1.0)
    }
}

// 6.28, not TAU, bounds the phases: the synthetic default data (and every
// figure from it) depends on these exact draws.
#[allow(clippy::approx_constant)]
pub fn phantom(seed: u64, case: u64, size: usize, slices: usize) -> Phantom {
    let mut rng = Rng::derive(seed, case);
    let n = size;
    let px = 2.0 / n as f64;
    let body = Blob::ellipse(0.0, 0.05, rng.range(0.8, 0.9), rng.range(0.6, 0.7));
    let fat = rng.range(0.05, 0.1);
    let muscle = Blob::ellipse(body.cx, body.cy, body.rx - fat, body.ry - fat);
    let inner = Blob::ellipse(body.cx, body.cy, body.rx - fat - 0.05, body.ry - fat - 0.05);
    let liver = Blob {
        cx: rng.range(-0.5, -0.3),
        cy: rng.range(-0.15, 0.05),
        rx: rng.range(0.28, 0.4),
        ry: rng.range(0.24, 0.34),
        harmonics: (2..=5).map(|k| (k as f64, rng.range(0.0, 0.12) / (k as f64 - 1.0), rng.range(0.0, 6.28))).collect(),
    };
    let spleen = Blob { cx: rng.range(0.45, 0.58), cy: rng.range(0.0, 0.2), rx: rng.range(0.1, 0.16), ry: rng.range(0.12, 0.2), harmonics: vec![(2.0, 0.1, rng.range(0.0, 6.28))] };
    let kidney_l = Blob::ellipse(rng.range(-0.35, -0.25), 0.35, 0.1, 0.07);
    let kidney_r = Blob::ellipse(rng.range(0.25, 0.35), 0.35, 0.1, 0.07);
    let stomach = Blob::ellipse(rng.range(0.15, 0.3), rng.range(-0.35, -0.2), 0.16, 0.12);
    let aorta = Blob::ellipse(0.06, 0.3, 0.045, 0.045);
    let ivc = Blob::ellipse(-0.12, 0.26, 0.05, 0.04);
    let spine = Blob::ellipse(0.0, 0.5, 0.1, 0.1);
    let marrow = Blob::ellipse(0.0, 0.5, 0.07, 0.07);
    let tumours: Vec<(Blob, f64)> =
        (0..rng.below(3)).map(|_| (Blob::ellipse(liver.cx + rng.range(-0.12, 0.12), liver.cy + rng.range(-0.1, 0.1), rng.range(0.03, 0.08), rng.range(0.03, 0.08)), rng.range(-45.0, -20.0))).collect();
    let liver_hu = rng.range(50.0, 70.0);
    let spleen_hu = liver_hu + rng.range(-15.0, 10.0);
    let kidney_hu = liver_hu + rng.range(-25.0, 5.0);
    let muscle_hu = rng.range(40.0, 55.0);
    let noise = rng.range(10.0, 22.0);
    // The liver spans the middle of the stack; the first and last slices may miss it.
    let z_centre = slices as f64 * rng.range(0.4, 0.6);
    let z_half = slices as f64 * rng.range(0.35, 0.5);
    let mut hu = vec![0i16; n * n * slices];
    let mut labels = vec![0u8; n * n * slices];
    for z in 0..slices {
        let t = (z as f64 - z_centre) / z_half;
        let liver_scale = (1.0 - t * t).max(0.0).sqrt();
        let organ_scale = (1.0 - 0.5 * t * t).max(0.0).sqrt();
        for y in 0..n {
            let v = (y as f64 + 0.5) * px - 1.0;
            for x in 0..n {
                let u = (x as f64 + 0.5) * px - 1.0;
                let mut val = -1000.0;
                let paint = |val: &mut f64, c: f64, h: f64| *val = *val * (1.0 - c) + h * c;
                paint(&mut val, body.coverage(u, v, 1.0, px), -100.0);
                paint(&mut val, muscle.coverage(u, v, 1.0, px), muscle_hu);
                paint(&mut val, inner.coverage(u, v, 1.0, px), 10.0 + 25.0 * ((u * 9.0).sin() * (v * 7.0).cos()));
                paint(&mut val, kidney_l.coverage(u, v, organ_scale, px), kidney_hu);
                paint(&mut val, kidney_r.coverage(u, v, organ_scale, px), kidney_hu);
                paint(&mut val, spleen.coverage(u, v, organ_scale, px), spleen_hu);
                let st = stomach.coverage(u, v, organ_scale, px);
                paint(&mut val, st, if v < stomach.cy - 0.04 { -700.0 } else { 25.0 });
                let lc = liver.coverage(u, v, liver_scale, px);
                paint(&mut val, lc, liver_hu);
                let mut label = u8::from(lc > 0.5);
                for (tb, delta) in &tumours {
                    let tc = tb.coverage(u, v, liver_scale, px) * lc;
                    paint(&mut val, tc, liver_hu + delta);
                    if tc > 0.5 {
                        label = 2;
                    }
                }
                paint(&mut val, aorta.coverage(u, v, 1.0, px), 170.0);
                paint(&mut val, ivc.coverage(u, v, 1.0, px), 110.0);
                paint(&mut val, spine.coverage(u, v, 1.0, px), 700.0);
                paint(&mut val, marrow.coverage(u, v, 1.0, px), 250.0);
                if val > -900.0 {
                    val += noise * rng.normal();
                }
                let i = x + n * (y + n * z);
                hu[i] = val.round().clamp(-1024.0, 3071.0) as i16;
                labels[i] = label;
            }
        }
    }
    let mm = 350.0 / n as f64;
    Phantom { dims: [n, n, slices], spacing: [mm, mm, 5.0], hu, labels }
}

/// Write `cases` phantoms as LiTS-layout NIfTI (`volume-N.nii.gz`, `segmentation-N.nii.gz`).
pub fn write_lits(out: &std::path::Path, cases: usize, seed: u64, size: usize, slices: usize) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for c in 0..cases {
        let p = phantom(seed, c as u64, size, slices);
        let mut affine = super::scaled_identity(p.spacing);
        // RAS with the usual LiTS-like flip of x and y (stored LPS-ish).
        affine[0][0] = -p.spacing[0];
        affine[1][1] = -p.spacing[1];
        super::nifti::write_u8_or_i16(&out.join(format!("volume-{c}.nii.gz")), p.dims, &affine, super::nifti::VoxelData::I16(&p.hu), None)?;
        super::nifti::write_u8_or_i16(&out.join(format!("segmentation-{c}.nii.gz")), p.dims, &affine, super::nifti::VoxelData::U8(&p.labels), None)?;
    }
    Ok(())
}
