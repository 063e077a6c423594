//! report: a self-contained HTML report (figures embedded, opens offline) and
//! a Markdown twin, built only from upstream artifacts, with the stage keys
//! behind every number and figure.
//!
//! inputs: ingest, split, evaluate, train, baseline (whichever models exist)
//! outputs: report.html, report.md, figures/*.svg, figures/*.png
//! sections: Table 1, learning curves, examples with Grad-CAM, external
//! validation, hyperparameter search, data, lineage

use anyhow::{bail, Context, Result};
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_engine::store::Artifact;
use liverseg_engine::tables::read_parquet;
use liverseg_engine::tensors::TensorFile;
use polars::prelude::DataFrame;
use std::fmt::Write;

pub const VERSION: u32 = 3;

liverseg_engine::params! {
    pub struct ReportParams {
        title: String = str "'liverseg report'", "report title";
    }
}

pub static INFO: StageInfo = StageInfo {
    name: "report",
    version: VERSION,
    about: "HTML and Markdown report with Table 1, curves, examples, data and lineage",
    inputs: &["ingest", "normalise", "split", "evaluate"],
    optional_inputs: &["train", "baseline", "tune"],
    collects: &[],
    per_dataset: false,
    outputs: &["report.html", "report.md", "figures/"],
    params: ReportParams::SPECS,
    placement: Placement::InProcess,
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

/// A line chart of several series against epoch (or trial), as standalone SVG.
fn line_chart(title: &str, x_label: &str, series: &[(&str, &str, Vec<f64>)]) -> String {
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
    let _ = write!(s, "<text x='{}' y='{}' text-anchor='middle'>{x_label} (1–{})</text>", w / 2.0, h - 8.0, n);
    for (k, (name, colour, v)) in series.iter().enumerate() {
        let pts: Vec<String> = v.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v))).collect();
        let _ = write!(s, "<polyline fill='none' stroke='{colour}' stroke-width='2' points='{}'/>", pts.join(" "));
        // Markers too, so that a one-epoch run still shows its values.
        for p in &pts {
            let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(s, "<circle cx='{cx}' cy='{cy}' r='2.5' fill='{colour}'/>");
        }
        let _ = write!(s, "<text x='{}' y='{}' fill='{colour}'>{}</text>", w - pad - 70.0, pad + 14.0 * k as f64, esc(name));
    }
    s.push_str("</svg>");
    s
}

/// A jet-like colour map for Grad-CAM: blue (0) through green to red (255).
fn heat(v: u8) -> [u8; 3] {
    let t = v as f64 / 255.0;
    let c = |x: f64| ((1.5 - (4.0 * t - x).abs()).clamp(0.0, 1.0) * 255.0) as u8;
    [c(3.0), c(2.0), c(1.0)]
}

/// Image | truth | prediction | Grad-CAM, side by side: truth in green,
/// prediction in red, the liver Grad-CAM map blended over the image.
fn overlay_png(img: &[u8], truth: &[u8], pred: &[u8], cam: Option<&[u8]>, size: usize) -> Result<Vec<u8>> {
    let panels = if cam.is_some() { 4 } else { 3 };
    let mut canvas = image::RgbImage::new(panels * size as u32, size as u32);
    for y in 0..size {
        for x in 0..size {
            let i = y * size + x;
            let g = img[i];
            canvas.put_pixel(x as u32, y as u32, image::Rgb([g, g, g]));
            let t = if truth[i] > 0 { image::Rgb([g / 2, 200, g / 2]) } else { image::Rgb([g, g, g]) };
            canvas.put_pixel((size + x) as u32, y as u32, t);
            let p = if pred[i] > 0 { image::Rgb([220, g / 2, g / 2]) } else { image::Rgb([g, g, g]) };
            canvas.put_pixel((2 * size + x) as u32, y as u32, p);
            if let Some(cam) = cam {
                let h = heat(cam[i]);
                let mix = |k: usize| ((g as u16 + h[k] as u16) / 2) as u8;
                canvas.put_pixel((3 * size + x) as u32, y as u32, image::Rgb([mix(0), mix(1), mix(2)]));
            }
        }
    }
    let mut out = Vec::new();
    canvas.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?;
    Ok(out)
}

