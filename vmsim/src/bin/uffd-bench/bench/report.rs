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
    row("min_fault_us", None, None, "baseline: p50 first touch, 1-page handler (own process), VM thread and handler pinned to one CPU"),
    row("min_fault_p99_us", None, None, "baseline: p99 of the same"),
    row("min_fault_free_us", None, None, "baseline: p50, the same unpinned (lands on one CPU or two)"),
    row("min_fault_free_p99_us", None, None, "baseline: p99, the same unpinned"),
    row("min_fault_cross_cpu_us", None, None, "baseline: p50, VM and handler pinned to different CPUs"),
    row("min_touch_all_gbps", None, None, "baseline: read-seq of a fresh VM, 1-page handler, one CPU"),
    row("min_touch_all_free_gbps", None, None, "baseline: the same unpinned"),
    row("touch_resident_gbps", None, None, "ceiling: read-seq of a VM already resident (vmsim verify speed)"),
    row("fault_p50_us", Some("min_fault_us"), Some(Target::RatioAtMost(1.25)), "p50 random first touch, fresh VM; VM thread and the pager's fault threads pinned to min_fault_us's CPU"),
    row("fault_p99_us", Some("min_fault_p99_us"), None, "p99 of the same, same placement"),
    row("fault_free_p50_us", Some("min_fault_free_us"), None, "p50 random first touch, fresh VM, VM and pager unpinned"),
    row("fault_free_p99_us", Some("min_fault_free_p99_us"), None, "p99 of the same, unpinned"),
    row("touch_all_gbps", Some("min_touch_all_gbps"), Some(Target::RatioAtLeast(5.0)), "read-seq of a fresh VM"),
    row("complete_dense_gbps", Some("raw_copy_gbps"), Some(Target::RatioAtLeast(0.9)), "CompleteSession, untouched dense VM"),
    row("complete_sparse_gbps", Some("raw_copy_gbps"), Some(Target::RatioAtLeast(1.6)), "the same, 25% zero + 25% holes in runs of 1-63 pages (mean 128 KiB), each run all data, zero or hole (logical bytes)"),
    row("complete_scattered_gbps", Some("raw_copy_gbps"), None, "the same, 25% zero + 25% holes scattered page by page (logical bytes)"),
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
    row("peer_random_p50_us_project", Some("peer_random_p50_us_on_demand"), Some(Target::RatioAtMost(0.8)), "peers: p50 random first touch, fresh VM, unpinned, vs Firecracker's on_demand handler"),
    row("peer_random_p99_us_project", Some("peer_random_p99_us_on_demand"), Some(Target::RatioAtMost(1.0)), "peers: p99 of the same"),
    row("peer_touch_all_gbps_project", Some("peer_touch_all_gbps_on_demand"), None, "peers: touch-all vs on_demand"),
    row("peer_many_wall_s_project", Some("peer_many_wall_s_on_demand"), Some(Target::RatioAtMost(0.8)), "peers: many VMs at once, wall, vs on_demand"),
    row("peer_many_vm_p99_ms_project", Some("peer_many_vm_p99_ms_on_demand"), Some(Target::RatioAtMost(1.0)), "peers: many VMs at once, per-VM p99 (median over VMs), vs on_demand"),
    row("ws_on_demand_ms", None, None, "working set: a random 25% read right after restore, on demand (ms)"),
    row("ws_prefetch_ms", Some("ws_on_demand_ms"), Some(Target::RatioAtMost(0.25)), "the same pages in the same order, restored with prefetch_working_set of their recording (>= 4x faster)"),
    row("ws_prefetch_done_ms", None, None, "from the restore until the prefetch of that recording is done (ms)"),
    row("ws_after_prefetch_ms", Some("ws_file_ms"), None, "the replay begun once the prefetch is done"),
    row("ws_file_ms", None, None, "ceiling: the same read, by the same reader, of a MAP_PRIVATE mapping of the memory file (Firecracker's File backend)"),
    row("ws_file_bare_ms", Some("ws_file_ms"), None, "the same pages of that mapping compared by a bare memcmp loop (the ceiling before it used the VM's reader)"),
    row("ws_prefetch_vs_file_ms", Some("ws_file_ms"), Some(Target::RatioAtMost(1.5)), "ws_prefetch_ms again, against the file-backed mapping"),
    row("ws_prefetch_fresh_ms", Some("ws_file_ms"), None, "the prefetched replay once the pager has let go of the memory file (mapped afresh; page cache warm), against the file mapping"),
    row("ws_on_demand_faults", None, None, "faults of the on-demand replay"),
    row("ws_prefetch_faults", Some("ws_on_demand_faults"), Some(Target::RatioAtMost(0.1)), "faults of the prefetched replay (>= 90% fewer)"),
    row("ws_differs_ms", Some("ws_on_demand_ms"), Some(Target::RatioAtMost(1.05)), "another random 25% (not the recording's), restored with the prefetch"),
    row("ws_cold_on_demand_ms", None, None, "the on-demand replay, memory file dropped from the page cache first"),
    row("ws_cold_prefetch_ms", Some("ws_cold_on_demand_ms"), None, "the prefetched replay, memory file dropped from the page cache first"),
    row("ws_cold_cached_fraction", None, None, "share of the memory file still in the page cache after each drop"),
];

