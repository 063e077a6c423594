//! Training-time augmentation of square 2D slices, at the level of nnU-Net's
//! default set: spatial (rotation, scaling, shift, elastic deformation,
//! mirroring) and intensity (Gaussian noise, Gaussian blur, brightness,
//! contrast, simulated low resolution, gamma), in nnU-Net's order. Each
//! transform has a probability and a range; a draw is a pure function of the
//! `Rng` it is given, so the same seed gives the same slices.
//!
//! Intensities are in the slice's own units (0–255 for the cached uint8
//! slices); masks move with nearest-neighbour sampling, images bilinearly.

use anyhow::{bail, Result};
use liverseg_rng::Rng;
use serde::{Deserialize, Serialize};

/// A transform applied with probability `p`, its magnitude uniform in [lo, hi].
/// Written `[p, lo, hi]` in pipeline.yaml.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "(f64, f64, f64)", into = "(f64, f64, f64)")]
pub struct Chance {
    pub p: f64,
    pub lo: f64,
    pub hi: f64,
}

impl From<(f64, f64, f64)> for Chance {
    fn from((p, lo, hi): (f64, f64, f64)) -> Self {
        Chance { p, lo, hi }
    }
}

impl From<Chance> for (f64, f64, f64) {
    fn from(c: Chance) -> Self {
        (c.p, c.lo, c.hi)
    }
}

impl Chance {
    pub const OFF: Chance = Chance { p: 0.0, lo: 0.0, hi: 0.0 };

    /// The magnitude, or None when the transform is not applied this time.
    /// Draws nothing for a transform that is off, so adding one to a config
    /// leaves the other draws alone.
    fn draw(&self, r: &mut Rng) -> Option<f64> {
        if self.p <= 0.0 {
            return None;
        }
        let hit = r.f64() < self.p;
        let v = r.range(self.lo, self.hi);
        hit.then_some(v)
    }
}

/// The transforms and their chances. Every one is off unless set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Transforms {
    /// Degrees.
    pub rotation: Chance,
    /// Zoom factor (> 1 enlarges).
    pub scale: Chance,
    /// Fraction of the side (signed; e.g. [1, -0.1, 0.1]), x and y drawn independently.
    pub shift: Chance,
    /// Displacement std in pixels of a coarse 4×4 grid, upsampled bilinearly.
    pub elastic: Chance,
    /// Probability of a left-right mirror.
    pub mirror: f64,
    /// Noise variance as a fraction of the slice's variance (nnU-Net: 0–0.1 of z-scored data).
    pub noise: Chance,
    /// Gaussian sigma in pixels.
    pub blur: Chance,
    /// Multiplicative brightness.
    pub brightness: Chance,
    /// Contrast factor around the mean, clipped to the slice's range.
    pub contrast: Chance,
    /// Down-sampling factor (nearest) before up-sampling back (bilinear).
    pub low_res: Chance,
    /// Gamma on the slice's range, mean and std kept.
    pub gamma: Chance,
    /// Another CT display window's export of the same slice (intensity
    /// domain randomisation), before every other intensity transform.
    pub rewindow: Rewindow,
}

/// The slice re-exported under another CT display window: it is read as the
/// export of `source` (HU mapped to 0..255, lower HU clipped black) and
/// mapped as a window of width W and level L would have exported it, W drawn
/// log-uniform in `width` and L uniform in `level` (HU). What the source
/// clipped black has lost its HU; it is given CT's own: black connected to
/// the slice's border is air (−1000 HU), black inside the body is fat
/// (drawn in −120..−80 HU per slice).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewindow {
    pub p: f64,
    pub width: (f64, f64),
    pub level: (f64, f64),
    /// The window the stored slices were exported with (the MSD export: HU clipped to [0, 255]).
    #[serde(default = "Rewindow::msd_export")]
    pub source: (f64, f64),
}

impl Rewindow {
    pub const OFF: Rewindow = Rewindow { p: 0.0, width: (0.0, 0.0), level: (0.0, 0.0), source: (0.0, 255.0) };

