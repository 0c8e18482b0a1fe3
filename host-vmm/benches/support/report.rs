//! A benchmark's results: the markdown table it prints and an SVG bar chart of the same
//! figures, each beside the floor or baseline measured in the same run.
//!
//! Every benchmark (host-vmm's and containerd-shim-pvrun's, which includes this file with
//! `#[path]`) builds one [`Report`] and calls [`Report::finish`], which prints the table,
//! writes `target/pvrun-bench/NAME.svg` (and `$PVRUN_BENCH_SVG_DIR/NAME.svg` when that is
//! set; a relative directory is taken from the workspace root) and prints the paths.
//!
//! The common table is `| measurement | median | floor | ratio | target |`:
//!
//! ```ignore
//! let floor = Baseline::floor(exit_floor());
//! let mut r = Report::new("vmm", "pvrun benchmark (medians; floors measured in this run)");
//! r.floor_row("raw KVM exit floor (CPL3 `out` round trip)", &floor); // no bar
//! r.compare("console-write hypercall round trip", hc, &floor, Ratio::Times, "<= 1.1x floor");
//! r.compare("boot-to-exit `hello`", boot, &floor, Ratio::Exits, "<= 1 ms");
//! // A figure compared with nothing: its table cell, its bar (label, unit, value), target.
//! r.alone("641 KiB", Bar::alone("host memory per idle sandbox", Unit::KiB, 641.0), "<= 1 MiB");
//! r.finish();
//! ```
//!
//! Any other table: [`Report::with_columns`], then [`Report::row`] with the cells exactly
//! as printed and the [`Bar`]s the chart shows for that row (none, one or several; a bar
//! is our figure, optionally beside a baseline in the same unit). The chart has one panel
//! per [`Unit`] (bars of one panel share an axis, logarithmic when the values span more
//! than a factor of 10), a title naming the benchmark, and beside each of our bars the
//! ratio to its baseline: the machine-independent figure.
//!
//! Text is written as SVG `<text>` (plotters' SVG backend without its `ttf` feature: no
//! font files are read; the viewer's sans-serif font draws it).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The environment variable naming a second directory for the charts (e.g. `docs/bench`).
pub const SVG_DIR_ENV: &str = "PVRUN_BENCH_SVG_DIR";

/// The fill of our bars, in the SVG as `#1F77B4`.
pub const OURS_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
/// The fill of the floor/baseline bars, in the SVG as `#A0A0A0`.
pub const BASE_COLOR: RGBColor = RGBColor(0xa0, 0xa0, 0xa0);

/// Microseconds with one decimal: `28.2 µs` (the common tables' time cells).
pub fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_nanos() as f64 / 1000.0)
}

/// Milliseconds with one decimal: `284.4 ms`.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// What a figure measures: decides its chart panel, how its axis is labelled, and
/// whether lower or higher is better.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unit {
    /// A duration, in seconds (lower is better); shown as ns, µs, ms or s.
    Seconds,
    /// Memory in KiB (lower is better).
    KiB,
    /// A rate (higher is better), named after the number: `"GB/s"`, `"IOPS"`,
    /// `"Gbit/s"`, `"requests/s"`. Rates of different names get different panels.
    Rate(&'static str),
}

impl Unit {
    /// Whether a smaller figure is the better one.
    pub fn lower_is_better(self) -> bool {
        !matches!(self, Unit::Rate(_))
    }

    /// A value with three significant digits and its unit: `23.4 µs`, `1.23 ms`,
    /// `641 KiB`, `12.1 GB/s`, `288k IOPS`.
    pub fn format(self, v: f64) -> String {
        if !v.is_finite() {
            return "no result".into();
        }
        match self {
            Unit::Seconds => {
                let (x, u) = if v < 1e-6 {
                    (v * 1e9, "ns")
                } else if v < 1e-3 {
                    (v * 1e6, "µs")
                } else if v < 1.0 {
                    (v * 1e3, "ms")
                } else {
                    (v, "s")
                };
                format!("{} {u}", sig3(x))
            }
            Unit::KiB if v >= 10240.0 => format!("{} MiB", sig3(v / 1024.0)),
            Unit::KiB => format!("{} KiB", sig3(v)),
            Unit::Rate(name) if v >= 1e6 => format!("{}M {name}", sig3(v / 1e6)),
            Unit::Rate(name) if v >= 1e4 => format!("{}k {name}", sig3(v / 1e3)),
            Unit::Rate(name) => format!("{} {name}", sig3(v)),
        }
    }

    /// The panel's name.
    fn axis(self) -> String {
        match self {
            Unit::Seconds => "time".into(),
            Unit::KiB => "memory".into(),
            Unit::Rate(name) => name.into(),
        }
    }
}

