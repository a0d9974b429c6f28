//! `tprun analyze --svg`: a per-rank timeline with a time axis, and for the TP model a heat map of
//! each rank's all-reduce wait per layer (attention and MLP), which shows at a glance which rank
//! waits and where.

use std::fmt::Write as _;

use super::{layer_sums, Ev, RankEvents};

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 70.0;
const ROW: f64 = 40.0;
const COMPUTE: &str = "#999";
const COMM: &str = "#e55";
const WAIT: &str = "#800";

/// The whole picture: the timeline, then the heat map when the trace has per-layer spans.
pub(super) fn draw(ranks: &[RankEvents]) -> String {
    let mut body = String::new();
    let mut y = timeline(&mut body, ranks, 10.0);
    if ranks.iter().any(|r| !layer_sums(r).is_empty()) {
        y = heat_map(&mut body, ranks, y + 30.0);
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{}" font-family="sans-serif" font-size="13"><rect width="100%" height="100%" fill="white"/>{body}</svg>
"#,
        y + 10.0
    )
}

fn rect(s: &mut String, x: f64, y: f64, w: f64, h: f64, fill: &str) {
    let _ = write!(
        s,
        r#"<rect x="{x:.2}" y="{y:.1}" width="{w:.2}" height="{h:.1}" fill="{fill}"/>"#
    );
}

fn text(s: &mut String, x: f64, y: f64, anchor: &str, t: &str) {
    let _ = write!(
        s,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}">{t}</text>"#
    );
}

/// A round tick step (1, 2 or 5 × 10^k) giving about eight ticks over `span`.
fn tick_step(span: f64) -> f64 {
    let raw = (span / 8.0).max(1e-9);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&v| v >= raw)
        .unwrap_or(10.0 * p)
}

/// Per-rank rows (innermost compute, collectives, the wait at each call's start), a legend and a
/// millisecond axis, from `top`; returns the y below it.
fn timeline(s: &mut String, ranks: &[RankEvents], top: f64) -> f64 {
    let all = || ranks.iter().flat_map(|r| r.compute.iter().chain(&r.comm));
    let t0 = all().map(|e| e.ts).fold(f64::INFINITY, f64::min);
    let t1 = all().map(Ev::end).fold(f64::NEG_INFINITY, f64::max);
    let scale = (WIDTH - LEFT - 20.0) / (t1 - t0).max(1.0);
    let x = |t: f64| LEFT + (t - t0) * scale;
    let title = format!("Per-rank timeline ({:.1} ms)", (t1 - t0) / 1e3);
    text(s, LEFT, top + 14.0, "start", &title);
    let mut lx = LEFT + 260.0;
    for (fill, label) in [
        (COMPUTE, "compute"),
        (COMM, "collective"),
        (WAIT, "waiting for peers"),
    ] {
        rect(s, lx, top + 3.0, 14.0, 14.0, fill);
        text(s, lx + 18.0, top + 14.0, "start", label);
        lx += 30.0 + 8.0 * label.len() as f64;
    }
    let rows = top + 26.0;
    for (i, r) in ranks.iter().enumerate() {
        let y = rows + ROW * i as f64;
        text(s, 8.0, y + ROW / 2.0, "start", &format!("rank {i}"));
        let leaves = r.compute.iter().filter(|e| e.name != "forward");
        for e in leaves {
            rect(s, x(e.ts), y, (e.dur * scale).max(0.5), ROW - 8.0, COMPUTE);
        }
        for c in &r.comm {
            rect(s, x(c.ts), y, (c.dur * scale).max(0.5), ROW - 8.0, COMM);
            rect(s, x(c.ts), y, (c.wait * scale).max(0.5), ROW - 8.0, WAIT);
        }
    }
    let axis = rows + ROW * ranks.len() as f64;
    let _ = write!(
        s,
        r##"<line x1="{LEFT}" y1="{axis}" x2="{:.1}" y2="{axis}" stroke="#000"/>"##,
        x(t1)
    );
    let step = tick_step((t1 - t0) / 1e3);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let mut k = 0.0;
    while k * step * 1e3 <= t1 - t0 {
        let tx = x(t0 + k * step * 1e3);
        let _ = write!(
            s,
            r##"<line x1="{tx:.1}" y1="{axis}" x2="{tx:.1}" y2="{}" stroke="#000"/>"##,
            axis + 5.0
        );
        text(
            s,
            tx,
            axis + 19.0,
            "middle",
            &format!("{:.decimals$}", k * step),
        );
        k += 1.0;
    }
    text(
        s,
        x(t1),
        axis + 34.0,
        "end",
        "time since the first event (ms)",
    );
    axis + 40.0
}

/// Rows ranks, columns each layer's attention and MLP: the all-reduce wait in ms, darker red
/// for more; from `top`, returns the y below it.
fn heat_map(s: &mut String, ranks: &[RankEvents], top: f64) -> f64 {
    let sums: Vec<_> = ranks.iter().map(layer_sums).collect();
    let layers: Vec<u64> = sums
        .iter()
        .flat_map(|m| m.keys().copied())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let wait = |r: usize, l: u64, col: usize| sums[r].get(&l).map_or(0.0, |v| v[col]);
    let max = (0..ranks.len())
        .flat_map(|r| {
            layers
                .iter()
                .flat_map(move |&l| [wait(r, l, 0), wait(r, l, 2)])
        })
        .fold(1.0, f64::max);
    let cw = ((WIDTH - LEFT - 20.0) / (2 * layers.len()) as f64).min(90.0);
    let title = "All-reduce wait per rank and layer (ms; darker = longer)";
    text(s, LEFT, top + 14.0, "start", title);
    let head = top + 38.0;
    for (j, l) in layers.iter().enumerate() {
        for (h, part) in ["attn", "mlp"].into_iter().enumerate() {
            let cx = LEFT + cw * (2 * j + h) as f64 + cw / 2.0;
            text(s, cx, head, "middle", &format!("L{l} {part}"));
        }
    }
    for r in 0..ranks.len() {
        let y = head + 8.0 + ROW * r as f64;
        text(s, 8.0, y + ROW / 2.0 + 4.0, "start", &format!("rank {r}"));
        for (j, &l) in layers.iter().enumerate() {
            for h in 0..2 {
                let v = wait(r, l, 2 * h);
                let f = v / max;
                // White to dark red: green and blue fall together.
                let gb = (255.0 * (1.0 - f)) as u8;
                let red = (255.0 - 119.0 * f) as u8;
                let cx = LEFT + cw * (2 * j + h) as f64;
                rect(
                    s,
                    cx + 1.0,
                    y,
                    cw - 2.0,
                    ROW - 4.0,
                    &format!("rgb({red},{gb},{gb})"),
                );
                let ink = if f > 0.5 { "white" } else { "black" };
                let _ = write!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{ink}">{:.1}</text>"#,
                    cx + cw / 2.0,
                    y + ROW / 2.0 + 3.0,
                    v / 1e3
                );
            }
        }
    }
    head + 8.0 + ROW * ranks.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_about_eight() {
        assert_eq!(tick_step(138.6), 20.0);
        assert_eq!(tick_step(8.0), 1.0);
        assert!((tick_step(0.3) - 0.05).abs() < 1e-12);
    }
}
