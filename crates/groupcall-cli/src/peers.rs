//! The participants of a demo or benchmark call, whatever runs them:
//! groupcall clients in this process, or reference peers (matrix-js-sdk in
//! Node, `interop/peer.mjs`) as child processes. Both report what happens
//! as [`Obs`] values on one channel, stamped on arrival.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use groupcall::matrix::MatrixSession;
use groupcall::media::TrackKind;
use groupcall::{ClientError, ClientEvent, JoinOptions, join_call};
use groupcall_proto::events;
use groupcall_proto::{CallEvent, Command, CommandError};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// Media kinds we count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Audio.
    Audio,
    /// Video.
    Video,
}

/// Something a participant saw.
#[derive(Debug, Clone)]
pub enum What {
    /// Our user id (known after login).
    Identity(String),
    /// Entered the call.
    Joined,
    /// The peer connection to `remote` (a user id) changed state.
    Peer {
        /// The remote user.
        remote: String,
        /// connecting, connected, failed, closed, ended, ...
        state: String,
        /// Why, for failures.
        reason: Option<String>,
    },
    /// Totals of one received track.
    Frames {
        /// The sending user.
        remote: String,
        /// Its stream.
        stream: String,
        /// Audio or video.
        kind: Kind,
        /// Frames so far.
        frames: u64,
        /// Bytes so far (`None` where the implementation does not say).
        bytes: Option<u64>,
    },
    /// A recording was finished.
    Recorded(PathBuf),
    /// A warning worth showing.
    Warning(String),
    /// The participant cannot go on.
    Fatal(String),
    /// The participant has left (or its process ended after `stop`).
    Left,
}

/// One observation of participant `idx`.
#[derive(Debug, Clone)]
pub struct Obs {
    /// When it arrived here.
    pub at: Instant,
    /// The participant.
    pub idx: usize,
    /// What.
    pub what: What,
}

/// A sender of observations of one participant.
#[derive(Clone)]
pub struct Reporter {
    idx: usize,
    tx: UnboundedSender<Obs>,
}

impl Reporter {
    /// Reports for participant `idx`.
    pub fn new(idx: usize, tx: UnboundedSender<Obs>) -> Reporter {
        Reporter { idx, tx }
    }

    /// Sends one observation, stamped now.
    pub fn send(&self, what: What) {
        let _ = self.tx.send(Obs {
            at: Instant::now(),
            idx: self.idx,
            what,
        });
    }
}

/// A groupcall participant running in this process.
pub struct GroupcallPeer {
    commander: Option<UnboundedSender<Command>>,
    task: JoinHandle<()>,
    done: bool,
}

