//! `groupcall demo --focus`: a focus (MSC3898 SFU, crate
//! `groupcall-focus`) running in the demo's process, with its figures.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow};
use groupcall_focus::config::Config;
use groupcall_focus::driver::{FocusHandle, FocusService};
use groupcall_focus::engine::{EngineCore, EngineFigures};
use groupcall_proto::FocusRef;
use serde_json::{Value, json};
use tokio::sync::watch;

/// How long the focus may take to drain when the demo ends.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A focus started by the demo.
pub struct DemoFocus {
    handle: FocusHandle,
    figures: watch::Receiver<EngineFigures>,
}

impl DemoFocus {
    /// Writes `dir/focus.toml` (the password in `dir/password`, its data
    /// in `dir/data`; media and HTTP on 127.0.0.1, free ports; only
    /// `allow` may invite it; plaintext signalling accepted only with
    /// `allow_plaintext`; with `cascade`, it links with the call's other
    /// foci, docs/protocol.md "Cascading foci") and starts the focus in
    /// this process.
    pub async fn start(
        dir: &Path,
        homeserver: &str,
        user: &str,
        password: &str,
        allow: &str,
        allow_plaintext: bool,
        cascade: bool,
    ) -> anyhow::Result<DemoFocus> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the focus directory {}", dir.display()))?;
        std::fs::write(dir.join("password"), format!("{password}\n"))
            .context("writing the focus's password file")?;
        let path = dir.join("focus.toml");
        std::fs::write(
            &path,
            config_text(homeserver, user, allow, allow_plaintext, cascade),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        let config = Config::load(&path)?;
        let core = EngineCore::from_config(&config)?;
        let figures = core.figures_watch();
        let handle = FocusService::start_with_core(config, core)
            .await
            .context("starting the focus")?;
        Ok(DemoFocus { handle, figures })
    }

    /// The focus's user id.
    pub fn user_id(&self) -> &str {
        self.handle.user_id()
    }

    /// The focus's device, for `JoinOptions::focus`.
    pub fn focus_ref(&self) -> FocusRef {
        FocusRef {
            user_id: self.handle.user_id().to_owned(),
            device_id: self.handle.device_id().to_owned(),
        }
    }

    /// Its device as the other foci name it: `@user:server/DEVICE`.
    pub fn device_key(&self) -> String {
        format!("{}/{}", self.handle.user_id(), self.handle.device_id())
    }

    /// The address of its HTTP endpoint (metrics, health).
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.handle.http_addr()
    }

    /// Waits until the focus has joined `rooms` rooms (it joins when
    /// invited), up to `timeout`.
    pub async fn wait_rooms(&self, rooms: u64, timeout: Duration) -> anyhow::Result<()> {
        let mut status = self.handle.watch_status();
        tokio::time::timeout(timeout, async {
            while status.borrow_and_update().rooms < rooms {
                if status.changed().await.is_err() {
                    return Err(anyhow!("the focus stopped"));
                }
            }
            Ok(())
        })
        .await
        .map_err(|_| {
            anyhow!(
                "the focus did not join the call room within {} s",
                timeout.as_secs_f64()
            )
        })?
    }

    /// Its latest figures (published every 500 ms).
    pub fn figures(&self) -> EngineFigures {
        self.figures.borrow().clone()
    }

    /// Drains and stops it (bounded).
    pub async fn stop(mut self) {
        self.handle.shutdown();
        match tokio::time::timeout(STOP_TIMEOUT, self.handle.wait()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("the focus stopped with: {e}"),
            Err(_) => tracing::warn!("the focus did not stop within {STOP_TIMEOUT:?}"),
        }
    }
}

/// The demo's focus.toml.
fn config_text(
    homeserver: &str,
    user: &str,
    allow: &str,
    allow_plaintext: bool,
    cascade: bool,
) -> String {
    // JSON strings are TOML basic strings for what we put in.
    let q = |s: &str| Value::String(s.to_owned()).to_string();
    format!(
        "homeserver = {hs}\nuser = {user}\npassword_file = \"password\"\ndata_dir = \"data\"\n\
         allow = [{allow}]\nallow_plaintext = {allow_plaintext}\ncascade = {cascade}\nhttp_listen = \"127.0.0.1:0\"\n\n\
         [media]\nbind = [\"127.0.0.1:0\"]\n\n[drain]\ngrace_period = \"1s\"\n",
        hs = q(homeserver),
        user = q(user),
        allow = q(allow),
    )
}

/// The `--json` summary's `links` entries of the focus `from` (its device):
/// one per link, as it sees it.
pub fn links_json(from: &str, f: &EngineFigures) -> Vec<Value> {
    f.links
        .iter()
        .map(|l| {
            json!({
                "from": from,
                "to": l.device,
                "outgoing": l.outgoing,
                "streams_carried": l.streams_out,
                "streams_subscribed": l.streams_in,
                "packets": l.packets_out,
                "packets_in": l.packets_in,
            })
        })
        .collect()
}

