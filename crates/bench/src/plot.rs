//! `ferroserve bench plot`: charts from one or more result files, each as PNG and SVG, with the runs
//! overlaid so that peers are compared in one picture:
//! - `ttft_cdf`, `itl_cdf`, `e2e_cdf`: latency CDFs, one line per run and level;
//! - `throughput`: output tokens per second against concurrency or rate;
//! - `ttft_vs_load`: TTFT p50 and p99 against concurrency or rate.
//!
//! Text needs a TrueType font: `FERROSERVE_PLOT_FONT`, else DejaVu Sans or Liberation Sans from the
//! system (Debian: `fonts-dejavu-core`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::BenchError;
use crate::load::Level;
use crate::report::RunResult;
use crate::stats::{Distribution, LevelResult};

/// Chart size in pixels.
const SIZE: (u32, u32) = (960, 600);
/// Fonts tried in order when `FERROSERVE_PLOT_FONT` is unset.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// One line on a chart.
struct Series {
    /// Legend text.
    name: String,
    /// Points in data units.
    points: Vec<(f64, f64)>,
    /// Which run: runs get distinct hues.
    run: usize,
    /// Lightness step within the run (levels of a CDF), out of `shades`.
    shade: usize,
    /// Steps in the run.
    shades: usize,
    /// Draw a dot on each point (load curves, which have few points).
    markers: bool,
    /// Dashed (a run's second statistic, p99, beside its solid p50).
    dashed: bool,
}

/// A line chart.
struct Chart {
    /// File stem and title.
    stem: &'static str,
    /// Caption.
    title: String,
    /// X axis name.
    x: String,
    /// Y axis name.
    y: String,
    /// The lines.
    series: Vec<Series>,
}

/// Registers a font with plotters, once per process.
fn font() -> Result<(), BenchError> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = std::env::var_os("FERROSERVE_PLOT_FONT")
            .map(PathBuf::from)
            .or_else(|| FONT_PATHS.iter().map(PathBuf::from).find(|p| p.exists()))
            .ok_or_else(|| {
                "no TrueType font found: set FERROSERVE_PLOT_FONT to a .ttf file, or install DejaVu \
                 (Debian: apt-get install fonts-dejavu-core)"
                    .to_string()
            })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // plotters keeps fonts for the life of the process; this is read once.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable TrueType font", path.display()))
    })
    .clone()
    .map_err(BenchError::Plot)
}

/// Writes every chart for `runs` into `dir`, as PNG and SVG. Returns the files written.
pub fn plot(runs: &[RunResult], dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    if runs.is_empty() {
        return Err(BenchError::setting("files", "give at least one result file"));
    }
    font()?;
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    let mut written = Vec::new();
    for chart in charts(runs) {
        written.extend(write(dir, &chart)?);
    }
    Ok(written)
}

/// One line of a chart drawn by [`line_chart`].
pub struct Line {
    /// Legend text.
    pub name: String,
    /// Points in data units.
    pub points: Vec<(f64, f64)>,
    /// Dashed instead of solid.
    pub dashed: bool,
    /// A dot on each point (for few points).
    pub markers: bool,
}

/// Draws one line chart, each line in its own hue, as `<dir>/<stem>.png` and
/// `.svg` (for other tools' charts: `ferroserve plan`). Returns the files written.
pub fn line_chart(
    dir: &Path,
    stem: &'static str,
    title: &str,
    axes: [&str; 2],
    lines: Vec<Line>,
) -> Result<Vec<PathBuf>, BenchError> {
    font()?;
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    let series = lines
        .into_iter()
        .enumerate()
        .map(|(run, l)| Series {
            name: l.name,
            points: l.points,
            run,
            shade: 0,
            shades: 1,
            markers: l.markers,
            dashed: l.dashed,
        })
        .collect();
    let chart = Chart {
        stem,
        title: title.into(),
        x: axes[0].into(),
        y: axes[1].into(),
        series,
    };
    write(dir, &chart)
}

/// Writes `chart` as PNG and SVG into `dir`.
fn write(dir: &Path, chart: &Chart) -> Result<Vec<PathBuf>, BenchError> {
    let png = dir.join(format!("{}.png", chart.stem));
    draw(BitMapBackend::new(&png, SIZE), chart)?;
    let svg = dir.join(format!("{}.svg", chart.stem));
    draw(SVGBackend::new(&svg, SIZE), chart)?;
    Ok(vec![png, svg])
}