    fn msd_export() -> (f64, f64) {
        (0.0, 255.0)
    }

    /// CT's display presets and exports, from the liver window (W 150) to
    /// a full 12-bit range (W 4096), levels from the lung window's (−600)
    /// to bone (400).
    pub fn ct_windows(p: f64) -> Self {
        Rewindow { p, width: (150.0, 4096.0), level: (-600.0, 400.0), source: (0.0, 255.0) }
    }

    /// The grey-level map of window (width, level) for the source's grey
    /// levels, `v · gain + offset`.
    pub fn map(&self, width: f64, level: f64) -> (f32, f32) {
        let (s0, s1) = self.source;
        let low = level - width / 2.0;
        (((s1 - s0) / width) as f32, ((s0 - low) * 255.0 / width) as f32)
    }

    /// The transform for window (width, level), fat at `fat_hu`.
    pub fn op(&self, width: f64, level: f64, fat_hu: f64) -> Intensity {
        let (gain, offset) = self.map(width, level);
        let grey = |hu: f64| ((hu - (level - width / 2.0)) * 255.0 / width).clamp(0.0, 255.0) as f32;
        Intensity::Rewindow { gain, offset, air: grey(-1000.0), fat: grey(fat_hu) }
    }

    fn draw(&self, r: &mut Rng) -> Option<Intensity> {
        if self.p <= 0.0 {
            return None;
        }
        let hit = r.f64() < self.p;
        let width = (self.width.0.ln() + r.f64() * (self.width.1.ln() - self.width.0.ln())).exp();
        let level = r.range(self.level.0, self.level.1);
        let fat_hu = r.range(-120.0, -80.0);
        hit.then_some(self.op(width, level, fat_hu))
    }

    fn check(&self) -> Result<()> {
        let off = self.p == 0.0;
        let ok = (0.0..=1.0).contains(&self.p) && (off || self.width.0 > 0.0) && (off || (self.width.0 <= self.width.1 && self.level.0 <= self.level.1 && self.source.0 < self.source.1));
        if !ok {
            bail!("augmentation `rewindow`: needs 0 ≤ p ≤ 1, 0 < width lo ≤ hi, level lo ≤ hi and a source window lo < hi (HU), got {self:?}");
        }
        Ok(())
    }
}

impl Default for Rewindow {
    fn default() -> Self {
        Rewindow::OFF
    }
}

impl Default for Transforms {
    fn default() -> Self {
        let off = Chance::OFF;
        Transforms { rotation: off, scale: off, shift: off, elastic: off, mirror: 0.0, noise: off, blur: off, brightness: off, contrast: off, low_res: off, gamma: off, rewindow: Rewindow::OFF }
    }
}

impl Transforms {
    /// nnU-Net v2's default 2D training transforms (elastic deformation off, as there).
    pub fn nnunet() -> Self {
        let c = |p, lo, hi| Chance { p, lo, hi };
        Transforms {
            rotation: c(0.2, -180.0, 180.0),
            scale: c(0.2, 0.7, 1.4),
            shift: Chance::OFF,
            elastic: Chance::OFF,
            mirror: 0.5,
            noise: c(0.1, 0.0, 0.1),
            blur: c(0.2, 0.5, 1.0),
            brightness: c(0.15, 0.75, 1.25),
            contrast: c(0.15, 0.75, 1.25),
            low_res: c(0.25, 0.5, 1.0),
            gamma: c(0.3, 0.7, 1.5),
            rewindow: Rewindow::OFF,
        }
    }

    /// nnU-Net's set with intensity domain randomisation: half the slices
    /// re-exported under another CT window ([`Rewindow::ct_windows`]).
    pub fn domain() -> Self {
        Transforms { rewindow: Rewindow::ct_windows(0.5), ..Transforms::nnunet() }
    }

