//! report: a self-contained HTML report (figures embedded, opens offline) and
//! a Markdown twin, built only from upstream artifacts, with the stage keys
//! behind every number and figure.
//!
//! inputs: ingest, split, evaluate, train, baseline (whichever models exist)
//! outputs: report.html, report.md, figures/*.svg, figures/*.png
//! sections: Table 1, learning curves, examples with Grad-CAM, external
//! validation, hyperparameter search, data, lineage

use crate::tune::TuneBest;
use anyhow::{bail, Context, Result};
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_engine::store::Artifact;
use liverseg_engine::tables::read_parquet;
use liverseg_engine::tensors::TensorFile;
use liverseg_metrics::INTENSITY_SHIFT_WARN;
use polars::prelude::DataFrame;
use std::collections::BTreeMap;
use std::fmt::Write;

/// 4: Table 1 with n, CI rule, HD95 rule, training columns; one search per tuned model.
/// 6: Table 1's params as wrapping text (the JSON ran off the page).
/// 7: each model's input scaling under Table 1.
/// 8: a banner at the top when the models learnt from synthetic phantoms.
/// 9: a per-case Dice strip plot; outlines and FP/FN maps in the examples;
/// wider charts with legends beside the plot.
/// 10: the external tables give the inputs' intensity distance.
pub const VERSION: u32 = 10;

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
    collects: &["tune"],
    per_dataset: false,
    dataset_requires: &[],
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

/// A column of any type as text (trial params are typed columns).
fn cells(df: &DataFrame, col: &str) -> Result<Vec<String>> {
    let c = df.column(col)?;
    Ok((0..c.len()).map(|i| c.get(i).map(|v| v.to_string().trim_matches('"').to_owned()).unwrap_or_default()).collect())
}

/// Table 1's params (a JSON object in the table) as short text that wraps:
/// `lr 0.00272, batch_size 8, optimizer adam, ...`.
fn params_text(json: &str) -> String {
    let Ok(serde_json::Value::Object(m)) = serde_json::from_str(json) else { return json.to_owned() };
    let value = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) if n.is_f64() => n.as_f64().map(|f| if f.abs() >= 1e-2 { format!("{f:.3}") } else { format!("{f:.2e}") }).unwrap_or_default(),
        other => other.to_string(),
    };
    m.iter().map(|(k, v)| format!("{k} {}", value(v))).collect::<Vec<_>>().join(", ")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Pixels a legend or label of `n` characters takes at font-size 12.
fn text_width(text: &str) -> f64 {
    7.0 * text.chars().count() as f64
}

/// Round ticks (steps of 1, 2 or 5 times a power of ten) between lo and hi.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let rough = (hi - lo) / 5.0;
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|s| *s >= rough).unwrap_or(10.0 * power);
    let first = (lo / step).ceil() as i64;
    (first..).map(|k| k as f64 * step).take_while(|t| *t <= hi + 1e-12).take(12).collect()
}

/// The frame of a chart: title, y axis with ticks and grid lines, and the
/// legend (a line per series) to the right of the plot, never over it.
struct Frame {
    plot_w: f64,
    h: f64,
    left: f64,
    top: f64,
    lo: f64,
    hi: f64,
}

impl Frame {
    const PLOT_H: f64 = 260.0;

    fn new(values: impl Iterator<Item = f64>, plot_w: f64) -> Self {
        let (mut lo, mut hi) = values.filter(|v| v.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
        if !lo.is_finite() || hi - lo < 1e-9 {
            (lo, hi) = (lo.min(0.0) - 0.5, hi.max(0.0) + 0.5);
        }
        let margin = (hi - lo) * 0.05;
        Frame { plot_w, h: Self::PLOT_H + 100.0, left: 60.0, top: 30.0, lo: lo - margin, hi: hi + margin }
    }

    fn y(&self, v: f64) -> f64 {
        self.top + Self::PLOT_H * (1.0 - (v - self.lo) / (self.hi - self.lo))
    }

    /// The SVG up to the plot's contents; `legend` entries as (label, colour, dashed).
    fn open(&self, title: &str, x_label: &str, legend: &[(String, &str, bool)]) -> String {
        let legend_w = legend.iter().map(|(l, _, _)| text_width(l)).fold(0.0, f64::max) + 40.0;
        let w = self.left + self.plot_w + 20.0 + legend_w;
        let h = self.h.max(self.top + 20.0 * legend.len() as f64 + 20.0);
        let (x0, x1, y1) = (self.left, self.left + self.plot_w, self.top + Self::PLOT_H);
        let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w:.0}' height='{h:.0}' viewBox='0 0 {w:.0} {h:.0}' font-family='sans-serif' font-size='12'>");
        let _ = write!(s, "<rect width='100%' height='100%' fill='white'/><text x='{:.1}' y='18' text-anchor='middle' font-weight='bold' font-size='14'>{}</text>", x0 + self.plot_w / 2.0, esc(title));
        for t in ticks(self.lo, self.hi) {
            let y = self.y(t);
            let _ = write!(s, "<line x1='{x0}' y1='{y:.1}' x2='{x1}' y2='{y:.1}' stroke='#ddd'/><text x='{:.1}' y='{:.1}' text-anchor='end'>{}</text>", x0 - 6.0, y + 4.0, tick_label(t));
        }
        let _ = write!(s, "<line x1='{x0}' y1='{y1}' x2='{x1}' y2='{y1}' stroke='#444'/><line x1='{x0}' y1='{}' x2='{x0}' y2='{y1}' stroke='#444'/>", self.top);
        let _ = write!(s, "<text x='{:.1}' y='{:.1}' text-anchor='middle'>{}</text>", x0 + self.plot_w / 2.0, y1 + 54.0, esc(x_label));
        for (k, (label, colour, dashed)) in legend.iter().enumerate() {
            let (lx, ly) = (x1 + 20.0, self.top + 10.0 + 20.0 * k as f64);
            let dash = if *dashed { " stroke-dasharray='6 4'" } else { "" };
            let _ = write!(s, "<line x1='{lx}' y1='{ly}' x2='{}' y2='{ly}' stroke='{colour}' stroke-width='3'{dash}/><text x='{}' y='{}'>{}</text>", lx + 24.0, lx + 30.0, ly + 4.0, esc(label));
        }
        s
    }
}

