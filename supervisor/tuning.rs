//! A pager version's tuning (`[[versions]]` keys in the config file): the `uffd-pager` flags
//! the supervisor passes to each process of that version, respawns included. Unset: the pager's
//! own default. The pager checks the values; a version it refuses FAILs with its last words.

use serde::{Deserialize, Serialize};

/// The pager's tuning flags, by their names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PagerTuning {
    /// `--fault-threads`: threads serving faults.
    pub fault_threads: Option<u32>,
    /// `--copy-threads`: threads helping graduation copy (0: none).
    pub copy_threads: Option<u32>,
    /// `--complete-step-bytes`: bytes a completion copies between checks for faults.
    pub complete_step_bytes: Option<u64>,
    /// `--fault-spin-us`: microseconds a fault worker polls after a fault.
    pub fault_spin_us: Option<u64>,
    /// `--fault-around-kib`: KiB served around a random fault while a worker is contended for.
    pub fault_around_kib: Option<u64>,
    /// `--memory-file-linger-secs`: seconds a memory file stays mapped after its last session.
    pub memory_file_linger_secs: Option<u64>,
    /// `--record-working-set-secs`: seconds a session asked to record its working set records.
    pub record_working_set_secs: Option<u64>,
    /// `--record-working-set-max-runs`: most runs of pages a working-set recording holds.
    pub record_working_set_max_runs: Option<u64>,
    /// `--follow-vcpus` (when true): a fault worker pinned to each CPU, each session served by
    /// the one on its vCPU's CPU.
    pub follow_vcpus: Option<bool>,
}

impl PagerTuning {
    /// The command-line arguments of the set values.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut push = |flag: &str, v: Option<u64>| {
            if let Some(v) = v {
                args.push(flag.to_string());
                args.push(v.to_string());
            }
        };
        push("--fault-threads", self.fault_threads.map(u64::from));
        push("--copy-threads", self.copy_threads.map(u64::from));
        push("--complete-step-bytes", self.complete_step_bytes);
        push("--fault-spin-us", self.fault_spin_us);
        push("--fault-around-kib", self.fault_around_kib);
        push("--memory-file-linger-secs", self.memory_file_linger_secs);
        push("--record-working-set-secs", self.record_working_set_secs);
        push("--record-working-set-max-runs", self.record_working_set_max_runs);
        if self.follow_vcpus == Some(true) {
            args.push("--follow-vcpus".to_string());
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_set_values_become_pager_flags() {
        assert!(PagerTuning::default().args().is_empty());
        let t =
            PagerTuning { fault_threads: Some(3), fault_spin_us: Some(0), ..Default::default() };
        assert_eq!(t.args(), ["--fault-threads", "3", "--fault-spin-us", "0"]);
        let t = PagerTuning { record_working_set_secs: Some(5), ..Default::default() };
        assert_eq!(t.args(), ["--record-working-set-secs", "5"]);
        let t = PagerTuning { fault_around_kib: Some(4), ..Default::default() };
        assert_eq!(t.args(), ["--fault-around-kib", "4"]);
        let t = PagerTuning { follow_vcpus: Some(true), ..Default::default() };
        assert_eq!(t.args(), ["--follow-vcpus"]);
        let t = PagerTuning { follow_vcpus: Some(false), ..Default::default() };
        assert!(t.args().is_empty(), "false is the pager's default: no flag");
    }
}