/// Waits until the room has a live call (its `m.call` state event without
/// `m.terminated`), polling the homeserver.
async fn wait_for_call(
    session: &MatrixSession,
    room: &str,
    give_up: Instant,
) -> anyhow::Result<()> {
    let room_id = session
        .join_room(room)
        .await
        .with_context(|| format!("joining room {room}"))?;
    loop {
        let states = session
            .fetch_room_state(&room_id, events::CALL_UNSTABLE)
            .await
            .context("reading the room's call state")?;
        let live = states.iter().any(|ev| {
            ev.get("content")
                .and_then(Value::as_object)
                .is_some_and(|c| !c.is_empty() && !c.contains_key("m.terminated"))
        });
        if live {
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!("no call appeared in room {room}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl GroupcallPeer {
    /// Starts joining the call of `opts.room` with `session` in a task. A
    /// participant that does not create the call first waits for it (up to
    /// `join_timeout`).
    pub fn spawn(
        session: MatrixSession,
        opts: JoinOptions,
        join_timeout: Duration,
        report: Reporter,
    ) -> GroupcallPeer {
        let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::unbounded_channel::<Command>();
        report.send(What::Identity(session.user_id().to_owned()));
        let task = tokio::spawn(async move {
            let give_up = Instant::now() + join_timeout;
            if opts.create.is_none()
                && let Err(e) = wait_for_call(&session, &opts.room, give_up).await
            {
                report.send(What::Fatal(format!("{e:#}")));
                return;
            }
            let mut handle = loop {
                match join_call(session.clone(), opts.clone()).await {
                    Ok(h) => break h,
                    Err(ClientError::Command(CommandError::NoCallToJoin))
                        if Instant::now() < give_up =>
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        report.send(What::Fatal(format!("joining the call: {e}")));
                        return;
                    }
                }
            };
            let mut leaving = false;
            loop {
                tokio::select! {
                    ev = handle.next_event() => match ev {
                        Some(ev) => forward(&report, ev),
                        None => break,
                    },
                    cmd = cmd_rx.recv(), if !leaving => match cmd {
                        Some(cmd) => {
                            leaving = matches!(cmd, Command::Leave);
                            handle.command(cmd);
                        }
                        None => {
                            leaving = true;
                            handle.command(Command::Leave);
                        }
                    },
                }
            }
            if let Err(e) = handle.finished().await {
                report.send(What::Warning(format!("the call ended with: {e}")));
            }
            report.send(What::Left);
        });
        GroupcallPeer {
            commander: Some(cmd_tx),
            task,
            done: false,
        }
    }

    /// Sends a command to its call; false once it is leaving or gone.
    pub fn command(&self, cmd: Command) -> bool {
        self.commander.as_ref().is_some_and(|c| c.send(cmd).is_ok())
    }

    /// Asks it to leave the call (hang up, remove its membership).
    pub fn begin_leave(&mut self) {
        if let Some(c) = self.commander.take() {
            let _ = c.send(Command::Leave);
        }
    }

    /// Waits (up to `timeout`) until it has left; aborts it after that.
    pub async fn wait(&mut self, timeout: Duration) {
        if self.done {
            return;
        }
        self.done = true;
        if tokio::time::timeout(timeout, &mut self.task).await.is_err() {
            warn!("a participant did not finish leaving in {timeout:?}");
            self.task.abort();
        }
    }
}

impl Drop for GroupcallPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn forward(report: &Reporter, ev: ClientEvent) {
    match ev {
        ClientEvent::Call(CallEvent::Joined { .. }) => report.send(What::Joined),
        ClientEvent::Call(CallEvent::PeerState { device, status, .. }) => {
            let (state, reason) = groupcall::json::peer_state(&status);
            report.send(What::Peer {
                remote: device.user_id,
                state: state.to_owned(),
                reason: reason.map(str::to_owned),
            });
        }
        ClientEvent::Media {
            device,
            stream_id,
            kind,
            frames,
            bytes,
            ..
        } => report.send(What::Frames {
            remote: device.user_id,
            stream: stream_id,
            kind: match kind {
                TrackKind::Audio => Kind::Audio,
                TrackKind::Video => Kind::Video,
            },
            frames,
            bytes: Some(bytes),
        }),
        ClientEvent::Recorded { path } => report.send(What::Recorded(path)),
        ClientEvent::Warning(w) => report.send(What::Warning(w)),
        _ => {}
    }
}

/// Where `interop/peer.mjs` is: the given directory, `./interop`, or the
/// source tree this binary was built from.
pub fn interop_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let candidates: Vec<PathBuf> = match given {
        Some(d) => vec![d.to_owned()],
        None => vec![
            PathBuf::from("interop"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop"),
        ],
    };
    for c in &candidates {
        if c.join("peer.mjs").is_file() {
            return Ok(c.canonicalize().unwrap_or_else(|_| c.clone()));
        }
    }
    bail!(
        "the reference peer (interop/peer.mjs) was not found in {}; give --interop-dir",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )
}

/// The packages `peer.mjs` and `browser.mjs` load; the same list as
/// `scripts/setup-node`.
const NODE_PACKAGES: [&str; 5] = [
    "matrix-js-sdk",
    "@roamhq/wrtc",
    "@matrix-org/matrix-sdk-crypto-wasm",
    "playwright-core",
    "esbuild",
];

/// Checks that Node is there and the interop packages are installed. It
/// installs nothing: `scripts/setup-node` does (`scripts/demo` runs it for
/// `--with-reference`), and the error names it.
pub async fn ensure_interop(dir: &Path) -> anyhow::Result<()> {
    let node = tokio::process::Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| {
            anyhow!("Node.js is needed for the reference peers but `node` cannot run ({e}); install it (Debian: apt-get install nodejs npm, or scripts/setup-system)")
        })?;
    if !node.status.success() {
        bail!("`node --version` failed: install Node.js 20 or newer");
    }
    let missing: Vec<&str> = NODE_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !dir.join("node_modules")
                .join(p)
                .join("package.json")
                .is_file()
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "the reference peer's packages are not installed ({}/node_modules lacks {}): \
             run scripts/setup-node {} (it runs `npm ci` there)",
            dir.display(),
            missing.join(", "),
            dir.display()
        );
    }
    Ok(())
}

