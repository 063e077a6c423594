//! A Gaussian-process sampler: a Matérn 5/2 kernel with one length scale per
//! feature (log-scaled ranges mapped to [0, 1], choices one-hot), fitted by
//! maximising the marginal likelihood over sampled hyperparameters, and the
//! next point chosen by expected improvement among sampled candidates.

use crate::{from_unit, unit, Dim, Point, Sampler, Space};
use liverseg_rng::Rng;

pub struct GpSampler {
    space: Space,
    rng: Rng,
    startup: usize,
    history: Vec<(Vec<f64>, f64, Point)>,
}

impl GpSampler {
    /// `startup` random trials first (at least two, to fit anything).
    pub fn new(space: Space, seed: u64, startup: usize) -> Self {
        GpSampler { space, rng: Rng::new(seed ^ 0x6B9), startup: startup.max(2), history: Vec::new() }
    }

    /// A point as features: ranges on [0, 1] (log scale for log-uniform), choices one-hot.
    fn encode(&self, p: &Point) -> Vec<f64> {
        let mut x = Vec::new();
        for (k, d) in &self.space.0 {
            match d {
                Dim::Choice(c) => x.extend(c.iter().map(|o| f64::from(u8::from(&p[k] == o)))),
                _ => x.push(unit(d, &p[k])),
            }
        }
        x
    }

    /// A random point, or a perturbation of `around`.
    fn candidate(&mut self, around: Option<&Point>) -> Point {
        let mut p = self.space.sample(&mut self.rng);
        if let Some(a) = around {
            for (k, d) in &self.space.0 {
                let v = match d {
                    Dim::Choice(_) if self.rng.f64() < 0.8 => a[k].clone(),
                    Dim::Choice(_) => p[k].clone(),
                    _ => from_unit(d, (unit(d, &a[k]) + 0.08 * self.rng.normal()).clamp(0.0, 1.0)),
                };
                p.insert(k.clone(), v);
            }
        }
        p
    }
}

impl Sampler for GpSampler {
    fn ask(&mut self) -> Point {
        if self.history.len() < self.startup {
            return self.space.sample(&mut self.rng);
        }
        let xs: Vec<Vec<f64>> = self.history.iter().map(|h| h.0.clone()).collect();
        let ys = standardise(&self.history.iter().map(|h| h.1).collect::<Vec<_>>());
        let gp = fit(&xs, &ys, &mut self.rng);
        let best_y = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let mut order: Vec<usize> = (0..self.history.len()).collect();
        order.sort_by(|&a, &b| self.history[a].1.total_cmp(&self.history[b].1));
        let leaders: Vec<Point> = order.iter().take(3).map(|&i| self.history[i].2.clone()).collect();
        let mut best: Option<(f64, Point)> = None;
        for i in 0..1500 {
            let around = (i % 3 == 0).then(|| &leaders[(i / 3) % leaders.len()]);
            let cand = self.candidate(around);
            let ei = gp.expected_improvement(&self.encode(&cand), best_y);
            if best.as_ref().is_none_or(|(b, _)| ei > *b) {
                best = Some((ei, cand));
            }
        }
        best.map(|b| b.1).unwrap_or_else(|| self.space.sample(&mut self.rng))
    }

    fn tell(&mut self, point: Point, value: f64) {
        if value.is_finite() {
            let x = self.encode(&point);
            self.history.push((x, value, point));
        }
    }
}

fn standardise(y: &[f64]) -> Vec<f64> {
    let n = y.len() as f64;
    let mean = y.iter().sum::<f64>() / n;
    let sd = (y.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt().max(1e-9);
    y.iter().map(|v| (v - mean) / sd).collect()
}

/// A fitted GP: its hyperparameters, data and the factorised kernel matrix.
struct Gp {
    lengths: Vec<f64>,
    noise: f64,
    xs: Vec<Vec<f64>>,
    chol: Vec<Vec<f64>>,
    alpha: Vec<f64>,
}

fn matern52(a: &[f64], b: &[f64], lengths: &[f64]) -> f64 {
    let r = a.iter().zip(b).zip(lengths).map(|((x, y), l)| ((x - y) / l).powi(2)).sum::<f64>().sqrt();
    let s = 5f64.sqrt() * r;
    (1.0 + s + s * s / 3.0) * (-s).exp()
}

/// Cholesky factor of a positive definite matrix, or None.
fn cholesky(k: &[Vec<f64>]) -> Option<Vec<Vec<f64>>> {
    let n = k.len();
    let mut l = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|m| l[i][m] * l[j][m]).sum();
            if i == j {
                let d = k[i][i] - s;
                if d <= 0.0 {
                    return None;
                }
                l[i][i] = d.sqrt();
            } else {
                l[i][j] = (k[i][j] - s) / l[j][j];
            }
        }
    }
    Some(l)
}

