//! The figures, their baselines, ratios and targets: the table a person reads and the one JSON
//! line a script reads.

use serde_json::{json, Map, Value};

use super::Figures;

/// What a figure must achieve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// value / baseline >= x
    RatioAtLeast(f64),
    /// value / baseline <= x
    RatioAtMost(f64),
    /// value <= x
    AtMost(f64),
}

impl Target {
    fn describe(self, baseline: Option<&str>) -> String {
        let b = baseline.unwrap_or("baseline");
        match self {
            Target::RatioAtLeast(x) => format!(">= {x}x {b}"),
            Target::RatioAtMost(x) => format!("<= {x}x {b}"),
            Target::AtMost(x) => format!("<= {x}"),
        }
    }

    fn short(self) -> String {
        match self {
            Target::RatioAtLeast(x) => format!(">= {x}x"),
            Target::RatioAtMost(x) => format!("<= {x}x"),
            Target::AtMost(x) => format!("<= {x}"),
        }
    }

    /// Whether `value` (with `ratio` to its baseline) meets the target; `None` when a figure
    /// it needs is missing.
    pub fn pass(self, value: f64, ratio: Option<f64>) -> Option<bool> {
        match self {
            Target::RatioAtLeast(x) => ratio.map(|r| r >= x),
            Target::RatioAtMost(x) => ratio.map(|r| r <= x),
            Target::AtMost(x) => Some(value <= x),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub name: &'static str,
    pub baseline: Option<&'static str>,
    pub target: Option<Target>,
    pub about: &'static str,
}

const fn row(
    name: &'static str,
    baseline: Option<&'static str>,
    target: Option<Target>,
    about: &'static str,
) -> Row {
    Row { name, baseline, target, about }
}

/// Every row, in the order printed. Figures not listed here still go into the JSON.
#[rustfmt::skip]
pub const ROWS: &[Row] = &[
    row("memcpy_gbps", None, None, "baseline: memcpy of the mapped warm file into pre-faulted memory"),
    row("raw_copy_gbps", None, None, "baseline: in-process UFFDIO_COPY, 2 MiB chunks"),
    row("min_fault_us", None, None, "baseline: p50 first touch, 1-page handler (own process), VM and handler on one CPU"),
    row("min_fault_p99_us", None, None, "baseline: p99 of the same"),
    row("min_fault_free_us", None, None, "baseline: p50, the same unpinned (lands on one CPU or two)"),
    row("min_fault_cross_cpu_us", None, None, "baseline: p50, VM and handler pinned to different CPUs"),
    row("min_touch_all_gbps", None, None, "baseline: read-seq of a fresh VM, 1-page handler, one CPU"),
    row("min_touch_all_free_gbps", None, None, "baseline: the same unpinned"),
    row("touch_resident_gbps", None, None, "ceiling: read-seq of a VM already resident (vmsim verify speed)"),
    row("fault_p50_us", Some("min_fault_us"), Some(Target::RatioAtMost(1.25)), "p50 random first touch, fresh VM"),
    row("fault_p99_us", Some("min_fault_p99_us"), None, "p99 of the same"),
    row("touch_all_gbps", Some("min_touch_all_gbps"), Some(Target::RatioAtLeast(5.0)), "read-seq of a fresh VM"),
    row("complete_dense_gbps", Some("raw_copy_gbps"), Some(Target::RatioAtLeast(0.9)), "CompleteSession, untouched dense VM"),
    row("complete_sparse_gbps", Some("raw_copy_gbps"), Some(Target::RatioAtLeast(1.6)), "the same, 25% zero pages + 25% holes (logical bytes)"),
    row("complete_with_reader_gbps", Some("raw_copy_gbps"), None, "dense CompleteSession while a reader runs"),
    row("stall_max_ms", None, Some(Target::AtMost(5.0)), "reader's longest page read during completion"),
    row("stall_p99_ms", None, Some(Target::AtMost(1.0)), "reader's p99 page read during completion"),
    row("sessions_graduated", Some("sessions_count"), Some(Target::RatioAtLeast(1.0)), "VMs restored concurrently, verified, graduated"),
    row("sessions_errors", None, Some(Target::AtMost(0.0)), "errors among them"),
    row("sessions_mismatches", None, Some(Target::AtMost(0.0)), "pages read wrong among them"),
    row("sessions_restore_s", None, None, "wall: CreateSession of all to all SERVING"),
    row("sessions_graduate_s", None, None, "wall: graduating and verifying all"),
    row("pager_threads_max", Some("pager_threads_idle"), Some(Target::AtMost(16.0)), "pager threads, max sampled (bound: 16)"),
    row("pager_anon_per_session_kib", Some("pager_anon_limit_kib"), Some(Target::RatioAtMost(1.0)), "pager RssAnon growth per live session"),
    row("pager_rss_per_session_kib", None, None, "pager VmRSS growth per live session (incl. file pages)"),
    row("rpc_complete_p50_ms", None, None, "CompleteSession round trip, resident small session"),
    row("watch_snapshot_ms", None, None, "WatchSessions: first SNAPSHOT, every session live"),
];

/// One evaluated row.
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub row: Row,
    pub value: f64,
    pub baseline: Option<f64>,
    pub ratio: Option<f64>,
    pub pass: Option<bool>,
}

/// Evaluates every row whose figure was measured.
pub fn evaluate(f: &Figures) -> Vec<Evaluated> {
    ROWS.iter()
        .filter_map(|row| {
            let value = f.median(row.name)?;
            let baseline = row.baseline.and_then(|b| f.median(b));
            let ratio = baseline.filter(|b| *b != 0.0).map(|b| value / b);
            let pass = row.target.and_then(|t| t.pass(value, ratio));
            Some(Evaluated { row: *row, value, baseline, ratio, pass })
        })
        .collect()
}

fn num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 || a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The table: figure, value, baseline, ratio, target, result.
pub fn table(rows: &[Evaluated], reps: usize) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<28} {:>10} {:>24} {:>7} {:>9} {:>6}  what (medians of {reps} reps)\n",
        "figure", "value", "baseline", "ratio", "target", "result"
    ));
    for e in rows {
        let baseline = match (e.row.baseline, e.baseline) {
            (Some(name), Some(b)) => format!("{} {}", num(b), short_name(name)),
            (Some(name), None) => format!("- {}", short_name(name)),
            _ => "-".into(),
        };
        let ratio = e.ratio.map(num).unwrap_or_else(|| "-".into());
        let target = e.row.target.map(Target::short).unwrap_or_else(|| "-".into());
        let result = match e.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None if e.row.target.is_some() => "n/a",
            None => "",
        };
        out.push_str(&format!(
            "{:<28} {:>10} {:>24} {:>7} {:>9} {:>6}  {}\n",
            e.row.name,
            num(e.value),
            baseline,
            ratio,
            target,
            result,
            e.row.about
        ));
    }
    out
}

