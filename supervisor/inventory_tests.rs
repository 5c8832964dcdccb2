use std::collections::BTreeMap;

use tokio::sync::broadcast::error::TryRecvError;
use uffdpager::api::SessionState;

use super::*;
use crate::lifecycle::{Finish, Lifecycle};

fn pending(id: &str) -> Session {
    Session { id: id.into(), state: SessionState::Pending as i32, ..Default::default() }
}

fn add(inv: &Inventory, id: &str) {
    inv.insert_with(id, || Ok::<_, ()>(pending(id))).unwrap();
}

fn serve(inv: &Inventory, id: &str, version: &str) {
    inv.modify(id, |r| {
        r.step(Lifecycle::hand_over).unwrap();
        r.step(Lifecycle::serve).unwrap();
        r.session.pager_version = version.into();
    })
    .unwrap();
}

fn set_faults(inv: &Inventory, id: &str, faults: u64) {
    inv.modify(id, |r| r.session.faults = faults).unwrap();
}

fn drain(rx: &mut broadcast::Receiver<SessionEvent>) -> Vec<SessionEvent> {
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(ev) => out.push(ev),
            Err(TryRecvError::Empty | TryRecvError::Closed) => return out,
            Err(TryRecvError::Lagged(n)) => panic!("lagged by {n}"),
        }
    }
}

