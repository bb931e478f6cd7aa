//! A throwaway local homeserver for the demo and the benchmarks: Synapse
//! (killed on drop) behind the counting proxy, with users and call rooms.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow};
use groupcall::matrix::{CreateRoomOptions, MatrixSession};
use groupcall_synapse::{Synapse, SynapseError, SynapseOptions};
use tracing::warn;

use crate::proxy::Proxy;

/// Synapse and the proxy in front of it.
pub struct Local {
    /// The server (stopped by [`Local::stop`], killed on drop).
    pub synapse: Synapse,
    /// The proxy every client goes through.
    pub proxy: Proxy,
}

impl Local {
    /// Installs (first time) and starts Synapse, then the proxy.
    pub async fn start(port: Option<u16>) -> anyhow::Result<Local> {
        let synapse = Synapse::start(SynapseOptions {
            port,
            ..SynapseOptions::default()
        })
        .await
        .map_err(|e| match e {
            SynapseError::PortBusy { port } => anyhow!(
                "cannot start the local Synapse: port {port} on 127.0.0.1 is busy (another program listens there); give another --synapse-port or leave it out to pick a free one"
            ),
            e => anyhow::Error::new(e).context("cannot start the local Synapse"),
        })?;
        let upstream = SocketAddr::from(([127, 0, 0, 1], synapse.port()));
        let proxy = Proxy::start(upstream).await?;
        Ok(Local { synapse, proxy })
    }

    /// The URL clients use (the proxy).
    pub fn url(&self) -> String {
        self.proxy.url().to_owned()
    }

    /// `@name:server`.
    pub fn user_id(&self, name: &str) -> String {
        format!("@{name}:{}", self.synapse.server_name())
    }

    /// Registers a user (an existing one is fine).
    pub async fn register(&self, name: &str, password: &str) -> anyhow::Result<String> {
        register_on(&self.synapse, name, password).await
    }

    /// Stops Synapse (bounded).
    pub async fn stop(&mut self) {
        if let Err(e) = self.synapse.stop().await {
            warn!("stopping Synapse: {e}");
        }
    }
}

/// Registers a user on `synapse` (an existing one is fine), returning its
/// user id.
pub async fn register_on(synapse: &Synapse, name: &str, password: &str) -> anyhow::Result<String> {
    match synapse.register_user(name, password).await {
        Ok(u) => Ok(u.user_id),
        Err(SynapseError::Register { body, .. }) if body.contains("M_USER_IN_USE") => {
            Ok(format!("@{name}:{}", synapse.server_name()))
        }
        Err(e) => Err(e).with_context(|| format!("registering {name} on {}", synapse.base_url())),
    }
}

/// Creates a call room (members may send the call events) as an
/// already logged-in session: public, or private (invited users only).
pub async fn create_room(
    session: &MatrixSession,
    name: &str,
    invite: Vec<String>,
    public: bool,
) -> anyhow::Result<String> {
    session
        .create_call_room(CreateRoomOptions {
            name: Some(name.to_owned()),
            invite,
            encrypted: false,
            public,
        })
        .await
        .context("creating the call room")
}

/// Logs in, bounded by `timeout`, keeping the device in `dir`.
pub async fn login(
    homeserver: &str,
    user: &str,
    password: &str,
    dir: &Path,
    timeout: Duration,
) -> anyhow::Result<MatrixSession> {
    tokio::time::timeout(
        timeout,
        MatrixSession::login(homeserver, user, password, dir),
    )
    .await
    .map_err(|_| anyhow!("logging in as {user} took longer than {timeout:?}"))?
    .with_context(|| format!("logging in as {user}"))
}