fn tick_label(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A line chart of several series against epoch (or trial), as standalone
/// SVG, its legend beside the plot. Series: (label, colour, dashed, values).
fn line_chart(title: &str, x_label: &str, series: &[(&str, &str, Vec<f64>)]) -> String {
    let dashed: Vec<(&str, &str, bool, Vec<f64>)> = series.iter().map(|(l, c, v)| (*l, *c, false, v.clone())).collect();
    line_chart_styled(title, x_label, &dashed)
}

fn line_chart_styled(title: &str, x_label: &str, series: &[(&str, &str, bool, Vec<f64>)]) -> String {
    let n = series.iter().map(|s| s.3.len()).max().unwrap_or(0).max(2);
    let f = Frame::new(series.iter().flat_map(|s| s.3.iter().copied()), 520.0);
    let x = |i: usize| f.left + f.plot_w * i as f64 / (n - 1) as f64;
    let legend: Vec<(String, &str, bool)> = series.iter().map(|(l, c, d, _)| (l.to_string(), *c, *d)).collect();
    let mut s = f.open(title, &format!("{x_label} (1–{n})"), &legend);
    for i in [0, (n - 1) / 2, n - 1] {
        let _ = write!(s, "<text x='{:.1}' y='{:.1}' text-anchor='middle'>{}</text>", x(i), f.top + Frame::PLOT_H + 18.0, i + 1);
    }
    for (_, colour, dashed, v) in series {
        let pts: Vec<(f64, f64)> = v.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (x(i), f.y(v))).collect();
        let dash = if *dashed { " stroke-dasharray='6 4'" } else { "" };
        let line: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        let _ = write!(s, "<polyline fill='none' stroke='{colour}' stroke-width='2'{dash} points='{}'/>", line.join(" "));
        // Markers too, so that a one-epoch run still shows its values.
        for (cx, cy) in &pts {
            let _ = write!(s, "<circle cx='{cx:.1}' cy='{cy:.1}' r='2.5' fill='{colour}'/>");
        }
    }
    s.push_str("</svg>");
    s
}

