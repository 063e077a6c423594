//! report: a self-contained HTML report (figures embedded, opens offline) and
//! a Markdown twin, built only from upstream artifacts, with the stage keys
//! behind every number and figure.
//!
//! inputs: ingest, split, evaluate, train, baseline (whichever models exist)
//! outputs: report.html, report.md, figures/*.svg, figures/*.png

use crate::engine::params::{param, ParamType::*, ParamSpec};
use crate::engine::stage::{Stage, StageContext, StageInfo, Summary};
use crate::engine::store::Artifact;
use crate::engine::table::{read_parquet, TensorFile};
use anyhow::{bail, Context, Result};
use polars::prelude::DataFrame;
use std::fmt::Write;

pub const VERSION: u32 = 1;
const PARAMS: &[ParamSpec] = &[param("title", Str, "'liverseg report'", "report title")];

pub static INFO: StageInfo = StageInfo {
    name: "report",
    version: VERSION,
    inputs: &["ingest", "normalise", "split", "evaluate"],
    outputs: &["report.html", "report.md", "figures/"],
    params: PARAMS,
    about: "HTML and Markdown report with Table 1, curves, examples, data and lineage",
};

pub struct Report;

fn f64s(df: &DataFrame, col: &str) -> Result<Vec<f64>> {
    Ok(df.column(col)?.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
}

fn strs(df: &DataFrame, col: &str) -> Result<Vec<String>> {
    Ok(df.column(col)?.str()?.iter().map(|v| v.unwrap_or_default().to_owned()).collect())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A line chart of several series against epoch, as standalone SVG.
fn line_chart(title: &str, series: &[(&str, &str, Vec<f64>)]) -> String {
    let (w, h, pad) = (360.0, 220.0, 36.0);
    let n = series.iter().map(|s| s.2.len()).max().unwrap_or(0).max(2);
    let vals: Vec<f64> = series.iter().flat_map(|s| s.2.iter().copied()).filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = vals.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if !lo.is_finite() || hi - lo < 1e-9 {
        lo -= 0.5;
        hi += 0.5;
    }
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1) as f64;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * (v - lo) / (hi - lo);
    let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}' font-family='sans-serif' font-size='11'>");
    let _ = write!(s, "<text x='{}' y='14' text-anchor='middle' font-weight='bold'>{}</text>", w / 2.0, esc(title));
    let _ = write!(s, "<line x1='{pad}' y1='{}' x2='{}' y2='{}' stroke='#444'/><line x1='{pad}' y1='{pad}' x2='{pad}' y2='{}' stroke='#444'/>", h - pad, w - pad, h - pad, h - pad);
    let _ = write!(s, "<text x='4' y='{}'>{hi:.3}</text><text x='4' y='{}'>{lo:.3}</text>", pad + 4.0, h - pad);
    let _ = write!(s, "<text x='{}' y='{}' text-anchor='middle'>epoch (1–{})</text>", w / 2.0, h - 8.0, n);
    for (k, (name, colour, v)) in series.iter().enumerate() {
        let pts: Vec<String> = v.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v))).collect();
        let _ = write!(s, "<polyline fill='none' stroke='{colour}' stroke-width='2' points='{}'/>", pts.join(" "));
        let _ = write!(s, "<text x='{}' y='{}' fill='{colour}'>{}</text>", w - pad - 70.0, pad + 14.0 * k as f64, esc(name));
    }
    s.push_str("</svg>");
    s
}

/// Image | truth | prediction, side by side: truth in green, prediction in red.
fn overlay_png(img: &[u8], truth: &[u8], pred: &[u8], size: usize) -> Result<Vec<u8>> {
    let mut canvas = image::RgbImage::new(3 * size as u32, size as u32);
    for y in 0..size {
        for x in 0..size {
            let i = y * size + x;
            let g = img[i];
            canvas.put_pixel(x as u32, y as u32, image::Rgb([g, g, g]));
            let t = if truth[i] > 0 { image::Rgb([g / 2, 200, g / 2]) } else { image::Rgb([g, g, g]) };
            canvas.put_pixel((size + x) as u32, y as u32, t);
            let p = if pred[i] > 0 { image::Rgb([220, g / 2, g / 2]) } else { image::Rgb([g, g, g]) };
            canvas.put_pixel((2 * size + x) as u32, y as u32, p);
        }
    }
    let mut out = Vec::new();
    canvas.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?;
    Ok(out)
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len() * 4 / 3 + 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        s.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    s
}

