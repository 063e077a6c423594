//! `lineage`: from a result back to the raw files, by the keys each manifest
//! recorded (not by today's pipeline), so the answer is what actually happened.

use super::runner::Engine;
use super::store::{Artifact, Store};
use anyhow::{anyhow, bail, Context, Result};
use std::fmt::Write;
use std::path::Path;

/// Resolve `what` (an artifact path, a stage name, or `stage.metric`) and
/// render its lineage tree.
pub fn lineage(engine: &Engine, what: &str) -> Result<String> {
    let mut out = String::new();
    let path = Path::new(what);
    let artifact = if path.exists() {
        artifact_containing(&engine.store, path)?
    } else if let Some((stage, metric)) = what.split_once('.').filter(|(s, _)| engine.pipeline.stage(s).is_some()) {
        let a = engine.current_artifact(stage)?;
        let value = a.manifest.metrics.get(metric).ok_or_else(|| {
            let names: Vec<&String> = a.manifest.metrics.keys().collect();
            anyhow!("stage `{stage}` reports no metric `{metric}` (it reports: {names:?})")
        })?;
        writeln!(out, "{stage}.{metric} = {value}")?;
        a
    } else if engine.pipeline.stage(what).is_some() {
        engine.current_artifact(what)?
    } else {
        bail!("`{what}` is neither a file, a stage, nor stage.metric (stages: {})", engine.pipeline.stage_names().join(", "));
    };
    render(&engine.store, &artifact, 0, &mut std::collections::HashSet::new(), &mut out)?;
    Ok(out)
}

fn artifact_containing(store: &Store, path: &Path) -> Result<Artifact> {
    let abs = path.canonicalize().with_context(|| format!("cannot resolve {}", path.display()))?;
    let root = store.root.canonicalize().with_context(|| format!("cannot resolve the store {}", store.root.display()))?;
    let rel = abs.strip_prefix(&root).map_err(|_| anyhow!("{} is not inside the artifact store {}", path.display(), store.root.display()))?;
    let mut parts = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned());
    let (Some(stage), Some(key)) = (parts.next(), parts.next()) else {
        bail!("{} is not inside an artifact directory (artifacts/<stage>/<key>/)", path.display());
    };
    store.get(&stage, &key)?.ok_or_else(|| anyhow!("{}: artifacts/{stage}/{key} has no manifest (incomplete or not an artifact)", path.display()))
}

/// One artifact and, indented below it, its upstreams. The lineage is a DAG
/// (ingest feeds most stages), so an artifact already printed is named once
/// more as a reference, not printed again with its whole subtree.
fn render(store: &Store, a: &Artifact, depth: usize, printed: &mut std::collections::HashSet<(String, String)>, out: &mut String) -> Result<()> {
    let pad = "    ".repeat(depth);
    let m = &a.manifest;
    if !printed.insert((m.stage.clone(), m.key.clone())) {
        writeln!(out, "{pad}{} @ {}  (see above)", m.stage, m.key)?;
        return Ok(());
    }
    writeln!(out, "{pad}{} @ {}  (version {}, ran {} for {:.1} s, liverseg {})", m.stage, m.key, m.version, m.started_utc, m.duration_s, m.liverseg_version)?;
    writeln!(out, "{pad}  params: {}", serde_json::to_string(&m.params)?)?;
    if let Some(e) = &m.effective_params {
        writeln!(out, "{pad}  effective params (what ran): {}", serde_json::to_string(e)?)?;
    }
    for (name, f) in &m.outputs {
        writeln!(out, "{pad}  output {name}  {} B  blake3 {}", f.size, &f.blake3[..16])?;
    }
    let raw_inputs = a.raw_inputs()?;
    if !raw_inputs.is_empty() {
        let mut h = blake3::Hasher::new();
        for r in &raw_inputs {
            h.update(r.path.as_bytes());
            h.update(r.blake3.as_bytes());
        }
        writeln!(out, "{pad}  raw inputs: {} files, combined blake3 {}", raw_inputs.len(), &h.finalize().to_hex()[..16])?;
        for r in raw_inputs.iter().take(5) {
            writeln!(out, "{pad}    {}  {} B  blake3 {}", r.path, r.size, &r.blake3[..16])?;
        }
        if raw_inputs.len() > 5 {
            let list = if m.raw_inputs_beside() { super::store::RAW_INPUTS } else { super::store::MANIFEST };
            writeln!(out, "{pad}    … {} more (all listed in {})", raw_inputs.len() - 5, a.dir.join(list).display())?;
        }
    }
    for (d, key) in &m.upstream {
        match store.get(d, key)? {
            Some(up) => render(store, &up, depth + 1, printed, out)?,
            None => writeln!(out, "{pad}    {d} @ {key}  (no longer in the store; `liverseg gc --apply` or a deleted file removed it)")?,
        }
    }
    Ok(())
}

/// Every artifact behind `start` (which it includes), walked through the
/// manifests down to the source stages, oldest first.
pub fn ancestry(store: &Store, start: Vec<Artifact>) -> Result<Vec<Artifact>> {
    let mut all = start;
    let mut k = 0;
    while k < all.len() {
        let ups: Vec<(String, String)> = all[k].manifest.upstream.iter().map(|(s, key)| (s.clone(), key.clone())).collect();
        for (stage, key) in ups {
            if !all.iter().any(|a| a.stage == stage && a.key == key) {
                let a = store.get(&stage, &key)?.with_context(|| format!("lineage: {stage}@{key} is not in the store"))?;
                all.push(a);
            }
        }
        k += 1;
    }
    all.sort_by(|a, b| a.manifest.started_unix.total_cmp(&b.manifest.started_unix).then(a.stage.cmp(&b.stage)));
    Ok(all)
}