/// Per-case values of several groups (a model on a source, or a run): each
/// case a dot, spread sideways so none hides another, over a box of the
/// quartiles with the median; the group's n under its label.
fn strip_chart(title: &str, y_label: &str, groups: &[(String, &str, Vec<f64>)]) -> String {
    let col = 110.0f64.max(groups.iter().map(|g| text_width(&g.0) + 10.0).fold(0.0, f64::max));
    let f = Frame::new(groups.iter().flat_map(|g| g.2.iter().copied()).chain([0.0, 1.0]), col * groups.len().max(1) as f64);
    let mut s = f.open(title, y_label, &[]);
    for (k, (label, colour, v)) in groups.iter().enumerate() {
        let cx = f.left + col * (k as f64 + 0.5);
        let mut sorted: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let _ = write!(
            s,
            "<text x='{cx:.1}' y='{:.1}' text-anchor='middle'>{}</text><text x='{cx:.1}' y='{:.1}' text-anchor='middle' fill='#666'>n = {}</text>",
            f.top + Frame::PLOT_H + 18.0,
            esc(label),
            f.top + Frame::PLOT_H + 32.0,
            sorted.len()
        );
        if let (Some(&first), Some(&last)) = (sorted.first(), sorted.last()) {
            let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
            let (q1, med, q3) = (f.y(q(0.25)), f.y(q(0.5)), f.y(q(0.75)));
            let _ = write!(s, "<line x1='{cx:.1}' y1='{:.1}' x2='{cx:.1}' y2='{:.1}' stroke='#888'/>", f.y(first), f.y(last));
            let _ = write!(s, "<rect x='{:.1}' y='{q3:.1}' width='40' height='{:.1}' fill='{colour}' fill-opacity='0.15' stroke='{colour}'/>", cx - 20.0, (q1 - q3).max(1.0));
            let _ = write!(s, "<line x1='{:.1}' y1='{med:.1}' x2='{:.1}' y2='{med:.1}' stroke='{colour}' stroke-width='3'/>", cx - 20.0, cx + 20.0);
        }
        for (i, &d) in v.iter().enumerate().filter(|(_, d)| d.is_finite()) {
            // A fixed spread by index: the same input draws the same figure.
            let dx = ((i * 37) % 11) as f64 * 3.0 - 15.0;
            let _ = write!(s, "<circle cx='{:.1}' cy='{:.1}' r='3.5' fill='{colour}' fill-opacity='0.75'/>", cx + dx, f.y(d));
        }
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

/// Image | contours | errors | Grad-CAM, side by side: the truth's outline
/// in green and the prediction's in red over the image; then each pixel
/// by outcome (agreed liver green, false positive red, false negative
/// blue); then the liver Grad-CAM map blended over the image.
fn overlay_png(img: &[u8], truth: &[u8], pred: &[u8], cam: Option<&[u8]>, size: usize) -> Result<Vec<u8>> {
    let panels = if cam.is_some() { 4 } else { 3 };
    let mut canvas = image::RgbImage::new(panels * size as u32, size as u32);
    let edge = |m: &[u8], x: usize, y: usize| {
        let inside = |x: usize, y: usize| m[y * size + x] > 0;
        inside(x, y) && (x == 0 || y == 0 || x + 1 == size || y + 1 == size || !inside(x - 1, y) || !inside(x + 1, y) || !inside(x, y - 1) || !inside(x, y + 1))
    };
    for y in 0..size {
        for x in 0..size {
            let i = y * size + x;
            let g = img[i];
            canvas.put_pixel(x as u32, y as u32, image::Rgb([g, g, g]));
            let outline = match (edge(truth, x, y), edge(pred, x, y)) {
                (_, true) => image::Rgb([255, 40, 40]),
                (true, false) => image::Rgb([40, 230, 40]),
                _ => image::Rgb([g, g, g]),
            };
            canvas.put_pixel((size + x) as u32, y as u32, outline);
            let dim = g / 2;
            let outcome = match (truth[i] > 0, pred[i] > 0) {
                (true, true) => image::Rgb([dim, 200, dim]),
                (false, true) => image::Rgb([230, dim, dim]),
                (true, false) => image::Rgb([dim, dim, 240]),
                (false, false) => image::Rgb([dim, dim, dim]),
            };
            canvas.put_pixel((2 * size + x) as u32, y as u32, outcome);
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
            let fmt = |x: f64| {
                if log {
                    format!("{:.0e}", 10f64.powf(x))
                } else {
                    format!("{x:.3}")
                }
            };
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

/// The report as it is written: every call adds to the HTML and to its
/// Markdown twin, so the two cannot drift apart.
struct Doc {
    html: String,
    md: String,
    figures: std::path::PathBuf,
}

impl Doc {
    fn new(title: &str, figures: std::path::PathBuf) -> Self {
        let mut d = Doc { html: String::new(), md: String::new(), figures };
        let _ = write!(d.html, "<!doctype html><html><head><meta charset='utf-8'><title>{0}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}th{{background:#eee}}td:first-child{{text-align:left}}code{{font-size:90%;overflow-wrap:anywhere}}figure{{display:inline-block;margin:4px}}</style></head><body><h1>{0}</h1>", esc(title));
        let _ = writeln!(d.md, "# {title}\n");
        d
    }

    fn heading(&mut self, level: usize, text: &str) {
        let _ = write!(self.html, "<h{level}>{}</h{level}>", esc(text));
        let _ = writeln!(self.md, "\n{} {text}\n", "#".repeat(level));
    }

    /// A paragraph; `code` spans are written as code in both.
    fn para(&mut self, parts: &[Text]) {
        self.html.push_str("<p>");
        for part in parts {
            match part {
                Text::Plain(t) => self.html.push_str(&esc(t)),
                Text::Code(t) => {
                    let _ = write!(self.html, "<code>{}</code>", esc(t));
                }
            }
        }
        self.html.push_str("</p>");
        let md: String = parts
            .iter()
            .map(|p| match p {
                Text::Plain(t) => t.clone(),
                Text::Code(t) => format!("`{t}`"),
            })
            .collect();
        let _ = writeln!(self.md, "{md}\n");
    }

    fn table(&mut self, head: &[&str], rows: &[Vec<String>]) {
        self.html.push_str("<table><tr>");
        for h in head {
            let _ = write!(self.html, "<th>{}</th>", esc(h));
        }
        self.html.push_str("</tr>");
        let _ = writeln!(self.md, "| {} |\n|{}", head.join(" | "), "---|".repeat(head.len()));
        for cells in rows {
            self.html.push_str("<tr>");
            for c in cells {
                let _ = write!(self.html, "<td>{}</td>", esc(c));
            }
            self.html.push_str("</tr>");
            let _ = writeln!(self.md, "| {} |", cells.join(" | "));
        }
        self.html.push_str("</table>");
        self.md.push('\n');
    }

    /// A figure file under figures/, embedded in the HTML and linked from the Markdown.
    fn figure(&mut self, file: &str, bytes: &[u8], mime: &str, alt: &str, caption: Option<&str>, width: Option<usize>) -> Result<()> {
        let path = self.figures.join(file);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        let width = width.map(|w| format!(" width='{w}'")).unwrap_or_default();
        let _ = write!(self.html, "<figure><img alt='{}' src='data:{mime};base64,{}'{width}/>", esc(alt), base64(bytes));
        match caption {
            Some(c) => {
                let _ = write!(self.html, "<figcaption>{}</figcaption></figure>", esc(c));
                let _ = writeln!(self.md, "![{alt}](figures/{file})  \n{c}\n");
            }
            None => {
                self.html.push_str("</figure>");
                let _ = writeln!(self.md, "![{alt}](figures/{file})");
            }
        }
        Ok(())
    }

    fn list(&mut self, items: &[Text]) {
        self.html.push_str("<ul>");
        for item in items {
            match item {
                Text::Code(t) => {
                    let _ = write!(self.html, "<li><code>{}</code></li>", esc(t));
                    let _ = writeln!(self.md, "- `{t}`");
                }
                Text::Plain(t) => {
                    let _ = write!(self.html, "<li>{}</li>", esc(t));
                    let _ = writeln!(self.md, "- {t}");
                }
            }
        }
        self.html.push_str("</ul>");
    }

    /// A warning box above everything else.
    fn banner(&mut self, text: &str) {
        let _ = write!(self.html, "<div role='alert' style='border:2px solid #c00;background:#fee;padding:0.6em 1em;margin:1em 0;font-weight:bold'>{}</div>", esc(text));
        let _ = writeln!(self.md, "> **Warning:** {text}\n");
    }

    fn finish(mut self, out: &std::path::Path) -> Result<()> {
        self.html.push_str("</body></html>");
        std::fs::write(out.join("report.html"), self.html).context("cannot write report.html")?;
        std::fs::write(out.join("report.md"), self.md).context("cannot write report.md")
    }
}

enum Text {
    Plain(String),
    Code(String),
}

fn plain(s: impl Into<String>) -> Text {
    Text::Plain(s.into())
}

fn code(s: impl Into<String>) -> Text {
    Text::Code(s.into())
}

/// An artifact and the keys it was built from: `evaluate@k ← normalise@k2 ...`.
fn chain(a: &Artifact) -> String {
    let mut parts = vec![key_line(a)];
    for (d, k) in &a.manifest.upstream {
        parts.push(format!("{d}@{k}"));
    }
    parts.join(" ← ")
}

fn metric_str(a: &Artifact, key: &str, default: &str) -> String {
    a.manifest.metrics.get(key).and_then(|v| v.as_str()).unwrap_or(default).to_owned()
}

impl Stage for Report {
    fn info(&self) -> &'static StageInfo {
        &INFO
    }

    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p: ReportParams = ctx.params.typed()?;
        let eval = ctx.upstream("evaluate")?;
        let figures = ctx.out("figures");
        std::fs::create_dir_all(&figures).with_context(|| format!("cannot create {}", figures.display()))?;
        let mut doc = Doc::new(&p.title, ctx.out("figures"));
        if let Some(d) = crate::train::TrainingData::from_lineage(ctx)?.filter(|d| d.phantoms()) {
            doc.banner(&format!(
                "These models were trained and evaluated on synthetic phantoms ({} generated cases), not on CT. The figures below test the pipeline, not liver segmentation; do not use these models on real scans.",
                d.cases
            ));
        }
        let mut summary = Summary::new();
        let models = table1(&mut doc, ctx, eval, &mut summary)?;
        if models.is_empty() {
            bail!("report: the evaluate artifact lists no models");
        }
        per_case_plot(&mut doc, eval, &models)?;
        curves(&mut doc, ctx, &models)?;
        examples(&mut doc, eval, &models)?;
        inference_options(&mut doc, eval)?;
        simulated_exports(&mut doc, eval)?;
        external(&mut doc, eval, &mut summary)?;
        search(&mut doc, ctx)?;
        data(&mut doc, ctx)?;
        lineage(&mut doc, ctx)?;
        doc.finish(ctx.out_dir)?;
        Ok(summary)
    }
}

/// A table1.parquet as rows of cells by column name.
struct Table1 {
    df: DataFrame,
}

impl Table1 {
    fn read(path: &std::path::Path) -> Result<Self> {
        Ok(Table1 { df: read_parquet(path)? })
    }
    fn models(&self) -> Result<Vec<String>> {
        strs(&self.df, "model")
    }
    fn f(&self, col: &str, i: usize) -> f64 {
        self.df.column(col).ok().and_then(|c| c.f64().ok()?.get(i)).unwrap_or(f64::NAN)
    }
    fn i(&self, col: &str, i: usize) -> Option<i64> {
        self.df.column(col).ok().and_then(|c| c.i64().ok()?.get(i))
    }
    fn s(&self, col: &str, i: usize) -> String {
        self.df.column(col).ok().and_then(|c| c.str().ok()?.get(i).map(str::to_owned)).unwrap_or_default()
    }
    /// Per-case Dice with its CI, or with n alone below the CI's threshold.
    fn dice_per_case(&self, i: usize) -> String {
        let (m, lo, hi) = (self.f("dice_per_case", i), self.f("dice_per_case_ci_low", i), self.f("dice_per_case_ci_high", i));
        if lo.is_finite() {
            format!("{m:.4} [{lo:.4}, {hi:.4}]")
        } else {
            format!("{m:.4} (no CI under {} cases)", crate::evaluate::MIN_CASES_FOR_CI)
        }
    }
    fn hd95(&self, i: usize) -> String {
        let n = self.i("hd95_one_empty_cases", i).unwrap_or(0);
        if n > 0 {
            format!("{:.2} ({n} one-empty)", self.f("hd95_mean", i))
        } else {
            format!("{:.2}", self.f("hd95_mean", i))
        }
    }
}

/// Table 1: the study's metrics beside per-case Dice, HD95 and how each
/// model was trained. Returns the models.
fn table1(doc: &mut Doc, ctx: &StageContext, eval: &Artifact, summary: &mut Summary) -> Result<Vec<String>> {
    let t = Table1::read(&eval.file("table1.parquet"))?;
    let models = t.models()?;
    let unit = metric_str(eval, "hd95_unit", "px");
    let split_name = metric_str(eval, "split", "test");
    let (loss, hd95) = (format!("{split_name} CE loss (model grid)"), format!("HD95 ({unit})"));
    let head = [
        "model",
        "cases",
        "mIoU",
        "pixel acc.",
        loss.as_str(),
        "Dice per case [95% CI]",
        "Dice per slice",
        "liver IoU",
        "Dice global",
        hd95.as_str(),
        "train loss",
        "epochs (stop)",
        "params used",
        "train time (s)",
        "parameters",
    ];
    doc.heading(2, &format!("Table 1: {split_name} split"));
    doc.para(&[plain(format!("As in the study: mIoU (background and liver), pixel accuracy and loss (cross-entropy on the model's input grid); beside them, scored on each case's original grid: Dice per case (with a bootstrap 95% CI from {} cases up), Dice per slice (slices empty in both prediction and truth are skipped and counted), liver IoU, global Dice and HD95 (MONAI's definition; a case where exactly one of prediction and truth is empty counts the grid's diagonal, and the count is shown), then each model's training: training loss at its best epoch, epochs run and why it stopped, and the params it ran with. Source: ", crate::evaluate::MIN_CASES_FOR_CI)), code(chain(eval)), plain(".")]);
    let mut rows = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let train_secs = ctx.upstream.get(m).and_then(|a| a.manifest.metrics.get("train_seconds")).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        let skipped = t.i("slices_both_empty", i).unwrap_or(0);
        rows.push(vec![
            m.clone(),
            t.i("cases", i).map(|n| n.to_string()).unwrap_or_default(),
            format!("{:.4}", t.f("miou", i)),
            format!("{:.4}", t.f("pixel_accuracy", i)),
            format!("{:.4}", t.f("loss", i)),
            t.dice_per_case(i),
            if skipped > 0 { format!("{:.4} ({skipped} empty skipped)", t.f("dice_per_slice", i)) } else { format!("{:.4}", t.f("dice_per_slice", i)) },
            format!("{:.4}", t.f("liver_iou", i)),
            format!("{:.4}", t.f("dice_global", i)),
            t.hd95(i),
            format!("{:.4}", t.f("train_loss", i)),
            format!("{} ({})", t.i("epochs_run", i).map(|e| e.to_string()).unwrap_or_default(), t.s("stop_reason", i).replace('_', " ")),
            params_text(&t.s("params_used", i)),
            format!("{train_secs:.0}"),
            t.i("parameters", i).unwrap_or(0).to_string(),
        ]);
        summary.insert(format!("{m}.dice_per_case"), serde_json::json!(t.f("dice_per_case", i)));
        summary.insert(format!("{m}.miou"), serde_json::json!(t.f("miou", i)));
    }
    doc.table(&head, &rows);
    input_scaling(doc, ctx, &models)?;
    Ok(models)
}

/// Which input scaling each model uses, with its statistics, from its card.
fn input_scaling(doc: &mut Doc, ctx: &StageContext, models: &[String]) -> Result<()> {
    let mut items = Vec::new();
    for m in models {
        let Some(a) = ctx.upstream.get(m) else { continue };
        let card: crate::train::ModelCard = serde_json::from_slice(&std::fs::read(a.file("model.json"))?).with_context(|| format!("{}: model.json", a.dir.display()))?;
        let window = (card.unit == "HU" && card.window.len() == 2).then(|| (card.window[0], card.window[1]));
        items.push(plain(format!("{m}: {}", card.scaling.describe(window))));
    }
    if !items.is_empty() {
        doc.para(&[plain("Input scaling (from each model's card):")]);
        doc.list(&items);
    }
    Ok(())
}

/// Loss, pixel accuracy and mIoU per epoch of every trained model upstream.
/// Dice per case of every model on the evaluated split and on each external
/// source: the spread behind Table 1's means, a collapse on one source visible.
fn per_case_plot(doc: &mut Doc, eval: &Artifact, models: &[String]) -> Result<()> {
    let split = metric_str(eval, "split", "test");
    let external: Vec<String> = eval.manifest.metrics.get("external").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default();
    let mut groups: Vec<(String, &str, Vec<f64>)> = Vec::new();
    for (source, file) in std::iter::once((split.clone(), "per_case.parquet".to_owned())).chain(external.iter().map(|n| (n.clone(), format!("external/{n}/per_case.parquet")))) {
        let df = read_parquet(&eval.file(&file))?;
        let (m, dice) = (strs(&df, "model")?, f64s(&df, "dice")?);
        for (k, model) in models.iter().enumerate() {
            let v: Vec<f64> = m.iter().zip(&dice).filter(|(x, _)| *x == model).map(|(_, d)| *d).collect();
            groups.push((format!("{model} · {source}"), RUN_COLOURS[k % RUN_COLOURS.len()], v));
        }
    }
    doc.heading(2, "Dice per case");
    doc.para(&[plain(format!("Each dot is one case ({split} split, then each external source); the box spans the quartiles, the bar is the median. Source: ")), code(key_line(eval)), plain(".")]);
    let svg = strip_chart("Dice per case, by model and source", "model · source", &groups);
    doc.figure("dice_per_case.svg", svg.as_bytes(), "image/svg+xml", "Dice per case by model and source", None, None)
}

fn curves(doc: &mut Doc, ctx: &StageContext, models: &[String]) -> Result<()> {
    doc.heading(2, "Learning curves");
    for m in models {
        let Some(a) = ctx.upstream.get(m) else {
            continue;
        };
        let df = read_parquet(&a.file("metrics.parquet"))?;
        // A cross-validated model's table holds every fold, told apart by `fold`.
        let fold: Vec<i64> = match df.column("fold") {
            Ok(c) => c.i64()?.iter().map(|v| v.unwrap_or(0)).collect(),
            Err(_) => vec![0; df.height()],
        };
        let folds = fold.iter().max().map_or(0, |k| k + 1);
        doc.heading(3, &format!("{m} ({})", key_line(a)));
        for (name, tr, va) in [("loss", "train_loss", "val_loss"), ("pixel accuracy", "train_pa", "val_pa"), ("mIoU", "train_miou", "val_miou")] {
            let (train, val) = (f64s(&df, tr)?, f64s(&df, va)?);
            let of_fold = |v: &[f64], k: i64| v.iter().zip(&fold).filter(|(_, f)| **f == k).map(|(x, _)| *x).collect::<Vec<f64>>();
            let labels: Vec<(String, String)> =
                (0..folds).map(|k| if folds > 1 { (format!("fold {k} train"), format!("fold {k} validation")) } else { ("train".into(), "validation".into()) }).collect();
            let mut series = Vec::new();
            for k in 0..folds {
                series.push((labels[k as usize].0.as_str(), "#1f77b4", of_fold(&train, k)));
                series.push((labels[k as usize].1.as_str(), "#d62728", of_fold(&val, k)));
            }
            let svg = line_chart(&format!("{m}: {name}"), "epoch", &series);
            let file = format!("{m}_{}.svg", tr.trim_start_matches("train_"));
            doc.figure(&file, svg.as_bytes(), "image/svg+xml", &format!("{m} {name}"), None, None)?;
        }
    }
    Ok(())
}

/// Evaluate's best, median and worst cases per model, with Grad-CAM.
fn examples(doc: &mut Doc, eval: &Artifact, models: &[String]) -> Result<()> {
    let split_name = metric_str(eval, "split", "test");
    doc.heading(2, &format!("Examples: best, median and worst {split_name} patients"));
    doc.para(&[plain("Left to right: image; outlines of the ground truth (green) and the prediction (red); each pixel by outcome (agreed liver green, false positive red, false negative blue); and the Grad-CAM map of the liver class at the encoder's last stage (blue low, red high; the study's Figure 5), on the model's input grid; the slice with the most liver of each patient, whose per-case Dice (original grid) is in the caption. Source: "), code(key_line(eval)), plain(".")]);
    let ex = read_parquet(&eval.file("examples.parquet"))?;
    let (ex_model, ex_label, ex_case, ex_dice) = (strs(&ex, "model")?, strs(&ex, "label")?, strs(&ex, "case_id")?, f64s(&ex, "dice")?);
    let ex_slice: Vec<i64> = ex.column("slice_index")?.i64()?.iter().map(|v| v.unwrap_or(-1)).collect();
    for m in models {
        let tf = TensorFile::open(&eval.file(&format!("examples/{m}.safetensors")))?;
        let get = |name: &str| tf.u8_ref(name).map(|(shape, data)| (shape, data));
        let ((shape, image), (_, truth), (_, pred), (_, cam)) = (get("image")?, get("truth")?, get("prediction")?, get("gradcam")?);
        let size = shape.get(1).copied().unwrap_or(0);
        let px = size * size;
        for (j, i) in (0..ex_model.len()).filter(|&i| &ex_model[i] == m).enumerate() {
            if (j + 1) * px > image.len() || [truth.len(), pred.len(), cam.len()].iter().any(|&l| l != image.len()) {
                bail!("{}: examples/{m}.safetensors does not hold the examples examples.parquet lists", eval.dir.display());
            }
            let r = j * px..(j + 1) * px;
            let png = overlay_png(&image[r.clone()], &truth[r.clone()], &pred[r.clone()], Some(&cam[r]), size)?;
            let cap = format!("{m}, {}: patient {} (slice {}), Dice per case {:.3}", ex_label[i], ex_case[i], ex_slice[i], ex_dice[i]);
            doc.figure(&format!("{m}_{}.png", ex_label[i]), &png, "image/png", &cap, Some(&cap), Some(4 * size.max(128)))?;
        }
    }
    Ok(())
}

/// Mirroring, the largest component and the ensemble, measured on the
/// validation split (never the test split), so a choice among them is honest.
fn inference_options(doc: &mut Doc, eval: &Artifact) -> Result<()> {
    let path = eval.file("options.parquet");
    if !path.is_file() {
        return Ok(());
    }
    let t = read_parquet(&path)?;
    let (models, cases) = (strs(&t, "model")?, t.column("cases")?.u64()?.clone());
    let flag = |c: &str| -> Result<Vec<bool>> { Ok(t.column(c)?.bool()?.iter().map(|v| v.unwrap_or(false)).collect()) };
    let (mirror, largest) = (flag("mirror")?, flag("largest_component")?);
    let (dice, global, hd, agree) = (f64s(&t, "dice_per_case")?, f64s(&t, "dice_global")?, f64s(&t, "hd95_mean")?, f64s(&t, "dice_vs_fp32")?);
    let precision = strs(&t, "precision")?;
    doc.heading(2, "Inference options on the validation split");
    doc.para(&[plain("Test-time mirroring (softmax averaged over left-right and up-down flips), keeping only the largest connected component, the ensemble of all models (softmax averaged), and bf16 inference (with the Dice of its masks against fp32's), each measured on the validation patients. With "), code("evaluate.postprocess: validation"), plain(" (the default) Table 1 takes, per model, the fp32 combination with the highest Dice per case here (its "), code("postprocess"), plain(" column); with "), code("fixed"), plain(", evaluate's "), code("mirror"), plain(" and "), code("largest_component"), plain(" params. Source: "), code(key_line(eval)), plain(".")]);
    let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let row = |i: usize| {
        vec![
            models[i].clone(),
            precision[i].clone(),
            yes(mirror[i]),
            yes(largest[i]),
            cases.get(i).unwrap_or(0).to_string(),
            format!("{:.4}", dice[i]),
            format!("{:.4}", global[i]),
            format!("{:.2}", hd[i]),
            format!("{:.4}", agree[i]),
        ]
    };
    let rows: Vec<Vec<String>> = (0..t.height()).map(row).collect();
    doc.table(&["model", "precision", "mirroring", "largest component", "cases", "Dice per case", "Dice global", "HD95", "Dice vs fp32"], &rows);
    Ok(())
}

/// The validation patients under other plausible exports (shift.parquet).
fn simulated_exports(doc: &mut Doc, eval: &Artifact) -> Result<()> {
    let path = eval.file("shift.parquet");
    if !path.is_file() {
        return Ok(());
    }
    let t = read_parquet(&path)?;
    let (models, exports, cases) = (strs(&t, "model")?, strs(&t, "export")?, t.column("cases")?.u64()?.clone());
    let (dice, pa, distance) = (f64s(&t, "dice_per_case")?, f64s(&t, "pixel_accuracy")?, f64s(&t, "intensity_distance")?);
    doc.heading(2, "Simulated other exports (validation)");
    doc.para(&[
        plain("The validation patients as exported (none) and as other hospitals might export the same CT: other display windows (width and level in HU; air and fat, which the export clipped black, given back), gamma and contrast; Table 1's post-processing. A recipe that holds here is chosen without looking at any external set. Source: "),
        code(key_line(eval)),
        plain("."),
    ]);
    let rows: Vec<Vec<String>> = (0..t.height())
        .map(|i| vec![models[i].clone(), exports[i].clone(), cases.get(i).unwrap_or(0).to_string(), format!("{:.4}", dice[i]), format!("{:.4}", pa[i]), intensity_distance(distance[i])])
        .collect();
    doc.table(&["model", "export", "cases", "Dice per case", "pixel acc.", "intensity distance"], &rows);
    Ok(())
}

/// Every model on every extra dataset.
fn external(doc: &mut Doc, eval: &Artifact, summary: &mut Summary) -> Result<()> {
    let external: Vec<String> = eval.manifest.metrics.get("external").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default();
    doc.heading(2, "External validation");
    if external.is_empty() {
        doc.para(&[plain("No "), code("external:"), plain(" datasets in pipeline.yaml; "), code("liverseg evaluate --model M --data DIR"), plain(" evaluates one on demand.")]);
    }
    for name in &external {
        let t = Table1::read(&eval.file(&format!("external/{name}/table1.parquet")))?;
        let m = &eval.manifest.metrics;
        let (cases, slices) = (m.get(&format!("external.{name}.cases")).cloned().unwrap_or_default(), m.get(&format!("external.{name}.slices")).cloned().unwrap_or_default());
        let unit = metric_str(eval, &format!("external.{name}.hd95_unit"), "px");
        let src: Vec<String> = ["ingest", "normalise"].iter().filter_map(|s| eval.manifest.upstream.get(&format!("{s}.{name}")).map(|k| format!("{s}.{name}@{k}"))).collect();
        doc.heading(3, name);
        doc.para(&[
            plain(format!("{cases} cases, {slices} slices, every case on its own grid, the models' own preprocessing. Source: ")),
            code(key_line(eval)),
            plain(", data "),
            code(src.join(", ")),
            plain("."),
        ]);
        let hd95 = format!("HD95 ({unit})");
        let rows: Vec<Vec<String>> = t
            .models()?
            .iter()
            .enumerate()
            .map(|(i, model)| {
                summary.insert(format!("external.{name}.{model}.dice_per_case"), serde_json::json!(t.f("dice_per_case", i)));
                vec![
                    model.clone(),
                    t.dice_per_case(i),
                    format!("{:.4}", t.f("dice_global", i)),
                    format!("{:.4}", t.f("liver_iou", i)),
                    format!("{:.4}", t.f("miou", i)),
                    format!("{:.4}", t.f("pixel_accuracy", i)),
                    t.hd95(i),
                    intensity_distance(t.f("intensity_distance", i)),
                ]
            })
            .collect();
        doc.table(&["model", "Dice per case [95% CI]", "Dice global", "liver IoU", "mIoU", "pixel acc.", &hd95, "intensity distance"], &rows);
        doc.para(&[plain(format!(
            "Intensity distance: Jensen-Shannon divergence (bits) of these inputs' grey levels from the model's training inputs; above {INTENSITY_SHIFT_WARN} the data come from another scanner or export mapping than the model learnt from, and evaluate warns."
        ))]);
    }
    Ok(())
}

fn intensity_distance(d: f64) -> String {
    match d {
        d if d.is_nan() => "n/a".to_owned(),
        d if d > INTENSITY_SHIFT_WARN => format!("{d:.3} (far)"),
        d => format!("{d:.3}"),
    }
}

/// The hyperparameter search: best so far per strategy, each parameter
/// against the objective, and every trial.
fn search(doc: &mut Doc, ctx: &StageContext) -> Result<()> {
    doc.heading(2, "Hyperparameter search");
    let mut tunes: Vec<(String, &Artifact)> = ctx.upstream.get("tune").map(|t| ("tune".to_owned(), t)).into_iter().collect();
    tunes.extend(ctx.instances_of("tune").into_iter().map(|(n, a)| (format!("tune.{n}"), a)));
    if tunes.is_empty() {
        doc.para(&[plain("No tune stage is upstream of this report; the models use the parameters in their lineage.")]);
    }
    for (name, t) in tunes {
        doc.heading(3, &name);
        one_search(doc, t, &name)?;
    }
    Ok(())
}

fn one_search(doc: &mut Doc, t: &Artifact, name: &str) -> Result<()> {
    let trials = read_parquet(&t.file("trials.parquet"))?;
    let strategy = strs(&trials, "strategy")?;
    let objective = f64s(&trials, "objective")?;
    let pruned: Vec<bool> = trials.column("pruned")?.bool()?.iter().map(|v| v.unwrap_or(false)).collect();
    let best = TuneBest::read(t)?;
    let obj_name = best.objective.clone();
    let higher = obj_name == "val_dice";
    let mut strategies: Vec<String> = strategy.clone();
    strategies.dedup();
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let series: Vec<(&str, &str, Vec<f64>)> = strategies
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let mut run = if higher { f64::MIN } else { f64::MAX };
            let curve = (0..strategy.len()).filter(|&k| &strategy[k] == st).map(|k| {
                run = if higher { run.max(objective[k]) } else { run.min(objective[k]) };
                run
            });
            (st.as_str(), colours[i % colours.len()], curve.collect())
        })
        .collect();
    let params_json = serde_json::to_string(&best.params)?;
    doc.para(&[
        plain("Source: "),
        code(chain(t)),
        plain(format!(". Best {obj_name} {:.4} by {} (trial {}), params ", best.value, best.strategy, best.trial)),
        code(params_json),
        plain(format!("; {} of {} trials pruned.", pruned.iter().filter(|p| **p).count(), pruned.len())),
    ]);
    let svg = line_chart(&format!("best {obj_name} so far"), "trial", &series);
    doc.figure(&format!("{name}_best_so_far.svg"), svg.as_bytes(), "image/svg+xml", "best so far", None, None)?;
    let params: Vec<String> = trials.get_column_names().iter().filter_map(|c| c.strip_prefix("param_").map(str::to_owned)).collect();
    for p in &params {
        let svg = scatter_chart(&format!("{obj_name} vs {p}"), &cells(&trials, &format!("param_{p}"))?, &objective, &pruned);
        doc.figure(&format!("{name}_{p}.svg"), svg.as_bytes(), "image/svg+xml", &format!("{obj_name} vs {p}"), None, None)?;
    }
    let trial_no: Vec<u64> = trials.column("trial")?.u64()?.iter().map(|v| v.unwrap_or(0)).collect();
    let cols: Vec<Vec<String>> = params.iter().map(|p| cells(&trials, &format!("param_{p}"))).collect::<Result<_>>()?;
    let rows: Vec<Vec<String>> = (0..strategy.len())
        .map(|k| {
            let mut cells = vec![strategy[k].clone(), trial_no[k].to_string()];
            // Values as tried, to 4 significant digits; choices as written.
            cells.extend(cols.iter().map(|c| match c[k].parse::<f64>() {
                Ok(v) if c[k].contains(['.', 'e']) => format!("{v:.3e}"),
                _ => c[k].trim_matches('"').to_owned(),
            }));
            cells.extend([format!("{:.4}", objective[k]), pruned[k].to_string()]);
            cells
        })
        .collect();
    let mut head: Vec<&str> = vec!["strategy", "trial"];
    head.extend(params.iter().map(String::as_str));
    head.extend([obj_name.as_str(), "pruned"]);
    doc.table(&head, &rows);
    Ok(())
}

