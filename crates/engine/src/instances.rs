//! Stage instances: one registered stage run under several names.
//!
//! - `uses: STAGE` and `foreach:` in pipeline.yaml declare them by hand.
//! - Extra datasets (`external:`) instantiate every stage (declared under its
//!   registered name) whose info says it runs per dataset (`per_dataset`),
//!   from the source stage down, as `STAGE.DATASET`; stages whose info `collects` such a stage depend on all
//!   of its dataset instances.
//! - An instance is presented to the stages that read it under the name of
//!   the stage it uses (`ingest.site_b` is read as `ingest`), unless the
//!   reader collects that stage's instances, which it then sees by name.

use super::config::{as_mapping, defaults, find, key_str, DATA_PREFIX};
use super::params::coerce;
use super::pipeline::{check_name, ResolvedStage};
use super::stage::Stage;
use anyhow::{anyhow, bail, Result};
use serde_yaml::Mapping;
use std::collections::BTreeMap;

/// Add the per-dataset instances for each extra dataset.
pub fn add_datasets(stages: &mut Vec<ResolvedStage>, datasets: &Mapping, f: &str, registry: &[Box<dyn Stage>]) -> Result<()> {
    // Stages declared under their registered name; instances made with
    // `uses:` or `foreach:` are the user's own and are not multiplied.
    let per_dataset = |s: &ResolvedStage| s.name == s.uses && find(registry, &s.uses).map(|i| i.info().per_dataset).unwrap_or(false);
    // The per-dataset chain: the source, then stages whose deps are all in the chain.
    let mut chain: Vec<usize> = Vec::new();
    for (i, s) in stages.iter().enumerate() {
        if per_dataset(s) && s.deps.iter().all(|d| chain.iter().any(|&c| stages[c].name == *d)) {
            chain.push(i);
        }
    }
    let Some(&source) = chain.iter().find(|&&i| stages[i].deps.is_empty()) else {
        bail!("{f}: external: the pipeline has no source stage that reads a dataset");
    };
    let collected: Vec<&str> = chain.iter().map(|&i| stages[i].uses.as_str()).collect();
    let collector = stages.iter().position(|s| find(registry, &s.uses).is_ok_and(|i| i.info().collects.iter().any(|c| collected.contains(c))));
    let Some(collector) = collector else {
        bail!("{f}: external: no stage in the pipeline reads the extra datasets (e.g. one that evaluates on them)");
    };
    let source_specs = find(registry, &stages[source].uses)?.info().params;
    let mut added = Vec::new();
    for (k, v) in datasets {
        let dataset = key_str(k, &format!("{f}: external"))?;
        let place = format!("{f}: external.{dataset}");
        check_name(&dataset, &place)?;
        for &i in &chain {
            let s = &stages[i];
            let mut params = s.params.clone();
            if i == source {
                let required = find(registry, &s.uses)?.info().dataset_requires;
                params = dataset_params(&params, source_specs, required, &s.uses, as_mapping(v, &place)?, &place)?;
            }
            let deps: Vec<String> = s.deps.iter().map(|d| format!("{d}.{dataset}")).collect();
            added.push(ResolvedStage { name: format!("{}.{dataset}", s.name), uses: s.uses.clone(), deps, upstream_as: BTreeMap::new(), params });
        }
    }
    // Every stage that collects a chain stage depends on its instances.
    for s in stages.iter_mut() {
        let collects = find(registry, &s.uses)?.info().collects;
        let wanted: Vec<String> = added.iter().filter(|a| collects.contains(&a.uses.as_str())).map(|a| a.name.clone()).collect();
        s.deps.extend(wanted);
    }
    // Instances go right before the first stage that reads them, which keeps the order topological.
    stages.splice(collector..collector, added);
    Ok(())
}

/// The source stage's params for one dataset: the pipeline's own settings,
/// every `data.*` key back at its default, then the dataset's entry.
fn dataset_params(own: &super::params::Params, specs: &[super::params::ParamSpec], required: &[&str], stage: &str, entry: &Mapping, place: &str) -> Result<super::params::Params> {
    let mut params = own.clone();
    params.0.extend(defaults(stage, specs.iter().filter(|s| s.name.starts_with(DATA_PREFIX)))?.0);
    if let Some(missing) = required.iter().find(|k| !entry.contains_key(**k)) {
        bail!("{place}: needs `{missing}`");
    }
    for (dk, dv) in entry {
        let dk = key_str(dk, place)?;
        let full = format!("{DATA_PREFIX}{dk}");
        let spec = specs.iter().find(|s| s.name == full).ok_or_else(|| {
            let known: Vec<&str> = specs.iter().filter_map(|s| s.name.strip_prefix(DATA_PREFIX)).collect();
            anyhow!("{place}.{dk}: not a dataset key (known: {})", known.join(", "))
        })?;
        params.0.insert(full, coerce(spec.kind, dv).map_err(|e| anyhow!("{place}.{dk}: {e}"))?);
    }
    Ok(params)
}

/// Decide the name each stage sees each upstream under, and check that every
/// input a stage needs is among them.
pub fn present_upstream(stages: &mut [ResolvedStage], registry: &[Box<dyn Stage>], f: &str) -> Result<()> {
    let uses: BTreeMap<String, String> = stages.iter().map(|s| (s.name.clone(), s.uses.clone())).collect();
    for s in stages.iter_mut() {
        let info = find(registry, &s.uses)?.info();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for d in &s.deps {
            let used = &uses[d];
            let is_collected_instance = info.collects.contains(&used.as_str()) && d.starts_with(&format!("{used}."));
            let shown = if used == d || is_collected_instance { d.clone() } else { used.clone() };
            if let Some(other) = seen.insert(shown.clone(), d.clone()) {
                bail!("{f}: stages.{}.deps: `{other}` and `{d}` are both a `{shown}`; a stage reads one", s.name);
            }
            if shown != *d {
                s.upstream_as.insert(d.clone(), shown);
            }
        }
        for need in info.inputs {
            if !seen.contains_key(*need) {
                bail!("{f}: stages.{}.deps: stage `{}` reads the output of `{need}`, so deps must list it", s.name, s.name);
            }
        }
    }
    Ok(())
}