/// How to start a reference peer.
pub struct RefOptions<'a> {
    /// The interop directory.
    pub dir: &'a Path,
    /// Homeserver base URL.
    pub homeserver: &'a str,
    /// Account.
    pub user: &'a str,
    /// Its password.
    pub password: &'a str,
    /// Room id.
    pub room: &'a str,
    /// Create the call (else wait for it).
    pub create_call: bool,
    /// Olm-encrypted signalling.
    pub encrypted: bool,
    /// How often frame counts are reported.
    pub media_interval: Duration,
    /// Where its stderr goes.
    pub log: &'a Path,
}

/// A reference peer process (in its own process group, killed on drop).
pub struct RefPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
    reader: JoinHandle<()>,
}

impl RefPeer {
    /// Starts `node peer.mjs` and reports its JSON lines.
    pub fn spawn(o: &RefOptions<'_>, report: Reporter) -> anyhow::Result<RefPeer> {
        Self::spawn_with(o, &[], report)
    }

    /// [`RefPeer::spawn`] with more command-line options for `peer.mjs`
    /// (e.g. `--candidate-ip 127.0.0.1`).
    pub fn spawn_with(
        o: &RefOptions<'_>,
        extra: &[&str],
        report: Reporter,
    ) -> anyhow::Result<RefPeer> {
        let mut args: Vec<String> = Vec::new();
        if o.create_call {
            args.push("--create-call".into());
        }
        if o.encrypted {
            args.push("--encrypted".into());
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        Self::spawn_script(o, "peer.mjs", &args, None, report)
    }

    /// Starts the MSC3898 focus client in headless Chromium (`node
    /// interop/focus-client.mjs`), calling the focus `focus_user`'s device
    /// `focus_device` with candidates on 127.0.0.1 only; its signalling is
    /// Olm-encrypted unless `o.encrypted` is false. Its peer connection
    /// with the focus is reported as a peer of `focus_user`.
    pub fn spawn_focus_client(
        o: &RefOptions<'_>,
        focus_user: &str,
        focus_device: &str,
        report: Reporter,
    ) -> anyhow::Result<RefPeer> {
        let mut args: Vec<String> = vec![
            "--focus".into(),
            format!("{focus_user}/{focus_device}"),
            "--candidate-ip".into(),
            "127.0.0.1".into(),
        ];
        if o.create_call {
            args.push("--create-call".into());
        }
        if !o.encrypted {
            args.push("--plaintext".into());
        }
        Self::spawn_script(o, "focus-client.mjs", &args, Some(focus_user), report)
    }

    /// Starts `node <dir>/<script>` with the options every interop script
    /// takes, then `args`; `focus_user` names the remote of `call_state`
    /// lines without a `user_id` (the focus client's call with its focus).
    fn spawn_script(
        o: &RefOptions<'_>,
        script: &str,
        args: &[String],
        focus_user: Option<&str>,
        report: Reporter,
    ) -> anyhow::Result<RefPeer> {
        let log = std::fs::File::create(o.log)
            .with_context(|| format!("creating {}", o.log.display()))?;
        let mut cmd = std::process::Command::new("node");
        cmd.arg(o.dir.join(script))
            .args(["--homeserver", o.homeserver, "--user", o.user])
            .args(["--password", o.password, "--room", o.room])
            .args(["--log-level", "warn"])
            .args([
                "--media-interval",
                &o.media_interval.as_millis().max(10).to_string(),
            ])
            .current_dir(o.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0);
        cmd.args(args);
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting node interop/{script}"))?;
        let focus_user = focus_user.map(str::to_owned);
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout of the reference peer"))?;
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => ref_line(&report, &v, focus_user.as_deref()),
                    Err(_) => debug!("reference peer: {line}"),
                }
            }
            report.send(What::Left);
        });
        Ok(RefPeer {
            child,
            stdin,
            pid,
            reader,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Asks it to leave the call and quit (`quit` on its stdin).
    pub async fn begin_stop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"quit\n").await;
            let _ = stdin.flush().await;
        }
    }

    /// Asks it to quit and waits up to `timeout`; kills it after that.
    pub async fn stop(&mut self, timeout: Duration) {
        self.begin_stop().await;
        if tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_err()
        {
            warn!(pid = self.pid, "reference peer did not quit; killing it");
        }
        self.kill();
        if !self.reader.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.reader).await;
        }
    }

    fn kill(&mut self) {
        if let Ok(pid) = i32::try_from(self.pid)
            && pid > 0
        {
            // The whole group: node and anything it started.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.start_kill();
    }
}

impl Drop for RefPeer {
    fn drop(&mut self) {
        self.kill();
        self.reader.abort();
    }
}

