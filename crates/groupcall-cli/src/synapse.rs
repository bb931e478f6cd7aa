//! `groupcall synapse`: a throwaway local Synapse with users and a call room.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, anyhow};
use groupcall::matrix::{CreateRoomOptions, MatrixSession};
use groupcall_synapse::{Synapse, SynapseError, SynapseOptions};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::args::SynapseArgs;

/// Runs `groupcall synapse` until SIGINT or SIGTERM.
pub async fn run(args: SynapseArgs) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let options = SynapseOptions {
        data_dir: args.data_dir.clone(),
        port: args.port,
        ..SynapseOptions::default()
    };
    let mut hs = tokio::select! {
        r = Synapse::start(options) => r.context("starting Synapse")?,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let result = tokio::select! {
        r = serve(&mut hs, &args) => r,
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    };
    info!("stopping Synapse");
    let stopped = hs.stop().await.context("stopping Synapse");
    result.and(stopped)
}

/// Sets up users and the room, prints the JSON line, then watches Synapse.
async fn serve(hs: &mut Synapse, args: &SynapseArgs) -> anyhow::Result<()> {
    let mut users = Vec::new();
    for u in &args.users {
        let user_id = match hs.register_user(&u.name, &u.password).await {
            Ok(r) => r.user_id,
            // A kept data directory already has the user.
            Err(SynapseError::Register { body, .. }) if body.contains("M_USER_IN_USE") => {
                format!("@{}:{}", u.name, hs.server_name())
            }
            Err(e) => return Err(e).context(format!("registering {}", u.name)),
        };
        users.push((u, user_id));
    }
    let (creator, creator_id) = users
        .first()
        .ok_or_else(|| anyhow!("give at least one --user NAME:PASSWORD"))?;

    // The creator's device exists only to create the room: log it out after.
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let session = MatrixSession::login(&hs.base_url(), creator_id, &creator.password, tmp.path())
        .await
        .with_context(|| format!("logging in as {creator_id}"))?;
    let room_id = session
        .create_call_room(CreateRoomOptions {
            name: Some(args.room_name.clone()),
            invite: users.iter().skip(1).map(|(_, id)| id.clone()).collect(),
            encrypted: false,
            public: true,
        })
        .await
        .context("creating the call room")?;
    if let Err(e) = session.logout().await {
        warn!("logging the room creator's helper device out: {e}");
    }

    let line = json!({
        "event": "synapse",
        "homeserver": hs.base_url(),
        "room_id": room_id,
        "users": users.iter().map(|(u, id)| json!({
            "user_id": id,
            "name": u.name,
            "password": u.password,
        })).collect::<Vec<_>>(),
    });
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
    drop(stdout);
    info!(homeserver = %hs.base_url(), %room_id, log = %hs.log_path().display(), "Synapse is ready; SIGINT or SIGTERM stops it");

    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if !hs.is_running() {
            return Err(anyhow!("Synapse exited; log tail:\n{}", hs.log_tail(20)));
        }
    }
}
