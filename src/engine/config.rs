//! pipeline.yaml: stages with their deps and params, named profiles, and
//! command-line overrides, resolved into typed, canonical parameters.

use super::params::{coerce, Params};
use super::stage::Stage;
use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::{Mapping, Value as Y};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Prefix of dataset keys: `data.root` in the file's `data:` block or in `-P`
/// belongs to the source stage (ingest), whatever its name.
pub const DATA_PREFIX: &str = "data.";

#[derive(Debug, Clone)]
pub struct ResolvedStage {
    pub name: String,
    /// The registered stage that does the work: `name` itself, or for an
    /// instance such as `normalise.hospital_b`, the stage it instantiates.
    pub uses: String,
    pub deps: Vec<String>,
    /// Upstream names as the stage sees them, where they differ from the dep
    /// names (an instance reads `ingest.hospital_b` as `ingest`).
    pub upstream_as: BTreeMap<String, String>,
    pub params: Params,
}

impl ResolvedStage {
    /// The name under which the stage finds upstream `dep`.
    pub fn upstream_name<'a>(&'a self, dep: &'a str) -> &'a str {
        self.upstream_as.get(dep).map(String::as_str).unwrap_or(dep)
    }
}

/// Top-level `external:` datasets: each becomes an ingest and a normalise
/// instance (`ingest.NAME`, `normalise.NAME`, with the pipeline's normalise
/// params, so preprocessing matches the models'), read by evaluate.
pub const EXTERNAL_PREFIX: &str = "normalise.";

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub root: PathBuf,
    pub profile: String,
    /// Stages in topological order.
    pub stages: Vec<ResolvedStage>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&ResolvedStage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// `name` and every stage it depends on, in topological order.
    pub fn ancestors_and_self(&self, name: &str) -> Result<Vec<&ResolvedStage>> {
        if self.stage(name).is_none() {
            bail!("unknown stage `{name}`; the pipeline has: {}", self.stage_names().join(", "));
        }
        let mut needed = BTreeSet::new();
        let mut todo = vec![name.to_owned()];
        while let Some(n) = todo.pop() {
            if needed.insert(n.clone()) {
                if let Some(s) = self.stage(&n) {
                    todo.extend(s.deps.iter().cloned());
                }
            }
        }
        Ok(self.stages.iter().filter(|s| needed.contains(&s.name)).collect())
    }

    pub fn stage_names(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.name.clone()).collect()
    }
}

/// A `-P key=value` override.
#[derive(Debug, Clone)]
pub struct Override {
    pub key: String,
    pub value: Y,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (key, value) = s.split_once('=').ok_or_else(|| format!("`{s}` is not key=value (e.g. train.lr=3e-4)"))?;
        // The value is read as YAML so that `-P a.b=3e-4` means what `b: 3e-4` means in the file.
        let value: Y = serde_yaml::from_str(value).map_err(|e| format!("`{value}` is not a YAML value: {e}"))?;
        Ok(Override { key: key.trim().to_owned(), value })
    }
}

fn as_mapping<'a>(v: &'a Y, place: &str) -> Result<&'a Mapping> {
    match v {
        Y::Mapping(m) => Ok(m),
        Y::Null => {
            static EMPTY: std::sync::OnceLock<Mapping> = std::sync::OnceLock::new();
            Ok(EMPTY.get_or_init(Mapping::new))
        }
        _ => bail!("{place}: expected a mapping"),
    }
}

fn key_str(k: &Y, place: &str) -> Result<String> {
    k.as_str().map(str::to_owned).ok_or_else(|| anyhow!("{place}: keys must be strings, found {k:?}"))
}

/// Load pipeline.yaml, apply the profile and overrides, and check everything
/// against the registered stages.
pub fn load(file: &Path, registry: &[Box<dyn Stage>], profile: Option<&str>, overrides: &[Override]) -> Result<Pipeline> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let root = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let root = if root.as_os_str().is_empty() { PathBuf::from(".") } else { root };
    parse(&text, file, &root, registry, profile, overrides)
}

