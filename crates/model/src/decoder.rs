//! DeepLabV3+ decoder, built as segmentation_models_pytorch builds it
//! (`DeepLabV3PlusDecoder`), with the same parameter names. Its ReLUs run in
//! place after BatchNorm (smp's are not): the same values and gradients, fewer
//! allocations (see the encoder's blocks).

use crate::init::{batch_norm2d, TORCH_DEFAULT_CONV};
use tch::nn;
use tch::Tensor;

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, padding: i64, dilation: i64, groups: i64) -> nn::Conv2D {
    nn::conv2d(p, cin, cout, k, nn::ConvConfig { padding, dilation, groups, bias: false, ws_init: TORCH_DEFAULT_CONV, ..Default::default() })
}

/// Depthwise 3×3 then pointwise 1×1 (smp's `SeparableConv2d`), no bias.
#[derive(Debug)]
struct Separable {
    depthwise: nn::Conv2D,
    pointwise: nn::Conv2D,
}

impl Separable {
    fn new(p: &nn::Path, cin: i64, cout: i64, dilation: i64) -> Self {
        Separable { depthwise: conv(p / 0, cin, cin, 3, dilation, dilation, cin), pointwise: conv(p / 1, cin, cout, 1, 0, 1, 1) }
    }
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.depthwise).apply(&self.pointwise)
    }
}

#[derive(Debug)]
pub struct Aspp {
    branch1x1: (nn::Conv2D, nn::BatchNorm),
    atrous: Vec<(Separable, nn::BatchNorm)>,
    pooling: (nn::Conv2D, nn::BatchNorm),
    project: (nn::Conv2D, nn::BatchNorm),
    dropout: f64,
}

impl Aspp {
    fn new(p: &nn::Path, cin: i64, cout: i64, rates: [i64; 3], dropout: f64) -> Self {
        let convs = p / "convs";
        let bn = |q: nn::Path| batch_norm2d(q, cout);
        let branch1x1 = (conv(&convs / 0 / 0, cin, cout, 1, 0, 1, 1), bn(&convs / 0 / 1));
        let atrous = rates.iter().enumerate().map(|(i, &r)| (Separable::new(&(&convs / (i as i64 + 1) / 0), cin, cout, r), bn(&convs / (i as i64 + 1) / 1))).collect();
        // Index 0 of the pooling branch is the (parameter-free) AdaptiveAvgPool2d.
        let pooling = (conv(&convs / 4 / 1, cin, cout, 1, 0, 1, 1), bn(&convs / 4 / 2));
        let project = (conv(&(p / "project") / 0, 5 * cout, cout, 1, 0, 1, 1), bn(&(p / "project") / 1));
        Aspp { branch1x1, atrous, pooling, project, dropout }
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let (h, w) = (xs.size()[2], xs.size()[3]);
        let mut outs = vec![xs.apply(&self.branch1x1.0).apply_t(&self.branch1x1.1, train).relu_()];
        for (sep, bn) in &self.atrous {
            outs.push(sep.forward(xs).apply_t(bn, train).relu_());
        }
        let pooled = xs.adaptive_avg_pool2d([1, 1]).apply(&self.pooling.0).apply_t(&self.pooling.1, train).relu_();
        outs.push(pooled.upsample_bilinear2d([h, w], false, None, None));
        Tensor::cat(&outs, 1).apply(&self.project.0).apply_t(&self.project.1, train).relu_().dropout(self.dropout, train)
    }
}

#[derive(Debug)]
pub struct DeepLabV3PlusDecoder {
    aspp: Aspp,
    aspp_sep: Separable,
    aspp_bn: nn::BatchNorm,
    block1: (nn::Conv2D, nn::BatchNorm),
    block2_sep: Separable,
    block2_bn: nn::BatchNorm,
    pub out_channels: i64,
}

impl DeepLabV3PlusDecoder {
    /// `encoder_channels`: stem, layer1..layer4. High-resolution features come from layer1.
    pub fn new(p: &nn::Path, encoder_channels: [i64; 5], out_channels: i64) -> Self {
        let aspp_p = p / "aspp";
        let aspp = Aspp::new(&(&aspp_p / 0), encoder_channels[4], out_channels, [12, 24, 36], 0.5);
        let aspp_sep = Separable::new(&(&aspp_p / 1), out_channels, out_channels, 1);
        let aspp_bn = batch_norm2d(&aspp_p / 2, out_channels);
        let highres = 48;
        let b1 = p / "block1";
        let block1 = (conv(&b1 / 0, encoder_channels[1], highres, 1, 0, 1, 1), batch_norm2d(&b1 / 1, highres));
        let b2 = p / "block2";
        let block2_sep = Separable::new(&(&b2 / 0), highres + out_channels, out_channels, 1);
        let block2_bn = batch_norm2d(&b2 / 1, out_channels);
        DeepLabV3PlusDecoder { aspp, aspp_sep, aspp_bn, block1, block2_sep, block2_bn, out_channels }
    }

    /// Output shape of every block, for the summary table.
    pub fn trace(&self, features: &[Tensor]) -> (Vec<(String, Vec<i64>)>, Tensor) {
        let xs = &features[4];
        let a = &self.aspp;
        let mut rows = vec![("decoder.aspp.0.convs.0".to_owned(), xs.apply(&a.branch1x1.0).size())];
        for (i, (sep, _)) in a.atrous.iter().enumerate() {
            rows.push((format!("decoder.aspp.0.convs.{}", i + 1), sep.forward(xs).size()));
        }
        rows.push(("decoder.aspp.0.convs.4".to_owned(), xs.adaptive_avg_pool2d([1, 1]).apply(&a.pooling.0).size()));
        let top = a.forward(xs, false);
        rows.push(("decoder.aspp.0.project".to_owned(), top.size()));
        let top = self.aspp_sep.forward(&top).apply_t(&self.aspp_bn, false).relu();
        rows.push(("decoder.aspp.1-2 (sep conv)".to_owned(), top.size()));
        let high = features[1].apply(&self.block1.0).apply_t(&self.block1.1, false).relu();
        rows.push(("decoder.block1".to_owned(), high.size()));
        let out = self.forward(features, false);
        rows.push(("decoder.block2".to_owned(), out.size()));
        (rows, out)
    }

    /// `features`: stem, layer1..layer4 (layer4 at stride 16).
    pub fn forward(&self, features: &[Tensor], train: bool) -> Tensor {
        let top = self.aspp.forward(&features[4], train);
        let top = self.aspp_sep.forward(&top).apply_t(&self.aspp_bn, train).relu_();
        let (h, w) = (top.size()[2], top.size()[3]);
        // smp uses nn.UpsamplingBilinear2d, i.e. align_corners=True.
        let top = top.upsample_bilinear2d([h * 4, w * 4], true, None, None);
        let high = features[1].apply(&self.block1.0).apply_t(&self.block1.1, train).relu_();
        let fused = Tensor::cat(&[top, high], 1);
        self.block2_sep.forward(&fused).apply_t(&self.block2_bn, train).relu_()
    }
}