fn key_line(a: &Artifact) -> String {
    format!("{}@{}", a.stage, a.key)
}

impl Stage for Report {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let title = ctx.params.str("title")?;
        let ingest = ctx.upstream("ingest")?;
        let norm = ctx.upstream("normalise")?;
        let split = ctx.upstream("split")?;
        let eval = ctx.upstream("evaluate")?;
        let figures = ctx.out("figures");
        std::fs::create_dir_all(&figures)?;
        let mut html = String::new();
        let mut md = String::new();
        let raw_hash = {
            let mut h = blake3::Hasher::new();
            for r in &ingest.manifest.raw_inputs {
                h.update(r.path.as_bytes());
                h.update(r.blake3.as_bytes());
            }
            h.finalize().to_hex()[..16].to_string()
        };
        let chain = |a: &Artifact| -> String {
            let mut parts = vec![key_line(a)];
            for (d, k) in &a.manifest.upstream {
                parts.push(format!("{d}@{k}"));
            }
            parts.join(" ← ")
        };
        let _ = write!(html, "<!doctype html><html><head><meta charset='utf-8'><title>{0}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}th{{background:#eee}}td:first-child{{text-align:left}}code{{font-size:90%}}figure{{display:inline-block;margin:4px}}</style></head><body><h1>{0}</h1>", esc(title));
        let _ = writeln!(md, "# {title}\n");

        // Table 1.
        let t1 = read_parquet(&eval.file("table1.parquet"))?;
        let models = strs(&t1, "model")?;
        let cols = ["miou", "pixel_accuracy", "loss", "dice_per_case", "dice_per_case_ci_low", "dice_per_case_ci_high", "liver_iou", "dice_global", "hd95_mean"];
        let vals: Vec<Vec<f64>> = cols.iter().map(|c| f64s(&t1, c)).collect::<Result<_>>()?;
        let params: Vec<i64> = t1.column("parameters")?.i64()?.iter().map(|v| v.unwrap_or(0)).collect();
        let unit = eval.manifest.metrics.get("hd95_unit").and_then(|v| v.as_str()).unwrap_or("px").to_owned();
        let split_name = eval.manifest.metrics.get("split").and_then(|v| v.as_str()).unwrap_or("test").to_owned();
        let head = ["model", "mIoU", "pixel acc.", "loss", "Dice per case [95% CI]", "liver IoU", "Dice global", &format!("HD95 ({unit})"), "train time (s)", "parameters"];
        let _ = write!(html, "<h2>Table 1: {split_name} split</h2><p>As in the study: mIoU (background and liver), pixel accuracy and loss; beside them the per-patient Dice with its bootstrap CI, liver IoU, HD95, training time and parameter count. Source: <code>{}</code>.</p><table><tr>", chain(eval));
        for hcol in head {
            let _ = write!(html, "<th>{}</th>", esc(hcol));
        }
        html.push_str("</tr>");
        let _ = writeln!(md, "## Table 1: {split_name} split\n\nSource: `{}`\n\n| {} |\n|{}", chain(eval), head.join(" | "), "---|".repeat(head.len()));
        let mut summary = Summary::new();
        for (i, m) in models.iter().enumerate() {
            let train_secs = ctx.upstream.get(m).and_then(|a| a.manifest.metrics.get("train_seconds")).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            let cells = [
                m.clone(),
                format!("{:.4}", vals[0][i]),
                format!("{:.4}", vals[1][i]),
                format!("{:.4}", vals[2][i]),
                format!("{:.4} [{:.4}, {:.4}]", vals[3][i], vals[4][i], vals[5][i]),
                format!("{:.4}", vals[6][i]),
                format!("{:.4}", vals[7][i]),
                format!("{:.2}", vals[8][i]),
                format!("{train_secs:.0}"),
                params[i].to_string(),
            ];
            html.push_str("<tr>");
            for c in &cells {
                let _ = write!(html, "<td>{}</td>", esc(c));
            }
            html.push_str("</tr>");
            let _ = writeln!(md, "| {} |", cells.join(" | "));
            summary.insert(format!("{m}.dice_per_case"), serde_json::json!(vals[3][i]));
            summary.insert(format!("{m}.miou"), serde_json::json!(vals[0][i]));
        }
        html.push_str("</table>");