/// The split's counts, the slice policy's drops and the quarantine.
fn data(doc: &mut Doc, ctx: &StageContext) -> Result<()> {
    let (ingest, norm, split) = (ctx.upstream("ingest")?, ctx.upstream("normalise")?, ctx.upstream("split")?);
    let counts = read_parquet(&split.file("counts.parquet"))?;
    let (cn, cc, cs) = (strs(&counts, "split")?, counts.column("cases")?.u64()?.clone(), counts.column("slices")?.u64()?.clone());
    doc.heading(2, "Data");
    doc.para(&[plain("Patient-level split ("), code(chain(split)), plain("); augmentation touched the train split only.")]);
    let rows: Vec<Vec<String>> = (0..cn.len()).map(|i| vec![cn[i].clone(), cc.get(i).unwrap_or(0).to_string(), cs.get(i).unwrap_or(0).to_string()]).collect();
    doc.table(&["split", "patients", "slices"], &rows);
    let q = read_parquet(&ingest.file("quarantine.parquet"))?;
    let dropped = norm.manifest.metrics.get("empty_slices_dropped").cloned().unwrap_or_default();
    doc.para(&[plain(format!("Slices dropped by the slice policy: {dropped}. Quarantined input files: {}.", q.height()))]);
    if q.height() > 0 {
        let (qf, qr) = (strs(&q, "file")?, strs(&q, "reason")?);
        doc.table(&["file", "reason"], &(0..q.height()).map(|i| vec![qf[i].clone(), qr[i].clone()]).collect::<Vec<_>>());
    }
    Ok(())
}

