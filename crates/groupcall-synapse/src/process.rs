//! The Synapse child process, in its own process group.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tracing::{debug, warn};

use crate::SynapseError;

/// A spawned server; killed (whole process group) on drop.
pub(crate) struct Running {
    child: Child,
    reaped: bool,
}

impl Running {
    /// Spawns `cmd` in a new process group with stdout and stderr appended
    /// to `log`.
    pub(crate) fn spawn(mut cmd: Command, log: &Path) -> Result<Running, SynapseError> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(SynapseError::io(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(SynapseError::io("duplicating the log handle"))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().map_err(SynapseError::io("spawning Synapse"))?;
        Ok(Running {
            child,
            reaped: false,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub(crate) fn exited(&mut self) -> Result<Option<String>, SynapseError> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Ok(Some(status.to_string()))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(SynapseError::Io {
                what: "waiting for Synapse".to_owned(),
                source: e,
            }),
        }
    }

    pub(crate) fn is_alive(&mut self) -> bool {
        matches!(self.exited(), Ok(None))
    }

    fn signal(&self, sig: Signal) {
        let Ok(pid) = i32::try_from(self.child.id()) else {
            return;
        };
        if let Err(e) = killpg(Pid::from_raw(pid), sig) {
            // ESRCH: the group is already gone.
            if e != nix::errno::Errno::ESRCH {
                warn!(pid, ?sig, error = %e, "signalling Synapse failed");
            }
        }
    }

    /// SIGTERM, wait up to `timeout`, then SIGKILL.
    pub(crate) async fn stop(mut self, timeout: Duration) -> Result<(), SynapseError> {
        if self.reaped {
            return Ok(());
        }
        self.signal(Signal::SIGTERM);
        let started = Instant::now();
        loop {
            if self.exited()?.is_some() {
                // Kill anything the server may have left in its group.
                self.signal(Signal::SIGKILL);
                debug!(
                    ms = started.elapsed().as_millis() as u64,
                    "Synapse exited after SIGTERM"
                );
                return Ok(());
            }
            if started.elapsed() > timeout {
                warn!(?timeout, "Synapse ignored SIGTERM; sending SIGKILL");
                self.kill_and_reap();
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn kill_and_reap(&mut self) {
        self.signal(Signal::SIGKILL);
        if !self.reaped {
            // Returns promptly: SIGKILL cannot be ignored.
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_and_reap();
        }
    }
}

/// The last `lines` lines of the file at `path` (empty if unreadable).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => crate::install::tail_lines(&String::from_utf8_lossy(&bytes), lines),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
