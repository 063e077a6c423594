//! Segmentation models composed as segmentation_models_pytorch composes them:
//! encoder, decoder, head.

use crate::decoder::DeepLabV3PlusDecoder;
use crate::encoder::ResNetEncoder;
use crate::init;
use anyhow::{bail, Result};
use liverseg_recipe::{Arch, Encoder};
use tch::nn;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub encoder: Encoder,
    pub in_channels: i64,
    pub classes: i64,
}

#[derive(Debug)]
enum Decoder {
    DeepLabV3Plus(DeepLabV3PlusDecoder),
    /// The baseline has no decoder: the head reads layer4 directly.
    None,
}

/// Encoder + decoder + head. The head is a 1×1 conv to the classes followed
/// by bilinear upsampling to the input size.
#[derive(Debug)]
pub struct SegmentationModel {
    pub spec: ModelSpec,
    encoder: ResNetEncoder,
    decoder: Decoder,
    head: nn::Conv2D,
}

impl SegmentationModel {
    pub fn new(root: &nn::Path, spec: &ModelSpec) -> Result<Self> {
        let (output_stride, decoder) = match spec.arch {
            Arch::DeepLabV3Plus => (16, true),
            // The study's "ResNet" comparison: the plain encoder at its native
            // stride 32, no ASPP and no decoder (an FCN-32s-style head).
            Arch::Resnet => (32, false),
        };
        let encoder = ResNetEncoder::new(&(root / "encoder"), spec.encoder, spec.in_channels, output_stride)?;
        let (decoder, head_in) = if decoder {
            let d = DeepLabV3PlusDecoder::new(&(root / "decoder"), encoder.out_channels, 256);
            let c = d.out_channels;
            (Decoder::DeepLabV3Plus(d), c)
        } else {
            (Decoder::None, encoder.out_channels[4])
        };
        let head_init = nn::ConvConfig { ws_init: init::TORCH_DEFAULT_CONV, bs_init: init::torch_default_bias(head_in), ..Default::default() };
        let head = nn::conv2d(root / "segmentation_head" / 0, head_in, spec.classes, 1, head_init);
        Ok(SegmentationModel { spec: spec.clone(), encoder, decoder, head })
    }

    /// The divisor input sides must respect.
    pub fn required_divisor(&self) -> i64 {
        self.encoder.output_stride
    }

    pub fn check_input(&self, h: i64, w: i64) -> Result<()> {
        let d = self.required_divisor().max(16);
        if h % d != 0 || w % d != 0 {
            bail!("input {h}×{w}: both sides must be divisible by {d} for {} (output stride {})", self.spec.arch, self.encoder.output_stride);
        }
        Ok(())
    }

    /// Logits [N, classes, H, W].
    pub fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let (h, w) = (xs.size()[2], xs.size()[3]);
        let feats = self.encoder.forward(xs, train);
        self.decode(&feats, h, w, train)
    }

    /// Decoder and head on encoder features (stem, layer1..layer4).
    fn decode(&self, feats: &[Tensor], h: i64, w: i64, train: bool) -> Tensor {
        match &self.decoder {
            Decoder::DeepLabV3Plus(d) => {
                let x = d.forward(feats, train).apply(&self.head);
                let (fh, fw) = (x.size()[2], x.size()[3]);
                x.upsample_bilinear2d([fh * 4, fw * 4], true, None, None)
            }
            Decoder::None => feats[4].apply(&self.head).upsample_bilinear2d([h, w], false, None, None),
        }
    }

    /// Grad-CAM (Selvaraju et al. 2017) for `class` at the encoder's last
    /// stage, in eval mode, adapted to segmentation as Seg-Grad-CAM
    /// (Vinogradova et al. 2020): the score is the class logit summed over the
    /// pixels predicted as that class (every pixel of an image where none is).
    /// Returns maps [N, H, W] scaled to [0, 1] per image.
    pub fn grad_cam(&self, xs: &Tensor, class: i64) -> Tensor {
        let (h, w) = (xs.size()[2], xs.size()[3]);
        let mut feats = tch::no_grad(|| self.encoder.forward(xs, false));
        // layer4 as a leaf: the gradient stops there, which is all Grad-CAM needs.
        let act = feats[4].detach().set_requires_grad(true);
        feats[4] = act.shallow_clone();
        let logits = self.decode(&feats, h, w, false);
        let chosen = logits.argmax(1, false).eq(class).to_kind(Kind::Float);
        let none = chosen.sum_dim_intlist(&[1i64, 2][..], true, Kind::Float).eq(0.0).to_kind(Kind::Float);
        let score = (logits.select(1, class) * (chosen + none)).sum(Kind::Float);
        let grads = Tensor::run_backward(&[score], &[&act], false, false);
        tch::no_grad(|| {
            let weights = grads[0].mean_dim(&[2i64, 3][..], true, Kind::Float);
            let cam = (weights * &act).sum_dim_intlist(&[1i64][..], true, Kind::Float).relu();
            let cam = cam.upsample_bilinear2d([h, w], false, None, None).squeeze_dim(1);
            &cam / cam.amax([1, 2], true).clamp_min(1e-12)
        })
    }
}

impl SegmentationModel {
    /// (block, output shape) for every block, in forward order.
    pub fn trace(&self, xs: &Tensor) -> Vec<(String, Vec<i64>)> {
        let (mut rows, feats) = self.encoder.trace(xs);
        if let Decoder::DeepLabV3Plus(d) = &self.decoder {
            let (drows, _) = d.trace(&feats);
            rows.extend(drows);
        }
        rows.push(("segmentation_head".to_owned(), self.forward(xs, false).size()));
        rows
    }
}

/// Trainable parameters (running statistics excluded), as smp counts them.
pub fn trainable_parameters(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}