/// A tick label: `10 µs` rather than `10.0 µs`, `0` rather than `0.000 KiB`.
fn tick_text(s: String) -> String {
    let end = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, rest) = s.split_at(end);
    let num = if num.contains('.') {
        num.trim_end_matches('0').trim_end_matches('.')
    } else {
        num
    };
    if num == "0" {
        "0".into()
    } else {
        format!("{num}{rest}")
    }
}

/// Three significant digits (no exponent; whole numbers from 100 up).
fn sig3(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// One group of bars in the chart: our figure and, when it is compared with one, the
/// floor/baseline measured in the same run, in the same unit.
#[derive(Clone, Debug)]
pub struct Bar {
    /// What was measured (printed above the bars).
    pub label: String,
    pub unit: Unit,
    /// Our figure, in `unit` (seconds for [`Unit::Seconds`]). NaN: no result (the bar is
    /// left out, the label says so).
    pub ours: f64,
    /// The baseline's name (`raw KVM exit floor`, `runc`, ...) and figure in `unit`.
    pub base: Option<(String, f64)>,
    /// The ratio as the table writes it (`1.04x`, `39 exits`); [`Bar::vs`] sets `ours /
    /// base` as `N.NNx`.
    pub ratio: Option<String>,
    /// The target, `-` or empty for none.
    pub target: String,
}

impl Bar {
    /// Our figure beside a baseline; the ratio is `ours / base` as `N.NNx`.
    pub fn vs(label: &str, unit: Unit, ours: f64, base_name: &str, base: f64) -> Bar {
        Bar {
            label: label.into(),
            unit,
            ours,
            base: Some((base_name.into(), base)),
            ratio: Some(format!("{:.2}x", ours / base)),
            target: String::new(),
        }
    }

    /// Our figure on its own (nothing measured to compare it with).
    pub fn alone(label: &str, unit: Unit, ours: f64) -> Bar {
        Bar {
            label: label.into(),
            unit,
            ours,
            base: None,
            ratio: None,
            target: String::new(),
        }
    }

    /// Durations beside a baseline duration, in [`Unit::Seconds`].
    pub fn times(label: &str, ours: Duration, base_name: &str, base: Duration) -> Bar {
        Bar::vs(
            label,
            Unit::Seconds,
            ours.as_secs_f64(),
            base_name,
            base.as_secs_f64(),
        )
    }

    /// The ratio as text (replaces `N.NNx`).
    pub fn ratio(mut self, text: impl Into<String>) -> Bar {
        self.ratio = Some(text.into());
        self
    }

    /// The target as text.
    pub fn target(mut self, text: impl Into<String>) -> Bar {
        self.target = text.into();
        self
    }

    fn height(&self) -> f64 {
        LABEL_H + BAR_STEP * if self.base.is_some() { 2.0 } else { 1.0 } + GAP
    }
}

/// A floor or baseline duration of the common table: its name in the chart and its cell
/// in the table.
#[derive(Clone, Debug)]
pub struct Baseline {
    /// The name at its bar: `raw KVM exit floor`, `fork+exec /bin/true`, `runc`.
    pub name: String,
    pub value: Duration,
    /// Its cell in the table's `floor` column.
    pub cell: String,
}

impl Baseline {
    /// The raw KVM exit floor (`support::exit_floor()`); cell `us(d)`.
    pub fn floor(d: Duration) -> Baseline {
        Baseline {
            name: "raw KVM exit floor".into(),
            value: d,
            cell: us(d),
        }
    }

    /// Any other baseline, with its table cell.
    pub fn new(name: &str, value: Duration, cell: impl Into<String>) -> Baseline {
        Baseline {
            name: name.into(),
            value,
            cell: cell.into(),
        }
    }
}

/// How the common table's `ratio` column states ours / floor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ratio {
    /// `1.04x` (two decimals).
    Times,
    /// `39 exits` (whole floors: for things that cost many exits).
    Exits,
}

impl Ratio {
    fn text(self, r: f64) -> String {
        match self {
            Ratio::Times => format!("{r:.2}x"),
            Ratio::Exits => format!("{r:.0} exits"),
        }
    }
}

/// One table row and the bars the chart shows for it.
#[derive(Clone, Debug)]
pub struct Row {
    pub cells: Vec<String>,
    pub bars: Vec<Bar>,
}

