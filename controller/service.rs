//! The `uffdpager.v1.Controller` gRPC service: read-only reports over the shared state.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uffdpager::api::controller_server::Controller;
use uffdpager::api::{ControllerStatus, GetStatusRequest, PlanRequest, PlanResponse};

use crate::state::Shared;
use crate::status;

/// The Controller service over the shared state.
#[derive(Debug, Clone)]
pub struct ControllerService {
    shared: Arc<Shared>,
}

impl ControllerService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<ControllerStatus>, Status> {
        Ok(Response::new(status::status(&self.shared)))
    }

    async fn plan(&self, _request: Request<PlanRequest>) -> Result<Response<PlanResponse>, Status> {
        Ok(Response::new(status::plan(&self.shared)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use uffdpager::api::{ConnectionState, PlanClass, Session, SessionState};

    use super::*;
    use crate::config::Settings;
    use crate::inventory::{SessionKey, TrackedSession};
    use crate::state::{Clock, ConnState};

    fn shared(enabled: bool) -> Arc<Shared> {
        let config = Settings {
            enabled: Some(enabled),
            supervisors: Some(vec!["unix:/s.sock".into()]),
            max_active_sessions: Some(1),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        Shared::new(config, Clock::System, None)
    }

    fn serving(id: &str, version: &str, age: Duration) -> TrackedSession {
        let connected_at = prost_types::Timestamp::from(SystemTime::now() - age);
        TrackedSession::from_proto(&Session {
            id: id.into(),
            pager_version: version.into(),
            state: SessionState::Serving as i32,
            connected_at: Some(connected_at),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_disabled_controller_says_so_and_plans_nothing() {
        let svc = ControllerService::new(shared(false));
        let status = svc.get_status(Request::new(GetStatusRequest {})).await.unwrap().into_inner();
        assert!(!status.enabled);
        assert!(status.mode.starts_with("disabled"), "{}", status.mode);
        assert_eq!(status.supervisors[0].state(), ConnectionState::NotWatched);
        let plan = svc.plan(Request::new(PlanRequest {})).await.unwrap().into_inner();
        assert!(plan.graduations.is_empty() && plan.note.starts_with("disabled"), "{plan:?}");
    }

    #[tokio::test]
    async fn status_and_plan_report_what_the_loop_sees() {
        let shared = shared(true);
        {
            let mut st = shared.lock();
            let sup = st.supervisor_mut("unix:/s.sock").unwrap();
            sup.conn = ConnState::Watching;
            sup.inventory.active_version = "v2".into();
            for s in [
                serving("old", "v1", Duration::from_secs(3600)),
                serving("a", "v2", Duration::from_secs(3000)),
                serving("b", "v2", Duration::from_secs(2000)),
                serving("young", "v2", Duration::from_secs(5)),
            ] {
                sup.inventory.sessions.insert(s.id.clone(), s);
            }
            st.failed_at.insert(SessionKey::new("unix:/s.sock", "a"), SystemTime::now());
        }
        let svc = ControllerService::new(shared);
        let plan = svc.plan(Request::new(PlanRequest {})).await.unwrap().into_inner();
        assert_eq!(plan.slots, 1);
        let got: Vec<(&str, PlanClass, bool)> = plan
            .graduations
            .iter()
            .map(|g| (g.session_id.as_str(), g.class(), g.starts_next_scan))
            .collect();
        assert_eq!(got, [("old", PlanClass::Outdated, true), ("b", PlanClass::Ceiling, false)]);
        assert!(plan.graduations[0].reason.starts_with("outdated version v1 (active v2)"));
        let held: Vec<(&str, &str)> =
            plan.held.iter().map(|h| (h.session_id.as_str(), h.reason.as_str())).collect();
        assert!(held.iter().any(|(id, r)| *id == "a" && r.contains("backoff")), "{held:?}");
        assert!(held.iter().any(|(id, r)| *id == "young" && r.contains("soaking")), "{held:?}");

        let status = svc.get_status(Request::new(GetStatusRequest {})).await.unwrap().into_inner();
        assert_eq!(status.mode, "enabled");
        let config = status.config.unwrap();
        assert_eq!(config.min_session_age.unwrap().seconds, 600);
        assert_eq!(config.max_active_sessions, 1);
        let sup = &status.supervisors[0];
        assert_eq!((sup.state(), sup.sessions, sup.serving), (ConnectionState::Watching, 4, 4));
        let a = status.sessions.iter().find(|s| s.session_id == "a").unwrap();
        assert!(a.retry_after.is_some() && !a.outdated);
        assert!(status.sessions.iter().find(|s| s.session_id == "old").unwrap().outdated);
    }
}
