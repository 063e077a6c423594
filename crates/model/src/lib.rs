//! libtorch segmentation models, composed as segmentation_models_pytorch
//! composes them (encoder, decoder, head), and what trains them: losses,
//! optimizers with checkpointable state, the batch loader, one epoch of
//! training and one pass of evaluation. The stages use it; it knows nothing
//! of pipelines or artifacts.

pub mod confusion;
pub mod decoder;
pub mod encoder;
pub mod fit;
pub mod init;
pub mod loader;
pub mod loss;
pub mod network;
pub mod optim;
pub use liverseg_recipe::scaling;
pub mod summary;
pub mod weights;

pub use network::{trainable_parameters, ModelSpec, SegmentationModel};

/// The libtorch device for a requested one: `auto` is CUDA when available.
pub fn device_for(choice: liverseg_recipe::Device) -> anyhow::Result<tch::Device> {
    use liverseg_recipe::Device as D;
    Ok(match choice {
        D::Cpu => tch::Device::Cpu,
        D::Cuda => {
            if !tch::Cuda::is_available() {
                anyhow::bail!("CUDA is not available on this machine");
            }
            tch::Device::Cuda(0)
        }
        D::Auto => tch::Device::cuda_if_available(),
    })
}