/// A benchmark's table and chart; see the module documentation.
#[derive(Clone, Debug)]
pub struct Report {
    /// The file name of the chart (`NAME.svg`) and the chart's title prefix.
    pub name: String,
    /// The line printed above the table; the chart's title.
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    /// Lines printed after the table.
    pub notes: Vec<String>,
    /// The time cells of [`Report::compare`] and [`Report::floor_row`] (default [`us`]).
    pub time_cell: fn(Duration) -> String,
}

/// The common table's columns.
pub const COLUMNS: [&str; 5] = ["measurement", "median", "floor", "ratio", "target"];

impl Report {
    /// A report with the common columns `measurement | median | floor | ratio | target`.
    pub fn new(name: &str, title: impl Into<String>) -> Report {
        Report::with_columns(name, title, &COLUMNS)
    }

    /// A report with its own columns.
    pub fn with_columns(name: &str, title: impl Into<String>, columns: &[&str]) -> Report {
        Report {
            name: name.into(),
            title: title.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
            time_cell: us,
        }
    }

    /// Time cells in another format (e.g. [`ms`]).
    pub fn time_cells(mut self, f: fn(Duration) -> String) -> Report {
        self.time_cell = f;
        self
    }

    /// Any row: the cells exactly as printed, and the chart's bars for it.
    pub fn row(&mut self, cells: Vec<String>, bars: Vec<Bar>) {
        assert_eq!(
            cells.len(),
            self.columns.len(),
            "a row of {} cells in a table of {} columns: {cells:?}",
            cells.len(),
            self.columns.len()
        );
        self.rows.push(Row { cells, bars });
    }

    /// The common table's row of the floor itself: `| LABEL | 25.2 µs | - | 1.00x | - |`.
    /// No bar: the chart shows the floor beside every figure compared with it.
    pub fn floor_row(&mut self, label: &str, floor: &Baseline) {
        self.row(
            vec![
                label.into(),
                (self.time_cell)(floor.value),
                "-".into(),
                "1.00x".into(),
                "-".into(),
            ],
            Vec::new(),
        );
    }

    /// The common table's row of a duration against a baseline:
    /// `| LABEL | ours | base.cell | ratio | TARGET |`, and the pair of bars.
    pub fn compare(
        &mut self,
        label: &str,
        ours: Duration,
        base: &Baseline,
        ratio: Ratio,
        target: &str,
    ) {
        let r = ratio.text(ours.as_secs_f64() / base.value.as_secs_f64());
        self.row(
            vec![
                label.into(),
                (self.time_cell)(ours),
                base.cell.clone(),
                r.clone(),
                target.into(),
            ],
            vec![
                Bar::times(label, ours, &base.name, base.value)
                    .ratio(r)
                    .target(target),
            ],
        );
    }

    /// The common table's row of a figure compared with nothing:
    /// `| bar.label | CELL | - | - | TARGET |`, and the bar alone.
    pub fn alone(&mut self, cell: impl Into<String>, bar: Bar, target: &str) {
        self.row(
            vec![
                bar.label.clone(),
                cell.into(),
                "-".into(),
                "-".into(),
                target.into(),
            ],
            vec![bar.target(target)],
        );
    }

    /// A line printed after the table.
    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    /// The text the benchmark prints: the title, the table, the notes.
    pub fn markdown(&self) -> String {
        let mut s = format!("{}\n\n", self.title);
        // An empty cell is `| |`, as the tables were always printed.
        let line = |cells: &[String]| {
            let mut l = String::from("|");
            for c in cells {
                l += &if c.is_empty() {
                    " |".into()
                } else {
                    format!(" {c} |")
                };
            }
            l + "\n"
        };
        s += &line(&self.columns);
        s += &format!("|{}\n", "---|".repeat(self.columns.len()));
        for r in &self.rows {
            s += &line(&r.cells);
        }
        if !self.notes.is_empty() {
            s += "\n";
            for n in &self.notes {
                s += n;
                s += "\n";
            }
        }
        s
    }

    /// Prints the table, writes the chart into `target/pvrun-bench/` (and
    /// `$PVRUN_BENCH_SVG_DIR`) and prints where. A chart that cannot be written is
    /// reported on one line and the benchmark exits with status 1 (after the table).
    pub fn finish(self) {
        print!("{}", self.markdown());
        let mut dirs = vec![target_dir().join("pvrun-bench")];
        if let Some(d) = std::env::var_os(SVG_DIR_ENV).filter(|d| !d.is_empty()) {
            let d = PathBuf::from(d);
            // cargo runs a benchmark in its package's directory: take a relative path
            // from the workspace root instead, where it was most likely typed.
            dirs.push(if d.is_relative() {
                workspace_root().join(d)
            } else {
                d
            });
        }
        match self.save(&dirs) {
            Ok(paths) => {
                println!();
                for p in paths {
                    println!("chart: {}", p.display());
                }
            }
            Err(e) => {
                eprintln!("benchmark chart not written: {e}");
                std::process::exit(1);
            }
        }
    }