/// The objective of every trial against one parameter, as standalone SVG:
/// log scale for positive numbers spanning a decade or more, categories otherwise.
fn scatter_chart(title: &str, xs: &[String], ys: &[f64], pruned: &[bool]) -> String {
    let (w, h, pad) = (300.0, 200.0, 36.0);
    let nums: Option<Vec<f64>> = xs.iter().map(|x| x.trim_matches('"').parse::<f64>().ok()).collect();
    let mut cats: Vec<&str> = xs.iter().map(String::as_str).collect();
    cats.sort();
    cats.dedup();
    let (xpos, ticks): (Vec<f64>, Vec<(f64, String)>) = match nums {
        Some(v) if cats.len() > 4 => {
            let log = v.iter().all(|&x| x > 0.0) && v.iter().cloned().fold(f64::MIN, f64::max) / v.iter().cloned().fold(f64::MAX, f64::min) >= 10.0;
            let t: Vec<f64> = v.iter().map(|&x| if log { x.log10() } else { x }).collect();
            let (lo, hi) = t.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let span = if hi - lo < 1e-12 { 1.0 } else { hi - lo };
            let pos = t.iter().map(|x| (x - lo) / span).collect();
            let fmt = |x: f64| if log { format!("{:.0e}", 10f64.powf(x)) } else { format!("{x:.3}") };
            (pos, vec![(0.0, fmt(lo)), (1.0, fmt(hi))])
        }
        _ => {
            let k = cats.len().max(1);
            let pos = xs.iter().map(|x| (cats.iter().position(|c| c == x).unwrap_or(0) as f64 + 0.5) / k as f64).collect();
            (pos, cats.iter().enumerate().map(|(i, c)| ((i as f64 + 0.5) / k as f64, c.trim_matches('"').to_owned())).collect())
        }
    };
    let fin: Vec<f64> = ys.iter().copied().filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = fin.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if !lo.is_finite() || hi - lo < 1e-9 {
        lo -= 0.5;
        hi += 0.5;
    }
    let x = |f: f64| pad + (w - 2.0 * pad) * f;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * (v - lo) / (hi - lo);
    let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}' font-family='sans-serif' font-size='11'>");
    let _ = write!(s, "<text x='{}' y='14' text-anchor='middle' font-weight='bold'>{}</text>", w / 2.0, esc(title));
    let _ = write!(s, "<line x1='{pad}' y1='{}' x2='{}' y2='{}' stroke='#444'/><line x1='{pad}' y1='{pad}' x2='{pad}' y2='{}' stroke='#444'/>", h - pad, w - pad, h - pad, h - pad);
    let _ = write!(s, "<text x='4' y='{}'>{hi:.3}</text><text x='4' y='{}'>{lo:.3}</text>", pad + 4.0, h - pad);
    for (f, label) in &ticks {
        let _ = write!(s, "<text x='{:.1}' y='{}' text-anchor='middle'>{}</text>", x(*f), h - pad + 14.0, esc(label));
    }
    for i in 0..ys.len().min(xpos.len()) {
        if ys[i].is_finite() {
            let colour = if pruned.get(i).copied().unwrap_or(false) { "#999" } else { "#1f77b4" };
            let _ = write!(s, "<circle cx='{:.1}' cy='{:.1}' r='4' fill='{colour}' fill-opacity='0.8'/>", x(xpos[i]), y(ys[i]));
        }
    }
    s.push_str("</svg>");
    s
}

