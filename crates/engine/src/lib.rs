//! The generic engine: typed parameters, content keys, the artifact store,
//! the DAG and its instances, locking, lineage, and the worker protocol with
//! its executors. It knows no stage by name: stages register themselves
//! (`Stage`), and the engine runs whatever pipeline.yaml composes of them.

pub mod config;
pub mod detach;
pub mod executor;
pub mod experiments;
pub mod gc;
pub mod hash;
pub mod instances;
pub mod lineage;
pub mod params;
pub mod paths;
pub mod pipeline;
pub mod progress;
pub mod runner;
pub mod runs;
pub mod scan;
pub mod slurm;
pub mod stage;
pub mod status;
pub mod store;
pub mod tables;
pub mod tensors;
pub mod worker;