    /// A config from pipeline.yaml: null or "none" (off), "nnunet", or a
    /// mapping of transforms to `[p, lo, hi]` (`mirror: p`).
    pub fn from_param(v: &serde_json::Value) -> Result<Option<Self>> {
        let t = match v {
            serde_json::Value::Null => return Ok(None),
            serde_json::Value::String(s) if s == "none" => return Ok(None),
            serde_json::Value::String(s) if s == "nnunet" => Transforms::nnunet(),
            serde_json::Value::String(s) if s == "domain" => Transforms::domain(),
            serde_json::Value::String(s) => bail!("unknown augmentation preset {s:?} (none, nnunet, domain, or a mapping of transforms to [p, lo, hi])"),
            other => serde_json::from_value(other.clone()).map_err(|e| anyhow::anyhow!("augmentation: {e} (each transform is [p, lo, hi]; mirror is a probability)"))?,
        };
        t.check()?;
        Ok(Some(t))
    }

    pub fn check(&self) -> Result<()> {
        let named = [
            ("rotation", self.rotation, -360.0),
            ("scale", self.scale, 1e-3),
            ("shift", self.shift, -0.5),
            ("elastic", self.elastic, 0.0),
            ("noise", self.noise, 0.0),
            ("blur", self.blur, 0.0),
            ("brightness", self.brightness, 0.0),
            ("contrast", self.contrast, 0.0),
            ("low_res", self.low_res, 0.05),
            ("gamma", self.gamma, 1e-3),
        ];
        for (name, c, min) in named {
            if !(0.0..=1.0).contains(&c.p) || c.lo > c.hi || (c.p > 0.0 && c.lo < min) {
                bail!("augmentation `{name}`: [p, lo, hi] = [{}, {}, {}] needs 0 ≤ p ≤ 1, lo ≤ hi and lo ≥ {min}", c.p, c.lo, c.hi);
            }
        }
        if self.low_res.hi > 1.0 || self.shift.hi > 0.5 || self.rotation.lo < -360.0 || self.rotation.hi > 360.0 {
            bail!("augmentation: low_res factors are at most 1, shifts at most 0.5 of the side, rotations within ±360°");
        }
        if !(0.0..=1.0).contains(&self.mirror) {
            bail!("augmentation `mirror`: a probability, got {}", self.mirror);
        }
        self.rewindow.check()
    }
}

/// One intensity transform, with its drawn magnitude.
#[derive(Debug, Clone, PartialEq)]
pub enum Intensity {
    /// Std as a fraction of the slice's std, and the noise stream's seed.
    Noise {
        relative_std: f32,
        seed: u64,
    },
    Blur(f32),
    Brightness(f32),
    Contrast(f32),
    LowRes(f32),
    Gamma(f32),
    /// `v · gain + offset` for the source's grey levels, clipped to
    /// 0..255; what the source clipped black (v < 0.5) becomes `air` where
    /// it reaches the slice's border, else `fat`.
    Rewindow {
        gain: f32,
        offset: f32,
        air: f32,
        fat: f32,
    },
}

/// One drawn transform of a slice.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    /// Radians.
    pub angle: f32,
    pub scale: f32,
    /// Pixels.
    pub dx: f32,
    pub dy: f32,
    pub mirror: bool,
    /// Linear intensity map (value · gain + bias · 255), the augment stage's jitter.
    pub gain: f32,
    pub bias: f32,
    /// Coarse 4×4 displacement grid (dx, dy) in pixels, upsampled bilinearly.
    pub elastic: Option<[[(f32, f32); 4]; 4]>,
    pub intensity: Vec<Intensity>,
}

impl Transform {
    pub const IDENTITY: Transform = Transform { angle: 0.0, scale: 1.0, dx: 0.0, dy: 0.0, mirror: false, gain: 1.0, bias: 0.0, elastic: None, intensity: Vec::new() };
}

/// A coarse elastic grid of normal displacements with std `alpha` pixels.
pub fn elastic_grid(r: &mut Rng, alpha: f32) -> [[(f32, f32); 4]; 4] {
    let mut g = [[(0f32, 0f32); 4]; 4];
    for row in g.iter_mut() {
        for cell in row.iter_mut() {
            *cell = (r.normal() as f32 * alpha, r.normal() as f32 * alpha);
        }
    }
    g
}

