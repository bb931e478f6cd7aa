//! The demo's report: the summary table (text and HTML), `summary.json`,
//! the setup timeline as an SVG drawn here (one bar per pair), and an
//! `index.html` that shows both.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use crate::tracker::PairSummary;

/// A duration in ms for a table cell.
fn cell_ms(v: Option<f64>) -> String {
    match v {
        Some(ms) if ms >= 10_000.0 => format!("{:.1} s", ms / 1000.0),
        Some(ms) => format!("{ms:.0} ms"),
        None => "-".to_owned(),
    }
}

/// Bytes for a table cell.
pub fn cell_bytes(v: Option<u64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(b) if b >= 10 * 1024 * 1024 => format!("{:.1} MB", b as f64 / 1_048_576.0),
        Some(b) if b >= 10 * 1024 => format!("{:.0} kB", b as f64 / 1024.0),
        Some(b) => format!("{b} B"),
    }
}

/// The columns of the table.
const HEADERS: [&str; 10] = [
    "pair",
    "connected",
    "1st frame →",
    "1st frame ←",
    "a+v both ways",
    "frames →",
    "frames ←",
    "bytes →",
    "bytes ←",
    "media at end",
];

fn rows(names: &[String], pairs: &[PairSummary]) -> Vec<[String; 10]> {
    pairs
        .iter()
        .map(|p| {
            let both = match (p.media_ab_ms, p.media_ba_ms) {
                (Some(x), Some(y)) => Some(x.max(y)),
                _ => None,
            };
            [
                format!("{} ↔ {}", names[p.a], names[p.b]),
                cell_ms(p.connected_ms),
                cell_ms(p.first_ab_ms),
                cell_ms(p.first_ba_ms),
                cell_ms(both),
                p.frames_ab.to_string(),
                p.frames_ba.to_string(),
                cell_bytes(p.bytes_ab),
                cell_bytes(p.bytes_ba),
                if p.media_recent {
                    "flowing".to_owned()
                } else if p.up() {
                    "stopped".to_owned()
                } else {
                    "-".to_owned()
                },
            ]
        })
        .collect()
}

