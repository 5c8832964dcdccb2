//! The loop under tokio's paused clock, with a fake supervisor that takes simulated time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Status;
use uffdpager::api::{CompleteSessionResponse, Session, SessionState};

use super::*;
use crate::config::Settings;
use crate::inventory::TrackedSession;
use crate::state::{Clock, ConnState, OutcomeKind, Shared};

const SUP: &str = "unix:/sup.sock";

/// One call the fake served: session, start, end (tokio time).
type Call = (String, Instant, Instant);

/// A supervisor whose completions take `work` of simulated time each; a call whose deadline is
/// shorter fails with DEADLINE_EXCEEDED, keeping the work done (pages copied stay copied).
#[derive(Debug, Clone)]
struct Fake {
    work: Duration,
    remaining: Arc<Mutex<std::collections::HashMap<String, Duration>>>,
    calls: Arc<Mutex<Vec<Call>>>,
    running: Arc<Mutex<(u32, u32)>>,
}

impl Fake {
    fn new(work: Duration) -> Self {
        Self {
            work,
            remaining: Default::default(),
            calls: Default::default(),
            running: Default::default(),
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn peak(&self) -> u32 {
        self.running.lock().unwrap().1
    }
}

impl Completer for Fake {
    fn complete(
        &self,
        _supervisor: &str,
        session: &str,
        deadline: Duration,
    ) -> impl Future<Output = Result<CompleteSessionResponse, Status>> + Send {
        let me = self.clone();
        let id = session.to_string();
        async move {
            let start = Instant::now();
            {
                let mut r = me.running.lock().unwrap();
                r.0 += 1;
                r.1 = r.1.max(r.0);
            }
            let left = *me.remaining.lock().unwrap().entry(id.clone()).or_insert(me.work);
            let spent = left.min(deadline);
            tokio::time::sleep(spent).await;
            me.remaining.lock().unwrap().insert(id.clone(), left - spent);
            me.running.lock().unwrap().0 -= 1;
            me.calls.lock().unwrap().push((id.clone(), start, Instant::now()));
            if spent < left {
                return Err(Status::deadline_exceeded("populate did not finish"));
            }
            let session =
                Session { id, state: SessionState::Graduated as i32, ..Default::default() };
            Ok(CompleteSessionResponse {
                session: Some(session),
                populated_bytes: 4096,
                ..Default::default()
            })
        }
    }
}

fn wall() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// A shared state watching one supervisor with `n` soaked current-version sessions s0 (oldest)
/// .. s{n-1}.
fn setup(settings: Settings, n: usize) -> Arc<Shared> {
    let settings = Settings {
        enabled: settings.enabled.or(Some(true)),
        supervisors: Some(vec![SUP.into()]),
        min_session_age: Some("10m".into()),
        ..settings
    };
    let shared = Shared::new(settings.resolve().unwrap(), Clock::tokio_at(wall()), None);
    {
        let mut st = shared.lock();
        let sup = st.supervisor_mut(SUP).unwrap();
        sup.conn = ConnState::Watching;
        sup.inventory.active_version = "v1".into();
        for i in 0..n {
            let age = Duration::from_secs(3600 - i as u64);
            sup.inventory.sessions.insert(format!("s{i}"), session(&format!("s{i}"), wall() - age));
        }
    }
    shared
}

fn session(id: &str, connected_at: SystemTime) -> TrackedSession {
    TrackedSession {
        id: id.into(),
        pager_version: "v1".into(),
        state: SessionState::Serving,
        outdated_flag: false,
        connected_at: Some(connected_at),
        total_bytes: 0,
        resident_bytes: 0,
    }
}

/// Runs the loop until `done` says so (or an hour of simulated time has passed), then stops it.
async fn run_until(shared: &Arc<Shared>, fake: &Fake, done: impl Fn(&Arc<Shared>) -> bool) {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let runner = Runner::new(shared.clone(), fake.clone());
    let task = tokio::spawn(runner.run(async move {
        let _ = stop_rx.await;
    }));
    let until = Instant::now() + Duration::from_secs(3600);
    while !done(shared) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(());
    task.await.unwrap();
}

fn results(shared: &Shared) -> Vec<(String, OutcomeKind)> {
    shared.lock().outcomes.iter().map(|o| (o.key.session.clone(), o.result)).collect()
}

fn graduated(shared: &Arc<Shared>) -> usize {
    shared.lock().counters.graduated as usize
}

#[tokio::test(start_paused = true)]
async fn never_more_completions_in_flight_than_max_concurrent() {
    for max in [1u32, 2] {
        let shared = setup(Settings { max_concurrent: Some(max.into()), ..Default::default() }, 5);
        let fake = Fake::new(Duration::from_secs(10));
        run_until(&shared, &fake, |s| graduated(s) == 5).await;
        assert_eq!(graduated(&shared), 5);
        assert_eq!(fake.peak(), max, "the fake supervisor saw it");
        let st = shared.lock();
        assert_eq!(st.counters.peak_in_flight, max, "the controller's record says it");
        assert!(st.outcomes.iter().all(|o| o.in_flight_at_start <= max));
        let order: Vec<&str> = st.outcomes.iter().map(|o| o.key.session.as_str()).collect();
        if max == 1 {
            assert_eq!(order, ["s0", "s1", "s2", "s3", "s4"], "oldest first");
            let calls = fake.calls();
            assert!(calls.windows(2).all(|w| w[1].1 >= w[0].2), "one at a time: {calls:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_session_keeps_serving_and_is_retried_only_after_the_backoff() {
    let settings = Settings {
        completion_timeout: Some("10s".into()),
        failure_backoff: Some("1m".into()),
        ..Default::default()
    };
    let shared = setup(settings, 1);
    // 25 s of work: two attempts time out (each keeps its progress), the third succeeds.
    let fake = Fake::new(Duration::from_secs(25));
    run_until(&shared, &fake, |s| graduated(s) == 1).await;
    let kinds: Vec<OutcomeKind> = results(&shared).into_iter().map(|r| r.1).collect();
    assert_eq!(kinds, [OutcomeKind::TimedOut, OutcomeKind::TimedOut, OutcomeKind::Graduated]);
    let st = shared.lock();
    let o = &st.outcomes;
    for pair in o.iter().collect::<Vec<_>>().windows(2) {
        let gap = pair[1].started_at.duration_since(pair[0].finished_at).unwrap();
        assert!(gap >= Duration::from_secs(60), "retried after {gap:?}");
    }
    assert!(o[0].error.contains("DeadlineExceeded"), "{}", o[0].error);
    assert_eq!(st.counters.timed_out, 2);
    assert!(st.failed_at.is_empty(), "success clears the failure");
}

#[tokio::test(start_paused = true)]
async fn a_graduated_session_is_not_picked_again_before_its_event_arrives() {
    let shared = setup(Settings { max_concurrent: Some(1), ..Default::default() }, 2);
    let fake = Fake::new(Duration::from_secs(1));
    run_until(&shared, &fake, |s| graduated(s) == 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.calls().len(), 2, "{:?}", fake.calls());
    assert_eq!(shared.lock().counters.already_graduated, 0);
}

#[tokio::test(start_paused = true)]
async fn a_stream_event_triggers_a_scan_before_the_next_tick() {
    let shared = setup(Settings { scan_interval: Some("1h".into()), ..Default::default() }, 0);
    let fake = Fake::new(Duration::from_secs(1));
    let waker = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut st = waker.lock();
        let sup = st.supervisor_mut(SUP).unwrap();
        sup.inventory
            .sessions
            .insert("late".into(), session("late", wall() - Duration::from_secs(3600)));
        drop(st);
        waker.wake.notify_one();
    });
    let started = Instant::now();
    run_until(&shared, &fake, |s| graduated(s) == 1).await;
    assert_eq!(results(&shared), [("late".to_string(), OutcomeKind::Graduated)]);
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_disabled_controller_calls_nothing() {
    let shared = setup(Settings { enabled: Some(false), ..Default::default() }, 3);
    let fake = Fake::new(Duration::from_secs(1));
    run_until(&shared, &fake, |_| false).await;
    assert!(fake.calls().is_empty());
    assert_eq!(shared.lock().counters.scans, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_records_each_graduation_once_and_calls_nothing() {
    let shared = setup(
        Settings { dry_run: Some(true), max_active_sessions: Some(1), ..Default::default() },
        3,
    );
    let fake = Fake::new(Duration::from_secs(1));
    run_until(&shared, &fake, |s| s.lock().counters.scans > 5).await;
    assert!(fake.calls().is_empty());
    let r = results(&shared);
    assert_eq!(
        r,
        [("s0".to_string(), OutcomeKind::DryRun), ("s1".to_string(), OutcomeKind::DryRun)],
        "the ceiling of 1 leaves the youngest"
    );
}

#[tokio::test(start_paused = true)]
async fn a_supervisor_out_of_sync_is_not_planned_on() {
    let shared = setup(Settings::default(), 2);
    shared.lock().supervisor_mut(SUP).unwrap().conn = ConnState::Backoff;
    let fake = Fake::new(Duration::from_secs(1));
    run_until(&shared, &fake, |s| s.lock().counters.scans > 3).await;
    assert!(fake.calls().is_empty());
}

#[test]
fn outcomes_are_classified_by_grpc_code() {
    let t = Duration::from_secs(10);
    let ok = Ok(CompleteSessionResponse::default());
    assert_eq!(classify(&ok, t, t), OutcomeKind::Graduated);
    let again = Ok(CompleteSessionResponse { already_graduated: true, ..Default::default() });
    assert_eq!(classify(&again, t, t), OutcomeKind::AlreadyGraduated);
    let cases = [
        (Status::deadline_exceeded("x"), Duration::from_secs(1), OutcomeKind::TimedOut),
        (Status::cancelled("Timeout expired"), t, OutcomeKind::TimedOut),
        (Status::cancelled("x"), Duration::from_secs(1), OutcomeKind::Failed),
        (Status::unavailable("x"), t, OutcomeKind::Failed),
        (Status::internal("x"), t, OutcomeKind::Failed),
        (Status::failed_precondition("ENDED"), t, OutcomeKind::NotGraduatable),
        (Status::not_found("x"), t, OutcomeKind::NotGraduatable),
    ];
    for (status, elapsed, want) in cases {
        assert_eq!(classify(&Err(status.clone()), elapsed, t), want, "{status:?}");
    }
}
