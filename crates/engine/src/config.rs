//! pipeline.yaml: stages with their deps and params, stage instances
//! (`uses:`, `foreach:`, extra datasets), named profiles and command-line
//! overrides, resolved into typed, canonical parameters.

use super::params::{coerce, ParamSpec, Params};
use super::pipeline::{check_name, topo_sort};
pub use super::pipeline::{ExecutorKind, Override, Pipeline, ResolvedStage};
use super::stage::Stage;
use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::{Mapping, Value as Y};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Prefix of dataset keys: `data.root` in the file's `data:` block or in `-P`
/// belongs to the source stage, whatever its name.
pub const DATA_PREFIX: &str = "data.";

const TOP_KEYS: &[&str] = &["stages", "profiles", "default_profile", "data", "external", "description", "verify_on_use", "raw_scan", "executor", "slurm", "remote"];
const STAGE_KEYS: &[&str] = &["deps", "params", "uses", "foreach"];

/// A stage as declared, before params are typed.
struct Decl {
    name: String,
    uses: String,
    deps: Vec<String>,
    /// (key, value, where it was set), later entries winning.
    raw: Vec<(String, Y, String)>,
    /// The declared name of the `foreach:` that made this instance.
    foreach_of: Option<String>,
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
    let f = file.display().to_string();
    let doc: Y = serde_yaml::from_str(text).with_context(|| format!("{f}: not valid YAML"))?;
    let top = as_mapping(&doc, &f)?;
    for k in top.keys() {
        let k = key_str(k, &f)?;
        if !TOP_KEYS.contains(&k.as_str()) {
            bail!("{f}: unknown top-level key `{k}` (expected {})", TOP_KEYS.join(", "));
        }
    }
    let stages_map = as_mapping(top.get("stages").ok_or_else(|| anyhow!("{f}: no `stages:` section"))?, &format!("{f}: stages"))?;
    if stages_map.is_empty() {
        bail!("{f}: `stages:` is empty");
    }
    let mut decls = declarations(stages_map, registry, &f)?;
    let order = dag_order(&decls, &f)?;
    decls = order.iter().map(|n| decls.remove(decls.iter().position(|d| &d.name == n).unwrap_or(0))).collect();
    let source = decls.iter().find(|d| d.deps.is_empty()).map(|d| d.name.clone());
    if let Some(data) = top.get("data") {
        let src = source.clone().ok_or_else(|| anyhow!("{f}: data: the pipeline has no source stage"))?;
        for (k, v) in as_mapping(data, &format!("{f}: data"))? {
            let k = key_str(k, &format!("{f}: data"))?;
            push_raw(&mut decls, &src, format!("{DATA_PREFIX}{k}"), v.clone(), format!("{f}: data.{k}"));
        }
    }
    let profile_name = apply_profile(top, profile, &mut decls, source.as_deref(), &f)?;
    for o in overrides {
        let place = format!("-P {}", o.key);
        for (stage, param) in resolve_dotted(&o.key, &decls, source.as_deref(), &place)? {
            push_raw(&mut decls, &stage, param, o.value.clone(), place.clone());
        }
    }
    let mut stages = decls.iter().map(|d| typed(d, registry)).collect::<Result<Vec<_>>>()?;
    if let Some(ext) = top.get("external") {
        super::instances::add_datasets(&mut stages, as_mapping(ext, &format!("{f}: external"))?, &f, registry)?;
    }
    super::instances::present_upstream(&mut stages, registry, &f)?;
    for s in &stages {
        let imp = find(registry, &s.uses)?;
        imp.check(&s.params).map_err(|e| anyhow!("{f}: stages.{}.params: {e:#}", s.name))?;
    }
    let verify_on_use = match top.get("verify_on_use") {
        None => false,
        Some(Y::Bool(b)) => *b,
        Some(other) => bail!("{f}: verify_on_use: expected true or false, got {other:?}"),
    };
    let raw_scan = match top.get("raw_scan") {
        None => Default::default(),
        Some(Y::String(s)) => s.parse().map_err(|e| anyhow!("{f}: raw_scan: {e}"))?,
        Some(other) => bail!("{f}: raw_scan: expected stat, folders or full, got {other:?}"),
    };
    let slurm = top.get("slurm").map(|v| super::slurm::SlurmConfig::parse(v, &format!("{f}: slurm"))).transpose()?.unwrap_or_default();
    for name in slurm.submit.iter().chain(slurm.stages.keys()) {
        if !stages.iter().any(|s| &s.name == name) {
            bail!("{f}: slurm: no stage `{name}` in this pipeline");
        }
    }
    let executor = match top.get("executor") {
        None => ExecutorKind::Local,
        Some(Y::String(s)) => s.parse().map_err(|e| anyhow!("{f}: executor: {e}"))?,
        Some(other) => bail!("{f}: executor: expected local or slurm, got {other:?}"),
    };
    let remote = match top.get("remote") {
        None | Some(Y::Null) => None,
        Some(Y::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Some(other) => bail!("{f}: remote: expected s3://bucket/prefix or a folder, got {other:?}"),
    };
    Ok(Pipeline { file: file.to_path_buf(), root: root.to_path_buf(), profile: profile_name, stages, verify_on_use, raw_scan, executor, slurm, remote })
}

/// The registered stage `name`.
pub fn find<'r>(registry: &'r [Box<dyn Stage>], name: &str) -> Result<&'r dyn Stage> {
    registry.iter().find(|s| s.info().name == name).map(|b| b.as_ref()).ok_or_else(|| {
        let known: Vec<&str> = registry.iter().map(|s| s.info().name).collect();
        anyhow!("unknown stage `{name}` (known stages: {})", known.join(", "))
    })
}

