//! `crosskv capacity --plot`: an SVG chart of max concurrency against sequence length,
//! with and without KV sharing, for one budget.

use crate::kv::KvLayout;
use anyhow::Context;
use plotters::prelude::*;
use std::path::Path;

/// One x position of the chart: how many sequences of `seq_len` tokens fit in the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityPoint {
    pub seq_len: usize,
    /// With the model's sharing (one KV slot per producer layer).
    pub with_sharing: usize,
    /// Every layer its own KV slot.
    pub without_sharing: usize,
}

/// The sequence lengths the chart is drawn at: `block_size` doubling up to `max_len`, and
/// `max_len` itself so the last point is the length the table reports.
pub fn plot_lengths(block_size: usize, max_len: usize) -> Vec<usize> {
    let mut lengths: Vec<usize> = std::iter::successors(Some(block_size), |&l| l.checked_mul(2))
        .take_while(|&l| l < max_len)
        .collect();
    lengths.push(max_len);
    lengths
}

/// Max concurrency at each of `lengths`, with and without sharing, for a KV budget of
/// `kv_cache_bytes` in blocks of `block_size` tokens (the figures of `KvLayout::capacity`).
pub fn capacity_series(
    layout: &KvLayout,
    kv_cache_bytes: u64,
    block_size: usize,
    lengths: &[usize],
) -> Vec<CapacityPoint> {
    lengths
        .iter()
        .map(|&seq_len| {
            let r = layout.capacity(kv_cache_bytes, block_size, seq_len);
            CapacityPoint {
                seq_len,
                with_sharing: r.max_concurrency,
                without_sharing: r.non_cla_max_concurrency,
            }
        })
        .collect()
}

pub const WITH_SHARING_LABEL: &str = "with CLA sharing";
pub const WITHOUT_SHARING_LABEL: &str = "without sharing";

/// One KV dtype's two series: its name and its points.
pub struct DtypeSeries {
    pub dtype: String,
    pub points: Vec<CapacityPoint>,
}

/// Renders the chart as an SVG document: each dtype's two series, the first in full
/// colour and the others paler. Both axes are logarithmic (x in powers of two); a series
/// stops where not one sequence of that length fits, as a log axis has no zero.
pub fn capacity_svg(title: &str, dtypes: &[DtypeSeries]) -> anyhow::Result<String> {
    let mut svg = String::new();
    draw_chart(SVGBackend::with_string(&mut svg, (900, 600)), title, dtypes)
        .map_err(|e| anyhow::anyhow!("drawing the capacity chart: {e}"))?;
    Ok(svg)
}

/// Picks one series' value out of a point.
type SequencesOf = fn(&CapacityPoint) -> usize;

fn draw_chart(
    backend: SVGBackend<'_>,
    title: &str,
    dtypes: &[DtypeSeries],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let root = backend.into_drawing_area();
    root.fill(&WHITE)?;
    let points = dtypes.first().map_or(&[][..], |d| &d.points[..]);
    let first = points.first().map_or(1, |p| p.seq_len.max(1));
    let last = points.last().map_or(2, |p| p.seq_len).max(2 * first);
    let top = dtypes
        .iter()
        .flat_map(|d| &d.points)
        .map(|p| p.with_sharing.max(p.without_sharing))
        .max()
        .unwrap_or(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((first..last).log_scale().base(2.0), (1..2 * top.max(1)).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("sequence length (tokens)")
        .y_desc("max concurrency (sequences)")
        .x_labels(points.len())
        .draw()?;
    let series: [(&str, RGBColor, SequencesOf); 2] = [
        (WITH_SHARING_LABEL, BLUE, |p| p.with_sharing),
        (WITHOUT_SHARING_LABEL, RED, |p| p.without_sharing),
    ];
    for (i, d) in dtypes.iter().enumerate() {
        let opacity = if i == 0 { 1.0 } else { 0.4 };
        for (label, color, sequences) in series {
            let color = color.mix(opacity);
            let fitting: Vec<(usize, usize)> = d
                .points
                .iter()
                .map(|p| (p.seq_len, sequences(p)))
                .filter(|&(_, n)| n > 0)
                .collect();
            chart.draw_series(fitting.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            chart
                .draw_series(LineSeries::new(fitting, color.stroke_width(2)))?
                .label(format!("{label}, {}", d.dtype))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes the chart to `path`, naming the path in any error.
pub fn write_capacity_plot(path: &Path, title: &str, dtypes: &[DtypeSeries]) -> anyhow::Result<()> {
    let svg = capacity_svg(title, dtypes)?;
    std::fs::write(path, svg).with_context(|| format!("--plot {}: cannot write the chart", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_double_from_the_block_size_and_end_at_the_max() {
        assert_eq!(plot_lengths(16, 128), vec![16, 32, 64, 128]);
        assert_eq!(plot_lengths(16, 100), vec![16, 32, 64, 100]);
        assert_eq!(plot_lengths(16, 8), vec![8]);
        assert_eq!(plot_lengths(16, 16), vec![16]);
    }

    #[test]
    fn series_match_the_capacity_report_at_each_length() {
        // 4 layers, share factor 2; one slot-token is 2 × 1 head × 8 × 2 bytes = 32 bytes.
        let layout = KvLayout::new(vec![0, 0, 2, 2], 1, 8, 2);
        let budget = 64 * 1024;
        let points = capacity_series(&layout, budget, 16, &[16, 100]);
        // 512-byte blocks: 128 of them; 16 tokens take 1 block per slot, 100 take 7.
        assert_eq!(
            points,
            vec![
                CapacityPoint {
                    seq_len: 16,
                    with_sharing: 64,
                    without_sharing: 32
                },
                CapacityPoint {
                    seq_len: 100,
                    with_sharing: 128 / 14,
                    without_sharing: 128 / 28
                },
            ]
        );
    }

    #[test]
    fn the_svg_has_each_dtypes_series_and_the_title() {
        let points = |n: usize| {
            vec![
                CapacityPoint {
                    seq_len: 16,
                    with_sharing: 8 * n,
                    without_sharing: 4 * n,
                },
                CapacityPoint {
                    seq_len: 32,
                    with_sharing: 4 * n,
                    without_sharing: 0,
                },
            ]
        };
        let dtypes = [
            DtypeSeries {
                dtype: "bf16".into(),
                points: points(1),
            },
            DtypeSeries {
                dtype: "fp8".into(),
                points: points(2),
            },
        ];
        let svg = capacity_svg("tiny model, KV budget 1 MiB", &dtypes).unwrap();
        assert!(svg.trim_start().starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
        for text in [
            "with CLA sharing, bf16",
            "without sharing, bf16",
            "with CLA sharing, fp8",
            "without sharing, fp8",
            "tiny model, KV budget 1 MiB",
        ] {
            assert!(svg.contains(text), "no `{text}` in the chart");
        }
    }
}