        // Learning curves.
        let _ = write!(html, "<h2>Learning curves</h2>");
        let _ = writeln!(md, "\n## Learning curves\n");
        for m in &models {
            let Some(a) = ctx.upstream.get(m) else { continue };
            let df = read_parquet(&a.file("metrics.parquet"))?;
            let _ = write!(html, "<h3>{m} <small><code>{}</code></small></h3>", key_line(a));
            let _ = writeln!(md, "### {m} (`{}`)\n", key_line(a));
            for (name, tr, va) in [("loss", "train_loss", "val_loss"), ("pixel accuracy", "train_pa", "val_pa"), ("mIoU", "train_miou", "val_miou")] {
                let svg = line_chart(&format!("{m}: {name}"), &[("train", "#1f77b4", f64s(&df, tr)?), ("validation", "#d62728", f64s(&df, va)?)]);
                let file = format!("{m}_{}.svg", tr.trim_start_matches("train_"));
                std::fs::write(figures.join(&file), &svg)?;
                let _ = write!(html, "<figure><img alt='{m} {name}' src='data:image/svg+xml;base64,{}'/></figure>", base64(svg.as_bytes()));
                let _ = writeln!(md, "![{m} {name}](figures/{file})");
            }
        }

        // Qualitative: best, median and worst test cases per model.
        let per_case = read_parquet(&eval.file("per_case.parquet"))?;
        let per_slice = read_parquet(&eval.file("per_slice.parquet"))?;
        let data = TensorFile::open(&norm.file("data.safetensors"))?;
        let (shape, images) = data.u8("images")?;
        let (_, masks) = data.u8("masks")?;
        let size = shape[1];
        let px = size * size;
        let _ = write!(html, "<h2>Examples: best, median and worst {split_name} patients</h2><p>Left to right: image, ground truth (green), prediction (red); the slice with the most liver of each patient.</p>");
        let _ = writeln!(md, "\n## Examples: best, median and worst {split_name} patients\n\nImage, ground truth (green), prediction (red).\n");
        let pc_model = strs(&per_case, "model")?;
        let pc_case = strs(&per_case, "case_id")?;
        let pc_dice = f64s(&per_case, "dice")?;
        let ps_model = strs(&per_slice, "model")?;
        let ps_case = strs(&per_slice, "case_id")?;
        let ps_idx: Vec<u64> = per_slice.column("idx")?.u64()?.iter().map(|v| v.unwrap_or(0)).collect();
        for m in &models {
            let preds = TensorFile::open(&eval.file(&format!("predictions/{m}.safetensors")))?;
            let (_, pred) = preds.u8("predictions")?;
            let mut rows: Vec<(f64, &str)> = (0..pc_model.len()).filter(|&i| &pc_model[i] == m).map(|i| (pc_dice[i], pc_case[i].as_str())).collect();
            rows.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
            if rows.is_empty() {
                continue;
            }
            let picks = [("best", 0), ("median", rows.len() / 2), ("worst", rows.len() - 1)];
            for (label, r) in picks {
                let (dice, case) = rows[r];
                // Position k of this model's slices in the prediction tensor.
                let slices: Vec<(usize, u64)> = (0..ps_model.len()).filter(|&i| &ps_model[i] == m).enumerate().filter(|(_, i)| ps_case[*i] == case).map(|(k, i)| (k, ps_idx[i])).collect();
                let Some(&(k, idx)) = slices.iter().max_by_key(|(_, idx)| masks[*idx as usize * px..(*idx as usize + 1) * px].iter().map(|&v| v as u64).sum::<u64>()) else { continue };
                let idx = idx as usize;
                let png = overlay_png(&images[idx * px..(idx + 1) * px], &masks[idx * px..(idx + 1) * px], &pred[k * px..(k + 1) * px], size)?;
                let file = format!("{m}_{label}.png");
                std::fs::write(figures.join(&file), &png)?;
                let cap = format!("{m}, {label}: patient {case}, Dice {dice:.3}");
                let _ = write!(html, "<figure><img alt='{}' src='data:image/png;base64,{}' width='{}'/><figcaption>{}</figcaption></figure>", esc(&cap), base64(&png), 3 * size.max(128), esc(&cap));
                let _ = writeln!(md, "![{cap}](figures/{file})  \n{cap}\n");
            }
        }
        let _ = write!(html, "<p><em>Grad-CAM maps (the study's Figure 5) are not produced yet.</em></p>");