/// Draw every transform of `cfg`, spatial first, in a fixed order.
pub fn draw(cfg: &Transforms, r: &mut Rng, size: usize) -> Transform {
    let mut t = Transform::IDENTITY;
    if let Some(deg) = cfg.rotation.draw(r) {
        t.angle = (deg as f32).to_radians();
    }
    if let Some(f) = cfg.shift.draw(r) {
        t.dx = f as f32 * size as f32;
        t.dy = r.range(cfg.shift.lo, cfg.shift.hi) as f32 * size as f32;
    }
    if let Some(alpha) = cfg.elastic.draw(r) {
        t.elastic = Some(elastic_grid(r, alpha as f32));
    }
    if cfg.mirror > 0.0 {
        t.mirror = r.f64() < cfg.mirror;
    }
    draw_scale_and_intensity(cfg, r, &mut t);
    t
}

/// Draw scaling and the intensity transforms of `cfg` into `t` (the augment
/// stage draws its own rotation, shift, mirror and elastic grid first).
pub fn draw_scale_and_intensity(cfg: &Transforms, r: &mut Rng, t: &mut Transform) {
    if let Some(s) = cfg.scale.draw(r) {
        t.scale = s as f32;
    }
    // An export mapping comes before what the scanner and the transforms add.
    t.intensity.extend(cfg.rewindow.draw(r));
    if let Some(var) = cfg.noise.draw(r) {
        t.intensity.push(Intensity::Noise { relative_std: var.sqrt() as f32, seed: r.next_u64() });
    }
    let mut push = |c: &Chance, r: &mut Rng, f: fn(f32) -> Intensity| {
        if let Some(v) = c.draw(r) {
            t.intensity.push(f(v as f32));
        }
    };
    push(&cfg.blur, r, Intensity::Blur);
    push(&cfg.brightness, r, Intensity::Brightness);
    push(&cfg.contrast, r, Intensity::Contrast);
    push(&cfg.low_res, r, Intensity::LowRes);
    push(&cfg.gamma, r, Intensity::Gamma);
}

/// Fixed other exports of a slice exported with `source` (HU window), to
/// measure how a model holds under another hospital's intensity mapping
/// without looking at one: CT display windows (abdomen, liver, wide, a full
/// 12-bit range, lung) with air and fat given back, gamma and low contrast.
pub fn simulated_exports(source: (f64, f64)) -> Vec<(&'static str, Vec<Intensity>)> {
    let at = |width: f64, level: f64| vec![Rewindow { source, ..Rewindow::ct_windows(1.0) }.op(width, level, -100.0)];
    vec![
        ("abdomen_w400_l40", at(400.0, 40.0)),
        ("liver_w150_l30", at(150.0, 30.0)),
        ("wide_w2000_l0", at(2000.0, 0.0)),
        ("full_w4096_l1024", at(4096.0, 1024.0)),
        ("lung_w1500_l-600", at(1500.0, -600.0)),
        ("gamma_0.6", vec![Intensity::Gamma(0.6)]),
        ("gamma_1.6", vec![Intensity::Gamma(1.6)]),
        ("contrast_0.6", vec![Intensity::Contrast(0.6)]),
    ]
}

/// Intensity transforms alone on a uint8 slice, rounded back.
pub fn intensity_u8(ops: &[Intensity], img: &[u8], size: usize) -> Vec<u8> {
    let mut x: Vec<f32> = img.iter().map(|&v| v as f32).collect();
    ops.iter().for_each(|op| intensity(op, &mut x, size));
    x.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect()
}

/// Bilinear displacement of the elastic grid at pixel (fx, fy).
fn elastic_at(g: &[[(f32, f32); 4]; 4], fx: f32, fy: f32, size: usize) -> (f32, f32) {
    let gx = fx / (size - 1) as f32 * 3.0;
    let gy = fy / (size - 1) as f32 * 3.0;
    let (x0, y0) = ((gx as usize).min(2), (gy as usize).min(2));
    let (wx, wy) = (gx - x0 as f32, gy - y0 as f32);
    let lerp = |k: usize| {
        let v = |a: usize, b: usize| if k == 0 { g[b][a].0 } else { g[b][a].1 };
        (v(x0, y0) * (1.0 - wx) + v(x0 + 1, y0) * wx) * (1.0 - wy) + (v(x0, y0 + 1) * (1.0 - wx) + v(x0 + 1, y0 + 1) * wx) * wy
    };
    (lerp(0), lerp(1))
}

