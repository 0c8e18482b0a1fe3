//! A strict parser of the Prometheus/OpenMetrics text format (every line a comment of a
//! known kind or a well-formed sample, `# EOF` last), for the `/metrics` tests.

use std::collections::HashMap;

/// Samples by `name{sorted labels}`, and the declared type of each metric family.
pub struct Metrics {
    pub samples: HashMap<String, f64>,
    pub types: HashMap<String, String>,
}

impl Metrics {
    pub fn get(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key}; have {:?}", self.samples.keys()))
    }

    /// The sum of every sample of metric `name` (all its label sets).
    pub fn sum(&self, name: &str) -> f64 {
        let prefix = format!("{name}{{");
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix) || k.as_str() == name)
            .map(|(_, v)| v)
            .sum()
    }
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Parses `k="v",k2="v2"` strictly (escapes `\\`, `\"`, `\n`), returning sorted pairs.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad labels `{s}`"));
        assert!(is_name(k), "bad label name `{k}` in `{s}`");
        let mut v = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => v.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => v.push(c),
                    other => panic!("bad escape {other:?} in `{s}`"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => v.push(c),
                None => panic!("unterminated label value in `{s}`"),
            }
        };
        out.push((k.to_string(), v));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
        if !rest.is_empty() {
            assert!(!rest.starts_with(','), "empty label in `{s}`");
        }
    }
    out.sort();
    out
}

pub fn parse(text: &str) -> Metrics {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "the exposition must end with # EOF"
    );
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(c) = line.strip_prefix("# ") {
            let mut parts = c.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().expect("comment names a metric");
            assert!(is_name(name), "bad metric name in `{line}`");
            match kind {
                "HELP" | "UNIT" => {}
                "TYPE" => {
                    let t = parts.next().expect("a type");
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown",
                            "gaugehistogram"
                        ]
                        .contains(&t),
                        "unknown type in `{line}`"
                    );
                    assert!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "{name} typed twice"
                    );
                }
                _ => panic!("unknown comment `{line}`"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line `{line}`"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in `{line}`")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n,
                parse_labels(l.strip_suffix('}').expect("labels end with }")),
            ),
            None => (series, Vec::new()),
        };
        assert!(is_name(name), "bad sample name in `{line}`");
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample `{name}` before its # TYPE"
        );
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        assert!(
            samples.insert(key, value).is_none(),
            "duplicate sample `{line}`"
        );
    }
    Metrics { samples, types }
}

/// Buckets of histogram `name` with `labels` (`k=v,...` or empty), by upper bound.
pub fn buckets(m: &Metrics, name: &str, labels: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut b: Vec<(f64, f64)> = m
        .samples
        .iter()
        .filter_map(|(k, v)| {
            let inner = k.strip_prefix(&prefix)?.strip_suffix('}')?;
            let mut le = None;
            let mut rest = Vec::new();
            for kv in inner.split(',') {
                match kv.strip_prefix("le=") {
                    Some(x) => {
                        le = Some(if x == "+Inf" {
                            f64::INFINITY
                        } else {
                            x.parse().unwrap()
                        })
                    }
                    None => rest.push(kv),
                }
            }
            (rest.join(",") == labels).then(|| (le.unwrap(), *v))
        })
        .collect();
    b.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    b
}
