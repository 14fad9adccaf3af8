//! The importance plot: one panel per axis (PNG, plotters).

use super::importance::Importance;
use elastica_core::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path = std::env::var("ELASTICA_FONT")
            .ok()
            .into_iter()
            .chain(FONTS.iter().map(|s| s.to_string()))
            .find(|p| Path::new(p).exists());
        let Some(p) = path else {
            return Err(
                "--plot needs a TrueType font (install fonts-dejavu-core, or set ELASTICA_FONT)"
                    .into(),
            );
        };
        let bytes: &'static [u8] = Box::leak(
            std::fs::read(&p)
                .map_err(|e| format!("{p}: {e}"))?
                .into_boxed_slice(),
        );
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{p}: not a usable font"))
    })
    .clone()
    .map_err(Error::Input)
}

pub type Series = Vec<(String, Vec<(f32, f32)>)>;

/// Legend entries at most; with more series, evenly spaced ones are named (layers in order).
const LEGEND_MAX: usize = 8;

/// Whether series `i` of `n` is named in the legend: all when they fit, else LEGEND_MAX evenly
/// spaced ones, first and last included.
fn in_legend(i: usize, n: usize) -> bool {
    n <= LEGEND_MAX || i * (LEGEND_MAX - 1) % (n - 1) < LEGEND_MAX - 1
}

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    xlabel: &str,
    series: &Series,
    points: bool,
    x_max: Option<f32>,
) -> Result<()> {
    let e = |x: String| Error::Input(format!("plot: {x}"));
    let (mut x1, mut y0, mut y1) = (x_max.unwrap_or(1f32), f32::MAX, f32::MIN);
    for (_, s) in series {
        for &(x, y) in s {
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if y0 > y1 {
        y0 = 0.0;
        y1 = 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let xr = if points {
        -0.5f32..x1 + 0.5
    } else {
        0f32..x1 * 1.02
    };
    // x is an index (channel rank, layer, step): whole-number labels, at most one per unit.
    let x_labels = ((xr.end - xr.start) as usize).clamp(2, 10);
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(xr, y0..y1 + (y1 - y0) * 0.05)
        .map_err(|x| e(x.to_string()))?;
    c.configure_mesh()
        .x_desc(xlabel)
        .x_labels(x_labels)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let n = series.len().max(1);
    for (i, (name, s)) in series.iter().enumerate() {
        let col = HSLColor(0.66 * i as f64 / n as f64, 0.7, 0.45);
        let drawn = if points {
            c.draw_series(s.iter().map(|&p| Circle::new(p, 2, col.filled())))
        } else {
            c.draw_series(LineSeries::new(s.iter().copied(), &col))
        }
        .map_err(|x| e(x.to_string()))?;
        if in_legend(i, n) && !name.is_empty() {
            drawn.label(name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(2))
            });
        }
    }
    if series.len() > 1 && series.iter().any(|(n, _)| !n.is_empty()) {
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|x| e(x.to_string()))?;
    }
    Ok(())
}

/// Line charts side by side (training curves): (title, x label, named series) per panel.
pub fn curves(path: &Path, panels: &[(String, String, Series)]) -> Result<()> {
    register_font()?;
    let w = 520 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (w, 400)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|x| Error::Input(format!("plot: {x}")))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (a, (title, xl, s)) in areas.iter().zip(panels) {
        panel(a, title, xl, s, false, None)?;
    }
    root.present()
        .map_err(|x| Error::Input(format!("{}: {x}", path.display())))?;
    Ok(())
}

fn sorted_norm(scores: &[f32]) -> Vec<(f32, f32)> {
    let mut v = scores.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    let m = v.first().copied().unwrap_or(1.0).max(f32::MIN_POSITIVE);
    v.iter()
        .enumerate()
        .map(|(i, &x)| (i as f32, x / m))
        .collect()
}

