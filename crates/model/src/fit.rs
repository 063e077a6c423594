//! One epoch of training, one pass of evaluation, weight snapshots, and
//! batch inference: the steps the train and evaluate stages are made of.

use crate::confusion::{confusion, Confusion};
use crate::loader::{batches, Online, SliceSet};
use crate::optim::{OptKind, Optimizer};
use crate::scaling::InputScaling;
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
pub fn train_epoch(
    model: &SegmentationModel,
    opt: &mut Optimizer,
    set: Arc<SliceSet>,
    order: Vec<usize>,
    batch: usize,
    device: Device,
    loss_kind: Loss,
    bf16: bool,
    online: Option<Online>,
    on_batch: &mut dyn FnMut(),
) -> Result<EpochStats> {
    let (mut loss_sum, mut seen, mut conf) = (0.0, 0usize, Confusion::default());
    for b in batches(set, order, batch, true, online) {
        let x = b.x.to_device(device);
        let y = b.y.to_device(device);
        let logits = tch::autocast(bf16, || model.forward(&x, true));
        let l = loss::compute(loss_kind, &logits.to_kind(Kind::Float), &y);
        let grads = opt.gradients(&l)?;
        opt.step(&grads);
        let n = y.size()[0] as usize;
        loss_sum += l.double_value(&[]) * n as f64;
        seen += n;
        conf.add(&confusion(&logits.detach().argmax(1, false), &y));
        on_batch();
    }
    Ok(EpochStats { loss: loss_sum / seen.max(1) as f64, confusion: conf, seen })
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

/// Predict `images` ([n, size, size] u8, scaled by `scaling`); returns the masks
/// and, with `masks`, the mean cross-entropy against them.
#[allow(clippy::too_many_arguments)]
pub fn predict_u8(net: &SegmentationModel, images: &[u8], masks: Option<&[u8]>, n: usize, size: usize, batch: usize, device: Device, scaling: &InputScaling) -> Result<(Vec<u8>, f64)> {
    let px = size * size;
    let mut out = vec![0u8; n * px];
    let mut loss_sum = 0.0;
    tch::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(batch.max(1)) {
            let end = (start + batch).min(n);
            let b = (end - start) as i64;
            let x = to_input(&images[start * px..end * px], end - start, size, device, scaling);
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

/// Liver probabilities on the model's grid for a stack of slices, and the
/// cross-entropy of the first model's plain prediction.
pub struct Probabilities {
    /// [n, S, S].
    pub liver: Vec<f32>,
    /// Mean cross-entropy of each slice against the masks, summed over slices
    /// (the first model, no flips; 0 without masks).
    pub loss_sum: f64,
}

/// The flips of test-time mirroring: none, left-right, up-down, both (the
/// image axes of [N, C, H, W]).
const FLIPS: [&[i64]; 4] = [&[], &[3], &[2], &[2, 3]];

/// How to run inference: batch size, device, test-time mirroring, and the
/// floating-point kind of the inputs (that of the nets' weights).
#[derive(Debug, Clone, Copy)]
pub struct Inference {
    pub batch: usize,
    pub device: Device,
    pub mirror: bool,
    /// `Kind::Float`, or `Kind::BFloat16` for nets cast by [`for_inference`].
    pub kind: Kind,
    /// Inputs in channels-last layout (for nets prepared by [`for_inference`]).
    pub channels_last: bool,
    /// How the u8 slices become input (every net of an ensemble shares it).
    pub scaling: InputScaling,
}

impl Inference {
    /// fp32 on `device`.
    pub fn fp32(batch: usize, device: Device, mirror: bool) -> Self {
        Inference { batch, device, mirror, kind: Kind::Float, channels_last: false, scaling: InputScaling::Fixed }
    }
}

/// Prepare a net's weights for inference in `kind`: cast (bf16 uses the
/// CPU's AVX-512 BF16/AMX kernels) and, for 4-D convolution weights, stored
/// channels-last, which oneDNN runs without reordering.
pub fn for_inference(vs: &mut nn::VarStore, kind: Kind) {
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    for (_, mut w) in vs.variables() {
        if w.dim() == 4 {
            tch::no_grad(|| w.set_data(&channels_last(&w)));
        }
    }
}

/// The same values with NHWC strides (PyTorch's channels_last memory format).
fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Liver probabilities of `images` ([n, S, S] u8, scaled by `how.scaling`): the
/// softmax averaged over `nets` (an ensemble) and, with `mirror`, over the
/// four flips of every slice, each flipped back first (nnU-Net's
/// test-time mirroring). With `masks`, the first net's plain cross-entropy.
pub fn liver_probabilities(nets: &[&SegmentationModel], images: &[u8], masks: Option<&[u8]>, n: usize, size: usize, how: &Inference) -> Result<Probabilities> {
    let px = size * size;
    let (batch, device) = (how.batch.max(1), how.device);
    let mut out = Probabilities { liver: Vec::with_capacity(n * px), loss_sum: 0.0 };
    let flips = if how.mirror { &FLIPS[..] } else { &FLIPS[..1] };
    tch::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(batch) {
            let end = (start + batch).min(n);
            let b = (end - start) as i64;
            let mut x = to_input(&images[start * px..end * px], end - start, size, device, &how.scaling);
            if how.kind != Kind::Float {
                x = x.to_kind(how.kind);
            }
            if how.channels_last {
                x = channels_last(&x);
            }
            let mut sum = Tensor::zeros([b, size as i64, size as i64], (Kind::Float, device));
            for (k, net) in nets.iter().enumerate() {
                for (f, dims) in flips.iter().enumerate() {
                    let xf = if dims.is_empty() { x.shallow_clone() } else { x.flip(*dims) };
                    let mut logits = net.forward(&xf, false).to_kind(Kind::Float);
                    if !dims.is_empty() {
                        logits = logits.flip(*dims);
                    }
                    if let (Some(masks), 0, 0) = (masks, k, f) {
                        let y = Tensor::from_slice(&masks[start * px..end * px]).view([b, size as i64, size as i64]).to_kind(Kind::Int64).to_device(device);
                        out.loss_sum += logits.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0).double_value(&[]) * b as f64;
                    }
                    sum += logits.softmax(1, Kind::Float).select(1, 1);
                }
            }
            let mean = (sum / (nets.len() * flips.len()) as f64).to_device(Device::Cpu).flatten(0, -1);
            out.liver.extend(Vec::<f32>::try_from(&mean).map_err(|e| anyhow!("{e}"))?);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Liver-class Grad-CAM maps of `images` ([n, size, size] u8), as u8 (255 = the image's maximum).
pub fn grad_cam_u8(net: &SegmentationModel, images: &[u8], n: usize, size: usize, device: Device, scaling: &InputScaling) -> Result<Vec<u8>> {
    let cam = net.grad_cam(&to_input(images, n, size, device, scaling), 1);
    let cam = (cam * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).to_device(Device::Cpu).flatten(0, -1);
    Vec::try_from(&cam).map_err(|e| anyhow!("{e}"))
}

/// Images [b, size, size] u8 as model input [b, 1, size, size], scaled.
fn to_input(images: &[u8], b: usize, size: usize, device: Device, scaling: &InputScaling) -> Tensor {
    let x: Vec<f32> = images
        .chunks_exact(size * size)
        .flat_map(|img| {
            let a = scaling.map(img);
            img.iter().map(move |&v| a.apply(v as f32))
        })
        .collect();
    Tensor::from_slice(&x).view([b as i64, 1, size as i64, size as i64]).to_device(device)
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
    // Seconds in forward+loss, backward and the optimizer, after warm-up.
    let mut phases = [0.0f64; 3];
    let mut t0 = Instant::now();
    for i in 0..=steps {
        if i == 1 {
            (t0, phases) = (Instant::now(), [0.0; 3]);
        }
        let t = Instant::now();
        let l = loss::compute(Loss::CrossEntropy, &model.forward(&x, true), &y);
        let _ = l.double_value(&[]);
        let t_forward = t.elapsed().as_secs_f64();
        let grads = opt.gradients(&l)?;
        let t_backward = t.elapsed().as_secs_f64();
        opt.step(&grads);
        phases[0] += t_forward;
        phases[1] += t_backward - t_forward;
        phases[2] += t.elapsed().as_secs_f64() - t_backward;
    }
    let train = (batch as usize * steps) as f64 / t0.elapsed().as_secs_f64();
    let per_step = phases.map(|s| s / steps as f64);
    eprintln!("seconds per step: forward {:.3}, backward {:.3}, optimizer {:.3}", per_step[0], per_step[1], per_step[2]);
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
    use liverseg_recipe::{Arch, Encoder};

    fn net(vs: &nn::VarStore) -> SegmentationModel {
        SegmentationModel::new(&vs.root(), &ModelSpec { arch: Arch::Resnet, encoder: Encoder::Resnet18, in_channels: 1, classes: 2 }).unwrap()
    }

    /// Mirroring averages the predictions of the flipped inputs, each flipped
    /// back; an ensemble of a model with itself is the model.
    #[test]
    fn mirroring_and_ensembles() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = net(&vs);
        let images: Vec<u8> = (0..2 * 32 * 32).map(|i| (i * 37 % 251) as u8).collect();
        let plain = liver_probabilities(&[&m], &images, None, 2, 32, &Inference::fp32(2, Device::Cpu, false)).unwrap().liver;
        let mirrored = liver_probabilities(&[&m], &images, None, 2, 32, &Inference::fp32(2, Device::Cpu, true)).unwrap().liver;
        // By hand: the mean of the four flipped predictions, flipped back.
        let x = to_input(&images, 2, 32, Device::Cpu, &InputScaling::Fixed);
        let by_hand = tch::no_grad(|| {
            let sum = FLIPS.iter().fold(Tensor::zeros([2, 32, 32], (Kind::Float, Device::Cpu)), |acc, d| {
                let xf = if d.is_empty() { x.shallow_clone() } else { x.flip(*d) };
                let p = m.forward(&xf, false).softmax(1, Kind::Float).select(1, 1);
                // On [N, H, W] the image axes are one lower.
                let back: Vec<i64> = d.iter().map(|a| a - 1).collect();
                acc + if d.is_empty() { p } else { p.flip(&back) }
            });
            sum / 4.0
        });
        let by_hand: Vec<f32> = Vec::try_from(by_hand.flatten(0, -1)).unwrap();
        assert!(mirrored.iter().zip(&by_hand).all(|(a, b)| (a - b).abs() < 1e-5));
        assert!(plain.iter().zip(&mirrored).any(|(a, b)| (a - b).abs() > 1e-4), "mirroring changed nothing");
        let twice = liver_probabilities(&[&m, &m], &images, None, 2, 32, &Inference::fp32(2, Device::Cpu, false)).unwrap().liver;
        assert!(plain.iter().zip(&twice).all(|(a, b)| (a - b).abs() < 1e-6), "an ensemble of a model with itself is the model");
    }
}
