//! SVG plots: latency percentile curves per endpoint, and the failover timeline.

use std::path::Path;

use plotters::prelude::*;

use crate::failover::Outcome;
use crate::latency::{Cell, Workload, CURVE};

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// One chart per workload and concurrency: latency (µs) at each percentile, one line per
/// endpoint. The x axis is the percentile's rank, so the tail gets room.
pub fn latency_curves(dir: &Path, cells: &[Cell]) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    let mut keys: Vec<(Workload, usize)> =
        cells.iter().map(|c| (c.workload, c.concurrency)).collect();
    keys.dedup();
    keys.sort();
    keys.dedup();
    for (workload, conc) in keys {
        let mine: Vec<&Cell> = cells
            .iter()
            .filter(|c| c.workload == workload && c.concurrency == conc && c.ops > 0)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let name = format!("latency-{}-c{conc}.svg", workload.name());
        let path = dir.join(&name);
        let values = || mine.iter().flat_map(|c| c.curve.iter().map(|(_, v)| *v));
        let top = values().fold(1.0f64, f64::max);
        let bottom = values().fold(f64::MAX, f64::min).max(1.0);
        let root = SVGBackend::new(&path, (820, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "{} at concurrency {conc}: latency by percentile",
                    workload.name()
                ),
                ("sans-serif", 20),
            )
            .margin(12)
            .margin_right(40)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                0f64..(CURVE.len() - 1) as f64,
                (bottom * 0.7..top * 1.3).log_scale(),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(CURVE.len())
            .x_label_formatter(&|x| {
                let i = x.round() as usize;
                CURVE.get(i).map_or_else(String::new, |p| format!("p{p}"))
            })
            .y_desc("µs")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(err)?;
        for (i, c) in mine.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = c
                .curve
                .iter()
                .enumerate()
                .map(|(k, (_, v))| (k as f64, v.max(1.0)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(c.endpoint.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
        files.push(name);
    }
    Ok(files)
}

/// The failover timeline: every attempt as a point on its endpoint's lane, green when it
/// committed and red when it failed, at the time it ended; leader changes as vertical lines.
pub fn failover_timeline(dir: &Path, o: &Outcome, endpoints: &[String]) -> anyhow::Result<String> {
    let name = "failover-timeline.svg".to_owned();
    let path = dir.join(&name);
    let end = o.attempts.iter().map(|a| a.end).fold(1.0f64, f64::max);
    let lanes = endpoints.len() as f64;
    let root =
        SVGBackend::new(&path, (1200, 140 + 70 * endpoints.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Writes per endpoint (green: committed, red: failed); blue line: new leader key, black: key deleted",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..end, -0.5f64..lanes - 0.5)
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_labels(endpoints.len())
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() < 0.01 && i >= 0.0 {
                endpoints.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("seconds")
        .disable_y_mesh()
        .draw()
        .map_err(err)?;
    for (event, from, to) in &o.windows {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(*from, -0.5), (*to, lanes - 0.5)],
                RGBColor(240, 240, 240).filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                event.name().to_owned(),
                (*from, lanes - 0.55),
                ("sans-serif", 14),
            )))
            .map_err(err)?;
    }
    for change in &o.leader_changes {
        let color = if change.leader.is_some() { BLUE } else { BLACK };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(change.at, -0.5), (change.at, lanes - 0.5)],
                color.stroke_width(1),
            )))
            .map_err(err)?;
    }
    // One mark per endpoint, outcome and 100 ms: the plot's size does not grow with the
    // number of writers (50 per endpoint make millions of attempts).
    let bucket = |t: f64| (t / 0.1).round() as i64;
    for (lane, ep) in endpoints.iter().enumerate() {
        let y = lane as f64;
        let marks = |ok: bool| {
            let mut b: Vec<i64> = o
                .attempts
                .iter()
                .filter(|a| &a.endpoint == ep && a.ok == ok)
                .map(|a| bucket(a.end))
                .collect();
            b.sort_unstable();
            b.dedup();
            b
        };
        chart
            .draw_series(
                marks(true)
                    .into_iter()
                    .map(|b| Circle::new((b as f64 * 0.1, y), 2, GREEN.filled())),
            )
            .map_err(err)?;
        chart
            .draw_series(
                marks(false)
                    .into_iter()
                    .map(|b| Circle::new((b as f64 * 0.1, y + 0.15), 3, RED.filled())),
            )
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(name)
}
