//! The engine's no-op cost over a large data folder, for `bench/run.sh
//! engine-scale`: a source stage that lists every file under `data/` and
//! seven cheap stages chained after it (as the DVC pipeline beside it has).
//! What is measured is the engine (listing, stat, cache, keys, store
//! checks); the stages themselves do next to nothing.
//!
//! Usage: engine_scale DIR [--status] [--raw-scan stat|folders|full]
//! (DIR holds pipeline.yaml and data/)

use anyhow::{Context, Result};
use liverseg_engine::params::Params;
use liverseg_engine::runner::Engine;
use liverseg_engine::scan::RawSource;
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use std::path::Path;

liverseg_engine::params! {
    struct FilesParams {
        root as "data.root": String = str "data", "the data folder";
    }
}

liverseg_engine::params! {
    struct NoParams {}
}

/// Source: the count and combined hash of every file under data.root.
struct Files;
static FILES: StageInfo = StageInfo {
    name: "files",
    version: 1,
    about: "list the data folder",
    inputs: &[],
    optional_inputs: &[],
    collects: &[],
    per_dataset: true,
    dataset_requires: &["root"],
    outputs: &["count.txt"],
    params: FilesParams::SPECS,
    placement: Placement::InProcess,
};

impl Stage for Files {
    fn info(&self) -> &'static StageInfo {
        &FILES
    }
    fn raw_inputs(&self, params: &Params, root: &Path) -> Result<Vec<RawSource>> {
        let dir = root.join(params.typed::<FilesParams>()?.root);
        Ok(vec![RawSource::Tree { base: dir.clone(), dir, list_folder_if: |_| false }])
    }
    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        std::fs::write(ctx.out("count.txt"), ctx.raw_files.len().to_string())?;
        Ok(Summary::from([("files".to_owned(), ctx.raw_files.len().into())]))
    }
}

/// A step after the source: writes one small file.
struct Step;
static STEP: StageInfo = StageInfo {
    name: "step",
    version: 1,
    about: "a cheap step",
    inputs: &[],
    optional_inputs: &[],
    collects: &[],
    per_dataset: false,
    dataset_requires: &[],
    outputs: &["done.txt"],
    params: NoParams::SPECS,
    placement: Placement::InProcess,
};

impl Stage for Step {
    fn info(&self) -> &'static StageInfo {
        &STEP
    }
    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        std::fs::write(ctx.out("done.txt"), ctx.instance)?;
        Ok(Summary::new())
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).context("usage: engine_scale DIR [--status]")?);
    let registry: Vec<Box<dyn Stage>> = vec![Box::new(Files), Box::new(Step)];
    let mut pipeline = liverseg_engine::config::load(&dir.join("pipeline.yaml"), &registry, None, &[])?;
    if let Some(i) = args.iter().position(|a| a == "--raw-scan") {
        pipeline.raw_scan = args.get(i + 1).context("--raw-scan needs stat, folders or full")?.parse().map_err(anyhow::Error::msg)?;
    }
    let mut engine = Engine::new(pipeline, &registry);
    engine.show_progress = false;
    if args.iter().any(|a| a == "--status") {
        let fresh = liverseg_engine::status::status(&engine)?.iter().filter(|s| s.state == liverseg_engine::status::StageState::Fresh).count();
        println!("fresh {fresh}");
    } else {
        let report = engine.run(None)?;
        println!("ran {} reused {}", report.ran.len(), report.reused.len());
    }
    Ok(())
}
