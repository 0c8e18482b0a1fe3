//! The benchmarks' report (`benches/support/report.rs`): the markdown table they print and
//! the SVG chart they write, from given rows. The SVG is parsed as XML and its bars are
//! found by their fill colours and measured.

#[path = "../benches/support/report.rs"]
mod report;

use std::time::Duration;

use report::{BASE_COLOR, Bar, Baseline, OURS_COLOR, Ratio, Report, Unit, ms, us};

fn hex(c: plotters::style::RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

/// A report like `--bench vmm`'s and `--bench sandbox`'s: one floor row, two times against
/// the exit floor, one against fork+exec, one figure alone in another unit.
fn sample() -> Report {
    let floor = Baseline::floor(Duration::from_nanos(25_200));
    let fork = Baseline::new(
        "fork+exec /bin/true",
        Duration::from_nanos(683_600),
        "683.6 µs (fork+exec /bin/true)",
    );
    let mut r = Report::new("sample", "pvrun sample benchmark (medians)");
    r.floor_row("raw KVM exit floor (CPL3 `out` round trip)", &floor);
    r.compare(
        "warm call (`echo`, 1 byte, no reset)",
        Duration::from_nanos(26_300),
        &floor,
        Ratio::Times,
        "<= 1.3x floor",
    );
    r.compare(
        "create sandbox from ELF (boot + init + snapshot)",
        Duration::from_nanos(976_200),
        &floor,
        Ratio::Exits,
        "-",
    );
    r.compare(
        "whole process `pvrun hello`",
        Duration::from_nanos(2_572_900),
        &fork,
        Ratio::Times,
        "<= 3 ms",
    );
    r.alone(
        "641 KiB",
        Bar::alone(
            "host memory per idle sandbox (1000 sandboxes; whole machine)",
            Unit::KiB,
            641.0,
        ),
        "<= 1 MiB",
    );
    r
}

#[test]
fn the_common_table_is_printed_as_the_benchmarks_always_did() {
    assert_eq!(
        sample().markdown(),
        "pvrun sample benchmark (medians)

| measurement | median | floor | ratio | target |
|---|---|---|---|---|
| raw KVM exit floor (CPL3 `out` round trip) | 25.2 µs | - | 1.00x | - |
| warm call (`echo`, 1 byte, no reset) | 26.3 µs | 25.2 µs | 1.04x | <= 1.3x floor |
| create sandbox from ELF (boot + init + snapshot) | 976.2 µs | 25.2 µs | 39 exits | - |
| whole process `pvrun hello` | 2572.9 µs | 683.6 µs (fork+exec /bin/true) | 3.76x | <= 3 ms |
| host memory per idle sandbox (1000 sandboxes; whole machine) | 641 KiB | - | - | <= 1 MiB |
"
    );
    assert_eq!(us(Duration::from_nanos(28_249)), "28.2 µs");
    assert_eq!(ms(Duration::from_micros(284_449)), "284.4 ms");
}

#[test]
fn other_tables_keep_their_columns_and_notes() {
    let mut r = Report::with_columns("t", "title line", &["guest", "operation", "time"]);
    r.row(
        vec!["crashes".into(), "read".into(), "0.22 ms".into()],
        Vec::new(),
    );
    r.row(vec!["ecosystem".into(), "".into(), "-".into()], Vec::new());
    r.note("target: met");
    assert_eq!(
        r.markdown(),
        "title line\n\n| guest | operation | time |\n|---|---|---|\n| crashes | read | 0.22 ms |\n| ecosystem | | - |\n\ntarget: met\n"
    );
}

/// A `<rect>`'s x, y, width and height.
fn geometry(n: &roxmltree::Node) -> (f64, f64, f64, f64) {
    let a = |k: &str| -> f64 {
        n.attribute(k)
            .unwrap_or_else(|| panic!("rect without {k}"))
            .parse()
            .unwrap()
    };
    (a("x"), a("y"), a("width"), a("height"))
}

/// The bars of one colour, top to bottom, without the legend's square (the first one).
fn bars<'a>(doc: &'a roxmltree::Document, color: &str) -> Vec<roxmltree::Node<'a, 'a>> {
    let mut v: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(color))
        .collect();
    assert!(!v.is_empty(), "no legend square of {color}");
    v.remove(0);
    v
}