        // Hyperparameter search.
        let _ = write!(html, "<h2>Hyperparameter search</h2>");
        let _ = writeln!(md, "## Hyperparameter search\n");
        match ctx.upstream.get("tune") {
            None => {
                let _ = write!(html, "<p>No tune stage is upstream of this report; the models use the parameters in their lineage.</p>");
                let _ = writeln!(md, "No tune stage is upstream of this report; the models use the parameters in their lineage.\n");
            }
            Some(t) => {
                let trials = read_parquet(&t.file("trials.parquet"))?;
                let strategy = strs(&trials, "strategy")?;
                let objective = f64s(&trials, "objective")?;
                let pruned: Vec<bool> = trials.column("pruned")?.bool()?.iter().map(|v| v.unwrap_or(false)).collect();
                let best: serde_json::Value = serde_json::from_slice(&std::fs::read(t.file("best.json"))?)?;
                let obj_name = best["objective"].as_str().unwrap_or("objective").to_owned();
                let higher = obj_name == "val_dice";
                let mut series = Vec::new();
                let mut strategies: Vec<String> = strategy.clone();
                strategies.dedup();
                let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
                for (i, st) in strategies.iter().enumerate() {
                    let mut run = if higher { f64::MIN } else { f64::MAX };
                    let curve: Vec<f64> = (0..strategy.len()).filter(|&k| &strategy[k] == st).map(|k| {
                        run = if higher { run.max(objective[k]) } else { run.min(objective[k]) };
                        run
                    }).collect();
                    series.push((st.as_str(), colours[i % colours.len()], curve));
                }
                let svg = line_chart(&format!("best {obj_name} so far (x: trial)"), &series);
                std::fs::write(figures.join("tune_best_so_far.svg"), &svg)?;
                let _ = write!(html, "<p>Source: <code>{}</code>. Best {obj_name} {:.4} by {} (trial {}), params <code>{}</code>; {} of {} trials pruned.</p>", chain(t), best["value"].as_f64().unwrap_or(f64::NAN), best["strategy"].as_str().unwrap_or(""), best["trial"], esc(&best["params"].to_string()), pruned.iter().filter(|p| **p).count(), pruned.len());
                let _ = write!(html, "<figure><img alt='best so far' src='data:image/svg+xml;base64,{}'/></figure>", base64(svg.as_bytes()));
                let _ = writeln!(md, "Source: `{}`. Best {obj_name} {:.4} by {} (trial {}), params `{}`.\n\n![best so far](figures/tune_best_so_far.svg)\n", chain(t), best["value"].as_f64().unwrap_or(f64::NAN), best["strategy"].as_str().unwrap_or(""), best["trial"], best["params"]);
                // Each parameter against the objective, as a table (choices and values as tried).
                let params: Vec<String> = trials.get_column_names().iter().filter_map(|c| c.strip_prefix("param_").map(str::to_owned)).collect();
                html.push_str("<table><tr><th>strategy</th><th>trial</th>");
                for p in &params {
                    let _ = write!(html, "<th>{}</th>", esc(p));
                }
                let _ = write!(html, "<th>{obj_name}</th><th>pruned</th></tr>");
                let _ = writeln!(md, "| strategy | {} | {obj_name} | pruned |\n|{}", params.join(" | "), "---|".repeat(params.len() + 3));
                let cols: Vec<Vec<String>> = params.iter().map(|p| strs(&trials, &format!("param_{p}"))).collect::<Result<_>>()?;
                for k in 0..strategy.len() {
                    let _ = write!(html, "<tr><td>{}</td><td>{k}</td>", esc(&strategy[k]));
                    let cells: Vec<String> = cols.iter().map(|c| c[k].clone()).collect();
                    for c in &cells {
                        let _ = write!(html, "<td>{}</td>", esc(c));
                    }
                    let _ = write!(html, "<td>{:.4}</td><td>{}</td></tr>", objective[k], pruned[k]);
                    let _ = writeln!(md, "| {} | {} | {:.4} | {} |", strategy[k], cells.join(" | "), objective[k], pruned[k]);
                }
                html.push_str("</table>");
            }
        }

