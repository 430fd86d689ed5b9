//! Line charts of benchmark figures as SVG files (plotters' SVG backend: text is written as
//! SVG text, so no font files are needed).

use std::path::Path;

use plotters::prelude::*;

use crate::error::BenchError;

/// One line of a chart: a name for the legend and its (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    /// The legend entry.
    pub name: String,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// A chart's title and axis labels.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Shown above the plot.
    pub title: String,
    /// The x axis label.
    pub x: &'static str,
    /// The y axis label.
    pub y: &'static str,
}

/// Write `series` as a line chart with logarithmic axes to `file` (an SVG), creating its
/// directory.
pub fn lines(file: &Path, chart: &Chart, series: &[Series]) -> Result<(), BenchError> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BenchError::Doing {
            what: format!("cannot create {}", dir.display()),
            source,
        })?;
    }
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let range = |pick: fn((f64, f64)) -> f64| {
        let (lo, hi) = points()
            .map(pick)
            .filter(|v| v.is_finite() && *v > 0.0)
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if lo > hi {
            (0.1, 10.0)
        } else {
            // Room around the data, and a range even for a single point.
            (lo / 1.5, hi * 1.5)
        }
    };
    let (x, y) = (range(|p| p.0), range(|p| p.1));
    draw(file, chart, series, x, y).map_err(|e| BenchError::Plot {
        file: file.to_owned(),
        message: e.to_string(),
    })
}

fn draw(
    file: &Path,
    chart: &Chart,
    series: &[Series],
    x: (f64, f64),
    y: (f64, f64),
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(file, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x.0..x.1).log_scale(), (y.0..y.1).log_scale())?;
    ctx.configure_mesh()
        .x_desc(chart.x)
        .y_desc(chart.y)
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        ctx.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))?
        .label(&s.name)
        .legend(move |(px, py)| PathElement::new([(px, py), (px + 20, py)], color.stroke_width(2)));
        ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_written_as_svg_with_its_legend() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/chart.svg");
        let series = [
            Series {
                name: "first".into(),
                points: vec![(100.0, 5.0), (1000.0, 6.0)],
            },
            Series {
                name: "second".into(),
                points: vec![(100.0, 300.0)],
            },
        ];
        let chart = Chart {
            title: "a title".into(),
            x: "N",
            y: "ms",
        };
        lines(&file, &chart, &series).unwrap();
        let svg = std::fs::read_to_string(&file).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for text in ["a title", "first", "second", "ms"] {
            assert!(svg.contains(text), "{text} missing");
        }
    }
}
