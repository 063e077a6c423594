//! Batches assembled ahead of the model on another thread, from slices held
//! in memory as uint8, so the model never waits on data.

use crate::scaling::{InputScaling, IntensityMap};
use liverseg_imaging::augment::{self, Transform, Transforms};
use liverseg_rng::Rng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// Square uint8 images and 0/1 masks, `n` of `size`×`size`, and how the
/// images become model input.
pub struct SliceSet {
    pub images: Vec<u8>,
    pub masks: Vec<u8>,
    pub size: usize,
    pub scaling: InputScaling,
}

impl SliceSet {
    pub fn len(&self) -> usize {
        self.images.len() / (self.size * self.size)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Batch {
    /// [B, 1, S, S] float in [0, 1].
    pub x: Tensor,
    /// [B, S, S] int64 class indices.
    pub y: Tensor,
}

/// Online augmentation: a fresh draw of `transforms` for every sample, from
/// `Rng::derive(seed, position in the epoch)`; the caller derives `seed`
/// from its own seed and the epoch, so each epoch differs and a rerun does not.
#[derive(Clone)]
pub struct Online {
    pub transforms: Arc<Transforms>,
    pub seed: u64,
}

/// Batches over `order`, augmented by `online` when given. A final batch
/// of one sample is dropped when `drop_singleton` (BatchNorm in the ASPP
/// pooling branch sees a 1×1 map and cannot train on a single sample).
/// Transforms run here, on the loader thread, ahead of the model.
pub fn batches(set: Arc<SliceSet>, order: Vec<usize>, batch: usize, drop_singleton: bool, online: Option<Online>) -> Receiver<Batch> {
    let (tx, rx) = sync_channel(3);
    std::thread::spawn(move || {
        let (s, px) = (set.size, set.size * set.size);
        for (b, chunk) in order.chunks(batch).enumerate() {
            if drop_singleton && chunk.len() == 1 {
                break;
            }
            let mut xs = vec![0f32; chunk.len() * px];
            let mut ys = vec![0u8; chunk.len() * px];
            for (k, &i) in chunk.iter().enumerate() {
                let (src_x, src_y) = (&set.images[i * px..(i + 1) * px], &set.masks[i * px..(i + 1) * px]);
                let t = online.as_ref().map(|o| augment::draw(&o.transforms, &mut Rng::derive(o.seed, (b * batch + k) as u64), s));
                let (out_x, out_y) = (&mut xs[k * px..(k + 1) * px], &mut ys[k * px..(k + 1) * px]);
                // Statistics of the stored slice, so that z-scoring does not undo
                // the intensity transforms.
                let scale = set.scaling.map(src_x);
                match t {
                    Some(t) if !is_flip_only(&t) => {
                        let (ax, ay) = augment::apply_f32(&t, src_x, src_y, s);
                        out_x.iter_mut().zip(&ax).for_each(|(o, &v)| *o = scale.apply(v));
                        out_y.copy_from_slice(&ay);
                    }
                    t => copy(src_x, src_y, out_x, out_y, s, t.is_some_and(|t| t.mirror), &scale),
                }
            }
            let n = chunk.len() as i64;
            let x = Tensor::from_slice(&xs).view([n, 1, s as i64, s as i64]);
            let y = Tensor::from_slice(&ys).view([n, s as i64, s as i64]).to_kind(Kind::Int64);
            if tx.send(Batch { x, y }).is_err() {
                return;
            }
        }
    });
    rx
}

/// A transform that at most mirrors (no resampling needed).
fn is_flip_only(t: &Transform) -> bool {
    Transform { mirror: false, ..t.clone() } == Transform::IDENTITY
}

/// One sample as it is, or mirrored left-right, scaled.
fn copy(src_x: &[u8], src_y: &[u8], out_x: &mut [f32], out_y: &mut [u8], s: usize, mirror: bool, scale: &IntensityMap) {
    for r in 0..s {
        for c in 0..s {
            let from = r * s + if mirror { s - 1 - c } else { c };
            out_x[r * s + c] = scale.apply(src_x[from] as f32);
            out_y[r * s + c] = src_y[from];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Arc<SliceSet> {
        let size = 32;
        let images: Vec<u8> = (0..6 * size * size).map(|i| (i * 31 % 253) as u8).collect();
        let masks: Vec<u8> = (0..6 * size * size).map(|i| ((i % size) > 12 && (i / size % size) > 9) as u8).collect();
        Arc::new(SliceSet { images, masks, size, scaling: InputScaling::Fixed })
    }

    fn collect(online: Option<Online>) -> Vec<(Vec<f32>, Vec<i64>)> {
        batches(set(), vec![3, 1, 4, 0, 5, 2], 4, false, online).iter().map(|b| (Vec::try_from(b.x.flatten(0, -1)).unwrap(), Vec::try_from(b.y.flatten(0, -1)).unwrap())).collect()
    }

    /// The same seed gives the same batches; another seed (the next epoch)
    /// other ones; without augmentation the slices come through as stored.
    #[test]
    fn online_batches_are_deterministic_per_seed() {
        let nnunet = |seed| Some(Online { transforms: Arc::new(Transforms::nnunet()), seed });
        assert_eq!(collect(nnunet(11)), collect(nnunet(11)));
        assert_ne!(collect(nnunet(11)), collect(nnunet(12)));
        let plain = collect(None);
        let s = set();
        assert_eq!(plain[0].0[..32 * 32], s.images[3 * 1024..4 * 1024].iter().map(|&v| v as f32 / 255.0).collect::<Vec<_>>()[..]);
        assert_eq!(plain.iter().map(|b| b.0.len()).sum::<usize>(), 6 * 1024);
        // Mirror-only draws take the copying path and still mirror both.
        let flips = collect(Some(Online { transforms: Arc::new(Transforms { mirror: 1.0, ..Default::default() }), seed: 1 }));
        assert_eq!(flips[0].1[..32], s.masks[3 * 1024..3 * 1024 + 32].iter().rev().map(|&v| v as i64).collect::<Vec<_>>()[..]);
    }
}