/// One table row, in the HTML and in the Markdown twin.
fn table_row(html: &mut String, md: &mut String, cells: &[String]) {
    html.push_str("<tr>");
    for c in cells {
        let _ = write!(html, "<td>{}</td>", esc(c));
    }
    html.push_str("</tr>");
    let _ = writeln!(md, "| {} |", cells.join(" | "));
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
        let p: ReportParams = ctx.params.typed()?;
        let title = p.title.as_str();
        let ingest = ctx.upstream("ingest")?;
        let norm = ctx.upstream("normalise")?;
        let split = ctx.upstream("split")?;
        let eval = ctx.upstream("evaluate")?;
        let figures = ctx.out("figures");
        std::fs::create_dir_all(&figures)?;
        let mut html = String::new();
        let mut md = String::new();
        let chain = |a: &Artifact| -> String {
            let mut parts = vec![key_line(a)];
            for (d, k) in &a.manifest.upstream {
                parts.push(format!("{d}@{k}"));
            }
            parts.join(" ← ")
        };
        let _ = write!(html, "<!doctype html><html><head><meta charset='utf-8'><title>{0}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}th{{background:#eee}}td:first-child{{text-align:left}}code{{font-size:90%;overflow-wrap:anywhere}}figure{{display:inline-block;margin:4px}}</style></head><body><h1>{0}</h1>", esc(title));
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
            table_row(&mut html, &mut md, &cells);
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
                let svg = line_chart(&format!("{m}: {name}"), "epoch", &[("train", "#1f77b4", f64s(&df, tr)?), ("validation", "#d62728", f64s(&df, va)?)]);
                let file = format!("{m}_{}.svg", tr.trim_start_matches("train_"));
                std::fs::write(figures.join(&file), &svg)?;
                let _ = write!(html, "<figure><img alt='{m} {name}' src='data:image/svg+xml;base64,{}'/></figure>", base64(svg.as_bytes()));
                let _ = writeln!(md, "![{m} {name}](figures/{file})");
            }
        }

        // Qualitative: evaluate's best, median and worst cases per model, with Grad-CAM.
        let data = TensorFile::open(&norm.file("data.safetensors"))?;
        let (shape, images) = data.u8("images")?;
        let (_, masks) = data.u8("masks")?;
        let size = shape[1];
        let px = size * size;
        let _ = write!(html, "<h2>Examples: best, median and worst {split_name} patients</h2><p>Left to right: image, ground truth (green), prediction (red), and the Grad-CAM map of the liver class at the encoder's last stage (blue low, red high; the study's Figure 5); the slice with the most liver of each patient. Source: <code>{}</code>.</p>", key_line(eval));
        let _ = writeln!(md, "\n## Examples: best, median and worst {split_name} patients\n\nImage, ground truth (green), prediction (red), liver Grad-CAM (blue low, red high). Source: `{}`.\n", key_line(eval));
        let ex = read_parquet(&eval.file("examples.parquet"))?;
        let (ex_model, ex_label, ex_case, ex_dice) = (strs(&ex, "model")?, strs(&ex, "label")?, strs(&ex, "case_id")?, f64s(&ex, "dice")?);
        let ex_idx: Vec<u64> = ex.column("idx")?.u64()?.iter().map(|v| v.unwrap_or(0)).collect();
        let ex_pos: Vec<u64> = ex.column("position")?.u64()?.iter().map(|v| v.unwrap_or(0)).collect();
        for m in &models {
            let preds = TensorFile::open(&eval.file(&format!("predictions/{m}.safetensors")))?;
            let (_, pred) = preds.u8("predictions")?;
            let cams = TensorFile::open(&eval.file(&format!("gradcam/{m}.safetensors")))?;
            let (_, cam) = cams.u8("gradcam")?;
            for (j, i) in (0..ex_model.len()).filter(|&i| &ex_model[i] == m).enumerate() {
                let (idx, k) = (ex_idx[i] as usize, ex_pos[i] as usize);
                if (idx + 1) * px > images.len() || (k + 1) * px > pred.len() || (j + 1) * px > cam.len() {
                    bail!("{}: examples.parquet points outside the stored tensors", eval.dir.display());
                }
                let png = overlay_png(&images[idx * px..(idx + 1) * px], &masks[idx * px..(idx + 1) * px], &pred[k * px..(k + 1) * px], Some(&cam[j * px..(j + 1) * px]), size)?;
                let file = format!("{m}_{}.png", ex_label[i]);
                std::fs::write(figures.join(&file), &png)?;
                let cap = format!("{m}, {}: patient {}, Dice {:.3}", ex_label[i], ex_case[i], ex_dice[i]);
                let _ = write!(html, "<figure><img alt='{}' src='data:image/png;base64,{}' width='{}'/><figcaption>{}</figcaption></figure>", esc(&cap), base64(&png), 4 * size.max(128), esc(&cap));
                let _ = writeln!(md, "![{cap}](figures/{file})  \n{cap}\n");
            }
        }

        // External validation.
        let external: Vec<String> = eval.manifest.metrics.get("external").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default();
        let _ = write!(html, "<h2>External validation</h2>");
        let _ = writeln!(md, "## External validation\n");
        if external.is_empty() {
            let _ = write!(html, "<p>No <code>external:</code> datasets in pipeline.yaml; <code>liverseg evaluate --model M --data DIR</code> evaluates one on demand.</p>");
            let _ = writeln!(md, "No `external:` datasets in pipeline.yaml; `liverseg evaluate --model M --data DIR` evaluates one on demand.\n");
        }
        for name in &external {
            let t = read_parquet(&eval.file(&format!("external/{name}/table1.parquet")))?;
            let ext_models = strs(&t, "model")?;
            let cols: Vec<Vec<f64>> = ["dice_per_case", "dice_per_case_ci_low", "dice_per_case_ci_high", "dice_global", "liver_iou", "miou", "pixel_accuracy", "hd95_mean"].iter().map(|c| f64s(&t, c)).collect::<Result<_>>()?;
            let cases = eval.manifest.metrics.get(&format!("external.{name}.cases")).cloned().unwrap_or_default();
            let slices = eval.manifest.metrics.get(&format!("external.{name}.slices")).cloned().unwrap_or_default();
            let eunit = eval.manifest.metrics.get(&format!("external.{name}.hd95_unit")).and_then(|v| v.as_str()).unwrap_or("px").to_owned();
            let src = eval.manifest.upstream.get(&format!("normalise.{name}")).map(|k| format!("normalise.{name}@{k}")).unwrap_or_default();
            let head = ["model", "Dice per case [95% CI]", "Dice global", "liver IoU", "mIoU", "pixel acc.", &format!("HD95 ({eunit})")];
            let _ = write!(html, "<h3>{}</h3><p>{cases} cases, {slices} slices, every slice, the models' own preprocessing. Source: <code>{}</code>, data <code>{}</code>.</p><table><tr>", esc(name), key_line(eval), esc(&src));
            for hcol in head {
                let _ = write!(html, "<th>{}</th>", esc(hcol));
            }
            html.push_str("</tr>");
            let _ = writeln!(md, "### {name}\n\n{cases} cases, {slices} slices. Source: `{}`, data `{src}`.\n\n| {} |\n|{}", key_line(eval), head.join(" | "), "---|".repeat(head.len()));
            for (i, m) in ext_models.iter().enumerate() {
                let cells = [m.clone(), format!("{:.4} [{:.4}, {:.4}]", cols[0][i], cols[1][i], cols[2][i]), format!("{:.4}", cols[3][i]), format!("{:.4}", cols[4][i]), format!("{:.4}", cols[5][i]), format!("{:.4}", cols[6][i]), format!("{:.2}", cols[7][i])];
                table_row(&mut html, &mut md, &cells);
                summary.insert(format!("external.{name}.{m}.dice_per_case"), serde_json::json!(cols[0][i]));
            }
            html.push_str("</table>");
            let _ = writeln!(md);
        }

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
                let svg = line_chart(&format!("best {obj_name} so far"), "trial", &series);
                std::fs::write(figures.join("tune_best_so_far.svg"), &svg)?;
                let _ = write!(html, "<p>Source: <code>{}</code>. Best {obj_name} {:.4} by {} (trial {}), params <code>{}</code>; {} of {} trials pruned.</p>", chain(t), best["value"].as_f64().unwrap_or(f64::NAN), best["strategy"].as_str().unwrap_or(""), best["trial"], esc(&best["params"].to_string()), pruned.iter().filter(|p| **p).count(), pruned.len());
                let _ = write!(html, "<figure><img alt='best so far' src='data:image/svg+xml;base64,{}'/></figure>", base64(svg.as_bytes()));
                let _ = writeln!(md, "Source: `{}`. Best {obj_name} {:.4} by {} (trial {}), params `{}`.\n\n![best so far](figures/tune_best_so_far.svg)\n", chain(t), best["value"].as_f64().unwrap_or(f64::NAN), best["strategy"].as_str().unwrap_or(""), best["trial"], best["params"]);
                // Each parameter against the objective: one scatter per parameter (grey = pruned), then every trial.
                let params: Vec<String> = trials.get_column_names().iter().filter_map(|c| c.strip_prefix("param_").map(str::to_owned)).collect();
                let trial_no: Vec<u64> = trials.column("trial")?.u64()?.iter().map(|v| v.unwrap_or(0)).collect();
                for p in &params {
                    let svg = scatter_chart(&format!("{obj_name} vs {p}"), &strs(&trials, &format!("param_{p}"))?, &objective, &pruned);
                    let file = format!("tune_{p}.svg");
                    std::fs::write(figures.join(&file), &svg)?;
                    let _ = write!(html, "<figure><img alt='{obj_name} vs {}' src='data:image/svg+xml;base64,{}'/></figure>", esc(p), base64(svg.as_bytes()));
                    let _ = writeln!(md, "![{obj_name} vs {p}](figures/{file})");
                }
                let _ = writeln!(md);
                html.push_str("<table><tr><th>strategy</th><th>trial</th>");
                for p in &params {
                    let _ = write!(html, "<th>{}</th>", esc(p));
                }
                let _ = write!(html, "<th>{obj_name}</th><th>pruned</th></tr>");
                let _ = writeln!(md, "| strategy | trial | {} | {obj_name} | pruned |\n|{}", params.join(" | "), "---|".repeat(params.len() + 4));
                let cols: Vec<Vec<String>> = params.iter().map(|p| strs(&trials, &format!("param_{p}"))).collect::<Result<_>>()?;
                for k in 0..strategy.len() {
                    let _ = write!(html, "<tr><td>{}</td><td>{}</td>", esc(&strategy[k]), trial_no[k]);
                    // Values as tried, to 4 significant digits; choices as written.
                    let cells: Vec<String> = cols.iter().map(|c| match c[k].parse::<f64>() {
                        Ok(v) if c[k].contains(['.', 'e']) => format!("{v:.3e}"),
                        _ => c[k].trim_matches('"').to_owned(),
                    }).collect();
                    for c in &cells {
                        let _ = write!(html, "<td>{}</td>", esc(c));
                    }
                    let _ = write!(html, "<td>{:.4}</td><td>{}</td></tr>", objective[k], pruned[k]);
                    let _ = writeln!(md, "| {} | {} | {} | {:.4} | {} |", strategy[k], trial_no[k], cells.join(" | "), objective[k], pruned[k]);
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
        // Every artifact behind the report, walked through the manifests down to
        // the source stages (external datasets included), oldest first.
        let all = ctx.lineage()?;
        for a in &all {
            let line = format!("{} (params {})", chain(a), serde_json::to_string(&a.manifest.params)?);
            let _ = write!(html, "<li><code>{}</code></li>", esc(&line));
            let _ = writeln!(md, "- `{line}`");
        }
        for a in all.iter().filter(|a| a.manifest.upstream.is_empty()) {
            let mut h = blake3::Hasher::new();
            for r in &a.manifest.raw_inputs {
                h.update(r.path.as_bytes());
                h.update(r.blake3.as_bytes());
            }
            let raw = if a.manifest.raw_inputs.is_empty() {
                format!("raw data of {}: none; generated from its params (synthetic phantoms)", key_line(a))
            } else {
                format!("raw data of {}: {} files, combined blake3 {}", key_line(a), a.manifest.raw_inputs.len(), &h.finalize().to_hex()[..16])
            };
            let _ = write!(html, "<li>{}</li>", esc(&raw));
            let _ = writeln!(md, "- {raw}");
        }
        html.push_str("</ul></body></html>");
        if models.is_empty() {
            bail!("report: the evaluate artifact lists no models");
        }
        std::fs::write(ctx.out("report.html"), html).context("cannot write report.html")?;
        std::fs::write(ctx.out("report.md"), md).context("cannot write report.md")?;
        Ok(summary)
    }
}
