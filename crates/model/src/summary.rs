//! A layer table like the study's Figure 2: output shape and parameters of
//! each block, from a real forward pass.

use crate::{ModelSpec, SegmentationModel};
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write;
use tch::{nn, Device, Kind, Tensor};

pub fn summary(spec: &ModelSpec, size: i64) -> Result<String> {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = SegmentationModel::new(&vs.root(), spec)?;
    model.check_input(size, size)?;
    let x = Tensor::zeros([1, spec.in_channels, size, size], (Kind::Float, Device::Cpu));
    let shapes = tch::no_grad(|| model.trace(&x));
    // Parameters per block: group variable names by their block prefix.
    let mut params: BTreeMap<String, i64> = BTreeMap::new();
    for (name, t) in vs.variables().into_iter().filter(|(_, t)| t.requires_grad()) {
        let block = block_of(&name);
        *params.entry(block).or_default() += t.numel() as i64;
    }
    let mut out = String::new();
    writeln!(out, "{} with {} encoder, {} input channel(s), {} classes, {size}×{size} input", spec.arch, spec.encoder, spec.in_channels, spec.classes)?;
    writeln!(out, "{:<34} {:<22} {:>12}", "Layer (block)", "Output shape", "Param #")?;
    writeln!(out, "{}", "=".repeat(70))?;
    let mut total = 0;
    for (block, shape) in &shapes {
        let p = params.get(block).copied().unwrap_or(0);
        total += p;
        writeln!(out, "{:<34} {:<22} {:>12}", block, format!("{shape:?}"), thousands(p))?;
    }
    let all: i64 = crate::trainable_parameters(&vs);
    debug_assert_eq!(total, all, "every parameter belongs to a listed block");
    writeln!(out, "{}", "=".repeat(70))?;
    writeln!(out, "Total params: {}", thousands(all))?;
    writeln!(out, "Trainable params: {}", thousands(all))?;
    Ok(out)
}

/// The block a variable belongs to, matching the names `trace` reports.
pub fn block_of(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["encoder", "conv1" | "bn1", ..] => "encoder.stem".into(),
        ["encoder", layer, idx, ..] if layer.starts_with("layer") => {
            format!("encoder.{layer}.{idx}")
        }
        ["decoder", "aspp", "0", "convs", i, ..] => format!("decoder.aspp.0.convs.{i}"),
        ["decoder", "aspp", "0", "project", ..] => "decoder.aspp.0.project".into(),
        ["decoder", "aspp", "1" | "2", ..] => "decoder.aspp.1-2 (sep conv)".into(),
        ["decoder", b, ..] => format!("decoder.{b}"),
        _ => "segmentation_head".into(),
    }
}

pub fn thousands(n: i64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