/// One evaluated row.
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub row: Row,
    /// The median over runs of each run's median.
    pub value: f64,
    /// The same for the baseline.
    pub baseline: Option<f64>,
    /// The median over runs of each run's ratio (a figure is compared with the baseline of its
    /// own run, never of another).
    pub ratio: Option<f64>,
    pub pass: Option<bool>,
    /// Each run's median.
    pub per_run: Vec<Option<f64>>,
}

/// The median of the values present.
fn median_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    super::stats::median(&v)
}

/// Evaluates every row measured in at least one of `runs`.
pub fn evaluate(runs: &[Figures]) -> Vec<Evaluated> {
    ROWS.iter()
        .filter_map(|row| {
            let per_run: Vec<Option<f64>> = runs.iter().map(|f| f.median(row.name)).collect();
            let value = median_of(per_run.iter().copied())?;
            let baseline = row.baseline.and_then(|b| median_of(runs.iter().map(|f| f.median(b))));
            let ratio = row.baseline.and_then(|b| {
                median_of(runs.iter().map(|f| {
                    let base = f.median(b).filter(|x| *x != 0.0)?;
                    Some(f.median(row.name)? / base)
                }))
            });
            let pass = row.target.and_then(|t| t.pass(value, ratio));
            Some(Evaluated { row: *row, value, baseline, ratio, pass, per_run })
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

fn result(e: &Evaluated) -> &'static str {
    match e.pass {
        Some(true) => "PASS",
        Some(false) => "FAIL",
        None if e.row.target.is_some() => "n/a",
        None => "",
    }
}

fn what(reps: usize, runs: usize) -> String {
    if runs > 1 {
        format!("medians of {reps} reps, then of {runs} runs")
    } else {
        format!("medians of {reps} reps")
    }
}

/// The table: figure, value, baseline, ratio, target, result.
pub fn table(rows: &[Evaluated], reps: usize, runs: usize) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<28} {:>10} {:>24} {:>7} {:>9} {:>6}  what ({})\n",
        "figure",
        "value",
        "baseline",
        "ratio",
        "target",
        "result",
        what(reps, runs)
    ));
    for e in rows {
        let baseline = match (e.row.baseline, e.baseline) {
            (Some(name), Some(b)) => format!("{} {}", num(b), short_name(name)),
            (Some(name), None) => format!("- {}", short_name(name)),
            _ => "-".into(),
        };
        let ratio = e.ratio.map(num).unwrap_or_else(|| "-".into());
        let target = e.row.target.map(Target::short).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<28} {:>10} {:>24} {:>7} {:>9} {:>6}  {}\n",
            e.row.name,
            num(e.value),
            baseline,
            ratio,
            target,
            result(e),
            e.row.about
        ));
    }
    out
}

/// The same as a Markdown table (for BENCHMARKS.md), with each run's value.
pub fn markdown(rows: &[Evaluated], reps: usize, runs: usize) -> String {
    let mut out = String::from(
        "| figure | value | per run | baseline | ratio | target | met | what |\n\
         |---|---:|---|---|---:|---|---|---|\n",
    );
    for e in rows {
        let per_run: Vec<String> =
            e.per_run.iter().map(|v| v.map(num).unwrap_or_else(|| "-".into())).collect();
        let baseline = match (e.row.baseline, e.baseline) {
            (Some(name), Some(b)) => format!("{} `{name}`", num(b)),
            _ => String::new(),
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} | {} |\n",
            e.row.name,
            num(e.value),
            per_run.join(" / "),
            baseline,
            e.ratio.map(num).unwrap_or_default(),
            e.row.target.map(Target::short).unwrap_or_default(),
            match e.pass {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            },
            e.row.about
        ));
    }
    out.push_str(&format!("\n({})\n", what(reps, runs)));
    out
}

fn short_name(name: &str) -> String {
    let s: String = name.chars().take(14).collect();
    format!("({s})")
}

/// One run's figures: each figure's median and its repetitions.
fn run_json(f: &Figures) -> Value {
    let mut figures = Map::new();
    let mut samples = Map::new();
    for (name, values) in f.iter() {
        if let Some(m) = f.median(name) {
            figures.insert(name.to_string(), json!(m));
        }
        samples.insert(name.to_string(), json!(values));
    }
    json!({ "figures": figures, "samples": samples })
}

