//! The liver pipeline's stages, one file each: its declaration (`INFO`:
//! name, version, inputs, outputs), its typed params, its `run`, and the
//! typed reader of what it writes, through which downstream stages read it.
//! Model stages (train, baseline, evaluate) do their work only with the
//! `torch` feature, in the liverseg-torch worker; the engine binary runs them
//! through it.

pub mod augment;
pub mod evaluate;
pub mod ingest;
pub mod normalise;
pub mod report;
pub mod split;
pub mod train;
pub mod tune;

use liverseg_engine::stage::Stage;

/// Every stage the pipeline can name, in DAG order.
pub fn registry() -> Vec<Box<dyn Stage>> {
    vec![
        Box::new(ingest::Ingest),
        Box::new(normalise::Normalise),
        Box::new(split::Split),
        Box::new(augment::Augment),
        Box::new(tune::Tune),
        Box::new(train::Train(&train::TRAIN)),
        Box::new(train::Train(&train::BASELINE)),
        Box::new(evaluate::Evaluate),
        Box::new(report::Report),
    ]
}

#[cfg(test)]
mod tests {
    /// Every stage's declared defaults parse into its typed params and pass its checks.
    #[test]
    fn defaults_fit_the_typed_params() {
        for stage in super::registry() {
            let info = stage.info();
            let params = liverseg_engine::config::defaults(info.name, info.params.iter()).unwrap();
            stage.check(&params).unwrap_or_else(|e| panic!("{}: {e:#}", info.name));
        }
    }
}