/// The load axis name for these runs.
fn load_axis(runs: &[RunResult]) -> String {
    let levels = || runs.iter().flat_map(|r| &r.levels);
    if levels().all(|l| matches!(l.level, Level::Concurrency(_))) {
        "concurrency (requests in flight)".into()
    } else if levels().all(|l| matches!(l.level, Level::Rate(_))) {
        "request rate (req/s)".into()
    } else {
        "load (concurrency or req/s)".into()
    }
}

fn charts(runs: &[RunResult]) -> Vec<Chart> {
    let cdf = |stem: &'static str, what: &str, pick: fn(&LevelResult) -> &Distribution| Chart {
        stem,
        title: format!("{what} CDF"),
        x: format!("{what} (ms)"),
        y: "cumulative fraction".into(),
        series: runs
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.levels.iter().filter(move |l| pick(l).count > 0).map(move |l| Series {
                    name: format!("{} {}", r.label, l.level.label()),
                    points: pick(l).cdf.iter().map(|p| (p[0], p[1])).collect(),
                    run: i,
                    shade: r.levels.iter().position(|x| x.level == l.level).unwrap_or(0),
                    shades: r.levels.len(),
                    markers: false,
                    dashed: false,
                })
            })
            .collect(),
    };
    let load = |l: &LevelResult| l.level.value().min(1e6);
    let axis = load_axis(runs);
    vec![
        cdf("ttft_cdf", "TTFT", |l| &l.ttft),
        cdf("itl_cdf", "ITL", |l| &l.itl),
        cdf("e2e_cdf", "E2E latency", |l| &l.e2e),
        Chart {
            stem: "throughput",
            title: "Output throughput against load".into(),
            x: axis.clone(),
            y: "output tokens/s".into(),
            series: runs
                .iter()
                .enumerate()
                .map(|(i, r)| Series {
                    name: r.label.clone(),
                    points: r.levels.iter().map(|l| (load(l), l.output_throughput)).collect(),
                    run: i,
                    shade: 0,
                    shades: 1,
                    markers: true,
                    dashed: false,
                })
                .collect(),
        },
        Chart {
            stem: "ttft_vs_load",
            title: "TTFT p50 and p99 against load".into(),
            x: axis,
            y: "TTFT (ms)".into(),
            series: runs
                .iter()
                .enumerate()
                .flat_map(|(i, r)| {
                    [
                        ("p50", 0usize, (|d: &Distribution| d.median) as fn(&Distribution) -> f64),
                        ("p99", 1, |d| d.p99),
                    ]
                    .into_iter()
                    .map(move |(stat, shade, f)| Series {
                        name: format!("{} {stat}", r.label),
                        points: r.levels.iter().map(|l| (load(l), f(&l.ttft))).collect(),
                        run: i,
                        shade: 0,
                        shades: 1,
                        markers: true,
                        dashed: shade == 1,
                    })
                })
                .collect(),
        },
    ]
}

/// Hues for runs (blue, orange, green, red, purple), so that peers are told apart at a glance.
const HUES: [f64; 5] = [0.58, 0.08, 0.33, 0.0, 0.78];

/// A series' color: its run's hue, darker for the first level and lighter for later ones.
fn color(s: &Series) -> RGBAColor {
    let step = if s.shades > 1 {
        s.shade as f64 / (s.shades - 1) as f64
    } else {
        0.0
    };
    HSLColor(HUES[s.run % HUES.len()], 0.8, 0.30 + 0.35 * step).to_rgba()
}

fn draw<DB: DrawingBackend>(backend: DB, c: &Chart) -> Result<(), BenchError> {
    let err = |e: &dyn std::fmt::Display| BenchError::Plot(format!("{}: {e}", c.stem));
    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let points = || c.series.iter().flat_map(|s| s.points.iter());
    let x_max = points().map(|p| p.0).fold(0.0_f64, f64::max).max(1e-3) * 1.05;
    let y_max = points().map(|p| p.1).fold(0.0_f64, f64::max).max(1e-3) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(c.x.as_str())
        .y_desc(c.y.as_str())
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for s in &c.series {
        let color = color(s);
        let line = if s.dashed {
            chart.draw_series(DashedLineSeries::new(
                s.points.iter().copied(),
                8,
                6,
                color.stroke_width(2),
            ))
        } else {
            chart.draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
        };
        let dashed = s.dashed;
        line.map_err(|e| err(&e))?.label(s.name.as_str()).legend(move |(x, y)| {
            let end = if dashed { x + 10 } else { x + 24 };
            PathElement::new(vec![(x, y), (end, y)], color.stroke_width(2))
        });
        if s.markers {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
