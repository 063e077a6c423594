//! The liver-specific stages, one file each. Each states its inputs, params,
//! outputs and a version constant in its `INFO`.

pub mod augment;
pub mod evaluate;
pub mod ingest;
pub mod normalise;
pub mod report;
pub mod split;
pub mod train;
pub mod tune;

use crate::engine::stage::Stage;

/// Every stage the pipeline can name, in DAG order.
pub fn registry() -> Vec<Box<dyn Stage>> {
    vec![Box::new(ingest::Ingest), Box::new(normalise::Normalise), Box::new(split::Split), Box::new(augment::Augment), Box::new(tune::Tune), Box::new(train::Train(&train::TRAIN)), Box::new(train::Train(&train::BASELINE)), Box::new(evaluate::Evaluate), Box::new(report::Report)]
}