/// The spatial part of `t` and its linear intensity map: the image sampled
/// bilinearly (f32, the input's units; 0 outside), the mask by nearest
/// neighbour (background outside).
pub fn spatial(t: &Transform, img: &[u8], mask: &[u8], size: usize) -> (Vec<f32>, Vec<u8>) {
    let (c, s) = (t.angle.cos(), t.angle.sin());
    let mid = (size as f32 - 1.0) / 2.0;
    let last = (size - 1) as f32;
    let mut oi = vec![0f32; size * size];
    let mut om = vec![0u8; size * size];
    for y in 0..size {
        for x in 0..size {
            let (mut fx, mut fy) = (x as f32, y as f32);
            if let Some(g) = &t.elastic {
                let (ex, ey) = elastic_at(g, fx, fy, size);
                fx += ex;
                fy += ey;
            }
            if t.mirror {
                fx = last - fx;
            }
            // Inverse mapping: output pixel -> source position.
            let (mut px, mut py) = (fx - mid - t.dx, fy - mid - t.dy);
            if t.scale != 1.0 {
                (px, py) = (px / t.scale, py / t.scale);
            }
            let sx = c * px + s * py + mid;
            let sy = -s * px + c * py + mid;
            let i = y * size + x;
            if sx < 0.0 || sy < 0.0 || sx > last || sy > last {
                continue;
            }
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
            let (wx, wy) = (sx - x0 as f32, sy - y0 as f32);
            let at = |xx: usize, yy: usize| img[yy * size + xx] as f32;
            let v = (at(x0, y0) * (1.0 - wx) + at(x1, y0) * wx) * (1.0 - wy) + (at(x0, y1) * (1.0 - wx) + at(x1, y1) * wx) * wy;
            oi[i] = v * t.gain + t.bias * 255.0;
            om[i] = mask[(sy.round() as usize).min(size - 1) * size + (sx.round() as usize).min(size - 1)];
        }
    }
    (oi, om)
}

/// `t` whole: spatial, then the intensity transforms in their drawn order.
pub fn apply_f32(t: &Transform, img: &[u8], mask: &[u8], size: usize) -> (Vec<f32>, Vec<u8>) {
    let (mut x, m) = spatial(t, img, mask, size);
    for op in &t.intensity {
        intensity(op, &mut x, size);
    }
    (x, m)
}

/// `t` whole, rounded back to uint8 (the augment stage's cached copies).
pub fn apply_u8(t: &Transform, img: &[u8], mask: &[u8], size: usize) -> (Vec<u8>, Vec<u8>) {
    let (x, m) = apply_f32(t, img, mask, size);
    (x.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect(), m)
}

fn mean_std(x: &[f32]) -> (f32, f32) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, var.sqrt() as f32)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// One intensity transform in place, as nnU-Net (batchgenerators) defines it.
pub fn intensity(op: &Intensity, x: &mut [f32], size: usize) {
    match *op {
        Intensity::Noise { relative_std, seed } => {
            let sigma = relative_std * mean_std(x).1;
            let mut r = Rng::new(seed);
            x.iter_mut().for_each(|v| *v += sigma * r.normal() as f32);
        }
        Intensity::Blur(sigma) => gaussian_blur(x, size, sigma),
        Intensity::Brightness(m) => x.iter_mut().for_each(|v| *v *= m),
        Intensity::Contrast(f) => {
            let (mean, _) = mean_std(x);
            let (lo, hi) = min_max(x);
            x.iter_mut().for_each(|v| *v = ((*v - mean) * f + mean).clamp(lo, hi));
        }
        Intensity::LowRes(zoom) => low_resolution(x, size, zoom),
        Intensity::Rewindow { gain, offset, air, fat } => {
            let outside = black_from_border(x, size);
            x.iter_mut().zip(outside).for_each(|(v, out)| {
                *v = if *v >= 0.5 {
                    (*v * gain + offset).clamp(0.0, 255.0)
                } else if out {
                    air
                } else {
                    fat
                }
            });
        }
        Intensity::Gamma(g) => {
            let (mean, std) = mean_std(x);
            let (lo, hi) = min_max(x);
            let range = hi - lo + 1e-7;
            x.iter_mut().for_each(|v| *v = ((*v - lo) / range).max(0.0).powf(g) * range + lo);
            let (m2, s2) = mean_std(x);
            let k = if s2 > 0.0 { std / s2 } else { 1.0 };
            x.iter_mut().for_each(|v| *v = (*v - m2) * k + mean);
        }
    }
}

