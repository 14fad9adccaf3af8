//! The importance plot: one panel per axis (PNG, plotters).

use super::importance::Importance;
use crate::error::{Error, Result};
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

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    xlabel: &str,
    series: &Series,
    points: bool,
) -> Result<()> {
    let e = |x: String| Error::Input(format!("plot: {x}"));
    let (mut x1, mut y0, mut y1) = (1f32, f32::MAX, f32::MIN);
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
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(48)
        .build_cartesian_2d(
            if points {
                -0.5f32..x1 + 0.5
            } else {
                0f32..x1 * 1.02
            },
            y0..y1 + (y1 - y0) * 0.05,
        )
        .map_err(|x| e(x.to_string()))?;
    c.configure_mesh()
        .x_desc(xlabel)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let n = series.len().max(1);
    for (i, (_, s)) in series.iter().enumerate() {
        let col = HSLColor(0.66 * i as f64 / n as f64, 0.7, 0.45);
        let name = series[i].0.clone();
        if points {
            c.draw_series(s.iter().map(|&p| Circle::new(p, 2, col.filled())))
                .map_err(|x| e(x.to_string()))?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 8, y), 3, col.filled()));
        } else {
            c.draw_series(LineSeries::new(s.iter().copied(), &col))
                .map_err(|x| e(x.to_string()))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col));
        }
    }
    if series.len() > 1 && series.iter().any(|(n, _)| !n.is_empty()) {
        c.configure_series_labels()
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
        panel(a, title, xl, s, false)?;
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

pub fn plot(imp: &Importance, path: &Path) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|x| Error::Input(format!("plot: {x}")))?;
    let areas = root.split_evenly((2, 3));
    let per_layer = |get: &dyn Fn(
        &super::importance::LayerImportance,
    ) -> Option<&super::importance::Axis>|
     -> Series {
        imp.layers
            .iter()
            .filter_map(|l| get(l).map(|a| (format!("{}", l.layer), sorted_norm(&a.scores))))
            .collect()
    };
    let by_layer = |get: &dyn Fn(
        &super::importance::LayerImportance,
    ) -> Option<&super::importance::Axis>|
     -> Series {
        vec![(
            "".into(),
            imp.layers
                .iter()
                .filter_map(|l| get(l).map(|a| (l.layer, a)))
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
    panel(
        &areas[0],
        "hidden channels (sorted)",
        "channel rank",
        &vec![("hidden".into(), sorted_norm(&imp.hidden.scores))],
        false,
    )?;
    match &imp.depth {
        Some(d) => {
            let pts: Vec<(f32, f32)> = d
                .scores
                .iter()
                .enumerate()
                .map(|(i, &s)| (i as f32, (s.max(1e-9)).log10()))
                .collect();
            panel(
                &areas[1],
                "depth: log10 NMSE when removed",
                "layer",
                &vec![("depth".into(), pts)],
                true,
            )?
        }
        None => panel(&areas[1], "depth: not ranked", "layer", &vec![], true)?,
    }
    panel(
        &areas[2],
        "FFN / expert channels per layer (sorted, / max)",
        "channel rank",
        &{
            let mut s = per_layer(&|l| l.ffn.as_ref());
            s.extend(per_layer(&|l| l.moe_ffn.as_ref()));
            s
        },
        false,
    )?;
    panel(
        &areas[3],
        "attention query heads (/ layer max)",
        "layer",
        &by_layer(&|l| l.heads.as_ref()),
        true,
    )?;
    panel(
        &areas[4],
        "Mamba heads (/ layer max)",
        "layer",
        &by_layer(&|l| l.mamba_heads.as_ref()),
        true,
    )?;
    panel(
        &areas[5],
        "routed experts, REAP (/ layer max)",
        "layer",
        &by_layer(&|l| l.experts.as_ref()),
        true,
    )?;
    root.present()
        .map_err(|x| Error::Input(format!("plot {}: {x}", path.display())))?;
    Ok(())
}
