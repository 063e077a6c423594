//! Binary (background/liver) confusion counts and the metrics derived from them.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Confusion {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub tn: u64,
}

impl Confusion {
    /// Counts from predicted and true label maps of the same shape (0/1).
    pub fn from_tensors(pred: &Tensor, target: &Tensor) -> Self {
        let p = pred.to_kind(Kind::Bool);
        let t = target.to_kind(Kind::Bool);
        let count = |m: Tensor| m.sum(Kind::Int64).int64_value(&[]) as u64;
        let tp = count(p.logical_and(&t));
        let fp = count(p.logical_and(&t.logical_not()));
        let fn_ = count(p.logical_not().logical_and(&t));
        let total = pred.numel() as u64;
        Confusion { tp, fp, fn_, tn: total - tp - fp - fn_ }
    }

    pub fn add(&mut self, o: &Confusion) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
        self.tn += o.tn;
    }

    pub fn total(&self) -> u64 {
        self.tp + self.fp + self.fn_ + self.tn
    }

    pub fn pixel_accuracy(&self) -> f64 {
        (self.tp + self.tn) as f64 / self.total().max(1) as f64
    }

    /// Liver IoU; 1 when both prediction and truth are empty.
    pub fn liver_iou(&self) -> f64 {
        let d = self.tp + self.fp + self.fn_;
        if d == 0 { 1.0 } else { self.tp as f64 / d as f64 }
    }

    pub fn background_iou(&self) -> f64 {
        let d = self.tn + self.fp + self.fn_;
        if d == 0 { 1.0 } else { self.tn as f64 / d as f64 }
    }

    /// Mean IoU over background and liver, as the study reports it.
    pub fn miou(&self) -> f64 {
        (self.liver_iou() + self.background_iou()) / 2.0
    }

    /// Dice of the liver; 1 when both are empty.
    pub fn dice(&self) -> f64 {
        let d = 2 * self.tp + self.fp + self.fn_;
        if d == 0 { 1.0 } else { 2.0 * self.tp as f64 / d as f64 }
    }

    pub fn precision(&self) -> f64 {
        let d = self.tp + self.fp;
        if d == 0 { 1.0 } else { self.tp as f64 / d as f64 }
    }

    pub fn recall(&self) -> f64 {
        let d = self.tp + self.fn_;
        if d == 0 { 1.0 } else { self.tp as f64 / d as f64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_squares() {
        // Two 4×4 squares in 10×10, offset by 2 columns: overlap 4×2 = 8.
        let mut a = vec![0i64; 100];
        let mut b = vec![0i64; 100];
        for y in 2..6 {
            for x in 2..6 {
                a[y * 10 + x] = 1;
                b[y * 10 + x + 2] = 1;
            }
        }
        let c = Confusion::from_tensors(&Tensor::from_slice(&a), &Tensor::from_slice(&b));
        assert_eq!((c.tp, c.fp, c.fn_, c.tn), (8, 8, 8, 76));
        assert!((c.dice() - 0.5).abs() < 1e-12);
        assert!((c.liver_iou() - 8.0 / 24.0).abs() < 1e-12);
        assert!((c.background_iou() - 76.0 / 92.0).abs() < 1e-12);
        assert!((c.pixel_accuracy() - 0.84).abs() < 1e-12);
        let empty = Confusion { tn: 100, ..Default::default() };
        assert_eq!(empty.dice(), 1.0);
    }
}
