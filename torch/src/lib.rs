//! The libtorch half of liverseg: models (encoder, decoder, head) and the
//! training loop. The `liverseg-torch` worker binary runs them, so the engine
//! binary never loads libtorch and a no-op `liverseg run` stays fast.

pub mod evaluate;
pub mod model;
pub mod predict;
pub mod training;
