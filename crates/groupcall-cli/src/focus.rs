//! `groupcall focus`: run the focus until SIGTERM or SIGINT, then drain.

use anyhow::{Context, anyhow};
use groupcall_focus::config::Config;
use groupcall_focus::driver::FocusService;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::args::FocusArgs;

/// Runs `groupcall focus --config FILE`.
pub async fn run(args: FocusArgs) -> anyhow::Result<()> {
    // Everything local first: a bad file fails before any network I/O.
    let config = Config::load(&args.config)?;
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;

    let mut handle = tokio::select! {
        r = FocusService::start(config) => r?,
        _ = term.recv() => { info!("SIGTERM while starting: not started"); return Ok(()); }
        _ = int.recv() => { info!("SIGINT while starting: not started"); return Ok(()); }
    };
    let mut signals = 0;
    loop {
        let sig = tokio::select! {
            r = handle.wait() => return r.map_err(Into::into),
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        signals += 1;
        if signals == 1 {
            info!(signal = sig, "draining (a second signal stops at once)");
            handle.shutdown();
        } else {
            warn!(
                signal = sig,
                "second signal: stopping without waiting for the drain"
            );
            return Err(anyhow!("stopped by a second {sig} during the drain"));
        }
    }
}