fn kinds(events: &[SessionEvent]) -> Vec<(SessionEventType, String)> {
    events
        .iter()
        .map(|e| {
            (
                SessionEventType::try_from(e.r#type).unwrap(),
                e.session.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
            )
        })
        .collect()
}

/// What a watcher knows after applying `events` in order.
fn apply(view: &mut BTreeMap<String, Session>, events: &[SessionEvent]) {
    for e in events {
        let Some(s) = &e.session else { continue };
        match SessionEventType::try_from(e.r#type).unwrap() {
            SessionEventType::Removed => {
                view.remove(&s.id);
            }
            _ => {
                view.insert(s.id.clone(), s.clone());
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn changes_are_broadcast_in_the_order_they_were_made() {
    let inv = Inventory::default();
    let (_, mut rx) = inv.watch();
    add(&inv, "a");
    add(&inv, "b");
    serve(&inv, "a", "v1");
    inv.remove_if("b", |_| Ok::<_, ()>(())).unwrap().unwrap();
    use SessionEventType::*;
    assert_eq!(
        kinds(&drain(&mut rx)),
        vec![
            (Added, "a".into()),
            (Added, "b".into()),
            (Updated, "a".into()),
            (Removed, "b".into())
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_id_is_refused_before_anything_is_built() {
    let inv = Inventory::default();
    add(&inv, "a");
    let mut built = false;
    let r = inv.insert_with("a", || {
        built = true;
        Ok::<_, ()>(pending("a"))
    });
    assert!(matches!(r, Err(InsertError::Exists)));
    assert!(!built);
}

#[tokio::test(start_paused = true)]
async fn a_watcher_gets_a_snapshot_then_an_end_marker_then_later_changes() {
    let inv = Inventory::default();
    add(&inv, "a");
    add(&inv, "b");
    let (snapshot, mut rx) = inv.watch();
    use SessionEventType::*;
    assert_eq!(
        kinds(&snapshot),
        vec![(Snapshot, "a".into()), (Snapshot, "b".into()), (Snapshot, "".into())]
    );
    assert!(snapshot.last().unwrap().session.is_none());
    add(&inv, "c");
    assert_eq!(kinds(&drain(&mut rx)), vec![(Added, "c".into())]);
}

#[tokio::test(start_paused = true)]
async fn a_watcher_subscribing_midway_ends_with_the_same_view_as_a_list() {
    let inv = Inventory::default();
    for i in 0..5 {
        add(&inv, &format!("s{i}"));
    }
    serve(&inv, "s1", "v1");
    let (snapshot, mut rx) = inv.watch();
    serve(&inv, "s2", "v1");
    set_faults(&inv, "s1", 10);
    set_faults(&inv, "s2", 20);
    inv.remove_if("s0", |_| Ok::<_, ()>(())).unwrap().unwrap();
    add(&inv, "s9");
    inv.set_active_version("v2");
    tokio::time::advance(COUNTER_EVENT_INTERVAL).await;
    inv.flush_counters();

    let mut view = BTreeMap::new();
    apply(&mut view, &snapshot);
    apply(&mut view, &drain(&mut rx));
    let (listed, active) = inv.list();
    assert_eq!(active, "v2");
    assert_eq!(view.into_values().collect::<Vec<_>>(), listed);
}

#[tokio::test(start_paused = true)]
async fn counter_changes_are_sent_at_most_once_per_second_but_never_lost() {
    let inv = Inventory::default();
    add(&inv, "a");
    serve(&inv, "a", "v1");
    let (_, mut rx) = inv.watch();
    set_faults(&inv, "a", 1);
    assert!(drain(&mut rx).is_empty(), "held back: the state change was just sent");
    tokio::time::advance(Duration::from_millis(400)).await;
    set_faults(&inv, "a", 2);
    inv.flush_counters();
    assert!(drain(&mut rx).is_empty());
    tokio::time::advance(Duration::from_millis(600)).await;
    inv.flush_counters();
    let events = drain(&mut rx);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].session.as_ref().unwrap().faults, 2);
    inv.flush_counters();
    assert!(drain(&mut rx).is_empty(), "nothing left to send");
    tokio::time::advance(COUNTER_EVENT_INTERVAL).await;
    set_faults(&inv, "a", 3);
    assert_eq!(drain(&mut rx).len(), 1, "due: sent at once");
}

#[tokio::test(start_paused = true)]
async fn a_state_change_is_sent_at_once_even_right_after_another() {
    let inv = Inventory::default();
    add(&inv, "a");
    let (_, mut rx) = inv.watch();
    serve(&inv, "a", "v1");
    inv.modify("a", |r| r.step(Lifecycle::begin_completion).unwrap()).unwrap();
    inv.modify("a", |r| r.step(|l| l.pager_reports(SessionState::Graduated)).unwrap()).unwrap();
    let states: Vec<i32> =
        drain(&mut rx).iter().map(|e| e.session.as_ref().unwrap().state).collect();
    assert_eq!(
        states,
        vec![
            SessionState::Serving as i32,
            SessionState::Completing as i32,
            SessionState::Graduated as i32
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_record_sends_nothing() {
    let inv = Inventory::default();
    add(&inv, "a");
    let (_, mut rx) = inv.watch();
    inv.modify("a", |_| ()).unwrap();
    assert!(drain(&mut rx).is_empty());
}

#[tokio::test(start_paused = true)]
async fn activating_another_version_marks_the_old_versions_sessions_outdated() {
    let inv = Inventory::default();
    inv.set_active_version("v1");
    add(&inv, "a");
    add(&inv, "p");
    serve(&inv, "a", "v1");
    assert!(!inv.get("a").unwrap().outdated);
    let (_, mut rx) = inv.watch();
    inv.set_active_version("v2");
    let events = drain(&mut rx);
    assert_eq!(kinds(&events), vec![(SessionEventType::Updated, "a".into())]);
    assert!(events[0].session.as_ref().unwrap().outdated);
    assert_eq!(events[0].active_version, "v2");
    assert!(!inv.get("p").unwrap().outdated, "a pending session belongs to no version");
}

#[tokio::test(start_paused = true)]
async fn finished_sessions_are_forgotten_after_the_retention_only() {
    let inv = Inventory::default();
    add(&inv, "done");
    add(&inv, "live");
    serve(&inv, "live", "v1");
    inv.modify("done", |r| r.step(|l| l.finish(Finish::Ended)).unwrap()).unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(inv.prune_finished(Duration::from_secs(60)).is_empty());
    let (_, mut rx) = inv.watch();
    tokio::time::advance(Duration::from_secs(1)).await;
    let removed = inv.prune_finished(Duration::from_secs(60));
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].id, "done");
    assert_eq!(kinds(&drain(&mut rx)), vec![(SessionEventType::Removed, "done".into())]);
    assert!(inv.get("live").is_some());
}

#[tokio::test(start_paused = true)]
async fn a_refused_removal_keeps_the_record_and_sends_nothing() {
    let inv = Inventory::default();
    add(&inv, "a");
    let (_, mut rx) = inv.watch();
    let r = inv.remove_if("a", |_| Err("no"));
    assert!(matches!(r, Some(Err("no"))));
    assert!(inv.get("a").is_some());
    assert!(drain(&mut rx).is_empty());
    assert!(inv.remove_if("zz", |_| Ok::<_, ()>(())).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_watcher_that_falls_behind_the_capacity_is_told_it_lagged() {
    let inv = Inventory::new(4);
    let (_, mut rx) = inv.watch();
    for i in 0..10 {
        add(&inv, &format!("s{i}"));
    }
    assert!(matches!(rx.try_recv(), Err(TryRecvError::Lagged(6))));
}

#[tokio::test(start_paused = true)]
async fn live_counts_follow_the_owning_version() {
    let inv = Inventory::default();
    for id in ["a", "b", "c"] {
        add(&inv, id);
    }
    serve(&inv, "a", "v1");
    serve(&inv, "b", "v1");
    serve(&inv, "c", "v2");
    inv.modify("b", |r| r.step(|l| l.pager_reports(SessionState::Graduated)).unwrap()).unwrap();
    assert_eq!(inv.live_count("v1"), 1);
    assert_eq!(inv.live_count("v2"), 1);
    assert_eq!(inv.records_of_version("v1").len(), 2);
}

#[test]
fn the_session_cap_counts_unfinished_sessions_only() {
    let inv = Inventory::default();
    let make = |id: &str| {
        let s = pending(id);
        move || Ok::<_, ()>(s)
    };
    inv.insert_capped("a", 2, make("a")).unwrap();
    inv.insert_capped("b", 2, make("b")).unwrap();
    let r = inv.insert_capped("c", 2, make("c"));
    assert!(matches!(r, Err(InsertError::Full { live: 2 })), "{r:?}");
    inv.modify("a", |r| r.step(|l| l.finish(Finish::Failed)).unwrap());
    inv.insert_capped("c", 2, make("c")).unwrap();
    assert!(matches!(inv.insert_capped("a", 9, make("a")), Err(InsertError::Exists)));
}