/// Every artifact behind the report, down to each source's raw-data hash.
fn lineage(doc: &mut Doc, ctx: &StageContext) -> Result<()> {
    doc.heading(2, "Lineage");
    doc.para(&[plain("Every number above comes from these artifacts (stage@key); "), code("liverseg lineage STAGE"), plain(" prints each one's params and file hashes.")]);
    let all = ctx.lineage()?;
    let mut items: Vec<Text> = all.iter().map(|a| serde_json::to_string(&a.manifest.params).map(|p| code(format!("{} (params {p})", chain(a))))).collect::<std::result::Result<_, _>>()?;
    for a in all.iter().filter(|a| a.manifest.upstream.is_empty()) {
        let raw_inputs = a.raw_inputs()?;
        let mut h = blake3::Hasher::new();
        for r in &raw_inputs {
            h.update(r.path.as_bytes());
            h.update(r.blake3.as_bytes());
        }
        items.push(plain(if raw_inputs.is_empty() {
            format!("raw data of {}: none; generated from its params (synthetic phantoms)", key_line(a))
        } else {
            format!("raw data of {}: {} files, combined blake3 {}", key_line(a), raw_inputs.len(), &h.finalize().to_hex()[..16])
        }));
    }
    doc.list(&items);
    Ok(())
}

