//! Reloading the target list while the probes keep running: on SIGHUP, or `pipeprobe reload`
//! over the control socket (in a `hostPID` pod the agent is not PID 1, so `kill -HUP 1` would
//! signal the node's init). The configuration file is read again with the command line's
//! `--target`s; only the targets are applied (other settings need a restart, and say so).
//! A configuration that does not load changes nothing.
use std::path::PathBuf;

use prometheus_client::metrics::gauge::Gauge;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::{Config, ConfigError},
    targets::{self, Reloaded},
    tracker::ReloadRequest,
};

#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("the new configuration was not applied, the previous targets stay: {0}")]
    Config(#[from] ConfigError),
    #[error("the new target list was not applied, the previous targets stay: {0}")]
    Targets(#[from] targets::ReloadError),
    #[error("the agent is stopping")]
    Stopped,
}

pub struct Reloader {
    config: Option<PathBuf>,
    cli_targets: Vec<String>,
    tracker: mpsc::Sender<ReloadRequest>,
    last_ok: Gauge,
}

impl Reloader {
    pub fn new(
        config: Option<PathBuf>,
        cli_targets: Vec<String>,
        tracker: mpsc::Sender<ReloadRequest>,
        last_ok: Gauge,
    ) -> Self {
        Self {
            config,
            cli_targets,
            tracker,
            last_ok,
        }
    }

    /// Reads the configuration again and applies its targets; logs and exports the outcome.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let result = self.apply().await;
        match &result {
            Ok(r) => {
                self.last_ok.set(1);
                tracing::info!(
                    added = ?r.added,
                    removed = ?r.removed,
                    changed = ?r.changed,
                    unchanged = r.unchanged.len(),
                    "targets reloaded; settings other than the targets apply at the next restart"
                );
            }
            Err(e) => {
                self.last_ok.set(0);
                tracing::error!("reload refused: {e}");
            }
        }
        result
    }

    async fn apply(&self) -> Result<Reloaded, ReloadError> {
        let config = Config::load(self.config.as_deref(), &self.cli_targets, None)?;
        let targets = config
            .targets
            .list()
            .into_iter()
            .map(|(_, t)| (*t).clone())
            .collect();
        let (reply, answer) = oneshot::channel();
        self.tracker
            .send((targets, reply))
            .await
            .map_err(|_| ReloadError::Stopped)?;
        Ok(answer.await.map_err(|_| ReloadError::Stopped)??)
    }
}

/// Reloads on every SIGHUP until the agent stops.
pub async fn on_sighup(reloader: std::sync::Arc<Reloader>) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot handle SIGHUP: {e}; `pipeprobe reload` still reloads");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let _ = reloader.reload().await;
    }
}

/// `pipeprobe reload`: asks the running agent to reload, prints what changed.
pub fn run_client(args: &crate::cli::ReloadArgs) -> Result<(), crate::flamegraph::FlamegraphError> {
    use crate::{
        control::{Request, Response},
        flamegraph::FlamegraphError,
    };
    let Response::Reloaded(r) = crate::flamegraph::ask(&args.control_socket, &Request::Reload)?
    else {
        return Err(FlamegraphError::Refused("unexpected reply".into()));
    };
    let names = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    println!("added:     {}", names(&r.added));
    println!("removed:   {}", names(&r.removed));
    println!("changed:   {}", names(&r.changed));
    println!("unchanged: {}", names(&r.unchanged));
    Ok(())
}