/// What the focus did, in short: the figures of the report and of the
/// `--json` summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Figures {
    /// The most camera video tracks one participant uploads.
    pub uploads_per_participant: usize,
    /// The most audio tracks one participant uploads.
    pub audio_uploads_per_participant: usize,
    /// Subscriptions being forwarded.
    pub forwarded_streams: usize,
    /// Packets sent to subscribers.
    pub packets_forwarded: u64,
    /// Packets received from publishers.
    pub packets_received: u64,
    /// Clients connected to it.
    pub participants: usize,
    /// Calls it serves.
    pub calls: usize,
    /// Invites it turned down.
    pub refusals: u64,
}

impl Figures {
    /// Sums the engine's figures up.
    pub fn of(f: &EngineFigures) -> Figures {
        Figures {
            uploads_per_participant: f.uploads.values().map(|(_, v)| *v).max().unwrap_or(0),
            audio_uploads_per_participant: f.uploads.values().map(|(a, _)| *a).max().unwrap_or(0),
            forwarded_streams: f.calls.iter().map(|c| c.subscriptions).sum(),
            packets_forwarded: f.calls.iter().map(|c| c.counters.packets_out).sum(),
            packets_received: f.calls.iter().map(|c| c.counters.packets_in).sum(),
            participants: f.calls.iter().map(|c| c.participants).sum(),
            calls: f.calls.len(),
            refusals: f.refusals.values().sum(),
        }
    }

    /// The figures of several foci together: the most uploads per
    /// participant, the sum of the rest.
    pub fn add(self, o: Figures) -> Figures {
        Figures {
            uploads_per_participant: self.uploads_per_participant.max(o.uploads_per_participant),
            audio_uploads_per_participant: self
                .audio_uploads_per_participant
                .max(o.audio_uploads_per_participant),
            forwarded_streams: self.forwarded_streams + o.forwarded_streams,
            packets_forwarded: self.packets_forwarded + o.packets_forwarded,
            packets_received: self.packets_received + o.packets_received,
            participants: self.participants + o.participants,
            calls: self.calls + o.calls,
            refusals: self.refusals + o.refusals,
        }
    }

    /// The summary's `focus` object.
    pub fn json(&self, user_id: &str) -> Value {
        json!({
            "user_id": user_id,
            "uploads_per_participant": self.uploads_per_participant,
            "audio_uploads_per_participant": self.audio_uploads_per_participant,
            "forwarded_streams": self.forwarded_streams,
            "packets_forwarded": self.packets_forwarded,
            "packets_received": self.packets_received,
            "participants": self.participants,
            "calls": self.calls,
            "refusals": self.refusals,
        })
    }

    /// One line for people.
    pub fn line(&self) -> String {
        format!(
            "focus: {} participants, uploads per participant: {} camera video + {} audio; {} forwarded streams; {} packets received, {} forwarded",
            self.participants,
            self.uploads_per_participant,
            self.audio_uploads_per_participant,
            self.forwarded_streams,
            self.packets_received,
            self.packets_forwarded
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use groupcall_focus::engine::CallFigures;

    #[test]
    fn config_is_valid_toml_for_the_focus() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("password"), "pw\n").unwrap();
        let path = dir.path().join("focus.toml");
        std::fs::write(
            &path,
            config_text(
                "http://127.0.0.1:8008",
                "focus",
                "@alice:localhost",
                false,
                true,
            ),
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.user, "focus");
        assert!(c.allow.allows("@alice:localhost"));
        assert!(!c.allow.allows("@bob:localhost"));
        assert_eq!(c.matrix_password().unwrap(), "pw");
        assert!(!c.allow_plaintext);
        assert!(c.cascade);
    }

    #[test]
    fn figures_sum_up() {
        let mut f = EngineFigures::default();
        f.uploads.insert("@a:x/A".into(), (1, 1));
        f.uploads.insert("@b:x/B".into(), (1, 2));
        for (subs, out) in [(2, 100), (3, 50)] {
            let mut c = CallFigures {
                participants: 2,
                subscriptions: subs,
                ..CallFigures::default()
            };
            c.counters.packets_out = out;
            f.calls.push(c);
        }
        let s = Figures::of(&f);
        assert_eq!(s.uploads_per_participant, 2);
        assert_eq!(s.audio_uploads_per_participant, 1);
        assert_eq!(s.forwarded_streams, 5);
        assert_eq!(s.packets_forwarded, 150);
        assert_eq!(s.participants, 4);
        assert_eq!(s.calls, 2);
    }
}