pub fn parse(text: &str, file: &Path, root: &Path, registry: &[Box<dyn Stage>], profile: Option<&str>, overrides: &[Override]) -> Result<Pipeline> {
    let f = file.display();
    let doc: Y = serde_yaml::from_str(text).with_context(|| format!("{f}: not valid YAML"))?;
    let top = as_mapping(&doc, &format!("{f}"))?;
    for k in top.keys() {
        let k = key_str(k, &format!("{f}"))?;
        if !["stages", "profiles", "default_profile", "data", "external", "description"].contains(&k.as_str()) {
            bail!("{f}: unknown top-level key `{k}` (expected stages, profiles, default_profile, data, external, description)");
        }
    }
    let stages_map = as_mapping(top.get("stages").ok_or_else(|| anyhow!("{f}: no `stages:` section"))?, &format!("{f}: stages"))?;
    if stages_map.is_empty() {
        bail!("{f}: `stages:` is empty");
    }

    // Stage declarations: which stages, their deps, and file-level params.
    let mut order: Vec<String> = Vec::new();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut raw_params: BTreeMap<String, Vec<(String, Y, String)>> = BTreeMap::new();
    for (k, v) in stages_map {
        let name = key_str(k, &format!("{f}: stages"))?;
        let place = format!("{f}: stages.{name}");
        let stage = registry.iter().find(|s| s.info().name == name).ok_or_else(|| {
            let known: Vec<&str> = registry.iter().map(|s| s.info().name).collect();
            anyhow!("{place}: unknown stage `{name}` (known stages: {})", known.join(", "))
        })?;
        let decl = as_mapping(v, &place)?;
        for dk in decl.keys() {
            let dk = key_str(dk, &place)?;
            if dk != "deps" && dk != "params" {
                bail!("{place}: unknown key `{dk}` (expected deps, params)");
            }
        }
        let d: Vec<String> = match decl.get("deps") {
            None | Some(Y::Null) => Vec::new(),
            Some(Y::Sequence(seq)) => seq.iter().map(|x| key_str(x, &format!("{place}.deps"))).collect::<Result<_>>()?,
            Some(_) => bail!("{place}.deps: expected a list of stage names"),
        };
        for need in stage.info().inputs {
            if !d.iter().any(|x| x == need) {
                bail!("{place}.deps: stage `{name}` reads the output of `{need}`, so deps must list it");
            }
        }
        let mut ps = Vec::new();
        if let Some(p) = decl.get("params") {
            for (pk, pv) in as_mapping(p, &format!("{place}.params"))? {
                let pk = key_str(pk, &format!("{place}.params"))?;
                ps.push((pk.clone(), pv.clone(), format!("{place}.params.{pk}")));
            }
        }
        order.push(name.clone());
        deps.insert(name.clone(), d);
        raw_params.insert(name, ps);
    }
    for (name, ds) in &deps {
        for d in ds {
            if !deps.contains_key(d) {
                bail!("{f}: stages.{name}.deps: upstream stage `{d}` is not in the pipeline");
            }
        }
    }
    let topo = topo_sort(&order, &deps).map_err(|cycle| anyhow!("{f}: dependency cycle: {}", cycle.join(" -> ")))?;
    let source = topo.iter().find(|n| deps[*n].is_empty()).cloned();

    // The `data:` block belongs to the source stage.
    if let Some(data) = top.get("data") {
        let src = source.clone().ok_or_else(|| anyhow!("{f}: data: the pipeline has no source stage"))?;
        for (k, v) in as_mapping(data, &format!("{f}: data"))? {
            let k = key_str(k, &format!("{f}: data"))?;
            raw_params.get_mut(&src).expect("source listed").push((format!("{DATA_PREFIX}{k}"), v.clone(), format!("{f}: data.{k}")));
        }
    }

    // Profile, then command-line overrides, as if the file had been edited.
    let profiles = match top.get("profiles") {
        Some(p) => as_mapping(p, &format!("{f}: profiles"))?.clone(),
        None => Mapping::new(),
    };
    let default_profile = top.get("default_profile").and_then(Y::as_str).map(str::to_owned);
    let profile_name = profile.map(str::to_owned).or(default_profile).unwrap_or_default();
    let resolve_dotted = |key: &str, place: &str| -> Result<(String, String)> {
        if let Some(rest) = key.strip_prefix(DATA_PREFIX) {
            let src = source.clone().ok_or_else(|| anyhow!("{place}: the pipeline has no source stage for `{key}`"))?;
            return Ok((src, format!("{DATA_PREFIX}{rest}")));
        }
        let (stage, param) = key.split_once('.').ok_or_else(|| anyhow!("{place}: `{key}` is not of the form stage.param"))?;
        if !deps.contains_key(stage) {
            bail!("{place}: `{key}` names stage `{stage}`, which is not in the pipeline");
        }
        Ok((stage.to_owned(), param.to_owned()))
    };
    if !profile_name.is_empty() {
        let p = profiles.get(profile_name.as_str()).ok_or_else(|| {
            let names: Vec<String> = profiles.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect();
            anyhow!("{f}: unknown profile `{profile_name}` (profiles: {})", names.join(", "))
        })?;
        let place = format!("{f}: profiles.{profile_name}");
        for (k, v) in as_mapping(p, &place)? {
            let k = key_str(k, &place)?;
            let (stage, param) = resolve_dotted(&k, &format!("{place}.{k}"))?;
            raw_params.get_mut(&stage).expect("stage known").push((param, v.clone(), format!("{place}.{k}")));
        }
    }
    for o in overrides {
        let place = format!("-P {}", o.key);
        let (stage, param) = resolve_dotted(&o.key, &place)?;
        raw_params.get_mut(&stage).expect("stage known").push((param, o.value.clone(), place));
    }

    // Type-check against each stage's declared params, later entries winning.
    let mut stages = Vec::new();
    for name in &topo {
        let stage = registry.iter().find(|s| s.info().name == name).expect("checked above");
        let specs = stage.info().params;
        let mut params = defaults(name, specs.iter())?;
        for (k, v, place) in &raw_params[name] {
            let spec = specs.iter().find(|s| s.name == k).ok_or_else(|| {
                let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
                anyhow!("{place}: stage `{name}` has no parameter `{k}` (it has: {})", known.join(", "))
            })?;
            let value = coerce(spec.ty, v).map_err(|e| anyhow!("{place}: {e}"))?;
            params.0.insert(k.clone(), value);
        }
        stages.push(ResolvedStage { name: name.clone(), uses: name.clone(), deps: deps[name].clone(), upstream_as: BTreeMap::new(), params });
    }
    if let Some(ext) = top.get("external") {
        add_external(&mut stages, as_mapping(ext, &format!("{f}: external"))?, &f.to_string(), registry)?;
    }
    Ok(Pipeline { file: file.to_path_buf(), root: root.to_path_buf(), profile: profile_name, stages })
}

