//! ResNet encoders (18, 34, 50) in torchvision's layout, as
//! segmentation_models_pytorch uses them: conv1 7×7/2, BN, ReLU, maxpool,
//! layer1–4, no avgpool or fc. `output_stride` 16 turns layer4 into a
//! dilated stage (stride 1, dilation 2), as smp's `make_dilated` does.

use crate::init::{batch_norm2d, ENCODER_CONV, TORCH_DEFAULT_CONV};
use anyhow::{bail, Result};
use liverseg_recipe::Encoder;
use tch::nn::{self, ModuleT};
use tch::Tensor;

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64, dilation: i64) -> nn::Conv2D {
    nn::conv2d(p, cin, cout, k, nn::ConvConfig { stride, padding, dilation, bias: false, ws_init: ENCODER_CONV, ..Default::default() })
}

#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl Block {
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = xs.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, (c, bn)) in self.convs.iter().enumerate() {
            h = h.apply(c).apply_t(bn, train);
            if i < last {
                let _ = h.relu_();
            }
        }
        let shortcut = match &self.downsample {
            Some((c, bn)) => xs.apply(c).apply_t(bn, train),
            None => xs.shallow_clone(),
        };
        // In place, as torchvision's `out += identity; relu(inplace=True)`:
        // BatchNorm's backward does not read its output, and ReLU's reads
        // only its result, so the values and gradients are the same, with
        // two fewer full-size allocations per block.
        let _ = h.g_add_(&shortcut);
        h.relu_()
    }
}

#[derive(Debug)]
pub struct ResNetEncoder {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    layers: Vec<Vec<Block>>,
    /// Channels of the features returned by `forward`: stem, layer1..layer4.
    pub out_channels: [i64; 5],
    pub output_stride: i64,
}

impl ResNetEncoder {
    pub fn new(p: &nn::Path, encoder: Encoder, in_channels: i64, output_stride: i64) -> Result<Self> {
        let (depths, bottleneck): ([usize; 4], bool) = match encoder {
            Encoder::Resnet18 => ([2, 2, 2, 2], false),
            Encoder::Resnet34 => ([3, 4, 6, 3], false),
            Encoder::Resnet50 => ([3, 4, 6, 3], true),
        };
        if output_stride != 16 && output_stride != 32 {
            bail!("output stride must be 16 or 32, got {output_stride}");
        }
        let expansion = if bottleneck { 4 } else { 1 };
        // smp re-creates the first conv for a channel count other than 3.
        let first_init = if in_channels == 3 { ENCODER_CONV } else { TORCH_DEFAULT_CONV };
        let conv1 = nn::conv2d(p / "conv1", in_channels, 64, 7, nn::ConvConfig { stride: 2, padding: 3, bias: false, ws_init: first_init, ..Default::default() });
        let bn1 = batch_norm2d(p / "bn1", 64);
        let mut layers = Vec::new();
        let mut cin = 64;
        for (li, &depth) in depths.iter().enumerate() {
            let width = 64 << li;
            let lp = p / format!("layer{}", li + 1);
            // Dilated layer4: every conv stride 1, every 3×3 conv dilation 2.
            let dilated = li == 3 && output_stride == 16;
            let dilation = if dilated { 2 } else { 1 };
            let mut blocks = Vec::new();
            for b in 0..depth {
                let bp = &lp / b as i64;
                let stride = if b == 0 && li > 0 && !dilated { 2 } else { 1 };
                let cout = width * expansion;
                let convs = if bottleneck {
                    vec![
                        (conv(&bp / "conv1", cin, width, 1, 1, 0, 1), batch_norm2d(&bp / "bn1", width)),
                        (conv(&bp / "conv2", width, width, 3, stride, dilation, dilation), batch_norm2d(&bp / "bn2", width)),
                        (conv(&bp / "conv3", width, cout, 1, 1, 0, 1), batch_norm2d(&bp / "bn3", cout)),
                    ]
                } else {
                    vec![
                        (conv(&bp / "conv1", cin, width, 3, stride, dilation, dilation), batch_norm2d(&bp / "bn1", width)),
                        (conv(&bp / "conv2", width, width, 3, 1, dilation, dilation), batch_norm2d(&bp / "bn2", width)),
                    ]
                };
                // torchvision adds a projection when the shape changes; its stride
                // follows the block's (1 in a dilated layer4).
                let needs_projection = b == 0 && (cin != cout || li > 0);
                let downsample = needs_projection.then(|| {
                    let dp = &bp / "downsample";
                    (conv(&dp / 0, cin, cout, 1, stride, 0, 1), batch_norm2d(&dp / 1, cout))
                });
                blocks.push(Block { convs, downsample });
                cin = cout;
            }
            layers.push(blocks);
        }
        let e = expansion;
        Ok(ResNetEncoder { conv1, bn1, layers, out_channels: [64, 64 * e, 128 * e, 256 * e, 512 * e], output_stride })
    }

    /// Features at strides 2, 4, 8, 16 and 16 or 32.
    pub fn forward(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let stem = xs.apply(&self.conv1).apply_t(&self.bn1, train).relu_();
        let mut h = stem.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut feats = vec![stem];
        for layer in &self.layers {
            for block in layer {
                h = block.forward(&h, train);
            }
            feats.push(h.shallow_clone());
        }
        feats
    }
}

impl ResNetEncoder {
    /// Output shape of every block, for the summary table.
    pub fn trace(&self, xs: &Tensor) -> (Vec<(String, Vec<i64>)>, Vec<Tensor>) {
        let mut rows = Vec::new();
        let stem = xs.apply(&self.conv1).apply_t(&self.bn1, false).relu();
        rows.push(("encoder.stem".to_owned(), stem.size()));
        let mut h = stem.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut feats = vec![stem];
        for (li, layer) in self.layers.iter().enumerate() {
            for (bi, block) in layer.iter().enumerate() {
                h = block.forward(&h, false);
                rows.push((format!("encoder.layer{}.{bi}", li + 1), h.size()));
            }
            feats.push(h.shallow_clone());
        }
        (rows, feats)
    }
}

/// Adapter so an encoder can be applied as a module in summaries.
impl ModuleT for ResNetEncoder {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward(xs, train).pop().expect("five features")
    }
}