/// Colours of the runs in `plots_page`, in order.
const RUN_COLOURS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

/// `liverseg plots diff`: one self-contained HTML page comparing runs. A
/// run with a per-epoch table (metrics.parquet) gives validation loss and
/// Dice curves; one with per-case scores (per_case.parquet) gives each
/// model's Dice per case. Each chart overlays the runs, one colour each.
pub fn plots_page(runs: &[(String, Artifact)]) -> Result<String> {
    let colour = |i: usize| RUN_COLOURS[i % RUN_COLOURS.len()];
    let labels = run_labels(runs);
    let mut figures: Vec<(String, String)> = Vec::new();
    let curves: Vec<(usize, DataFrame)> =
        runs.iter().enumerate().filter(|(_, r)| r.1.file("metrics.parquet").is_file()).map(|(i, r)| Ok((i, read_parquet(&r.1.file("metrics.parquet"))?))).collect::<Result<_>>()?;
    if !curves.is_empty() {
        let train: Vec<String> = curves.iter().map(|(i, _)| format!("{} train", labels[*i])).collect();
        let val: Vec<String> = curves.iter().map(|(i, _)| format!("{} validation", labels[*i])).collect();
        let mut series: Vec<(&str, &str, bool, Vec<f64>)> = Vec::new();
        for (k, (i, df)) in curves.iter().enumerate() {
            series.push((train[k].as_str(), colour(*i), true, f64s(df, "train_loss")?));
            series.push((val[k].as_str(), colour(*i), false, f64s(df, "val_loss")?));
        }
        figures.push(("loss".into(), line_chart_styled("loss (dashed: train, solid: validation)", "epoch", &series)));
        let dice: Vec<(&str, &str, Vec<f64>)> = curves.iter().map(|(i, df)| Ok((labels[*i].as_str(), colour(*i), f64s(df, "val_dice")?))).collect::<Result<_>>()?;
        figures.push(("validation Dice".into(), line_chart("validation Dice", "epoch", &dice)));
    }
    let mut per_model: std::collections::BTreeMap<String, Vec<(String, &str, Vec<f64>)>> = Default::default();
    for (i, (_, a)) in runs.iter().enumerate() {
        let path = a.file("per_case.parquet");
        if !path.is_file() {
            continue;
        }
        let df = read_parquet(&path)?;
        let (models, dice) = (strs(&df, "model")?, f64s(&df, "dice")?);
        let mut by_model: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        models.into_iter().zip(dice).for_each(|(m, d)| by_model.entry(m).or_default().push(d));
        for (m, v) in by_model {
            per_model.entry(m).or_default().push((labels[i].clone(), colour(i), v));
        }
    }
    for (model, groups) in &per_model {
        let title = format!("{model}: Dice per case");
        figures.push((title.clone(), strip_chart(&title, "each dot a case; box: quartiles and median", groups)));
    }
    if figures.is_empty() {
        bail!("none of these runs has a per-epoch table (metrics.parquet) or per-case scores (per_case.parquet) to plot");
    }
    let mut html = String::from("<!doctype html><html><head><meta charset='utf-8'><title>liverseg plots diff</title><style>body{font-family:sans-serif;margin:2em;max-width:1100px}figure{margin:0 0 1.5em 0}img{max-width:100%}</style></head><body><h1>liverseg plots diff</h1><ul>");
    for (i, (_, a)) in runs.iter().enumerate() {
        let _ = write!(html, "<li><span style='color:{}'>&#9632;</span> {}: <code>{}@{}</code></li>", colour(i), esc(&labels[i]), esc(&a.stage), esc(&a.key));
    }
    html.push_str("</ul>");
    for (title, svg) in figures {
        let _ = write!(html, "<figure><img alt='{}' src='data:image/svg+xml;base64,{}'/></figure>", esc(&title), base64(svg.as_bytes()));
    }
    html.push_str("</body></html>\n");
    Ok(html)
}

