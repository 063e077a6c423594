//! Initialisation as segmentation_models_pytorch 0.6 builds
//! `DeepLabV3Plus(encoder_weights=None, in_channels=1)`, read off its source
//! and checked per tensor against it (crates/model/tests/model.rs):
//! - encoder: torchvision's ResNet init (convs Kaiming-normal fan-out, ReLU
//!   gain; BatchNorm weight 1, bias 0), except the first conv, which smp
//!   re-creates for a channel count other than 3 with PyTorch's default;
//! - decoder and head: PyTorch's defaults. smp's DeepLabV3+ (unlike its U-Net
//!   or FPN) never calls `initialize()`, so `initialize_decoder` and
//!   `initialize_head` do not apply to it.
//! tch's own defaults differ (BatchNorm weights uniform in [0, 1], convs
//! Kaiming-uniform with the ReLU gain), so every layer names its init here.

use tch::nn::{self, init::FanInOut, init::NonLinearity, init::NormalOrUniform, Init};

/// torchvision's ResNet: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
pub const ENCODER_CONV: Init = Init::Kaiming { dist: NormalOrUniform::Normal, fan: FanInOut::FanOut, non_linearity: NonLinearity::ReLU };

/// PyTorch's `Conv2d.reset_parameters()`: `kaiming_uniform_(a=√5)`, a bound
/// of 1/√fan_in.
pub const TORCH_DEFAULT_CONV: Init = Init::Kaiming {
    dist: NormalOrUniform::Uniform,
    fan: FanInOut::FanIn,
    // gain √(2/(1+a²)) with a = √5
    non_linearity: NonLinearity::ExplicitGain(0.577_350_269_189_625_8),
};

/// PyTorch's default conv bias: uniform in ±1/√fan_in.
pub fn torch_default_bias(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// BatchNorm as PyTorch starts it: weight 1, bias 0.
pub fn batch_norm2d<'a>(p: impl std::borrow::Borrow<nn::Path<'a>>, channels: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, channels, nn::BatchNormConfig { ws_init: Init::Const(1.0), bs_init: Init::Const(0.0), ..Default::default() })
}