/// The one JSON line: flags, machine, every figure (the median over runs of each run's
/// median), every ratio and target, each run's figures and repetitions, and the errors met.
pub fn json_line(
    runs: &[Figures],
    rows: &[Evaluated],
    flags: Value,
    machine: Value,
    errors: &[String],
) -> String {
    let mut names: Vec<&str> = runs.iter().flat_map(|f| f.iter().map(|(n, _)| n)).collect();
    names.sort_unstable();
    names.dedup();
    let mut figures = Map::new();
    for name in names {
        if let Some(m) = median_of(runs.iter().map(|f| f.median(name))) {
            figures.insert(name.to_string(), json!(m));
        }
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
        "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
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
        let rows = evaluate(std::slice::from_ref(&f));
        let dense = rows.iter().find(|e| e.row.name == "complete_dense_gbps").unwrap();
        assert_eq!(dense.baseline, Some(2.5));
        assert!((dense.ratio.unwrap() - 2.3 / 2.5).abs() < 1e-9);
        assert_eq!(dense.pass, Some(true));
        let stall = rows.iter().find(|e| e.row.name == "stall_max_ms").unwrap();
        assert_eq!(stall.pass, Some(false));
        assert!(rows.iter().all(|e| e.row.name != "fault_p50_us"));
        let line = json_line(std::slice::from_ref(&f), &rows, json!({}), json!({}), &[]);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["figures"]["raw_copy_gbps"], json!(2.5));
        assert_eq!(v["runs"][0]["samples"]["raw_copy_gbps"], json!([2.0, 2.6, 2.5]));
        assert_eq!(v["all_targets_met"], json!(false));
        assert!(v["ratios"]["complete_dense_gbps/raw_copy_gbps"].is_number());
        assert!(!line.contains('\n'));
        assert!(table(&rows, 3, 1).contains("FAIL"));
        assert!(markdown(&rows, 3, 1).contains("| `stall_max_ms` | 7.00 | 7.00 |"));
    }

    #[test]
    fn the_pinned_fault_figure_has_the_target_and_the_unpinned_one_only_a_ratio() {
        let mut f = Figures::default();
        f.add("min_fault_us", 10.0);
        f.add("fault_p50_us", 12.0);
        f.add("min_fault_free_us", 40.0);
        f.add("fault_free_p50_us", 60.0);
        let rows = evaluate(std::slice::from_ref(&f));
        let row = |name: &str| rows.iter().find(|e| e.row.name == name).unwrap().clone();
        let pinned = row("fault_p50_us");
        assert_eq!(pinned.row.baseline, Some("min_fault_us"));
        assert_eq!(pinned.ratio, Some(1.2));
        assert_eq!(pinned.pass, Some(true));
        let free = row("fault_free_p50_us");
        assert_eq!(free.row.baseline, Some("min_fault_free_us"));
        assert_eq!(free.ratio, Some(1.5));
        assert!(free.row.target.is_none() && free.pass.is_none());
        assert!(ROWS.iter().all(|r| r.name != "fault_free_p50_us" || r.about.contains("unpinned")));
        assert!(ROWS.iter().any(|r| r.name == "fault_p50_us" && r.about.contains("pinned")));
    }

    #[test]
    fn scattered_completion_has_a_ratio_to_raw_copy_and_no_target() {
        let mut f = Figures::default();
        f.add("raw_copy_gbps", 4.0);
        f.add("complete_sparse_gbps", 8.0);
        f.add("complete_scattered_gbps", 3.0);
        let rows = evaluate(std::slice::from_ref(&f));
        let row = |name: &str| rows.iter().find(|e| e.row.name == name).unwrap().clone();
        let (sparse, scattered) = (row("complete_sparse_gbps"), row("complete_scattered_gbps"));
        assert_eq!((sparse.ratio, sparse.pass), (Some(2.0), Some(true)));
        assert_eq!(scattered.row.baseline, Some("raw_copy_gbps"));
        assert_eq!((scattered.ratio, scattered.pass), (Some(0.75), None));
        assert!(sparse.row.about.contains("runs of 1-63 pages"));
        assert!(scattered.row.about.contains("page by page"));
    }

    #[test]
    fn over_several_runs_each_ratio_uses_its_own_runs_baseline() {
        // Run 1: a slow moment for both; run 2: fast for both. Each ratio is 1.0, although
        // the value's median over runs and the baseline's come from different runs.
        let run = |value: f64, baseline: f64| {
            let mut f = Figures::default();
            f.add("complete_dense_gbps", value);
            f.add("raw_copy_gbps", baseline);
            f
        };
        let runs = [run(1.0, 1.0), run(3.0, 3.0), run(2.0, 2.0)];
        let rows = evaluate(&runs);
        let dense = rows.iter().find(|e| e.row.name == "complete_dense_gbps").unwrap();
        assert_eq!(dense.ratio, Some(1.0));
        assert_eq!(dense.value, 2.0);
        assert_eq!(dense.per_run, vec![Some(1.0), Some(3.0), Some(2.0)]);
        let v: Value =
            serde_json::from_str(&json_line(&runs, &rows, json!({}), json!({}), &[])).unwrap();
        assert_eq!(v["runs"].as_array().unwrap().len(), 3);
        assert_eq!(v["figures"]["complete_dense_gbps"], json!(2.0));
    }
}