/// Each run's label with the params in which the runs differ (`HEAD~1
/// (lr=0.001)`), so a legend says what changed between the lines.
fn run_labels(runs: &[(String, Artifact)]) -> Vec<String> {
    let params: Vec<BTreeMap<String, serde_json::Value>> = runs.iter().map(|(_, a)| liverseg_engine::experiments::params_of(a)).collect();
    runs.iter()
        .enumerate()
        .map(|(i, (label, a))| {
            // Compared with the other runs of the same stage only.
            let peers: Vec<&BTreeMap<String, serde_json::Value>> = runs.iter().zip(&params).filter(|((_, b), _)| b.stage == a.stage).map(|(_, p)| p).collect();
            let differing = params[i].keys().filter(|k| peers.iter().any(|p| p.get(*k) != params[i].get(*k)));
            let what: Vec<String> = differing.take(3).map(|k| format!("{k}={}", liverseg_engine::experiments::cell(&params[i][k]))).collect();
            if what.is_empty() {
                label.clone()
            } else {
                format!("{label} ({})", what.join(", "))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn table1_params_read_as_text() {
        let json = r#"{"batch_size":8,"loss":"ce","lr":0.002717129926138064,"optimizer":"adam","weight_decay":9.593504699939347e-6}"#;
        assert_eq!(super::params_text(json), "batch_size 8, loss ce, lr 2.72e-3, optimizer adam, weight_decay 9.59e-6");
        assert_eq!(super::params_text(""), "", "a model without a manifest has no params");
    }
}
