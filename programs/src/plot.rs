//! `perf --plot`: bus bandwidth against message size, one line per operation (and per world size
//! when results of several runs are drawn), as an SVG file.
//!
//! Drawn with plotters' SVG backend only (no fonts, no bitmap encoders), so the dependency stays
//! a few small crates; text is left to the viewer's default sans-serif font.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

/// One line of the plot: `(bytes, busbw GB/s)` points in increasing size.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(u64, f64)>,
}

/// Human size for an axis label: 8, 1K, 64M...
fn size_label(bytes: f64) -> String {
    let b = bytes.round() as u64;
    match b {
        _ if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{}G", b >> 30),
        _ if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{}M", b >> 20),
        _ if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{}K", b >> 10),
        _ => b.to_string(),
    }
}

/// Writes the plot of `series` to `path` (SVG, 960 x 600).
pub fn busbw_svg(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
    for &(b, bw) in pts {
        let x = (b.max(1) as f64).log2();
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(bw);
    }
    anyhow::ensure!(x0.is_finite(), "nothing to plot: no perf rows");
    let (x0, x1) = (x0.floor(), x1.ceil().max(x0.floor() + 1.0));
    let y1 = if y1 > 0.0 { y1 * 1.08 } else { 1.0 };
    // Drawn into memory, then written by write_output (atomic replace, no partial file).
    let mut svg = String::new();
    let draw = |svg: &mut String| -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::with_string(svg, (960, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, 0f64..y1)?;
        let span = (x1 - x0) as usize;
        chart
            .configure_mesh()
            .x_desc("message size (bytes, log2 scale)")
            .y_desc("bus bandwidth (GB/s)")
            .x_labels(span + 1)
            .x_label_formatter(&|x| size_label(2f64.powf(*x)))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .max_light_lines(1)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let xy: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|&(b, bw)| ((b.max(1) as f64).log2(), bw))
                .collect();
            chart
                .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(xy.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw(&mut svg)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .and_then(|()| Ok(collectives::files::write_output(path, svg.as_bytes())?))
        .with_context(|| format!("cannot write plot {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels() {
        assert_eq!(size_label(8.0), "8");
        assert_eq!(size_label(4096.0), "4K");
        assert_eq!(size_label((64u64 << 20) as f64), "64M");
    }

    #[test]
    fn writes_an_svg_with_one_legend_entry_per_series() {
        let path = std::env::temp_dir().join(format!("tprun-plot-{}.svg", std::process::id()));
        let s = |label: &str, k: f64| Series {
            label: label.into(),
            points: (3..20).map(|e| (1u64 << e, k * e as f64)).collect(),
        };
        busbw_svg(&path, "test", &[s("all_reduce", 1.0), s("all_gather", 0.5)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("all_reduce") && svg.contains("all_gather"));
        assert!(svg.contains("<polyline"));
    }
}