/// The declared defaults of `specs`, typed.
fn defaults<'a>(stage: &str, specs: impl Iterator<Item = &'a super::params::ParamSpec>) -> Result<Params> {
    let mut params = Params::default();
    for spec in specs {
        let dv: Y = serde_yaml::from_str(spec.default).with_context(|| format!("default of {stage}.{}", spec.name))?;
        params.0.insert(spec.name.to_owned(), coerce(spec.ty, &dv).with_context(|| format!("default of {stage}.{}", spec.name))?);
    }
    Ok(params)
}

fn add_external(stages: &mut Vec<ResolvedStage>, ext: &Mapping, f: &str, registry: &[Box<dyn Stage>]) -> Result<()> {
    let find = |n: &str| stages.iter().position(|s| s.name == n);
    let (Some(ingest), Some(normalise), Some(evaluate)) = (find("ingest"), find("normalise"), find("evaluate")) else {
        bail!("{f}: external: needs stages ingest, normalise and evaluate in the pipeline");
    };
    let ingest_specs = registry.iter().find(|s| s.info().name == "ingest").expect("ingest registered").info().params;
    let mut added = Vec::new();
    for (k, v) in ext {
        let name = key_str(k, &format!("{f}: external"))?;
        let place = format!("{f}: external.{name}");
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            bail!("{place}: names may use letters, digits, `_` and `-` only");
        }
        // The pipeline's own ingest settings (on_error), with this dataset's `data.*` keys.
        let mut params = stages[ingest].params.clone();
        params.0.extend(defaults("ingest", ingest_specs.iter().filter(|s| s.name.starts_with(DATA_PREFIX)))?.0);
        let entry = as_mapping(v, &place)?;
        if !entry.contains_key("source") {
            bail!("{place}: needs `source` (and `root`, the dataset folder, unless synthetic)");
        }
        for (dk, dv) in entry {
            let dk = key_str(dk, &place)?;
            let full = format!("{DATA_PREFIX}{dk}");
            let spec = ingest_specs.iter().find(|s| s.name == full).ok_or_else(|| {
                let known: Vec<&str> = ingest_specs.iter().filter_map(|s| s.name.strip_prefix(DATA_PREFIX)).collect();
                anyhow!("{place}.{dk}: not a dataset key (known: {})", known.join(", "))
            })?;
            params.0.insert(full, coerce(spec.ty, dv).map_err(|e| anyhow!("{place}.{dk}: {e}"))?);
        }
        let ing = format!("ingest.{name}");
        let norm = format!("{EXTERNAL_PREFIX}{name}");
        added.push(ResolvedStage { name: ing.clone(), uses: "ingest".into(), deps: vec![], upstream_as: BTreeMap::new(), params });
        added.push(ResolvedStage {
            name: norm.clone(),
            uses: "normalise".into(),
            deps: vec![ing.clone()],
            upstream_as: BTreeMap::from([(ing, "ingest".to_owned())]),
            params: stages[normalise].params.clone(),
        });
        stages[evaluate].deps.push(norm);
    }
    // Instances go right before evaluate, which keeps the order topological.
    let at = stages.iter().position(|s| s.name == "evaluate").expect("found above");
    stages.splice(at..at, added);
    Ok(())
}

/// Kahn's algorithm, keeping file order among ready stages; on a cycle, returns it.
fn topo_sort(order: &[String], deps: &BTreeMap<String, Vec<String>>) -> std::result::Result<Vec<String>, Vec<String>> {
    let mut done: Vec<String> = Vec::new();
    let mut remaining: Vec<String> = order.to_vec();
    while !remaining.is_empty() {
        let ready = remaining.iter().position(|n| deps[n].iter().all(|d| done.contains(d)));
        match ready {
            Some(i) => done.push(remaining.remove(i)),
            None => {
                // Walk deps from any remaining stage until a name repeats.
                let mut path = vec![remaining[0].clone()];
                loop {
                    let last = path.last().expect("non-empty").clone();
                    let next = deps[&last].iter().find(|d| remaining.contains(d)).expect("a remaining dep exists").clone();
                    if let Some(pos) = path.iter().position(|p| *p == next) {
                        let mut cycle = path[pos..].to_vec();
                        cycle.push(next);
                        return Err(cycle);
                    }
                    path.push(next);
                }
            }
        }
    }
    Ok(done)
}
