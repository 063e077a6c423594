//! One epoch of training, one pass of evaluation, weight snapshots, and
//! batch inference: the steps the train and evaluate stages are made of.

use crate::confusion::{confusion, Confusion};
use crate::loader::{batches, SliceSet};
use crate::optim::{OptKind, Optimizer};
use crate::{loss, ModelSpec, SegmentationModel};
use anyhow::{anyhow, Result};
use liverseg_recipe::{Arch, Encoder, Loss};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Device, Kind, Reduction, Tensor};

/// Mean loss and confusion counts over the samples seen.
pub struct EpochStats {
    pub loss: f64,
    pub confusion: Confusion,
    pub seen: usize,
}

/// One training epoch over `order` (batches assembled on another thread),
/// calling `on_batch` after each step.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch(model: &SegmentationModel, opt: &mut Optimizer, set: Arc<SliceSet>, order: Vec<usize>, batch: usize, device: Device, loss_kind: Loss, bf16: bool, flip_seed: Option<u64>, on_batch: &mut dyn FnMut()) -> EpochStats {
    let (mut loss_sum, mut seen, mut conf) = (0.0, 0usize, Confusion::default());
    for b in batches(set, order, batch, true, flip_seed) {
        let x = b.x.to_device(device);
        let y = b.y.to_device(device);
        let logits = tch::autocast(bf16, || model.forward(&x, true));
        let l = loss::compute(loss_kind, &logits.to_kind(Kind::Float), &y);
        opt.zero_grad();
        l.backward();
        opt.step();
        let n = y.size()[0] as usize;
        loss_sum += l.double_value(&[]) * n as f64;
        seen += n;
        conf.add(&confusion(&logits.detach().argmax(1, false), &y));
        on_batch();
    }
    EpochStats { loss: loss_sum / seen.max(1) as f64, confusion: conf, seen }
}

/// Mean loss and confusion of `model` over a set, in eval mode.
pub fn evaluate(model: &SegmentationModel, set: &Arc<SliceSet>, batch: usize, device: Device, loss_kind: Loss, bf16: bool) -> (f64, Confusion) {
    let (mut loss_sum, mut seen, mut conf) = (0.0, 0usize, Confusion::default());
    tch::no_grad(|| {
        for b in batches(set.clone(), (0..set.len()).collect(), batch, false, None) {
            let x = b.x.to_device(device);
            let y = b.y.to_device(device);
            let logits = tch::autocast(bf16, || model.forward(&x, false)).to_kind(Kind::Float);
            let n = y.size()[0] as usize;
            loss_sum += loss::compute(loss_kind, &logits, &y).double_value(&[]) * n as f64;
            seen += n;
            conf.add(&confusion(&logits.argmax(1, false), &y));
        }
    });
    (loss_sum / seen.max(1) as f64, conf)
}

/// A copy of every variable, on the CPU.
pub fn snapshot(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().map(|(k, v)| (k, v.detach().to_device(Device::Cpu).copy())).collect()
}

/// Copy `tensors[prefix + name]` into every variable of `vs`.
pub fn restore(vs: &nn::VarStore, tensors: &BTreeMap<String, Tensor>, prefix: &str) -> Result<()> {
    let device = vs.device();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let src = tensors.get(&format!("{prefix}{name}")).ok_or_else(|| anyhow!("checkpoint lacks {prefix}{name}"))?;
            var.copy_(&src.to_device(device));
        }
        Ok(())
    })
}

/// Predict `images` ([n, size, size] u8, scaled by /255); returns the masks
/// and, with `masks`, the mean cross-entropy against them.
#[allow(clippy::too_many_arguments)]
pub fn predict_u8(net: &SegmentationModel, images: &[u8], masks: Option<&[u8]>, n: usize, size: usize, batch: usize, device: Device) -> Result<(Vec<u8>, f64)> {
    let px = size * size;
    let mut out = vec![0u8; n * px];
    let mut loss_sum = 0.0;
    tch::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(batch.max(1)) {
            let end = (start + batch).min(n);
            let b = (end - start) as i64;
            let x = to_input(&images[start * px..end * px], end - start, size, device);
            let logits = net.forward(&x, false).to_kind(Kind::Float);
            if let Some(masks) = masks {
                let y = Tensor::from_slice(&masks[start * px..end * px]).view([b, size as i64, size as i64]).to_kind(Kind::Int64).to_device(device);
                loss_sum += logits.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0).double_value(&[]) * b as f64;
            }
            let pred = logits.argmax(1, false).to_kind(Kind::Uint8).to_device(Device::Cpu).flatten(0, -1);
            let v: Vec<u8> = Vec::try_from(&pred).map_err(|e| anyhow!("{e}"))?;
            out[start * px..end * px].copy_from_slice(&v);
        }
        Ok(())
    })?;
    Ok((out, loss_sum / n.max(1) as f64))
}

/// A model's masks for a stack of slices: at the input's own resolution and
/// at the model's grid, with the cross-entropy on the model's grid.
pub struct Segmented {
    /// [n, h, w]: liver probabilities resampled to the input's resolution
    /// (bilinear, align_corners=False, as torch's interpolate) and thresholded at 0.5.
    pub full: Vec<u8>,
    /// [n, S, S]: argmax on the model's grid.
    pub grid: Vec<u8>,
    /// Mean cross-entropy of each slice against `grid_masks`, summed over slices.
    pub loss_sum: f64,
}