fn texts(doc: &roxmltree::Document) -> Vec<String> {
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .collect()
}

#[test]
fn the_chart_is_an_svg_with_one_bar_per_figure_and_readable_labels() {
    let r = sample();
    let svg = r.svg().unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the chart is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(root.attribute("width"), Some("1100"));
    let height: f64 = root.attribute("height").unwrap().parse().unwrap();

    // Four figures of ours (the floor row has no bar), three baselines.
    let ours = bars(&doc, &hex(OURS_COLOR));
    let base = bars(&doc, &hex(BASE_COLOR));
    assert_eq!(ours.len(), 4, "{svg}");
    assert_eq!(base.len(), 3, "{svg}");
    for b in ours.iter().chain(&base) {
        let (x, y, w, h) = geometry(b);
        assert!(x >= 0.0 && w > 0.0 && h > 0.0, "{b:?}");
        assert!(x + w <= 1100.0 && y >= 0.0 && y + h <= height, "{b:?}");
    }

    let t = texts(&doc);
    let has = |s: &str| {
        assert!(
            t.iter().any(|x| x.contains(s)),
            "no text with {s:?} in {t:#?}"
        )
    };
    has("sample benchmark");
    has("pvrun sample benchmark (medians)");
    has("warm call (`echo`, 1 byte, no reset)   (target: <= 1.3x floor)");
    has("create sandbox from ELF (boot + init + snapshot)");
    has("whole process `pvrun hello`   (target: <= 3 ms)");
    has("host memory per idle sandbox");
    // Values, ratios and baseline names beside the bars.
    has("26.3 µs   = 1.04x");
    has("976 µs   = 39 exits");
    has("2.57 ms   = 3.76x");
    has("25.2 µs   raw KVM exit floor");
    has("684 µs   fork+exec /bin/true");
    has("641 KiB");
    // Panels: time spans 25 µs .. 2.6 ms (log), memory is one figure (linear).
    has("time (log scale, lower is better)");
    has("memory (linear scale, lower is better)");
    // Guest-chosen or table text is escaped, not broken: '<' went through as text.
    assert!(svg.contains("&lt;= 1.3x floor"));
}

#[test]
fn bar_lengths_follow_the_figures_on_both_scales() {
    let mut r = Report::with_columns("scales", "t", &["a"]);
    // Linear (within 10x): 3.0 beside 1.5 must be twice as long.
    r.row(
        vec!["x".into()],
        vec![Bar::vs("linear", Unit::Rate("GB/s"), 3.0, "peer", 1.5)],
    );
    // Log: 100x apart, the bigger one is longer but far less than 100x.
    r.row(
        vec!["y".into()],
        vec![Bar::times(
            "log",
            Duration::from_micros(2500),
            "floor",
            Duration::from_micros(25),
        )],
    );
    let svg = r.svg().unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let ours = bars(&doc, &hex(OURS_COLOR));
    let base = bars(&doc, &hex(BASE_COLOR));
    assert_eq!((ours.len(), base.len()), (2, 2));
    let w = |n: &roxmltree::Node| geometry(n).2;
    let linear = w(&ours[0]) / w(&base[0]);
    assert!((linear - 2.0).abs() < 0.05, "linear ratio {linear}");
    let log = w(&ours[1]) / w(&base[1]);
    assert!(log > 1.5 && log < 20.0, "log ratio {log}");
    // Each figure's bars start at its panel's left edge, ours above the baseline.
    for (o, b) in ours.iter().zip(&base) {
        let (go, gb) = (geometry(o), geometry(b));
        assert!((go.0 - gb.0).abs() < 1.0);
        assert!(
            go.1 + go.3 <= gb.1 + 0.5,
            "ours {go:?} not above base {gb:?}"
        );
    }
    let t = texts(&doc);
    assert!(t.iter().any(|x| x == "3.00 GB/s   = 2.00x"), "{t:#?}");
    // Axis ticks: powers of ten on the log axis (the first one at its left end), round
    // figures without trailing zeros on the linear one.
    for tick in ["10 µs", "100 µs", "1 ms", "0", "1 GB/s", "2 GB/s", "4 GB/s"] {
        assert!(t.iter().any(|x| x == tick), "no tick {tick:?} in {t:#?}");
    }
    assert!(
        t.iter()
            .any(|x| x.contains("GB/s (linear scale, higher is better)"))
    );
    assert!(
        t.iter()
            .any(|x| x.contains("time (log scale, lower is better)"))
    );
}

