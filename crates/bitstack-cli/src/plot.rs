//! A small SVG line plot: perplexity (log scale) against memory.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes curves `(memory_bytes, ppl)` with an optional reference point drawn as a horizontal
/// line (the original model). The y axis is logarithmic.
pub fn write_curve_svg(
    path: &Path,
    title: &str,
    series: &[(&str, &[(u64, f64)])],
    reference: Option<(u64, f64)>,
) -> Result<()> {
    let (w, h, left, right, top, bottom) = (760.0, 480.0, 80.0, 30.0, 40.0, 60.0);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, pts)| pts.iter())
        .chain(reference.iter())
        .filter(|(_, p)| p.is_finite() && *p > 0.0)
        .map(|&(m, p)| (m as f64 / 1e6, p))
        .collect();
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &(x, _)| (a.min(x), b.max(x)));
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), &(_, y)| {
        (a.min(y.ln()), b.max(y.ln()))
    });
    if all.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if (x1 - x0).abs() < 1e-9 {
        x1 = x0 + 1.0;
    }
    if (y1 - y0).abs() < 1e-9 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let sy = |y: f64| top + (y1 - y.ln()) / (y1 - y0) * (h - top - bottom);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    // Axes and ticks.
    let _ = writeln!(
        svg,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        h - bottom,
        w - right,
        h - bottom
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#,
        h - bottom
    );
    for i in 0..=5 {
        let x = x0 + (x1 - x0) * i as f64 / 5.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.1}</text>"#,
            sx(x),
            h - bottom + 18.0
        );
        let y = (y0 + (y1 - y0) * i as f64 / 5.0).exp();
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#ddd"/>"##,
            sy(y),
            w - right,
            sy(y)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{y:.3}</text>"#,
            left - 6.0,
            sy(y) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">memory (MB, 10^6 bytes)</text>"#,
        w / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">perplexity (log scale)</text>"#,
        h / 2.0,
        h / 2.0
    );
    let colours = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    if let Some((m, p)) = reference {
        let y = sy(p);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#555" stroke-dasharray="6 4"/>"##,
            w - right
        );
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{:.1}" text-anchor="end" fill="#555">original: {p:.4} at {:.2} MB</text>"##,
            w - right - 4.0,
            y - 5.0,
            m as f64 / 1e6
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let path_d: Vec<String> = pts
            .iter()
            .filter(|(_, p)| p.is_finite() && *p > 0.0)
            .map(|&(m, p)| format!("{:.1},{:.1}", sx(m as f64 / 1e6), sy(p)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path_d.join(" ")
        );
        for pt in &path_d {
            let (x, y) = pt.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{colour}">{}</text>"#,
            left + 10.0,
            top + 16.0 + 16.0 * i as f64,
            escape(name)
        );
    }
    let _ = writeln!(svg, "</svg>");
    let tmp = path.with_extension("svg.partial");
    std::fs::write(&tmp, svg).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
