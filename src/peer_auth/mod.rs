//! Who may call a gRPC API on a Unix socket: the caller's credentials as the kernel gives them
//! (`SO_PEERCRED`: uid, gid and pid at `connect(2)`; `SO_PEERGROUPS`: its supplementary groups),
//! checked against a [`CallerPolicy`] when the connection is accepted.
//!
//! The socket file's mode and group are the first gate (0600, or 0660 with the API group); the
//! credential check is the second, which also holds for a caller that gets past the file mode
//! (`CAP_DAC_OVERRIDE`, a socket reachable through another path) and which can say no with a
//! reason: every call on a refused connection answers `PERMISSION_DENIED`, and the refusal is
//! logged once per connection with the caller's uid, gid and pid.
//!
//! - [`creds`]: reading the credentials of a connected socket;
//! - [`layer`]: the accepted-connection wrapper that carries the verdict into each request,
//!   and the tower layer that enforces it.

#[allow(unsafe_code)]
pub mod creds;
pub mod layer;

use std::fmt;

pub use creds::PeerCredentials;
pub use layer::{checked_incoming, CallerVerdict, RequireAllowedCaller};

/// A group whose members may call an API (`--api-group NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiGroup {
    pub name: String,
    pub gid: u32,
}

/// Why `--api-group` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ApiGroupError {
    #[error("--api-group {0:?}: no such group")]
    Unknown(String),
    #[error("--api-group {name:?}: looking it up failed: {source}")]
    Lookup { name: String, source: nix::errno::Errno },
}

impl ApiGroup {
    /// Looks up a group by name, or by number when `name` is all digits.
    pub fn resolve(name: &str) -> Result<Self, ApiGroupError> {
        let lookup = |source| ApiGroupError::Lookup { name: name.into(), source };
        let group = match name.parse::<u32>() {
            Ok(gid) => nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)),
            Err(_) => nix::unistd::Group::from_name(name),
        }
        .map_err(lookup)?
        .ok_or_else(|| ApiGroupError::Unknown(name.into()))?;
        Ok(Self { name: group.name, gid: group.gid.as_raw() })
    }
}

/// Who may call: root, the server's own uid, and the members of an optional group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerPolicy {
    /// The uid the server runs as (root in production); its own processes may call.
    pub server_uid: u32,
    /// Members of this group may call too (primary or supplementary group).
    pub group: Option<ApiGroup>,
}

impl CallerPolicy {
    /// Root and the server's own uid only (a pager's internal sockets: the supervisor).
    pub fn owner_only() -> Self {
        Self { server_uid: nix::unistd::geteuid().as_raw(), group: None }
    }

    /// Root, the server's own uid, and the members of `group`.
    pub fn with_group(group: Option<ApiGroup>) -> Self {
        Self { group, ..Self::owner_only() }
    }
}

impl fmt::Display for CallerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.group, self.server_uid) {
            (Some(g), 0) => write!(f, "root or a member of group {} (gid {})", g.name, g.gid),
            (Some(g), uid) => {
                write!(f, "root, uid {uid} or a member of group {} (gid {})", g.name, g.gid)
            }
            (None, 0) => write!(f, "root"),
            (None, uid) => write!(f, "root or uid {uid}"),
        }
    }
}

/// Why a caller is let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Root,
    ServerUid,
    /// Its primary group is the API group.
    PrimaryGroup,
    /// One of its supplementary groups is the API group.
    SupplementaryGroup,
}

/// Decides whether the caller with `peer`'s credentials may call under `policy`.
pub fn authorize(policy: &CallerPolicy, peer: &PeerCredentials) -> Result<Admission, String> {
    if peer.uid == 0 {
        return Ok(Admission::Root);
    }
    if peer.uid == policy.server_uid {
        return Ok(Admission::ServerUid);
    }
    if let Some(g) = &policy.group {
        if peer.gid == g.gid {
            return Ok(Admission::PrimaryGroup);
        }
        if peer.groups.contains(&g.gid) {
            return Ok(Admission::SupplementaryGroup);
        }
    }
    Err(format!("{peer} may not call this API: callers must be {policy}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> PeerCredentials {
        PeerCredentials { uid, gid, pid: Some(42), groups: groups.to_vec() }
    }

    fn policy(group: Option<u32>) -> CallerPolicy {
        CallerPolicy {
            server_uid: 0,
            group: group.map(|gid| ApiGroup { name: "uffd".into(), gid }),
        }
    }

    #[test]
    fn root_may_always_call() {
        assert_eq!(authorize(&policy(None), &peer(0, 0, &[])), Ok(Admission::Root));
        assert_eq!(authorize(&policy(Some(100)), &peer(0, 5, &[])), Ok(Admission::Root));
    }

    #[test]
    fn the_server_uid_may_call_the_server_it_runs() {
        let p = CallerPolicy { server_uid: 1000, group: None };
        assert_eq!(authorize(&p, &peer(1000, 1000, &[])), Ok(Admission::ServerUid));
        assert!(authorize(&p, &peer(1001, 1000, &[])).is_err());
    }

    #[test]
    fn members_of_the_api_group_may_call_by_primary_or_supplementary_group() {
        let p = policy(Some(100));
        assert_eq!(authorize(&p, &peer(65534, 100, &[])), Ok(Admission::PrimaryGroup));
        assert_eq!(
            authorize(&p, &peer(65534, 65534, &[65534, 100])),
            Ok(Admission::SupplementaryGroup)
        );
    }

    #[test]
    fn anyone_else_is_refused_with_who_and_why() {
        let err = authorize(&policy(Some(100)), &peer(65534, 65534, &[65534])).unwrap_err();
        assert_eq!(
            err,
            "uid 65534 (gid 65534, pid 42) may not call this API: callers must be root or a \
             member of group uffd (gid 100)"
        );
        let err = authorize(&policy(None), &peer(65534, 100, &[100])).unwrap_err();
        assert!(err.ends_with("callers must be root"), "{err}");
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        let root = ApiGroup::resolve("root").unwrap();
        assert_eq!(root, ApiGroup { name: "root".into(), gid: 0 });
        assert_eq!(ApiGroup::resolve("0").unwrap(), root);
        let err = ApiGroup::resolve("no-such-group-uffd").unwrap_err().to_string();
        assert!(err.contains("no such group"), "{err}");
    }
}