/// One JSON line of a reference peer (or of the focus client, whose
/// `call_state` lines are about its call with `focus_user`).
fn ref_line(report: &Reporter, v: &Value, focus_user: Option<&str>) {
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    match v.get("event").and_then(Value::as_str).unwrap_or_default() {
        "ready" => report.send(What::Identity(s("user_id"))),
        "joined" => report.send(What::Joined),
        "call_state" => report.send(What::Peer {
            remote: match (v.get("user_id").and_then(Value::as_str), focus_user) {
                (None, Some(f)) => f.to_owned(),
                _ => s("user_id"),
            },
            state: s("state"),
            reason: v
                .get("hangup_reason")
                .and_then(Value::as_str)
                .map(str::to_owned),
        }),
        // The moment a track's first frame was decoded (video) or its first
        // audible frame played (audio): exact, whatever --media-interval.
        "first_frame" => {
            let kind = match v.get("kind").and_then(Value::as_str) {
                Some("audio") => Kind::Audio,
                Some("video") => Kind::Video,
                _ => return,
            };
            report.send(What::Frames {
                remote: s("user_id"),
                stream: s("stream_id"),
                kind,
                frames: 1,
                bytes: None,
            });
        }
        "media" => {
            let kind = match v.get("kind").and_then(Value::as_str) {
                Some("audio") => Kind::Audio,
                Some("video") => Kind::Video,
                _ => return,
            };
            // Its audio sinks produce (silent) frames before any packet
            // arrives: count the audible ones where it says.
            let frames = match kind {
                Kind::Audio => v.get("audible").or_else(|| v.get("frames")),
                Kind::Video => v.get("frames"),
            };
            report.send(What::Frames {
                remote: s("user_id"),
                stream: s("stream_id"),
                kind,
                frames: frames.and_then(Value::as_u64).unwrap_or(0),
                bytes: None,
            });
        }
        "call_error" => report.send(What::Warning(format!("reference: {}", s("message")))),
        "error" => report.send(What::Fatal(format!("reference peer: {}", s("message")))),
        _ => {}
    }
}

/// CPU time (user + system) of a process so far, from /proc (`None` for
/// "self" when unreadable).
pub fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, in clock
    // ticks; Linux's /proc always counts USER_HZ = 100 ticks per second.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_time() {
        let before = cpu_time(None).unwrap();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(100) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_time(None).unwrap() >= before);
    }

    #[test]
    fn reference_lines() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = Reporter::new(3, tx);
        ref_line(
            &r,
            &serde_json::json!({"event":"media","user_id":"@a:x","stream_id":"s","kind":"video","frames":7}),
            None,
        );
        ref_line(
            &r,
            &serde_json::json!({"event":"call_state","user_id":"@a:x","state":"connected"}),
            None,
        );
        ref_line(
            &r,
            &serde_json::json!({"event":"media","user_id":"@a:x","stream_id":"s","kind":"audio","frames":90,"audible":0}),
            None,
        );
        let o = rx.try_recv().unwrap();
        assert_eq!(o.idx, 3);
        assert!(matches!(
            o.what,
            What::Frames {
                kind: Kind::Video,
                frames: 7,
                bytes: None,
                ..
            }
        ));
        assert!(
            matches!(rx.try_recv().unwrap().what, What::Peer { state, .. } if state == "connected")
        );
        // Silence before the first packet is not a frame received.
        assert!(matches!(
            rx.try_recv().unwrap().what,
            What::Frames {
                kind: Kind::Audio,
                frames: 0,
                ..
            }
        ));
        // The first decoded frame counts at once.
        ref_line(
            &r,
            &serde_json::json!({"event":"first_frame","user_id":"@a:x","stream_id":"s","kind":"audio","track_id":"t"}),
            None,
        );
        assert!(matches!(
            rx.try_recv().unwrap().what,
            What::Frames {
                kind: Kind::Audio,
                frames: 1,
                ..
            }
        ));
        ref_line(
            &r,
            &serde_json::json!({"event":"first_frame","user_id":"@a:x","kind":"data"}),
            None,
        );
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn focus_client_call_state_is_about_the_focus() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = Reporter::new(1, tx);
        let line = serde_json::json!({"event":"call_state","call_id":"c","state":"connected"});
        ref_line(&r, &line, Some("@focus:x"));
        assert!(matches!(
            rx.try_recv().unwrap().what,
            What::Peer { remote, state, .. } if remote == "@focus:x" && state == "connected"
        ));
        // A reference peer's lines name their remote themselves.
        ref_line(&r, &line, None);
        assert!(matches!(
            rx.try_recv().unwrap().what,
            What::Peer { remote, .. } if remote.is_empty()
        ));
    }
}