#[test]
fn a_missing_result_has_no_bar_and_says_so() {
    let mut r = Report::with_columns("missing", "t", &["a"]);
    r.row(
        vec!["x".into()],
        vec![
            Bar::alone("HTTP with wrk", Unit::Rate("requests/s"), f64::NAN),
            Bar::alone("TCP", Unit::Rate("Gbit/s"), 5.6),
        ],
    );
    let svg = r.svg().unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    assert_eq!(bars(&doc, &hex(OURS_COLOR)).len(), 1);
    let t = texts(&doc);
    assert!(
        t.iter().any(|x| x == "HTTP with wrk   (no result)"),
        "{t:#?}"
    );
    assert!(t.iter().any(|x| x == "5.60 Gbit/s"), "{t:#?}");
}

#[test]
fn save_writes_the_chart_into_every_directory() {
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let d = Dir(std::env::temp_dir().join(format!("pvrun-bench-report-{}", std::process::id())));
    let dirs = [d.0.join("a"), d.0.join("b/c")];
    let r = sample();
    let written = r.save(&dirs).unwrap();
    assert_eq!(
        written,
        [dirs[0].join("sample.svg"), dirs[1].join("sample.svg")]
    );
    for p in &written {
        let text = std::fs::read_to_string(p).unwrap();
        assert_eq!(text, r.svg().unwrap());
        roxmltree::Document::parse(&text).unwrap();
    }
    // A directory that cannot be made: a one-line error naming it.
    let file = d.0.join("a/sample.svg");
    let e = r.save(&[file.join("x")]).unwrap_err();
    assert!(e.starts_with(&file.join("x").display().to_string()), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn figures_are_written_with_three_significant_digits_and_their_unit() {
    let cases = [
        (Unit::Seconds, 25.24e-6, "25.2 µs"),
        (Unit::Seconds, 976.2e-6, "976 µs"),
        (Unit::Seconds, 2.5729e-3, "2.57 ms"),
        (Unit::Seconds, 0.1218, "122 ms"),
        (Unit::Seconds, 850e-9, "850 ns"),
        (Unit::Seconds, 3.5, "3.50 s"),
        (Unit::KiB, 641.0, "641 KiB"),
        (Unit::KiB, 20480.0, "20.0 MiB"),
        (Unit::Rate("GB/s"), 12.13, "12.1 GB/s"),
        (Unit::Rate("IOPS"), 233_003.0, "233k IOPS"),
        (Unit::Rate("requests/s"), 1_203_530.0, "1.20M requests/s"),
        (Unit::Rate("Gbit/s"), f64::NAN, "no result"),
    ];
    for (unit, v, want) in cases {
        assert_eq!(unit.format(v), want, "{unit:?} {v}");
    }
    assert!(Unit::Seconds.lower_is_better() && Unit::KiB.lower_is_better());
    assert!(!Unit::Rate("IOPS").lower_is_better());
}

#[test]
fn a_long_title_is_wrapped_inside_the_chart() {
    let words = "a benchmark title that goes on and on about what was measured ".repeat(5);
    let r = Report::with_columns("long", words.trim(), &["a"]);
    let svg = r.svg().unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let lines: Vec<String> = texts(&doc)
        .into_iter()
        .filter(|t| !t.is_empty() && words.contains(t.as_str()))
        .collect();
    assert!(lines.len() >= 3, "{lines:#?}");
    assert!(lines.iter().all(|l| l.chars().count() <= 110), "{lines:#?}");
    assert_eq!(lines.join(" "), words.trim());
}