/// Black pixels (< 0.5) 4-connected to the border of a square slice: air
/// around the body, as against fat inside it.
fn black_from_border(x: &[f32], size: usize) -> Vec<bool> {
    let mut seen = vec![false; x.len()];
    let black = |i: usize| x[i] < 0.5;
    let mut stack: Vec<usize> = (0..size).flat_map(|k| [k, (size - 1) * size + k, k * size, k * size + size - 1]).filter(|&i| i < x.len() && black(i)).collect();
    while let Some(i) = stack.pop() {
        if seen[i] {
            continue;
        }
        seen[i] = true;
        let (r, c) = (i / size, i % size);
        let next = [(r > 0).then(|| i - size), (r + 1 < size).then(|| i + size), (c > 0).then(|| i - 1), (c + 1 < size).then(|| i + 1)];
        stack.extend(next.into_iter().flatten().filter(|&j| !seen[j] && black(j)));
    }
    seen
}

/// Separable Gaussian blur, edges clamped, radius ⌈3σ⌉.
fn gaussian_blur(x: &mut [f32], size: usize, sigma: f32) {
    if sigma <= 0.0 {
        return;
    }
    let radius = (3.0 * sigma).ceil() as isize;
    let kernel: Vec<f32> = (-radius..=radius).map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let clamp = |i: isize| i.clamp(0, size as isize - 1) as usize;
    let mut tmp = vec![0f32; x.len()];
    for y in 0..size {
        for xx in 0..size {
            tmp[y * size + xx] = kernel.iter().enumerate().map(|(k, w)| w * x[y * size + clamp(xx as isize + k as isize - radius)]).sum();
        }
    }
    for y in 0..size {
        for xx in 0..size {
            x[y * size + xx] = kernel.iter().enumerate().map(|(k, w)| w * tmp[clamp(y as isize + k as isize - radius) * size + xx]).sum();
        }
    }
}

/// Nearest-neighbour down-sampling by `zoom`, then bilinear back to `size`.
fn low_resolution(x: &mut [f32], size: usize, zoom: f32) {
    let small = ((size as f32 * zoom).round() as usize).clamp(1, size);
    if small == size {
        return;
    }
    let step = size as f32 / small as f32;
    let down: Vec<f32> = (0..small * small)
        .map(|i| {
            let (sy, sx) = (i / small, i % small);
            let (y, xx) = ((((sy as f32 + 0.5) * step) as usize).min(size - 1), (((sx as f32 + 0.5) * step) as usize).min(size - 1));
            x[y * size + xx]
        })
        .collect();
    for y in 0..size {
        for xx in 0..size {
            // Pixel centres of the small grid, half-pixel aligned.
            let fy = ((y as f32 + 0.5) / step - 0.5).clamp(0.0, (small - 1) as f32);
            let fx = ((xx as f32 + 0.5) / step - 0.5).clamp(0.0, (small - 1) as f32);
            let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
            let (y1, x1) = ((y0 + 1).min(small - 1), (x0 + 1).min(small - 1));
            let (wy, wx) = (fy - y0 as f32, fx - x0 as f32);
            let at = |a: usize, b: usize| down[a * small + b];
            x[y * size + xx] = (at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx) * (1.0 - wy) + (at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx) * wy;
        }
    }
}

#[cfg(test)]
mod tests;