    /// Writes the chart as `NAME.svg` into each directory (creating it); returns the
    /// files written.
    pub fn save(&self, dirs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
        let svg = self.svg()?;
        let mut written = Vec::new();
        for d in dirs {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            let p = d.join(format!("{}.svg", self.name));
            std::fs::write(&p, &svg).map_err(|e| format!("{}: {e}", p.display()))?;
            written.push(p);
        }
        Ok(written)
    }

    /// Every bar, in table order.
    pub fn bars(&self) -> impl Iterator<Item = &Bar> {
        self.rows.iter().flat_map(|r| &r.bars)
    }

    /// The chart as SVG text.
    pub fn svg(&self) -> Result<String, String> {
        // Panels: one per unit, in order of first appearance.
        let mut panels: Vec<(Unit, Vec<&Bar>)> = Vec::new();
        for b in self.bars() {
            match panels.iter_mut().find(|(u, _)| *u == b.unit) {
                Some((_, v)) => v.push(b),
                None => panels.push((b.unit, vec![b])),
            }
        }
        let heights: Vec<u32> = panels
            .iter()
            .map(|(_, bars)| {
                (PANEL_TOP + bars.iter().map(|b| b.height()).sum::<f64>() + PANEL_AXIS) as u32
            })
            .collect();
        let header = header_height(&self.title);
        let height = header + heights.iter().sum::<u32>() + if panels.is_empty() { 30 } else { 0 };
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
            draw_chart(&root, self, &panels, &heights).map_err(|e| e.to_string())?;
            root.present().map_err(|e| e.to_string())?;
        }
        Ok(out)
    }
}

const WIDTH: u32 = 1100;
/// Characters of the title per line (16 px sans-serif over the chart's width).
const TITLE_CHARS: usize = 110;
const TITLE_LINE: u32 = 22;
const MARGIN: i32 = 40;
const PANEL_TOP: f64 = 34.0;
const PANEL_AXIS: f64 = 54.0;
const LABEL_H: f64 = 24.0;
const BAR_H: f64 = 16.0;
const BAR_STEP: f64 = 19.0;
const GAP: f64 = 14.0;
/// The share of the plot's width kept free right of the longest bar for its text.
const TEXT_ROOM: f64 = 0.3;

type DrawResult<T, DB> = Result<T, DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &Report,
    panels: &[(Unit, Vec<&Bar>)],
    heights: &[u32],
) -> DrawResult<(), DB> {
    root.fill(&WHITE)?;
    // The benchmark's name, then its title line (wrapped), then the legend.
    root.draw(&Text::new(
        format!("{} benchmark", report.name),
        (MARGIN, 10),
        ("sans-serif", 22).into_font().style(FontStyle::Bold),
    ))?;
    let small = ("sans-serif", 16).into_font();
    let mut y = 40;
    for line in wrap(&report.title, TITLE_CHARS) {
        root.draw(&Text::new(line, (MARGIN, y), small.clone()))?;
        y += TITLE_LINE as i32;
    }
    let y = y + 8;
    root.draw(&Rectangle::new(
        [(MARGIN, y), (MARGIN + 14, y + 12)],
        OURS_COLOR.filled(),
    ))?;
    root.draw(&Text::new(
        "pvrun (this run)",
        (MARGIN + 20, y),
        small.clone(),
    ))?;
    let x = MARGIN + 190;
    root.draw(&Rectangle::new(
        [(x, y), (x + 14, y + 12)],
        BASE_COLOR.filled(),
    ))?;
    root.draw(&Text::new(
        "floor or baseline measured in the same run (named at its bar); ratio = pvrun / baseline",
        (x + 20, y),
        small.clone(),
    ))?;
    if panels.is_empty() {
        root.draw(&Text::new("(no figures)", (MARGIN, y + 30), small))?;
        return Ok(());
    }
    let (_, mut rest) = root.split_vertically(header_height(&report.title));
    for ((unit, bars), h) in panels.iter().zip(heights) {
        let (area, below) = rest.split_vertically(*h);
        rest = below;
        draw_panel(&area, *unit, bars)?;
    }
    Ok(())
}

/// The title, the wrapped title line and the legend.
fn header_height(title: &str) -> u32 {
    40 + TITLE_LINE * wrap(title, TITLE_CHARS).len() as u32 + 42
}

/// Lines of at most `width` characters, broken at spaces (a longer word stays whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let last = lines.last_mut().unwrap();
        if !last.is_empty() && last.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
}

