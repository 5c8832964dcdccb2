//! Sessions that move between workers (`--follow-vcpus`, see `crate::follow`): a worker hands a
//! session it serves to the worker on its vCPU's CPU, and passes on the commands for it that
//! still reach it.
//!
//! The order keeps every command with the session. The giving worker sends the session first,
//! then records the new worker in the session table: a command routed before that record
//! reaches the giver, which passes it on behind the session (one channel, in order); one routed
//! after it reaches the taker, behind the session too.

use std::time::{Duration, Instant};

use tracing::{debug, error, warn};

use super::handle::Command;
use super::{publish_end, Release, Worker};
use crate::session::Session;

/// How long a worker passes on the commands of a session it handed over: far longer than a
/// command routed just before the handover takes to arrive.
const PASS_ON_FOR: Duration = Duration::from_secs(10);

impl Worker {
    /// Passes `cmd` on to the worker that now serves its session, if this one handed it over;
    /// otherwise gives it back to be applied here.
    pub(super) fn pass_on_if_moved(&mut self, cmd: Command) -> Option<Command> {
        // A session handed back is taken here, never passed on again.
        let Some(token) = cmd.token().filter(|_| !matches!(cmd, Command::Moved { .. })) else {
            return Some(cmd);
        };
        let moved = self.moved.get(&token).map(|&(to, _)| to);
        let Some(to) = moved.filter(|_| !self.sessions.contains_key(&token)) else {
            return Some(cmd);
        };
        match self.peers.get().and_then(|p| p.get(to)) {
            Some(peer) => peer.send(cmd).err(),
            None => Some(cmd),
        }
    }

    /// Hands session `token` to worker `to`, unless it has work in progress here (a completion,
    /// read-ahead, a prefetch, blocks to fill, faults read and not yet served): it moves at a
    /// later sample, once quiet.
    pub(super) fn move_session(&mut self, token: u64, to: usize) {
        let now = Instant::now();
        self.moved.retain(|_, (_, at)| now.saturating_duration_since(*at) < PASS_ON_FOR);
        let Some(peer) = self.peers.get().and_then(|p| p.get(to)).cloned() else { return };
        let in_progress = self.completions.iter().any(|(t, _)| *t == token)
            || self.streams.contains(&token)
            || self.prefetches.contains(&token)
            || self.around.contains(&token);
        let quiet = self.sessions.get(&token).is_some_and(|s| !s.has_pending());
        if to == self.index || in_progress || !quiet {
            return;
        }
        let Some(session) = self.sessions.remove(&token) else { return };
        let _ = self.epoll.delete(&session.uffd);
        let _ = self.epoll.delete(session.vmm_fd());
        self.record_deadlines.retain(|d| d.1 != token);
        let shared = std::sync::Arc::clone(&session.shared);
        match peer.send(Command::Moved { token, session: Box::new(session) }) {
            Ok(()) => {
                shared.set_worker(to);
                self.moved.insert(token, (to, now));
                debug!(session = %shared.id, version = %self.version, from = self.index, to, "session moved to its vCPU's worker");
            }
            Err(Command::Moved { session, .. }) => {
                // The other worker has stopped (the pager shuts down): serve it here still.
                warn!(session = %shared.id, version = %self.version, to, "the worker to move to has stopped");
                self.take_moved(token, *session);
            }
            Err(_) => unreachable!("a worker gives back the command it was sent"),
        }
    }

    /// Serves a session another worker handed over. Should its descriptors not join this
    /// worker's epoll set, it fails with the reason (nothing else could serve it).
    pub(super) fn take_moved(&mut self, token: u64, session: Session) {
        self.moved.remove(&token);
        let shared = std::sync::Arc::clone(&session.shared);
        if let Err(e) = self.watch(token, &session) {
            error!(session = %shared.id, version = %self.version, error = %e, "a moved session could not be served");
            shared.set_error(format!("moving to another fault worker: {e}"));
            publish_end(&shared, Release::Failed);
        } else {
            self.serve(token, session);
        }
    }
}
