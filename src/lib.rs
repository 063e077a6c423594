//! liverseg: a content-hashed pipeline from CT scans with liver masks to a
//! trained, evaluated and auditable segmentation model.
//!
//! `engine` is generic (hashing, store, DAG, locking, lineage); the
//! liver-specific stages live in the top-level `stages/` folder and are
//! compiled into the binary.

pub mod engine;
pub mod imaging;
pub mod metrics;
pub mod progress;
pub mod rng;
pub mod tune;
#[path = "../stages/mod.rs"]
pub mod stages;