/// One panel per ranked axis the model has (hidden, depth when ranked, FFN, expert and shared
/// channels, query heads, Mamba heads and head channels, routed experts).
pub fn plot(imp: &Importance, path: &Path) -> Result<()> {
    use elastica_core::budget::Axis;
    register_font()?;
    let layers = imp.layers.len().max(1);
    let last = (layers - 1) as f32;
    // Sorted scores of each layer that has the axis, one line per layer.
    let per_layer = |axis: Axis| -> Series {
        imp.layers
            .iter()
            .filter_map(|l| {
                l.axes[axis]
                    .as_ref()
                    .map(|a| (format!("layer {}", l.layer), sorted_norm(&a.scores)))
            })
            .collect()
    };
    // Every component's score over its layer's largest, as points at the layer.
    let by_layer = |axis: Axis| -> Series {
        vec![(
            "".into(),
            imp.layers
                .iter()
                .filter_map(|l| l.axes[axis].as_ref().map(|a| (l.layer, a)))
                .flat_map(|(l, a)| {
                    let m = a
                        .scores
                        .iter()
                        .fold(0f32, |x, &y| x.max(y))
                        .max(f32::MIN_POSITIVE);
                    a.scores.iter().map(move |&s| (l as f32, s / m))
                })
                .collect(),
        )]
    };
    // (title, x label, series, points, x extent)
    let mut panels: Vec<(&str, &str, Series, bool, Option<f32>)> = vec![(
        "hidden channels (sorted, / max)",
        "channel rank",
        vec![(Axis::Hidden.to_string(), sorted_norm(&imp.hidden.scores))],
        false,
        None,
    )];
    if let Some(d) = &imp.depth {
        let pts = d
            .scores
            .iter()
            .enumerate()
            .map(|(i, &s)| (i as f32, (s.max(1e-9)).log10()))
            .collect();
        panels.push((
            "depth: log10 NMSE when removed",
            "layer",
            vec![("".into(), pts)],
            true,
            Some(last),
        ));
    }
    let lines = [
        ("FFN channels per layer (sorted, / max)", Axis::Ffn),
        (
            "routed-expert channels per layer (sorted, / max)",
            Axis::MoeFfn,
        ),
        (
            "shared-expert channels per layer (sorted, / max)",
            Axis::SharedFfn,
        ),
        (
            "Mamba head channels per layer (sorted, / max)",
            Axis::MambaHeadDim,
        ),
    ];
    for (title, axis) in lines {
        let s = per_layer(axis);
        if !s.is_empty() {
            panels.push((title, "channel rank", s, false, None));
        }
    }
    let dots = [
        ("attention query heads (/ layer max)", Axis::Heads),
        ("Mamba heads (/ layer max)", Axis::MambaHeads),
        ("routed experts, REAP (/ layer max)", Axis::Experts),
    ];
    for (title, axis) in dots {
        let s = by_layer(axis);
        if !s[0].1.is_empty() {
            panels.push((title, "layer", s, true, Some(last)));
        }
    }
    let n = panels.len();
    let cols = match n {
        1..=3 => n,
        4 => 2,
        _ => 3,
    };
    let rows = n.div_ceil(cols);
    let root = BitMapBackend::new(path, (500 * cols as u32, 420 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|x| Error::Input(format!("plot: {x}")))?;
    let areas = root.split_evenly((rows, cols));
    for (a, (title, xl, s, points, x_max)) in areas.iter().zip(&panels) {
        panel(a, title, xl, s, *points, *x_max)?;
    }
    root.present()
        .map_err(|x| Error::Input(format!("plot {}: {x}", path.display())))?;
    Ok(())
}

/// Accuracy against latency (budget control): each named group of (x, y) points in its own
/// colour, and the Pareto frontier (highest y for any smaller x) as a line through them.
pub fn pareto(
    path: &Path,
    title: &str,
    labels: (&str, &str),
    groups: &[(String, Vec<(f32, f32)>)],
) -> Result<()> {
    register_font()?;
    let e = |x: String| Error::Input(format!("plot: {x}"));
    let all: Vec<(f32, f32)> = groups.iter().flat_map(|g| g.1.iter().copied()).collect();
    if all.is_empty() {
        return Err(e("no points".into()));
    }
    let x1 = all.iter().map(|p| p.0).fold(0f32, f32::max) * 1.05;
    let (y0, y1) = all
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((y1 - y0) * 0.08).max(0.01);
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f32..x1, (y0 - pad).max(0.0)..(y1 + pad).min(1.0))
        .map_err(|x| e(x.to_string()))?;
    c.configure_mesh()
        .x_desc(labels.0)
        .y_desc(labels.1)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let n = groups.len().max(1);
    for (i, (name, pts)) in groups.iter().enumerate() {
        let col = HSLColor(0.8 * i as f64 / n as f64, 0.75, 0.45);
        c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, col.filled())))
            .map_err(|x| e(x.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, col.filled()));
    }
    c.draw_series(LineSeries::new(frontier(&all), BLACK.stroke_width(1)))
        .map_err(|x| e(x.to_string()))?
        .label("Pareto frontier")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(1)));
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present()
        .map_err(|x| Error::Input(format!("{}: {x}", path.display())))?;
    Ok(())
}

/// The points no other point beats (lower or equal x with higher y), by x.
pub fn frontier(points: &[(f32, f32)]) -> Vec<(f32, f32)> {
    let mut p = points.to_vec();
    p.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut out: Vec<(f32, f32)> = vec![];
    for q in p {
        if out.last().is_none_or(|l| q.1 > l.1) {
            out.push(q);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legend_fits() {
        for n in [1, 3, LEGEND_MAX] {
            assert!((0..n).all(|i| in_legend(i, n)));
        }
        for n in [LEGEND_MAX + 1, 24, 30, 52, 200] {
            let named: Vec<usize> = (0..n).filter(|&i| in_legend(i, n)).collect();
            assert_eq!(named.len(), LEGEND_MAX, "{n}: {named:?}");
            assert_eq!((named[0], *named.last().unwrap()), (0, n - 1));
        }
    }

    #[test]
    fn frontier_keeps_what_nothing_beats() {
        let f = frontier(&[(3.0, 0.5), (1.0, 0.2), (2.0, 0.6), (2.5, 0.4), (1.0, 0.3)]);
        assert_eq!(f, vec![(1.0, 0.3), (2.0, 0.6)]);
    }
}