        // Data.
        let counts = read_parquet(&split.file("counts.parquet"))?;
        let (cn, cc, cs) = (strs(&counts, "split")?, counts.column("cases")?.u64()?.clone(), counts.column("slices")?.u64()?.clone());
        let _ = write!(html, "<h2>Data</h2><p>Patient-level split (<code>{}</code>); augmentation touched the train split only.</p><table><tr><th>split</th><th>patients</th><th>slices</th></tr>", chain(split));
        let _ = writeln!(md, "## Data\n\nPatient-level split (`{}`); augmentation touched the train split only.\n\n| split | patients | slices |\n|---|---|---|", chain(split));
        for i in 0..cn.len() {
            let (a, b) = (cc.get(i).unwrap_or(0), cs.get(i).unwrap_or(0));
            let _ = write!(html, "<tr><td>{}</td><td>{a}</td><td>{b}</td></tr>", cn[i]);
            let _ = writeln!(md, "| {} | {a} | {b} |", cn[i]);
        }
        html.push_str("</table>");
        let q = read_parquet(&ingest.file("quarantine.parquet"))?;
        let dropped = norm.manifest.metrics.get("empty_slices_dropped").cloned().unwrap_or_default();
        let _ = write!(html, "<p>Slices dropped by the slice policy: {dropped}. Quarantined input files: {}.</p>", q.height());
        let _ = writeln!(md, "\nSlices dropped by the slice policy: {dropped}. Quarantined input files: {}.\n", q.height());
        if q.height() > 0 {
            let (qf, qr) = (strs(&q, "file")?, strs(&q, "reason")?);
            html.push_str("<table><tr><th>file</th><th>reason</th></tr>");
            for i in 0..q.height() {
                let _ = write!(html, "<tr><td>{}</td><td>{}</td></tr>", esc(&qf[i]), esc(&qr[i]));
                let _ = writeln!(md, "- `{}`: {}", qf[i], qr[i]);
            }
            html.push_str("</table>");
        }

        // Lineage.
        let _ = write!(html, "<h2>Lineage</h2><p>Every number above comes from these artifacts (stage@key); <code>liverseg lineage STAGE</code> prints each one's params and file hashes.</p><ul>");
        let _ = writeln!(md, "## Lineage\n");
        let mut all: Vec<&Artifact> = ctx.upstream.values().collect();
        all.sort_by(|a, b| a.manifest.started_unix.total_cmp(&b.manifest.started_unix));
        for a in all {
            let line = format!("{} (params {})", chain(a), serde_json::to_string(&a.manifest.params)?);
            let _ = write!(html, "<li><code>{}</code></li>", esc(&line));
            let _ = writeln!(md, "- `{line}`");
        }
        let raw = format!("raw data: {} files, combined blake3 {raw_hash}", ingest.manifest.raw_inputs.len());
        let _ = write!(html, "<li>{}</li></ul></body></html>", esc(&raw));
        let _ = writeln!(md, "- {raw}");
        if models.is_empty() {
            bail!("report: the evaluate artifact lists no models");
        }
        std::fs::write(ctx.out("report.html"), html).context("cannot write report.html")?;
        std::fs::write(ctx.out("report.md"), md).context("cannot write report.md")?;
        Ok(summary)
    }
}
