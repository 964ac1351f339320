//! The figures of `scale` as CSV files and SVG charts: memory against connections (in total by
//! side, and per node), time to the last receiver of a broadcast against connections, and
//! connections resumed over the seconds after a node was drained or killed.

use std::path::Path;

use plotters::prelude::*;

/// One row of a CSV file: names and numbers, in order.
pub type Row = Vec<(&'static str, f64)>;

pub struct Table<'a> {
    pub steps: &'a [Row],
    /// Per event (drain, kill): (seconds after the signal, connections resumed by then).
    pub curves: &'a [(String, Vec<(f64, f64)>)],
}

pub fn write_csv(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let mut text = String::new();
    if let Some(first) = rows.first() {
        let names: Vec<&str> = first.iter().map(|(name, _)| *name).collect();
        text.push_str(&names.join(","));
        text.push('\n');
    }
    for row in rows {
        let values: Vec<String> = row.iter().map(|(_, v)| trim(*v)).collect();
        text.push_str(&values.join(","));
        text.push('\n');
    }
    std::fs::write(path, text)?;
    Ok(())
}

fn trim(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

fn column(rows: &[Row], name: &str) -> Vec<f64> {
    rows.iter()
        .map(|row| {
            row.iter()
                .find(|(n, _)| *n == name)
                .map_or(0.0, |(_, v)| *v)
        })
        .collect()
}

/// Draws every chart that has data into `dir`.
pub fn draw(dir: &Path, table: &Table) -> anyhow::Result<()> {
    if !table.steps.is_empty() {
        let connections: Vec<f64> = column(table.steps, "connections")
            .iter()
            .map(|c| c / 1000.0)
            .collect();
        let gib = |name: &str| -> Vec<f64> {
            column(table.steps, name)
                .iter()
                .map(|m| m / 1024.0)
                .collect()
        };
        let (nodes, client, kernel, redis) = (
            gib("node_rss_total_mib"),
            gib("client_rss_total_mib"),
            gib("kernel_slab_delta_mib"),
            gib("redis_rss_mib"),
        );
        let tcp = gib("tcp_buffers_mib");
        let total: Vec<f64> = (0..connections.len())
            .map(|i| nodes[i] + client[i] + kernel[i] + redis[i] + tcp[i])
            .collect();
        lines(
            &dir.join("memory-total.svg"),
            "Memory in total vs connections",
            ("connections (thousands)", "GiB"),
            &[
                ("all of it", xy(&connections, &total)),
                ("gateway nodes (RSS)", xy(&connections, &nodes)),
                ("kernel slab (sockets)", xy(&connections, &kernel)),
                ("load client (RSS)", xy(&connections, &client)),
                ("TCP buffers", xy(&connections, &tcp)),
                ("Redis (RSS)", xy(&connections, &redis)),
            ],
        )?;
        let per_node: Vec<f64> = column(table.steps, "node_rss_total_mib")
            .iter()
            .zip(column(table.steps, "nodes"))
            .map(|(total, n)| total / n.max(1.0))
            .collect();
        lines(
            &dir.join("memory-per-node.svg"),
            "Memory per node vs connections",
            ("connections in the cluster (thousands)", "MiB"),
            &[
                ("mean node RSS", xy(&connections, &per_node)),
                (
                    "largest node RSS",
                    xy(&connections, &column(table.steps, "node_rss_max_mib")),
                ),
            ],
        )?;
        lines(
            &dir.join("broadcast.svg"),
            "Broadcast: time until receivers have it vs connections",
            ("connections (thousands)", "ms"),
            &[
                (
                    "last receiver (worst broadcast)",
                    xy(&connections, &column(table.steps, "last_receiver_max_ms")),
                ),
                (
                    "last receiver (median broadcast)",
                    xy(
                        &connections,
                        &column(table.steps, "last_receiver_median_ms"),
                    ),
                ),
                (
                    "p99 receiver",
                    xy(&connections, &column(table.steps, "p99_ms")),
                ),
                (
                    "p50 receiver",
                    xy(&connections, &column(table.steps, "p50_ms")),
                ),
            ],
        )?;
    }
    if !table.curves.is_empty() {
        let series: Vec<(&str, Vec<(f64, f64)>)> = table
            .curves
            .iter()
            .map(|(event, curve)| {
                let name = if event == "drain" {
                    "drained node (SIGTERM)"
                } else {
                    "killed node (SIGKILL)"
                };
                (name, curve.iter().map(|&(s, n)| (s, n / 1000.0)).collect())
            })
            .collect();
        lines(
            &dir.join("resume.svg"),
            "Connections resumed on other nodes after the signal",
            (
                "seconds after the signal",
                "connections resumed (thousands)",
            ),
            &series,
        )?;
    }
    Ok(())
}

fn xy(x: &[f64], y: &[f64]) -> Vec<(f64, f64)> {
    x.iter().copied().zip(y.iter().copied()).collect()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn lines(
    path: &Path,
    title: &str,
    (x_label, y_label): (&str, &str),
    series: &[(&str, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let points = series.iter().flat_map(|(_, s)| s.iter());
    let (x_max, y_max) = points.fold((0f64, 0f64), |(x, y), &(px, py)| (x.max(px), y.max(py)));
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            0f64..(x_max * 1.05).max(1e-3),
            0f64..(y_max * 1.1).max(1e-3),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_csv_and_charts() {
        let dir = std::env::temp_dir().join(format!("scale-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let steps = vec![
            vec![("connections", 1000.0), ("node_rss_total_mib", 20.5)],
            vec![("connections", 2000.0), ("node_rss_total_mib", 31.0)],
        ];
        super::write_csv(&dir.join("steps.csv"), &steps).unwrap();
        let csv = std::fs::read_to_string(dir.join("steps.csv")).unwrap();
        assert_eq!(
            csv,
            "connections,node_rss_total_mib\n1000,20.500\n2000,31\n"
        );
        let curves = vec![("drain".to_owned(), vec![(0.0, 0.0), (1.5, 900.0)])];
        let table = super::Table {
            steps: &steps,
            curves: &curves,
        };
        super::draw(&dir, &table).unwrap();
        for chart in [
            "memory-total.svg",
            "memory-per-node.svg",
            "broadcast.svg",
            "resume.svg",
        ] {
            let svg = std::fs::read_to_string(dir.join(chart)).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.contains("<polyline"),
                "{chart}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