/// Solve L·x = b (forward) or Lᵀ·x = b (backward).
fn solve(l: &[Vec<f64>], b: &[f64], transpose: bool) -> Vec<f64> {
    let n = b.len();
    let mut x = vec![0.0; n];
    if !transpose {
        for i in 0..n {
            x[i] = (b[i] - (0..i).map(|m| l[i][m] * x[m]).sum::<f64>()) / l[i][i];
        }
    } else {
        for i in (0..n).rev() {
            x[i] = (b[i] - (i + 1..n).map(|m| l[m][i] * x[m]).sum::<f64>()) / l[i][i];
        }
    }
    x
}

impl Gp {
    fn new(xs: &[Vec<f64>], ys: &[f64], lengths: Vec<f64>, noise: f64) -> Option<(Gp, f64)> {
        let n = xs.len();
        let k: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| matern52(&xs[i], &xs[j], &lengths) + if i == j { noise } else { 0.0 }).collect()).collect();
        let chol = cholesky(&k)?;
        let alpha = solve(&chol, &solve(&chol, ys, false), true);
        // log p(y) = -½ yᵀα - Σ log L_ii - n/2 log 2π
        let lml = -0.5 * ys.iter().zip(&alpha).map(|(y, a)| y * a).sum::<f64>() - (0..n).map(|i| chol[i][i].ln()).sum::<f64>() - 0.5 * n as f64 * (2.0 * std::f64::consts::PI).ln();
        Some((Gp { lengths, noise, xs: xs.to_vec(), chol, alpha }, lml))
    }

    /// Posterior mean and standard deviation at `x`.
    fn predict(&self, x: &[f64]) -> (f64, f64) {
        let ks: Vec<f64> = self.xs.iter().map(|xi| matern52(x, xi, &self.lengths)).collect();
        let mean = ks.iter().zip(&self.alpha).map(|(k, a)| k * a).sum();
        let v = solve(&self.chol, &ks, false);
        let var = (1.0 + self.noise - v.iter().map(|x| x * x).sum::<f64>()).max(1e-12);
        (mean, var.sqrt())
    }

    /// Expected improvement below `best` (values are minimised).
    fn expected_improvement(&self, x: &[f64], best: f64) -> f64 {
        let (mu, sd) = self.predict(x);
        let gain = best - mu - 0.01;
        let z = gain / sd;
        gain * normal_cdf(z) + sd * (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
    }
}

/// The hyperparameters (length scales, noise) of highest marginal likelihood
/// among sampled ones.
fn fit(xs: &[Vec<f64>], ys: &[f64], rng: &mut Rng) -> Gp {
    let d = xs[0].len();
    let mut best: Option<(f64, Gp)> = None;
    for i in 0..96 {
        let lengths: Vec<f64> = if i < 8 { vec![0.1 * 1.6f64.powi(i); d] } else { (0..d).map(|_| rng.range(0.05f64.ln(), 3f64.ln()).exp()).collect() };
        for noise in [1e-6, 1e-3, 1e-2, 0.1] {
            if let Some((gp, lml)) = Gp::new(xs, ys, lengths.clone(), noise) {
                if best.as_ref().is_none_or(|(b, _)| lml > *b) {
                    best = Some((lml, gp));
                }
            }
        }
    }
    match best {
        Some((_, gp)) => gp,
        None => Gp::new(xs, ys, vec![1.0; d], 1.0).map(|g| g.0).expect("a unit-noise kernel matrix is positive definite"),
    }
}

/// Φ(z), from erfc (Numerical Recipes' Chebyshev fit, |error| < 1.2e-7).
fn normal_cdf(z: f64) -> f64 {
    0.5 * erfc(-z / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn normal_cdf_is_right() {
        assert!((super::normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((super::normal_cdf(1.96) - 0.9750021).abs() < 1e-6);
        assert!((super::normal_cdf(-1.0) - 0.1586553).abs() < 1e-6);
    }
}
