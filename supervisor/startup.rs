//! Which pager versions the supervisor starts with, and starting them once the pagers of an
//! earlier run have been taken over (`recover.rs`).
//!
//! Versions come from the command line (`--pager-binary PATH[=LABEL]`, repeatable; the last one
//! is active) or from a TOML file (`--versions-config FILE`):
//!
//! ```toml
//! [[versions]]
//! version = "v1"                                   # optional: what the binary prints
//! binary_path = "/opt/uffd-pager/1.0/uffd-pager"   # relative: to the file's directory
//!
//! [[versions]]
//! version = "v2"
//! binary_path = "/opt/uffd-pager/2.0/uffd-pager"
//! active = true                                    # at most one; none: the last one
//! ```
//!
//! The active version becomes ACTIVE; the others are started on standby (DRAINING, but kept
//! running while idle, as roll-back targets for ActivateVersion). After a restart, a version
//! already running is taken over, not started again; if the version recorded as active runs, it
//! stays active (it is the latest DeployVersion or ActivateVersion), and the listed versions that
//! do not run are started on standby.

use std::sync::Arc;

use anyhow::{bail, Context};
use tracing::{error, info};

use crate::core::Core;
use crate::deploy::Role;
use crate::recover::Recovered;
use crate::version_spec::VersionSpec;

/// Starts the listed versions that do not run yet (the others were taken over). Fails only if
/// the version that is to be active cannot start.
pub async fn start_versions(
    core: &Arc<Core>,
    specs: &[VersionSpec],
    recovered: &Recovered,
) -> anyhow::Result<()> {
    let keep_active = recovered.active.is_some();
    let ordered = specs.iter().filter(|s| !s.active).chain(specs.iter().filter(|s| s.active));
    for spec in ordered {
        let makes_active = spec.active && !keep_active;
        let Some(binary) = spec.binary.to_str() else {
            bail!("the pager binary's path {} is not UTF-8", spec.binary.display());
        };
        let label = match Core::resolve_label(&spec.binary, &spec.label).await {
            Ok(l) => l,
            Err(e) if makes_active => {
                return Err(anyhow::Error::new(e)).context("starting the active pager version")
            }
            Err(e) => {
                error!(binary, error = %e, "cannot start a listed pager version");
                continue;
            }
        };
        if recovered.versions.contains(&label) {
            if makes_active {
                core.activate_version(&label)
                    .await
                    .map_err(anyhow::Error::new)
                    .context("making the running pager version active")?;
            }
            info!(version = %label, "pager version already running (taken over)");
            continue;
        }
        let role = if makes_active { Role::Active } else { Role::Standby };
        match core.start_version(binary, &label, role, &spec.tuning).await {
            Ok(_) => {}
            Err(e) if makes_active => {
                return Err(anyhow::Error::new(e)).context("starting the active pager version")
            }
            Err(e) => error!(version = %label, error = %e, "a listed pager version did not start"),
        }
        if spec.active && keep_active {
            info!(
                version = %label,
                active = recovered.active.as_deref().unwrap_or(""),
                "the listed active version is on standby: the version recorded as active runs \
                 and stays active (ActivateVersion switches)",
            );
        }
    }
    Ok(())
}
