//! A pager that says it cannot serve is replaced: each monitor pass asks every running pager's
//! `grpc.health.v1` status; a process that has answered NOT_SERVING (a fault worker of its has
//! stalled: `pager/watchdog.rs`) without a break for `--pager-unhealthy-timeout` is killed
//! through its pidfd, and the ordinary re-adoption path (`readopt.rs`) hands its sessions to
//! another process, a fresh one of the same version if it was the active one.
//!
//! Only an explicit NOT_SERVING counts: a check that fails or times out (a pager starting or
//! busy) proves nothing, and the process's exit is watched elsewhere. The decision is a pure
//! function of the answers and their times ([`UnhealthyTracker`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tracing::error;

use crate::core::Core;
use crate::pagers::PagerProcess;

/// What one health check said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Serving,
    NotServing,
    /// No answer, or one that proves nothing (an error, UNKNOWN).
    Unknown,
}

/// What to do with a pager after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// NOT_SERVING for this long so far, under the limit.
    Unhealthy(Duration),
    /// NOT_SERVING for at least the limit: kill it.
    Replace(Duration),
}

/// Since when each pager process (by pid) has answered NOT_SERVING without a break.
#[derive(Debug, Default)]
pub struct UnhealthyTracker {
    since: HashMap<u32, Instant>,
}

impl UnhealthyTracker {
    /// Takes in pager `pid`'s answer at `now` (pure, given the answers so far).
    pub fn observe(&mut self, pid: u32, answer: Answer, now: Instant, limit: Duration) -> Verdict {
        match answer {
            Answer::Serving => {
                self.since.remove(&pid);
                Verdict::Healthy
            }
            Answer::Unknown => match self.since.get(&pid) {
                // A failed check neither starts nor ends a bad spell.
                Some(&since) => Verdict::Unhealthy(now.saturating_duration_since(since)),
                None => Verdict::Healthy,
            },
            Answer::NotServing => {
                let since = *self.since.entry(pid).or_insert(now);
                let spell = now.saturating_duration_since(since);
                if spell >= limit {
                    Verdict::Replace(spell)
                } else {
                    Verdict::Unhealthy(spell)
                }
            }
        }
    }

    /// Forgets processes no longer running.
    pub fn retain(&mut self, running: &[u32]) {
        self.since.retain(|pid, _| running.contains(pid));
    }
}

/// Asks a pager's health (the whole server: service "").
pub async fn check(process: &PagerProcess, timeout: Duration) -> Answer {
    let mut client = HealthClient::new(process.channel());
    let mut req = tonic::Request::new(HealthCheckRequest { service: String::new() });
    req.set_timeout(timeout);
    match client.check(req).await {
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => Answer::Serving,
        Ok(r) if r.get_ref().status == ServingStatus::NotServing as i32 => Answer::NotServing,
        _ => Answer::Unknown,
    }
}

impl Core {
    /// Checks every running pager's health; kills one that has been NOT_SERVING for too long.
    pub async fn check_pager_health(self: &Arc<Self>, tracker: &mut UnhealthyTracker) {
        let running = self.versions.running();
        tracker.retain(&running.iter().map(|(_, p)| p.pid).collect::<Vec<_>>());
        let limit = self.config.pager_unhealthy_timeout;
        for (version, process) in running {
            if process.exit().is_some() {
                continue;
            }
            let answer = check(&process, self.config.pager_call_timeout).await;
            if let Verdict::Replace(spell) =
                tracker.observe(process.pid, answer, Instant::now(), limit)
            {
                let reason = format!(
                    "its health was NOT_SERVING for {:.1} s (a fault worker stalled), so the \
                     supervisor killed it to hand its sessions to another process",
                    spell.as_secs_f64()
                );
                error!(version = %version, pid = process.pid, spell_ms = u64::try_from(spell.as_millis()).unwrap_or(u64::MAX),
                    "pager NOT_SERVING too long; killing it so its sessions are re-adopted");
                process.set_kill_reason(reason);
                tokio::spawn(async move {
                    process.kill().await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(5);

    #[test]
    fn a_pager_not_serving_for_the_limit_is_replaced() {
        let t0 = Instant::now();
        let mut t = UnhealthyTracker::default();
        assert_eq!(t.observe(7, Answer::NotServing, t0, LIMIT), Verdict::Unhealthy(Duration::ZERO));
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(t.observe(7, Answer::NotServing, at(4), LIMIT), Verdict::Unhealthy(at(4) - t0));
        assert_eq!(t.observe(7, Answer::NotServing, at(5), LIMIT), Verdict::Replace(LIMIT));
    }

    #[test]
    fn one_serving_answer_ends_the_spell() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut t = UnhealthyTracker::default();
        t.observe(7, Answer::NotServing, t0, LIMIT);
        assert_eq!(t.observe(7, Answer::Serving, at(3), LIMIT), Verdict::Healthy);
        assert_eq!(
            t.observe(7, Answer::NotServing, at(6), LIMIT),
            Verdict::Unhealthy(Duration::ZERO)
        );
        assert_eq!(t.observe(7, Answer::NotServing, at(10), LIMIT), Verdict::Unhealthy(at(4) - t0));
    }

    #[test]
    fn a_failed_check_neither_starts_nor_ends_a_spell() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut t = UnhealthyTracker::default();
        assert_eq!(t.observe(7, Answer::Unknown, t0, LIMIT), Verdict::Healthy);
        t.observe(7, Answer::NotServing, at(1), LIMIT);
        assert_eq!(t.observe(7, Answer::Unknown, at(3), LIMIT), Verdict::Unhealthy(at(2) - t0));
        assert_eq!(t.observe(7, Answer::NotServing, at(6), LIMIT), Verdict::Replace(LIMIT));
    }

    #[test]
    fn each_process_has_its_own_spell_and_gone_ones_are_forgotten() {
        let t0 = Instant::now();
        let mut t = UnhealthyTracker::default();
        t.observe(7, Answer::NotServing, t0, LIMIT);
        assert_eq!(
            t.observe(8, Answer::NotServing, t0 + LIMIT, LIMIT),
            Verdict::Unhealthy(Duration::ZERO)
        );
        t.retain(&[8]);
        assert_eq!(
            t.observe(7, Answer::NotServing, t0 + LIMIT, LIMIT),
            Verdict::Unhealthy(Duration::ZERO)
        );
    }
}
