//! Training building blocks: optimizers, metrics, the batch loader, losses.

pub mod loader;
pub mod metrics;
pub mod optim;
pub mod run;

use anyhow::{bail, Result};
use tch::{Kind, Reduction, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    CrossEntropy,
    Dice,
    CeDice,
}

impl Loss {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ce" => Loss::CrossEntropy,
            "dice" => Loss::Dice,
            "ce_dice" => Loss::CeDice,
            other => bail!("unknown loss `{other}` (ce, dice, ce_dice)"),
        })
    }

    /// logits [N, 2, H, W], target [N, H, W] int64.
    pub fn compute(&self, logits: &Tensor, target: &Tensor) -> Tensor {
        let ce = || logits.cross_entropy_loss::<Tensor>(target, None, Reduction::Mean, -100, 0.0);
        let dice = || {
            // Soft Dice of the liver class over the batch.
            let p = logits.softmax(1, Kind::Float).select(1, 1);
            let g = target.to_kind(Kind::Float);
            let inter = (&p * &g).sum(Kind::Float);
            let denom = p.sum(Kind::Float) + g.sum(Kind::Float);
            1.0 - (inter * 2.0 + 1.0) / (denom + 1.0)
        };
        match self {
            Loss::CrossEntropy => ce(),
            Loss::Dice => dice(),
            Loss::CeDice => ce() + dice(),
        }
    }
}