/// The `stages:` entries, with `foreach:` expanded into instances.
fn declarations(stages_map: &Mapping, registry: &[Box<dyn Stage>], f: &str) -> Result<Vec<Decl>> {
    let mut decls = Vec::new();
    for (k, v) in stages_map {
        let name = key_str(k, &format!("{f}: stages"))?;
        let place = format!("{f}: stages.{name}");
        let decl = as_mapping(v, &place)?;
        for dk in decl.keys() {
            let dk = key_str(dk, &place)?;
            if !STAGE_KEYS.contains(&dk.as_str()) {
                bail!("{place}: unknown key `{dk}` (expected {})", STAGE_KEYS.join(", "));
            }
        }
        let uses = match decl.get("uses") {
            None => name.clone(),
            Some(Y::String(u)) => {
                check_name(&name, &place)?;
                u.clone()
            }
            Some(_) => bail!("{place}.uses: expected the name of a registered stage"),
        };
        find(registry, &uses).map_err(|e| anyhow!("{place}: {e}"))?;
        let deps: Vec<String> = match decl.get("deps") {
            None | Some(Y::Null) => Vec::new(),
            Some(Y::Sequence(seq)) => seq.iter().map(|x| key_str(x, &format!("{place}.deps"))).collect::<Result<_>>()?,
            Some(_) => bail!("{place}.deps: expected a list of stage names"),
        };
        let mut raw = Vec::new();
        if let Some(p) = decl.get("params") {
            for (pk, pv) in as_mapping(p, &format!("{place}.params"))? {
                let pk = key_str(pk, &format!("{place}.params"))?;
                raw.push((pk.clone(), pv.clone(), format!("{place}.params.{pk}")));
            }
        }
        match decl.get("foreach") {
            None => decls.push(Decl { name, uses, deps, raw, foreach_of: None }),
            Some(each) => decls.extend(foreach(&name, &uses, &deps, &raw, each, &place)?),
        }
    }
    Ok(decls)
}

/// `foreach: {INSTANCE: {param: value}}`: one stage `NAME.INSTANCE` per
/// entry, each with the declaration's deps and params plus its own, as DVC's
/// `foreach ... do`.
fn foreach(name: &str, uses: &str, deps: &[String], raw: &[(String, Y, String)], each: &Y, place: &str) -> Result<Vec<Decl>> {
    let entries = as_mapping(each, &format!("{place}.foreach"))?;
    if entries.is_empty() {
        bail!("{place}.foreach: empty");
    }
    let mut out = Vec::new();
    for (ik, iv) in entries {
        let inst = key_str(ik, &format!("{place}.foreach"))?;
        let iplace = format!("{place}.foreach.{inst}");
        check_name(&inst, &iplace)?;
        let mut params = raw.to_vec();
        for (pk, pv) in as_mapping(iv, &iplace)? {
            let pk = key_str(pk, &iplace)?;
            params.push((pk.clone(), pv.clone(), format!("{iplace}.{pk}")));
        }
        out.push(Decl { name: format!("{name}.{inst}"), uses: uses.to_owned(), deps: deps.to_vec(), raw: params, foreach_of: Some(name.to_owned()) });
    }
    Ok(out)
}

/// Stage names in an order where every stage follows its deps.
fn dag_order(decls: &[Decl], f: &str) -> Result<Vec<String>> {
    let deps: BTreeMap<String, Vec<String>> = decls.iter().map(|d| (d.name.clone(), d.deps.clone())).collect();
    for d in decls {
        for dep in &d.deps {
            if !deps.contains_key(dep) {
                let instances: Vec<&str> = deps.keys().filter(|n| n.starts_with(&format!("{dep}."))).map(String::as_str).collect();
                if instances.is_empty() {
                    bail!("{f}: stages.{}.deps: upstream stage `{dep}` is not in the pipeline", d.name);
                }
                bail!("{f}: stages.{}.deps: `{dep}` has instances ({}); name one", d.name, instances.join(", "));
            }
        }
    }
    let order: Vec<String> = decls.iter().map(|d| d.name.clone()).collect();
    topo_sort(&order, &deps).map_err(|cycle| anyhow!("{f}: dependency cycle: {}", cycle.join(" -> ")))
}