fn short_name(name: &str) -> String {
    let s: String = name.chars().take(14).collect();
    format!("({s})")
}

/// The one JSON line: flags, machine, every figure (median) and its samples, every ratio,
/// every target and whether it passed, and the errors met.
pub fn json_line(
    f: &Figures,
    rows: &[Evaluated],
    flags: Value,
    machine: Value,
    errors: &[String],
) -> String {
    let mut figures = Map::new();
    let mut samples = Map::new();
    for (name, values) in f.iter() {
        if let Some(m) = f.median(name) {
            figures.insert(name.to_string(), json!(m));
        }
        samples.insert(name.to_string(), json!(values));
    }
    let mut ratios = Map::new();
    let mut targets = Map::new();
    for e in rows {
        if let (Some(b), Some(r)) = (e.row.baseline, e.ratio) {
            ratios.insert(format!("{}/{}", e.row.name, b), json!(r));
        }
        if let Some(t) = e.row.target {
            targets.insert(
                e.row.name.to_string(),
                json!({ "target": t.describe(e.row.baseline), "value": e.value,
                        "ratio": e.ratio, "pass": e.pass }),
            );
        }
    }
    let all_pass = rows.iter().all(|e| e.pass != Some(false));
    json!({
        "bench": "uffd-bench",
        "flags": flags,
        "machine": machine,
        "figures": figures,
        "ratios": ratios,
        "targets": targets,
        "all_targets_met": all_pass && errors.is_empty(),
        "errors": errors,
        "samples": samples,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_targets_need_their_baseline() {
        assert_eq!(Target::RatioAtLeast(0.9).pass(2.5, Some(0.95)), Some(true));
        assert_eq!(Target::RatioAtLeast(0.9).pass(2.0, Some(0.8)), Some(false));
        assert_eq!(Target::RatioAtMost(1.25).pass(14.0, Some(1.3)), Some(false));
        assert_eq!(Target::RatioAtMost(1.25).pass(14.0, None), None);
        assert_eq!(Target::AtMost(5.0).pass(4.9, None), Some(true));
    }

    #[test]
    fn rows_are_evaluated_against_the_same_runs_baselines() {
        let mut f = Figures::default();
        for v in [2.0, 2.6, 2.5] {
            f.add("raw_copy_gbps", v);
        }
        for v in [2.4, 2.3, 2.2] {
            f.add("complete_dense_gbps", v);
        }
        f.add("stall_max_ms", 7.0);
        let rows = evaluate(&f);
        let dense = rows.iter().find(|e| e.row.name == "complete_dense_gbps").unwrap();
        assert_eq!(dense.baseline, Some(2.5));
        assert!((dense.ratio.unwrap() - 2.3 / 2.5).abs() < 1e-9);
        assert_eq!(dense.pass, Some(true));
        let stall = rows.iter().find(|e| e.row.name == "stall_max_ms").unwrap();
        assert_eq!(stall.pass, Some(false));
        assert!(rows.iter().all(|e| e.row.name != "fault_p50_us"));
        let line = json_line(&f, &rows, json!({}), json!({}), &[]);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["figures"]["raw_copy_gbps"], json!(2.5));
        assert_eq!(v["all_targets_met"], json!(false));
        assert!(v["ratios"]["complete_dense_gbps/raw_copy_gbps"].is_number());
        assert!(!line.contains('\n'));
        assert!(table(&rows, 3).contains("FAIL"));
    }
}
