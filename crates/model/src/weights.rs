//! Weights as safetensors with segmentation_models_pytorch's state_dict names,
//! so `smp.DeepLabV3Plus(...).load_state_dict(load_file(path))` works.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Kind, Tensor};

/// Save every variable, plus a `num_batches_tracked` per BatchNorm as PyTorch
/// has, in name order (so the file is deterministic).
pub fn save(vs: &nn::VarStore, path: &Path, batches_tracked: i64) -> Result<()> {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in &vars {
        named.push((name.clone(), t.to_device(tch::Device::Cpu).contiguous()));
        if let Some(prefix) = name.strip_suffix(".running_mean") {
            named.push((format!("{prefix}.num_batches_tracked"), Tensor::from(batches_tracked)));
        }
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

/// A tensor of the state_dict as bytes, for a writer that adds metadata.
pub struct StateTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// f32 weights and statistics, or the i64 `num_batches_tracked` counters.
    pub is_f32: bool,
    /// Little-endian element bytes.
    pub bytes: Vec<u8>,
}

/// The state_dict `save` writes (smp's names, `num_batches_tracked` per
/// BatchNorm), in name order, as bytes.
pub fn state_dict(vs: &nn::VarStore, batches_tracked: i64) -> Result<Vec<StateTensor>> {
    let mut out = Vec::new();
    for (name, t) in vs.variables() {
        let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
        let shape = t.size().iter().map(|&d| d as usize).collect();
        let values: Vec<f32> = Vec::try_from(t.flatten(0, -1)).map_err(|e| anyhow!("{name}: {e}"))?;
        if let Some(prefix) = name.strip_suffix(".running_mean") {
            out.push(StateTensor { name: format!("{prefix}.num_batches_tracked"), shape: vec![], is_f32: false, bytes: batches_tracked.to_le_bytes().to_vec() });
        }
        out.push(StateTensor { name, shape, is_f32: true, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Load weights into `vs`. `strict`: every variable must be in the file (a
/// trained model); otherwise a partial file, such as encoder weights exported
/// from Python, fills what it names. A name of ours with a different shape is
/// always an error.
pub fn load(vs: &mut nn::VarStore, path: &Path, strict: bool) -> Result<usize> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| anyhow!("{}: not a readable safetensors file: {e}", path.display()))?;
    let file: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let mut vars = vs.variables();
    let mut loaded = 0;
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vars.iter_mut() {
            match file.get(name) {
                Some(src) => {
                    if src.size() != var.size() {
                        bail!("{}: `{name}` has shape {:?}, the model expects {:?}", path.display(), src.size(), var.size());
                    }
                    var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
                    loaded += 1;
                }
                None if strict => bail!("{}: no tensor `{name}`", path.display()),
                None => {}
            }
        }
        Ok(())
    })
    .with_context(|| format!("cannot load weights from {}", path.display()))?;
    if strict {
        // Like PyTorch's strict load_state_dict: nothing unexpected either.
        if let Some(extra) = file.keys().find(|k| !vars.contains_key(*k) && !k.ends_with(".num_batches_tracked")) {
            bail!("{}: unexpected tensor `{extra}` (a different architecture or encoder?)", path.display());
        }
    }
    if loaded == 0 {
        bail!("{}: none of its tensors names a parameter of this model", path.display());
    }
    Ok(loaded)
}

/// (name, shape) of everything `save` writes, for comparison with smp's list.
pub fn state_dict_names(vs: &nn::VarStore) -> Vec<(String, Vec<i64>)> {
    let mut out: Vec<(String, Vec<i64>)> = Vec::new();
    for (name, t) in vs.variables() {
        if let Some(prefix) = name.strip_suffix(".running_mean") {
            out.push((format!("{prefix}.num_batches_tracked"), vec![]));
        }
        out.push((name, t.size()));
    }
    out.sort();
    out
}

pub fn float_input(images_u8: &Tensor) -> Tensor {
    images_u8.to_kind(Kind::Float) / 255.0
}
