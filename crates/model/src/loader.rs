//! Batches assembled ahead of the model on another thread, from slices held
//! in memory as uint8, so the model never waits on data.

use liverseg_rng::Rng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// Square uint8 images and 0/1 masks, `n` of `size`×`size`.
pub struct SliceSet {
    pub images: Vec<u8>,
    pub masks: Vec<u8>,
    pub size: usize,
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

/// Batches over `order`. With `flip_seed`, each sample is mirrored left-right
/// with probability 1/2 (online augmentation). A final batch of one sample is
/// dropped when `drop_singleton` (BatchNorm in the ASPP pooling branch sees a
/// 1×1 map and cannot train on a single sample).
pub fn batches(set: Arc<SliceSet>, order: Vec<usize>, batch: usize, drop_singleton: bool, flip_seed: Option<u64>) -> Receiver<Batch> {
    let (tx, rx) = sync_channel(3);
    std::thread::spawn(move || {
        let px = set.size * set.size;
        let s = set.size;
        for (b, chunk) in order.chunks(batch).enumerate() {
            if drop_singleton && chunk.len() == 1 {
                break;
            }
            let mut xs = vec![0u8; chunk.len() * px];
            let mut ys = vec![0u8; chunk.len() * px];
            for (k, &i) in chunk.iter().enumerate() {
                let src_x = &set.images[i * px..(i + 1) * px];
                let src_y = &set.masks[i * px..(i + 1) * px];
                let flip = flip_seed.is_some_and(|seed| Rng::derive(seed, (b * batch + k) as u64).f64() < 0.5);
                if flip {
                    for r in 0..s {
                        for c in 0..s {
                            xs[k * px + r * s + c] = src_x[r * s + s - 1 - c];
                            ys[k * px + r * s + c] = src_y[r * s + s - 1 - c];
                        }
                    }
                } else {
                    xs[k * px..(k + 1) * px].copy_from_slice(src_x);
                    ys[k * px..(k + 1) * px].copy_from_slice(src_y);
                }
            }
            let n = chunk.len() as i64;
            let x = Tensor::from_slice(&xs).view([n, 1, s as i64, s as i64]).to_kind(Kind::Float) / 255.0;
            let y = Tensor::from_slice(&ys).view([n, s as i64, s as i64]).to_kind(Kind::Int64);
            if tx.send(Batch { x, y }).is_err() {
                return;
            }
        }
    });
    rx
}