/// The summary table as text (times since the later of the pair's joins;
/// → is from the first named to the second).
pub fn table(names: &[String], pairs: &[PairSummary]) -> String {
    let rows = rows(names, pairs);
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            let pad = w.saturating_sub(c.chars().count());
            if i == 0 {
                let _ = write!(out, "{c}{}", " ".repeat(pad));
            } else {
                let _ = write!(out, "  {}{c}", " ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(&HEADERS.map(str::to_owned), &mut out);
    for r in &rows {
        line(r, &mut out);
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step (1, 2, 2.5 or 5 times a power of ten) for about
/// `target` ticks over `span` ms.
fn tick_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(1.0);
    let pow = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * pow >= raw {
            return m * pow;
        }
    }
    10.0 * pow
}

fn axis_label(ms: f64, step: f64) -> String {
    if step >= 1000.0 {
        format!("{:.0} s", ms / 1000.0)
    } else if step >= 100.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

/// The setup timeline: one bar per pair from the later join to connected
/// (orange) and on to audio and video both ways (blue), with markers for
/// the first frame each way; times since the first participant's join.
pub fn timeline_svg(
    names: &[String],
    pairs: &[PairSummary],
    joins_ms: &[Option<f64>],
    title: &str,
) -> String {
    const W: f64 = 960.0;
    const LEFT: f64 = 190.0;
    const RIGHT: f64 = 170.0;
    const TOP: f64 = 78.0;
    const ROW: f64 = 28.0;
    const BAR: f64 = 12.0;
    let plot_w = W - LEFT - RIGHT;
    let abs = |p: &PairSummary, rel: Option<f64>| -> Option<f64> { Some(p.start_ms? + rel?) };
    let mut end: f64 = 0.0;
    for p in pairs {
        for t in [
            p.start_ms,
            abs(p, p.connected_ms),
            abs(p, p.first_ab_ms),
            abs(p, p.first_ba_ms),
            abs(p, p.media_ab_ms),
            abs(p, p.media_ba_ms),
        ]
        .into_iter()
        .flatten()
        {
            end = end.max(t);
        }
    }
    for j in joins_ms.iter().flatten() {
        end = end.max(*j);
    }
    let step = tick_step(end.max(100.0) * 1.05, 8.0);
    let span = ((end.max(100.0) * 1.05) / step).ceil() * step;
    let x = |ms: f64| LEFT + ms.clamp(0.0, span) / span * plot_w;
    let h = TOP + ROW * pairs.len() as f64 + 52.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="DejaVu Sans, Verdana, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r##"<rect width="{W}" height="{h}" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="12" y="22" font-size="15" font-weight="bold" fill="#222">{}</text>"##,
        esc(title)
    );
    // Legend.
    let ly = 44.0;
    let _ = writeln!(
        s,
        r##"<rect x="12" y="{}" width="22" height="{BAR}" fill="#f0a030"/><text x="40" y="{}" fill="#333">both joined → connected (signalling, ICE, DTLS)</text>"##,
        ly - 10.0,
        ly
    );
    let _ = writeln!(
        s,
        r##"<rect x="350" y="{}" width="22" height="{BAR}" fill="#3a7bd5"/><text x="378" y="{}" fill="#333">connected → audio and video both ways</text>"##,
        ly - 10.0,
        ly
    );
    let _ = writeln!(
        s,
        r##"<circle cx="640" cy="{}" r="4.5" fill="#1b7f3b"/><text x="650" y="{}" fill="#333">1st frame →</text><circle cx="740" cy="{}" r="4.5" fill="#fff" stroke="#8e2c9e" stroke-width="2"/><text x="750" y="{}" fill="#333">1st frame ←</text>"##,
        ly - 4.0,
        ly,
        ly - 4.0,
        ly
    );
    // Grid and axis.
    let axis_y = TOP + ROW * pairs.len() as f64 + 6.0;
    let mut t = 0.0;
    while t <= span + 0.5 {
        let gx = x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{}" x2="{gx:.1}" y2="{axis_y}" stroke="#e4e4e4"/><line x1="{gx:.1}" y1="{axis_y}" x2="{gx:.1}" y2="{}" stroke="#555"/><text x="{gx:.1}" y="{}" text-anchor="middle" fill="#333">{}</text>"##,
            TOP - 8.0,
            axis_y + 5.0,
            axis_y + 19.0,
            axis_label(t, step)
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{axis_y}" x2="{:.1}" y2="{axis_y}" stroke="#555"/><text x="{:.1}" y="{}" text-anchor="middle" fill="#555">time since the first participant joined (→: from the first named to the second)</text>"##,
        LEFT + plot_w,
        LEFT + plot_w / 2.0,
        axis_y + 38.0
    );
    // The last join.
    if let Some(last) = joins_ms
        .iter()
        .copied()
        .collect::<Option<Vec<f64>>>()
        .and_then(|v| v.into_iter().reduce(f64::max))
    {
        let lx = x(last);
        let _ = writeln!(
            s,
            r##"<line x1="{lx:.1}" y1="{}" x2="{lx:.1}" y2="{axis_y}" stroke="#999" stroke-dasharray="4 3"/><text x="{lx:.1}" y="{}" text-anchor="middle" fill="#777" font-size="11">last join</text>"##,
            TOP - 8.0,
            TOP - 11.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{}" fill="#777" font-size="11">connected / a+v both ways</text>"##,
        LEFT + plot_w + 8.0,
        TOP - 11.0
    );
    // One row per pair.
    for (i, p) in pairs.iter().enumerate() {
        let cy = TOP + ROW * i as f64 + ROW / 2.0;
        let label = format!(
            "{} ↔ {}",
            names.get(p.a).map_or("?", String::as_str),
            names.get(p.b).map_or("?", String::as_str)
        );
        let _ = write!(
            s,
            r##"<g class="pair"><text x="{}" y="{:.1}" text-anchor="end" fill="#222">{}</text>"##,
            LEFT - 10.0,
            cy + 4.0,
            esc(&label)
        );
        let Some(start) = p.start_ms else {
            let _ = writeln!(
                s,
                r##"<text x="{LEFT}" y="{:.1}" fill="#c0392b">not joined</text></g>"##,
                cy + 4.0
            );
            continue;
        };
        let both = match (p.media_ab_ms, p.media_ba_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        match p.connected_ms {
            Some(c) => {
                let _ = write!(
                    s,
                    r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{BAR}" fill="#f0a030"><title>{}: connected {c:.0} ms after both joined</title></rect>"##,
                    x(start),
                    cy - BAR / 2.0,
                    (x(start + c) - x(start)).max(1.5),
                    esc(&label)
                );
                if let Some(m) = both {
                    let _ = write!(
                        s,
                        r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{BAR}" fill="#3a7bd5"><title>{}: audio and video both ways {m:.0} ms after both joined</title></rect>"##,
                        x(start + c),
                        cy - BAR / 2.0,
                        (x(start + m.max(c)) - x(start + c)).max(1.5),
                        esc(&label)
                    );
                }
            }
            None => {
                let _ = write!(
                    s,
                    r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{BAR}" fill="#f6c6c0" stroke="#c0392b"><title>{}: never connected</title></rect>"##,
                    x(start),
                    cy - BAR / 2.0,
                    (x(span) - x(start)).max(1.5),
                    esc(&label)
                );
            }
        }
        if let Some(f) = p.first_ab_ms {
            let _ = write!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4.5" fill="#1b7f3b"/>"##,
                x(start + f),
                cy - BAR / 2.0 - 1.0
            );
        }
        if let Some(f) = p.first_ba_ms {
            let _ = write!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4.5" fill="#fff" stroke="#8e2c9e" stroke-width="2"/>"##,
                x(start + f),
                cy + BAR / 2.0 + 1.0
            );
        }
        let note = match (p.connected_ms, both) {
            (Some(c), Some(m)) => format!("{c:.0} / {m:.0} ms"),
            (Some(c), None) => format!("{c:.0} ms / no media"),
            _ => "not connected".to_owned(),
        };
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#444" font-size="11">{}</text></g>"##,
            LEFT + plot_w + 8.0,
            cy + 4.0,
            esc(&note)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// `index.html`: the timeline, the table and links.
pub fn index_html(
    title: &str,
    intro: &[String],
    svg: &str,
    names: &[String],
    pairs: &[PairSummary],
    links: &[(String, String)],
) -> String {
    let mut h = String::new();
    let _ = writeln!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>body{{font-family:DejaVu Sans,Verdana,sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}th{{background:#f3f3f3}}</style></head><body>",
        esc(title)
    );
    let _ = writeln!(h, "<h1>{}</h1>", esc(title));
    for p in intro {
        let _ = writeln!(h, "<p>{}</p>", esc(p));
    }
    let _ = writeln!(h, "<h2>Setup timeline</h2>\n{svg}");
    let _ = writeln!(
        h,
        "<h2>Pairs</h2>\n<p>Times since the later of the pair's two joins; → is from the first named participant to the second, as received by the second. Frames are counted by the receiver: groupcall counts received audio packets (20 ms of Opus) and video frames, the reference peers count audible 10 ms audio frames (their sinks play silence before any packet arrives) and decoded video frames; only groupcall reports bytes.</p>\n<table><tr>"
    );
    for c in HEADERS {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr>\n");
    for r in rows(names, pairs) {
        h.push_str("<tr>");
        for c in r {
            let _ = write!(h, "<td>{}</td>", esc(&c));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n<h2>Files</h2>\n<ul>\n");
    for (href, text) in links {
        let _ = writeln!(h, "<li><a href=\"{}\">{}</a></li>", esc(href), esc(text));
    }
    h.push_str("</ul>\n</body></html>\n");
    h
}

/// One pair as JSON.
pub fn pair_json(names: &[String], p: &PairSummary) -> Value {
    json!({
        "a": names.get(p.a),
        "b": names.get(p.b),
        "start_ms": p.start_ms,
        "connected_ms": p.connected_ms,
        "first_frame_ab_ms": p.first_ab_ms,
        "first_frame_ba_ms": p.first_ba_ms,
        "media_ab_ms": p.media_ab_ms,
        "media_ba_ms": p.media_ba_ms,
        "frames_ab": p.frames_ab,
        "frames_ba": p.frames_ba,
        "bytes_ab": p.bytes_ab,
        "bytes_ba": p.bytes_ba,
        "media_both_ways": p.up(),
        "media_recent": p.media_recent,
        "state_a": p.states.0,
        "state_b": p.states.1,
    })
}

/// Writes a file, with the path in the error.
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: usize, b: usize, up: bool) -> PairSummary {
        PairSummary {
            a,
            b,
            start_ms: Some(120.0),
            connected_ms: up.then_some(300.0),
            first_ab_ms: up.then_some(320.0),
            first_ba_ms: up.then_some(330.0),
            media_ab_ms: up.then_some(340.0),
            media_ba_ms: up.then_some(360.0),
            frames_ab: 100,
            frames_ba: 90,
            bytes_ab: Some(20_000),
            bytes_ba: None,
            states: ("connected".into(), "connected".into()),
            media_recent: up,
        }
    }

    #[test]
    fn ticks() {
        assert_eq!(tick_step(1000.0, 8.0), 200.0);
        assert_eq!(tick_step(4000.0, 8.0), 500.0);
        assert_eq!(tick_step(15_000.0, 8.0), 2000.0);
        assert_eq!(axis_label(1500.0, 500.0), "1.5 s");
        assert_eq!(axis_label(4000.0, 1000.0), "4 s");
    }

    #[test]
    fn svg_has_a_bar_per_pair() {
        let names: Vec<String> = ["a<", "b", "c"].iter().map(|s| s.to_string()).collect();
        let pairs = vec![pair(0, 1, true), pair(0, 2, true), pair(1, 2, false)];
        let svg = timeline_svg(&names, &pairs, &[Some(0.0), Some(60.0), Some(120.0)], "t");
        assert_eq!(svg.matches(r#"<g class="pair">"#).count(), 3);
        assert!(svg.contains("a&lt; ↔ b"));
        assert!(svg.contains("never connected"));
        assert!(svg.contains("last join"));
        assert!(svg.starts_with("<svg"));
        let html = index_html("T", &["x".into()], &svg, &names, &pairs, &[]);
        assert!(html.contains("<svg") && html.contains("<table>"));
        let t = table(&names, &pairs);
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("300 ms") && t.contains("360 ms"), "{t}");
        assert!(t.contains("20 kB"), "{t}");
        assert!(t.contains("media at end") && t.contains("flowing"), "{t}");
    }
}
