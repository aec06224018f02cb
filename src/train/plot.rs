//! The loss-curve plot written at the end of training: an SVG of training loss and validation
//! bits per byte against the optimizer step.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::checkpoint::LogPoint;

/// Failure to draw or write the plot.
#[derive(Debug, thiserror::Error)]
#[error("cannot write loss plot {path}: {reason}")]
pub struct PlotError {
    /// The SVG file being written.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 600;
const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VALID_COLOR: RGBColor = RGBColor(214, 39, 40);

/// Writes an SVG plot of `history` to `path`: training loss converted to bits per byte
/// (`loss / ln 2`) as a line, validation bits per byte as a line with markers, both against the
/// step, with labelled axes and a legend. Non-finite values are left out. When nothing is
/// plottable the file still gets written, with the title and a "no data" note.
pub fn write_loss_plot(path: &Path, history: &[LogPoint], title: &str) -> Result<(), PlotError> {
    let fail = |reason: String| PlotError {
        path: path.to_path_buf(),
        reason,
    };
    let train: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|p| {
            p.train_loss
                .map(|l| (p.step as f64, f64::from(l) / std::f64::consts::LN_2))
        })
        .filter(|(_, y)| y.is_finite())
        .collect();
    let valid: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|p| p.valid_bpb.map(|b| (p.step as f64, f64::from(b))))
        .filter(|(_, y)| y.is_finite())
        .collect();

    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    if train.is_empty() && valid.is_empty() {
        draw_no_data(&root, title).map_err(fail)?;
    } else {
        draw_curves(&root, title, &train, &valid).map_err(fail)?;
    }
    root.present().map_err(|e| fail(e.to_string()))
}

fn draw_no_data(
    root: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
) -> Result<(), String> {
    let caption = ("sans-serif", 24).into_font();
    root.draw(&Text::new(title.to_string(), (40, 40), caption))
        .map_err(|e| e.to_string())?;
    let note = ("sans-serif", 20).into_font();
    root.draw(&Text::new(
        "no data: the history holds no finite loss values".to_string(),
        (40, (HEIGHT / 2) as i32),
        note,
    ))
    .map_err(|e| e.to_string())
}

fn draw_curves(
    root: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    train: &[(f64, f64)],
    valid: &[(f64, f64)],
) -> Result<(), String> {
    let all = || train.iter().chain(valid);
    let (x_min, x_max) = padded_range(all().map(|p| p.0), 0.0);
    let (y_min, y_max) = padded_range(all().map(|p| p.1), 0.05);

    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("bits per byte")
        .draw()
        .map_err(|e| e.to_string())?;

    if !train.is_empty() {
        chart
            .draw_series(LineSeries::new(
                train.iter().copied(),
                TRAIN_COLOR.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label("train loss (bits/byte)")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], TRAIN_COLOR.stroke_width(2))
            });
    }
    if !valid.is_empty() {
        chart
            .draw_series(LineSeries::new(
                valid.iter().copied(),
                VALID_COLOR.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label("validation bpb")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], VALID_COLOR.stroke_width(2))
            });
        // Markers keep a validation curve with a single point visible.
        chart
            .draw_series(
                valid
                    .iter()
                    .map(|&p| Circle::new(p, 3, VALID_COLOR.filled())),
            )
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// The range of `values`, widened by `pad` of its span on each side and never empty.
fn padded_range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let span = hi - lo;
    if span > 0.0 {
        (lo - pad * span, hi + pad * span)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}
