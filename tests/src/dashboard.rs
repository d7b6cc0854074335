//! The metric names a Grafana dashboard's PromQL queries read, and the names a Prometheus text
//! exposition declares, so a test can check that every panel reads something that is exported.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

use crate::control_plane::repo_root;

/// The chart's dashboard file.
pub fn chart_dashboard() -> PathBuf {
    repo_root().join("charts/petl-operator/dashboards/petl.json")
}

/// PromQL words that look like names but are not metrics: aggregations, their modifiers,
/// binary-operator keywords.
const KEYWORDS: [&str; 16] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "sum",
    "avg",
    "min",
    "max",
    "count",
];

/// Every metric name read by the `expr` of any query in a dashboard.
pub fn metric_names_in_queries(dashboard: &Value) -> BTreeSet<String> {
    let mut exprs = Vec::new();
    collect_exprs(dashboard, &mut exprs);
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

fn collect_exprs<'a>(value: &'a Value, into: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => into.push(expr),
                    _ => collect_exprs(v, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, into)),
        _ => {}
    }
}

/// The metric names in one PromQL expression: identifiers outside label matchers (`{...}`),
/// grouping lists (`by (...)`), ranges (`[5m]`) and strings that are not function calls or
/// keywords.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // After `by`, `without`, `on`, `ignoring`, `group_left` or `group_right`, the next
    // parenthesised list holds labels.
    let mut labels_next = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => i = skip_to(&chars, i, '}'),
            '[' => i = skip_to(&chars, i, ']'),
            '"' | '\'' | '`' => i = skip_to(&chars, i, c),
            // Numbers and durations (0.99, 5m, 1e3).
            c if c.is_ascii_digit() => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                continue;
            }
            '(' if labels_next => {
                labels_next = false;
                i = skip_to(&chars, i, ')');
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let call = chars.get(next) == Some(&'(');
                if matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    labels_next = true;
                } else if !call && !KEYWORDS.contains(&word.as_str()) && !is_number(&word) {
                    names.insert(word);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// The index just past the `close` that ends the construct opened at `open`.
fn skip_to(chars: &[char], open: usize, close: char) -> usize {
    let mut i = open + 1;
    while i < chars.len() && chars[i] != close {
        i += 1;
    }
    i + 1
}

fn is_number(word: &str) -> bool {
    matches!(word.to_ascii_lowercase().as_str(), "inf" | "nan")
}

/// The series names a Prometheus (OpenMetrics) text exposition declares: every sample's name,
/// and from the `# TYPE` lines the names a family yields even before it has samples (`_total`
/// for counters; `_bucket`, `_sum` and `_count` for histograms).
pub fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(declaration) = line.strip_prefix("# TYPE ") {
            let mut parts = declaration.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_are_found_outside_labels_groupings_ranges_and_calls() {
        assert_eq!(
            metric_names(
                "histogram_quantile(0.99, sum by (le, pod) (rate(petl_x_seconds_bucket{job=\"a\", pod=~\"w-.*\"}[5m])))"
            ),
            set(&["petl_x_seconds_bucket"])
        );
        assert_eq!(
            metric_names("max by (pod) (petl_trainer_step / petl_trainer_total_steps) > 0.5"),
            set(&["petl_trainer_step", "petl_trainer_total_steps"])
        );
        assert_eq!(
            metric_names("sum without (instance) (increase(a_total[1h] offset 5m)) or on (job) b"),
            set(&["a_total", "b"])
        );
    }

    #[test]
    fn exposition_names_include_families_without_samples() {
        let text = "# HELP petl_e Errors.\n# TYPE petl_e counter\n# TYPE petl_h histogram\npetl_h_bucket{le=\"1\"} 0\n# TYPE petl_g gauge\npetl_g 3\n# EOF\n";
        assert_eq!(
            exported_names(text),
            set(&[
                "petl_e_total",
                "petl_g",
                "petl_h_bucket",
                "petl_h_count",
                "petl_h_sum"
            ])
        );
    }

    #[test]
    fn the_charts_dashboard_reads_only_petl_metrics() {
        let text = std::fs::read_to_string(chart_dashboard()).unwrap();
        let dashboard: Value = serde_json::from_str(&text).unwrap();
        let names = metric_names_in_queries(&dashboard);
        assert!(names.len() >= 20, "{names:?}");
        for name in &names {
            assert!(
                ["petl_operator_", "petl_trainer_", "petl_snapshot_"]
                    .iter()
                    .any(|p| name.starts_with(p)),
                "{name} is not one of petl's metrics"
            );
        }
    }
}