/// Segment `images` ([n, S, S] u8, scaled by /255) and bring the liver
/// probabilities back to `(h, w)`, the slices' original size.
#[allow(clippy::too_many_arguments)]
pub fn segment(net: &SegmentationModel, images: &[u8], grid_masks: &[u8], n: usize, size: usize, (h, w): (usize, usize), batch: usize, device: Device) -> Result<Segmented> {
    let px = size * size;
    let mut out = Segmented { full: Vec::with_capacity(n * h * w), grid: Vec::with_capacity(n * px), loss_sum: 0.0 };
    tch::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(batch.max(1)) {
            let end = (start + batch).min(n);
            let b = (end - start) as i64;
            let x = to_input(&images[start * px..end * px], end - start, size, device);
            let y = Tensor::from_slice(&grid_masks[start * px..end * px]).view([b, size as i64, size as i64]).to_kind(Kind::Int64).to_device(device);
            let logits = net.forward(&x, false).to_kind(Kind::Float);
            out.loss_sum += logits.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0).double_value(&[]) * b as f64;
            let grid = logits.argmax(1, false).to_kind(Kind::Uint8).to_device(Device::Cpu).flatten(0, -1);
            out.grid.extend(Vec::<u8>::try_from(&grid).map_err(|e| anyhow!("{e}"))?);
            let full = to_original_grid(&logits.softmax(1, Kind::Float).narrow(1, 1, 1), (h, w)).to_device(Device::Cpu).flatten(0, -1);
            out.full.extend(Vec::<u8>::try_from(&full).map_err(|e| anyhow!("{e}"))?);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Liver probabilities [b, 1, S, S] as masks [b, h, w] on the original grid:
/// bilinear resampling (align_corners=False, as torch's interpolate and
/// nnU-Net's export), then a threshold at 0.5.
pub fn to_original_grid(liver: &Tensor, (h, w): (usize, usize)) -> Tensor {
    liver.upsample_bilinear2d([h as i64, w as i64], false, None, None).squeeze_dim(1).gt(0.5).to_kind(Kind::Uint8)
}

/// Liver-class Grad-CAM maps of `images` ([n, size, size] u8), as u8 (255 = the image's maximum).
pub fn grad_cam_u8(net: &SegmentationModel, images: &[u8], n: usize, size: usize, device: Device) -> Result<Vec<u8>> {
    let cam = net.grad_cam(&to_input(images, n, size, device), 1);
    let cam = (cam * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).to_device(Device::Cpu).flatten(0, -1);
    Vec::try_from(&cam).map_err(|e| anyhow!("{e}"))
}

fn to_input(images: &[u8], b: usize, size: usize, device: Device) -> Tensor {
    Tensor::from_slice(images).view([b as i64, 1, size as i64, size as i64]).to_kind(Kind::Float).to_device(device) / 255.0
}

/// Images/s for training steps (forward, CE loss, backward, Adam) and for
/// inference of DeepLabV3+ResNet34 on random data; the first step is warm-up.
pub fn speed(size: i64, batch: i64, steps: usize) -> Result<(f64, f64)> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let spec = ModelSpec { arch: Arch::DeepLabV3Plus, encoder: Encoder::Resnet34, in_channels: 1, classes: 2 };
    let model = SegmentationModel::new(&vs.root(), &spec)?;
    let mut opt = Optimizer::new(OptKind::Adam, vs.trainable_variables(), 1e-3, 0.0);
    let x = Tensor::rand([batch, 1, size, size], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(2, [batch, size, size], (Kind::Int64, Device::Cpu));
    let mut t0 = Instant::now();
    for i in 0..=steps {
        if i == 1 {
            t0 = Instant::now();
        }
        opt.zero_grad();
        let l = loss::compute(Loss::CrossEntropy, &model.forward(&x, true), &y);
        l.backward();
        opt.step();
    }
    let train = (batch as usize * steps) as f64 / t0.elapsed().as_secs_f64();
    let infer = tch::no_grad(|| {
        let _ = model.forward(&x, false);
        let t0 = Instant::now();
        for _ in 0..steps {
            let _ = model.forward(&x, false);
        }
        (batch as usize * steps) as f64 / t0.elapsed().as_secs_f64()
    });
    Ok((train, infer))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2×2 block of certain liver in a 4×4 probability map lands on the
    /// block's footprint at the original size, whatever the aspect.
    #[test]
    fn probabilities_are_resampled_to_the_original_grid() {
        let mut p = vec![0f32; 16];
        for (r, c) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            p[r * 4 + c] = 1.0;
        }
        let probs = Tensor::from_slice(&p).view([1, 1, 4, 4]);
        let mask = |h: usize, w: usize| -> Vec<u8> { Vec::try_from(to_original_grid(&probs, (h, w)).flatten(0, -1)).unwrap() };
        let expect = |h: usize, w: usize, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| -> Vec<u8> { (0..h * w).map(|i| u8::from(rows.contains(&(i / w)) && cols.contains(&(i % w)))).collect() };
        assert_eq!(mask(8, 8), expect(8, 8, 2..6, 2..6));
        assert_eq!(mask(12, 4), expect(12, 4, 3..9, 1..3), "non-square: rows ×3, columns ×1");
        let uniform = Tensor::full([1, 1, 4, 4], 0.7, (Kind::Float, Device::Cpu));
        assert!(Vec::<u8>::try_from(to_original_grid(&uniform, (5, 7)).flatten(0, -1)).unwrap().iter().all(|&v| v == 1));
    }
}