/// One panel: the bars of one unit on one axis.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    unit: Unit,
    bars: &[&Bar],
) -> DrawResult<(), DB> {
    let values: Vec<f64> = bars
        .iter()
        .flat_map(|b| std::iter::once(b.ours).chain(b.base.as_ref().map(|(_, v)| *v)))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    let (min, max) = if values.is_empty() {
        (1.0, 1.0)
    } else {
        (min, max)
    };
    let log = max / min > 10.0;
    let total: f64 = bars.iter().map(|b| b.height()).sum();
    let caption = format!(
        "{} ({}, {} is better)",
        unit.axis(),
        if log { "log scale" } else { "linear scale" },
        if unit.lower_is_better() {
            "lower"
        } else {
            "higher"
        }
    );
    let mut cb = ChartBuilder::on(area);
    cb.caption(
        caption,
        ("sans-serif", 18).into_font().style(FontStyle::Bold),
    )
    .margin_left(MARGIN as u32)
    .margin_right(MARGIN as u32 + 8)
    .x_label_area_size(24);
    if log {
        // From the power of ten under the smallest value; room for text on the right.
        // (A hair under it, so that the power of ten itself gets a tick.)
        let lo = 10f64.powf(min.log10().floor()) * 0.999;
        let span = (max / lo).ln();
        let hi = max * (span * TEXT_ROOM / (1.0 - TEXT_ROOM)).exp();
        let chart = cb.build_cartesian_2d((lo..hi).log_scale(), 0.0..total)?;
        fill_panel(chart, unit, bars, lo, total, true)
    } else {
        let hi = max / (1.0 - TEXT_ROOM);
        let chart = cb.build_cartesian_2d(0.0..hi, 0.0..total)?;
        fill_panel(chart, unit, bars, 0.0, total, false)
    }
}

fn fill_panel<DB: DrawingBackend, X>(
    mut chart: ChartContext<'_, DB, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    unit: Unit,
    bars: &[&Bar],
    lo: f64,
    total: f64,
    log: bool,
) -> DrawResult<(), DB>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    // Tick labels: on a log axis only at 1, 2 and 5 times a power of ten.
    let tick = |v: &f64| {
        let m = *v / 10f64.powf(v.log10().floor());
        let round = [1.0, 2.0, 5.0, 10.0].iter().any(|k| (m - k).abs() < 1e-6);
        if !log || round {
            tick_text(unit.format(*v))
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_labels(if log { 40 } else { 8 })
        .x_label_formatter(&tick)
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(0xe4, 0xe4, 0xe4))
        .x_label_style(("sans-serif", 15))
        .draw()?;
    let label_font = ("sans-serif", 16).into_font();
    let value_font =
        TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let bottom = |v: f64| if v.is_finite() && v > lo { v } else { lo };
    let mut top = 0.0;
    for b in bars {
        // y runs upwards; `top` is measured from the panel's top.
        let y = |from_top: f64| total - from_top;
        let mut label = b.label.clone();
        if !b.target.is_empty() && b.target != "-" {
            label += &format!("   (target: {})", b.target);
        }
        if !b.ours.is_finite() {
            label += "   (no result)";
        }
        chart.draw_series(std::iter::once(Text::new(
            label,
            (lo, y(top + 3.0)),
            label_font.clone(),
        )))?;
        let mut row = top + LABEL_H;
        let mut one = |value: f64, color: RGBColor, text: String| -> DrawResult<(), DB> {
            let (y0, y1) = (y(row), y(row + BAR_H));
            if value.is_finite() {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(lo, y1), (bottom(value), y0)],
                    color.filled(),
                )))?;
            }
            chart.draw_series(std::iter::once(
                EmptyElement::at((bottom(value), (y0 + y1) / 2.0))
                    + Text::new(text, (6, 0), value_font.clone()),
            ))?;
            row += BAR_STEP;
            Ok(())
        };
        let ours = match &b.ratio {
            Some(r) => format!("{}   = {r}", unit.format(b.ours)),
            None => unit.format(b.ours),
        };
        one(b.ours, OURS_COLOR, ours)?;
        if let Some((name, v)) = &b.base {
            one(*v, BASE_COLOR, format!("{}   {name}", unit.format(*v)))?;
        }
        top += b.height();
    }
    Ok(())
}

/// The build's target directory: the benchmark binary is `TARGET/PROFILE/deps/NAME-HASH`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let deps = exe.parent()?;
            (deps.file_name()? == "deps").then(|| deps.parent()?.parent().map(Path::to_path_buf))?
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The workspace root: the parent of the package that includes this file.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}