fn push_raw(decls: &mut [Decl], stage: &str, key: String, value: Y, place: String) {
    if let Some(d) = decls.iter_mut().find(|d| d.name == stage) {
        d.raw.push((key, value, place));
    }
}

/// Apply the chosen (or default) profile; returns its name.
fn apply_profile(top: &Mapping, profile: Option<&str>, decls: &mut [Decl], source: Option<&str>, f: &str) -> Result<String> {
    let profiles = match top.get("profiles") {
        Some(p) => as_mapping(p, &format!("{f}: profiles"))?.clone(),
        None => Mapping::new(),
    };
    let default_profile = top.get("default_profile").and_then(Y::as_str).map(str::to_owned);
    let name = profile.map(str::to_owned).or(default_profile).unwrap_or_default();
    if name.is_empty() {
        return Ok(name);
    }
    let p = profiles.get(name.as_str()).ok_or_else(|| {
        let names: Vec<String> = profiles.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect();
        anyhow!("{f}: unknown profile `{name}` (profiles: {})", names.join(", "))
    })?;
    let place = format!("{f}: profiles.{name}");
    for (k, v) in as_mapping(p, &place)? {
        let k = key_str(k, &place)?;
        for (stage, param) in resolve_dotted(&k, decls, source, &format!("{place}.{k}"))? {
            push_raw(decls, &stage, param, v.clone(), format!("{place}.{k}"));
        }
    }
    Ok(name)
}

/// The (stage, param) pairs `key` sets: `stage.param` (the stage name may
/// itself hold a dot, `tune.baseline.lr`), `data.key` for the source stage,
/// or `NAME.param` for every instance a `foreach:` made of NAME.
fn resolve_dotted(key: &str, decls: &[Decl], source: Option<&str>, place: &str) -> Result<Vec<(String, String)>> {
    if let Some(rest) = key.strip_prefix(DATA_PREFIX) {
        let src = source.ok_or_else(|| anyhow!("{place}: the pipeline has no source stage for `{key}`"))?;
        return Ok(vec![(src.to_owned(), format!("{DATA_PREFIX}{rest}"))]);
    }
    let Some((first, _)) = key.split_once('.') else { bail!("{place}: `{key}` is not of the form stage.param") };
    let stage = decls.iter().map(|d| d.name.as_str()).filter(|n| key.len() > n.len() + 1 && key.starts_with(n) && key.as_bytes()[n.len()] == b'.').max_by_key(|n| n.len());
    if let Some(s) = stage {
        return Ok(vec![(s.to_owned(), key[s.len() + 1..].to_owned())]);
    }
    let (group, param) = key.rsplit_once('.').expect("key has a dot");
    let instances: Vec<(String, String)> = decls.iter().filter(|d| d.foreach_of.as_deref() == Some(group)).map(|d| (d.name.clone(), param.to_owned())).collect();
    if instances.is_empty() {
        bail!("{place}: `{key}` names stage `{first}`, which is not in the pipeline");
    }
    Ok(instances)
}

/// Check a declaration's params against its stage's specs, defaults filled in.
fn typed(d: &Decl, registry: &[Box<dyn Stage>]) -> Result<ResolvedStage> {
    let specs = find(registry, &d.uses)?.info().params;
    let mut params = defaults(&d.uses, specs.iter())?;
    for (k, v, place) in &d.raw {
        let spec = specs.iter().find(|s| s.name == k).ok_or_else(|| {
            let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
            anyhow!("{place}: stage `{}` has no parameter `{k}` (it has: {})", d.name, known.join(", "))
        })?;
        params.0.insert(k.clone(), coerce(spec.kind, v).map_err(|e| anyhow!("{place}: {e}"))?);
    }
    Ok(ResolvedStage { name: d.name.clone(), uses: d.uses.clone(), deps: d.deps.clone(), upstream_as: BTreeMap::new(), params })
}

/// The declared defaults of `specs`, typed.
pub fn defaults<'a>(stage: &str, specs: impl Iterator<Item = &'a ParamSpec>) -> Result<Params> {
    let mut params = Params::default();
    for spec in specs {
        let dv: Y = serde_yaml::from_str(spec.default).with_context(|| format!("default of {stage}.{}", spec.name))?;
        params.0.insert(spec.name.to_owned(), coerce(spec.kind, &dv).with_context(|| format!("default of {stage}.{}", spec.name))?);
    }
    Ok(params)
}

pub(crate) fn as_mapping<'a>(v: &'a Y, place: &str) -> Result<&'a Mapping> {
    match v {
        Y::Mapping(m) => Ok(m),
        Y::Null => {
            static EMPTY: std::sync::OnceLock<Mapping> = std::sync::OnceLock::new();
            Ok(EMPTY.get_or_init(Mapping::new))
        }
        _ => bail!("{place}: expected a mapping"),
    }
}

pub(crate) fn key_str(k: &Y, place: &str) -> Result<String> {
    k.as_str().map(str::to_owned).ok_or_else(|| anyhow!("{place}: keys must be strings, found {k:?}"))
}
