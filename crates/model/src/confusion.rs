//! Confusion counts from tensors on any device.

pub use liverseg_metrics::Confusion;
use tch::{Kind, Tensor};

/// Counts from predicted and true label maps of the same shape (0/1).
pub fn confusion(pred: &Tensor, target: &Tensor) -> Confusion {
    let p = pred.to_kind(Kind::Bool);
    let t = target.to_kind(Kind::Bool);
    let count = |m: Tensor| m.sum(Kind::Int64).int64_value(&[]) as u64;
    let tp = count(p.logical_and(&t));
    let fp = count(p.logical_and(&t.logical_not()));
    let fn_ = count(p.logical_not().logical_and(&t));
    let total = pred.numel() as u64;
    Confusion { tp, fp, fn_, tn: total - tp - fp - fn_ }
}
