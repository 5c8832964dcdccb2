//! The peer comparison's table: one row per workload figure, every contender's median, and the
//! project's same-run ratio to each peer (each run's project figure over that run's peer
//! figure, then the median over runs).

use serde_json::{json, Map, Value};

use super::Contender;
use crate::bench::stats::median;
use crate::bench::Figures;

/// The figures compared: name (after `peer_`, before the contender), unit, what it is.
pub const WORKLOADS: &[(&str, &str, &str)] = &[
    ("random_p50_us", "µs", "random 4 KiB first touch, fresh VM: p50"),
    ("random_p99_us", "µs", "the same: p99"),
    ("touch_all_gbps", "GB/s", "touch-all: read and verify every page in order"),
    ("many_wall_s", "s", "many VMs at once, random touches: wall until the last is done"),
    ("many_vm_p99_ms", "ms", "the same: each VM's p99, median over VMs"),
];

fn name(workload: &str, c: Contender) -> String {
    format!("peer_{workload}_{}", c.name())
}

/// The median over runs of each run's median of the figure.
fn value(runs: &[Figures], figure: &str) -> Option<f64> {
    let v: Vec<f64> = runs.iter().filter_map(|f| f.median(figure)).collect();
    median(&v)
}

/// The median over runs of the project's figure over `peer`'s, each in its own run.
fn ratio(runs: &[Figures], workload: &str, peer: Contender) -> Option<f64> {
    let v: Vec<f64> = runs
        .iter()
        .filter_map(|f| {
            let base = f.median(&name(workload, peer)).filter(|b| *b != 0.0)?;
            Some(f.median(&name(workload, Contender::Project))? / base)
        })
        .collect();
    median(&v)
}

const PEERS: [Contender; 3] = [Contender::OnDemand, Contender::FaultAll, Contender::File];

fn cell(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) if v >= 1.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// The table (Markdown when `markdown`), or `None` when no peer figure was measured.
pub fn table(runs: &[Figures], markdown: bool, note: Option<&str>) -> Option<String> {
    let measured =
        WORKLOADS.iter().any(|(w, _, _)| value(runs, &name(w, Contender::Project)).is_some());
    if !measured {
        return None;
    }
    let mut head: Vec<String> = vec!["figure".into()];
    head.extend(Contender::ALL.iter().map(|c| c.name().to_string()));
    head.extend(PEERS.iter().map(|p| format!("project/{}", p.name())));
    head.push("what".into());
    let mut rows = vec![head];
    for (w, unit, about) in WORKLOADS {
        let mut row = vec![format!("{w} ({unit})")];
        row.extend(Contender::ALL.iter().map(|c| cell(value(runs, &name(w, *c)))));
        row.extend(PEERS.iter().map(|p| cell(ratio(runs, w, *p))));
        row.push((*about).to_string());
        rows.push(row);
    }
    let mut out = String::new();
    if markdown {
        for (i, r) in rows.iter().enumerate() {
            out.push_str(&format!("| {} |\n", r.join(" | ")));
            if i == 0 {
                out.push_str(&format!("|{}\n", "---|".repeat(r.len())));
            }
        }
    } else {
        for r in &rows {
            let Some((last, cols)) = r.split_last() else { continue };
            let mut line: String = cols
                .iter()
                .enumerate()
                .map(|(i, c)| if i == 0 { format!("{c:<22}") } else { format!(" {c:>18}") })
                .collect();
            line.push_str(&format!("  {last}\n"));
            out.push_str(&line);
        }
    }
    if let Some(note) = note {
        out.push_str(&format!("({note})\n"));
    }
    Some(out)
}

/// The comparison for the JSON line: each workload's median per contender and the ratios.
pub fn json(runs: &[Figures], skipped: Option<&str>) -> Value {
    let mut out = Map::new();
    for (w, unit, about) in WORKLOADS {
        let mut values = Map::new();
        for c in Contender::ALL {
            if let Some(v) = value(runs, &name(w, c)) {
                values.insert(c.name().into(), json!(v));
            }
        }
        let mut ratios = Map::new();
        for p in PEERS {
            if let Some(r) = ratio(runs, w, p) {
                ratios.insert(format!("project/{}", p.name()), json!(r));
            }
        }
        out.insert(
            (*w).into(),
            json!({ "unit": unit, "what": about, "values": values, "ratios": ratios }),
        );
    }
    json!({ "workloads": out, "peers_skipped": skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ratio_to_a_peer_is_taken_within_its_own_run() {
        let run = |project: f64, on_demand: f64| {
            let mut f = Figures::default();
            f.add("peer_random_p50_us_project", project);
            f.add("peer_random_p50_us_on_demand", on_demand);
            f
        };
        // A slow run and a fast one: each run's ratio is 0.5.
        let runs = [run(10.0, 20.0), run(5.0, 10.0), run(20.0, 40.0)];
        assert_eq!(ratio(&runs, "random_p50_us", Contender::OnDemand), Some(0.5));
        assert_eq!(ratio(&runs, "random_p50_us", Contender::File), None);
        let t = table(&runs, true, Some("quiet")).unwrap();
        assert!(t.contains("| random_p50_us (µs) | 10.0 | 20.0 | - | - | 0.500 | - | - |"), "{t}");
        let j = json(&runs, None);
        assert_eq!(j["workloads"]["random_p50_us"]["ratios"]["project/on_demand"], json!(0.5));
        assert!(table(&[Figures::default()], false, None).is_none());
    }
}
