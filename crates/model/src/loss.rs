//! Training losses.

use liverseg_recipe::Loss;
use tch::{Kind, Reduction, Tensor};

/// The loss of `logits` [N, 2, H, W] against `target` [N, H, W] int64.
pub fn compute(loss: Loss, logits: &Tensor, target: &Tensor) -> Tensor {
    let ce = || logits.cross_entropy_loss::<Tensor>(target, None, Reduction::Mean, -100, 0.0);
    let dice = || {
        // Soft Dice of the liver class over the batch.
        let p = logits.softmax(1, Kind::Float).select(1, 1);
        let g = target.to_kind(Kind::Float);
        let inter = (&p * &g).sum(Kind::Float);
        let denom = p.sum(Kind::Float) + g.sum(Kind::Float);
        1.0 - (inter * 2.0 + 1.0) / (denom + 1.0)
    };
    match loss {
        Loss::CrossEntropy => ce(),
        Loss::Dice => dice(),
        Loss::CeDice => ce() + dice(),
    }
}
