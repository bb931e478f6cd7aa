//! The harness of tests that put groupcall participants and reference peers
//! (matrix-js-sdk's `GroupCall` in `interop/`, run by Node or headless
//! Chromium) in one call on a real Synapse.
//!
//! Everything either side reports goes into one [`Log`] of timestamped
//! [`Entry`]s, so a test can wait for conditions spanning both sides.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command as StdCommand, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use groupcall::client::{CallCommander, ClientEvent, JoinOptions, join_call};
use groupcall::matrix::{CreateRoomOptions, MatrixSession};
use groupcall::media::TrackKind;
use groupcall::proto::events::FeedPurpose;
use groupcall::proto::{CallEvent, DeviceKey, PeerStatus};
use groupcall_synapse::{Synapse, SynapseOptions};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use crate::env::{interop_dir, require_node_modules};

/// The password of every user a test registers.
pub const PASSWORD: &str = "secret-pw";

/// What a participant reported.
#[derive(Debug, Clone)]
pub enum Ev {
    /// A groupcall participant's event.
    Rust(ClientEvent),
    /// One JSON line of a reference peer.
    Js(Value),
    /// A reference peer's process ended (exit code, if any).
    JsExited(Option<i32>),
}

/// One reported event, when it arrived and from which participant.
#[derive(Debug, Clone)]
pub struct Entry {
    pub t: Instant,
    pub who: usize,
    pub ev: Ev,
}

impl Entry {
    /// The JSON line of a reference peer with this `event` name.
    pub fn js(&self, event: &str) -> Option<&Value> {
        match &self.ev {
            Ev::Js(v) if v["event"] == event => Some(v),
            _ => None,
        }
    }

    /// The core event of a groupcall participant.
    pub fn call(&self) -> Option<&CallEvent> {
        match &self.ev {
            Ev::Rust(ClientEvent::Call(e)) => Some(e),
            _ => None,
        }
    }
}

// ---- the harness -------------------------------------------------------

/// A groupcall participant running in this process.
pub struct Participant {
    pub commander: CallCommander,
    pub done: tokio::task::JoinHandle<()>,
    crash: tokio::sync::oneshot::Sender<()>,
}

/// Joins a groupcall participant and forwards every event it reports,
/// tagged `idx`, into `tx` (a [`Log::sender`]).
pub async fn spawn_participant(
    tx: mpsc::UnboundedSender<(usize, Ev)>,
    idx: usize,
    session: MatrixSession,
    opts: JoinOptions,
) -> Participant {
    let mut handle = join_call(session, opts).await.expect("join_call");
    let commander = handle.commander();
    let (crash, mut crashed) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        let mut armed = true;
        loop {
            tokio::select! {
                ev = handle.next_event() => match ev {
                    Some(ev) => {
                        if tx.send((idx, Ev::Rust(ev))).is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                r = &mut crashed, if armed => {
                    if r.is_ok() {
                        handle.abort();
                        return;
                    }
                    // Only the crash sender was dropped: keep forwarding.
                    armed = false;
                }
            }
        }
        let _ = handle.finished().await;
    });
    Participant {
        commander,
        done,
        crash,
    }
}

impl Participant {
    /// Ends the participant as a crash would: its task is aborted (no
    /// hangups, no member state update, no more heartbeats of its delayed
    /// leave, sockets closed).
    pub async fn crash(self) {
        let _ = self.crash.send(());
        let _ = self.done.await;
    }
}

/// A Synapse, an event log and the participants of one test.
pub struct Harness {
    /// When the harness was made: "since the beginning".
    pub t_start: Instant,
    pub synapse: Synapse,
    pub hs: String,
    pub tmp: tempfile::TempDir,
    pub log: Log,
    peers: Vec<RefPeer>,
    /// Anomalies a test expects (substrings).
    allowed: Vec<String>,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Harness {
    /// Waits for its turn (one test at a time per test binary, see
    /// [`crate::serial`]) and starts Synapse. The reference peer's packages
    /// are checked when one is started ([`Harness::spawn_js`]).
    pub async fn new() -> Harness {
        Self::with_synapse(SynapseOptions::default()).await
    }

    /// [`Harness::new`] with a STUN server that groupcall participants use:
    /// the homeserver's `/voip/turnServer` names `stun_uri` (with static
    /// credentials: Synapse answers nothing without). Reference peers read
    /// it too, unless given their own `--ice-server`.
    pub async fn with_stun(stun_uri: &str) -> Harness {
        let mut options = SynapseOptions::default();
        let extra = &mut options.extra_config;
        extra.insert("turn_uris".into(), serde_json::json!([stun_uri]));
        extra.insert("turn_username".into(), "stun-user".into());
        extra.insert("turn_password".into(), "stun-pw".into());
        Self::with_synapse(options).await
    }

    /// [`Harness::new`] with Synapse started with `options`.
    pub async fn with_synapse(options: SynapseOptions) -> Harness {
        let serial = crate::serial().await;
        crate::init_tracing("warn,matrix_sdk_crypto=error,groupcall=info");
        let synapse = Synapse::start(options).await.expect("synapse");
        let hs = synapse.base_url();
        Harness {
            t_start: Instant::now(),
            synapse,
            hs,
            tmp: {
                // GROUPCALL_INTEROP_KEEP=1 keeps stores and the reference
                // peers' stderr logs, also when the test fails.
                let keep = std::env::var_os("GROUPCALL_INTEROP_KEEP").is_some();
                let t = tempfile::Builder::new()
                    .prefix("groupcall-interop-")
                    .disable_cleanup(keep)
                    .tempdir()
                    .unwrap();
                if keep {
                    eprintln!("interop: logs kept in {}", t.path().display());
                }
                t
            },
            log: Log::new(),
            peers: Vec::new(),
            allowed: Vec::new(),
            _serial: serial,
        }
    }

    fn slot(&self, name: &str) -> usize {
        self.log.name_next(name)
    }

    /// Registers `name` (password [`PASSWORD`]) and returns its user id.
    pub async fn register(&self, name: &str) -> String {
        self.synapse
            .register_user(name, PASSWORD)
            .await
            .unwrap()
            .user_id
    }

    /// Logs `name` in (a groupcall device, store under the temp dir).
    pub async fn login(&self, name: &str) -> MatrixSession {
        MatrixSession::login(&self.hs, name, PASSWORD, self.tmp.path().join(name))
            .await
            .unwrap()
    }

    /// A public room (anyone may join and send call state) created by
    /// `creator`.
    pub async fn room(&self, creator: &MatrixSession) -> String {
        creator
            .create_call_room(CreateRoomOptions {
                name: Some("interop".into()),
                invite: Vec::new(),
                encrypted: false,
                public: true,
            })
            .await
            .unwrap()
    }

    /// Joins a groupcall participant; its events go into the log as `name`.
    pub async fn join_rust(
        &mut self,
        name: &str,
        session: MatrixSession,
        opts: JoinOptions,
    ) -> (usize, Participant) {
        let idx = self.slot(name);
        let p = spawn_participant(self.log.sender(), idx, session, opts).await;
        (idx, p)
    }

    /// Starts a reference peer (`script` is `peer.mjs` or `browser.mjs`) as
    /// user `name` in `room`, with extra options.
    pub fn spawn_js(&mut self, name: &str, script: &str, room: &str, extra: &[&str]) -> usize {
        let peer = spawn_reference(
            &self.log,
            &self.hs,
            name,
            script,
            room,
            extra,
            self.tmp.path(),
        );
        let idx = peer.idx;
        self.peers.push(peer);
        idx
    }

    fn peer_mut(&mut self, idx: usize) -> &mut RefPeer {
        self.peers
            .iter_mut()
            .find(|p| p.idx == idx)
            .unwrap_or_else(|| panic!("no reference peer #{idx}"))
    }

    /// Sends a stdin command to a reference peer.
    pub fn send(&mut self, idx: usize, command: &str) {
        self.peer_mut(idx).send(command);
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to a reference peer's process
    /// group: `STOP` freezes it as a phone in the background would be.
    pub fn signal_js(&mut self, idx: usize, sig: &str) {
        let pid = self.peer_mut(idx).pid;
        let ok = StdCommand::new("kill")
            .args([format!("-{sig}"), "--".into(), format!("-{pid}")])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} reference peer #{idx}");
    }

    /// Quits a reference peer cleanly (it leaves the call first) and waits
    /// for it to exit; kills it after 20 s.
    pub async fn quit_js(&mut self, idx: usize) {
        self.peer_mut(idx).close_stdin();
        self.log
            .wait_for(&format!("reference peer #{idx} to exit"), 20, |s| {
                s.iter()
                    .any(|e| e.who == idx && matches!(e.ev, Ev::JsExited(_)))
            })
            .await;
        let code = self.log.seen.iter().find_map(|e| match e.ev {
            Ev::JsExited(c) if e.who == idx => Some(c),
            _ => None,
        });
        let pos = self.peers.iter().position(|p| p.idx == idx).unwrap();
        drop(self.peers.remove(pos));
        assert_eq!(code, Some(Some(0)), "reference peer #{idx} exit code");
    }

    /// Waits for a reference peer's `ready` line and returns its device.
    pub async fn js_device(&mut self, idx: usize) -> DeviceKey {
        self.log.js_device(idx).await
    }

    /// Things that went wrong without failing the test: warnings, refused
    /// signalling, failed peers, the reference's errors and odd hangups.
    pub fn anomalies(&mut self) -> Vec<String> {
        self.log.pump();
        let names = self.log.names();
        let mut out = Vec::new();
        for e in &self.log.seen {
            let name = names.get(e.who).map(String::as_str).unwrap_or("?");
            let bad = match &e.ev {
                Ev::Rust(ClientEvent::Warning(w)) => Some(format!("warning {w}")),
                Ev::Rust(ClientEvent::Signalling {
                    ignored: Some(why),
                    event_type,
                    sender,
                    ..
                }) => Some(format!("ignored {event_type} from {sender}: {why}")),
                Ev::Rust(ClientEvent::Call(
                    ev @ (CallEvent::Unanswered { .. }
                    | CallEvent::PeerState {
                        status: PeerStatus::Failed(_),
                        ..
                    }),
                )) => Some(format!("{ev:?}")),
                Ev::Js(v) => match v["event"].as_str() {
                    Some("call_error" | "error" | "garbage") => Some(v.to_string()),
                    Some("command") if v["ok"] != true => Some(v.to_string()),
                    // The reference names it `hangup_reason`, the focus
                    // client (`focus-client.mjs`) `reason`.
                    Some("call_state")
                        if v["state"] == "ended"
                            && !matches!(
                                v["hangup_reason"].as_str().or(v["reason"].as_str()),
                                Some("user_hangup") | Some("new_session")
                            ) =>
                    {
                        Some(v.to_string())
                    }
                    _ => None,
                },
                Ev::JsExited(Some(0)) => None,
                Ev::JsExited(c) => Some(format!("exited with {c:?}")),
                _ => None,
            };
            if let Some(b) = bad
                && !self.allowed.iter().any(|a| b.contains(a.as_str()))
            {
                out.push(format!("{name}: {b}"));
            }
        }
        out
    }

    /// Expects anomalies containing `what` (see [`Harness::anomalies`]).
    pub fn allow_anomaly(&mut self, what: &str) {
        self.allowed.push(what.to_owned());
    }

    /// Quits every reference peer still running (cleanly, bounded), then
    /// fails the test on anything that went wrong without failing it so
    /// far (see [`Harness::anomalies`]).
    pub async fn shutdown(mut self) {
        let idxs: Vec<usize> = self.peers.iter().map(|p| p.idx).collect();
        for p in &mut self.peers {
            p.close_stdin();
        }
        self.log
            .wait_for("reference peers to exit", 30, |s| {
                idxs.iter().all(|i| {
                    s.iter()
                        .any(|e| e.who == *i && matches!(e.ev, Ev::JsExited(_)))
                })
            })
            .await;
        self.peers.clear();
        let anomalies = self.anomalies();
        assert!(
            anomalies.is_empty(),
            "anomalies during the test:\n{}\nrecent events:\n{}",
            anomalies.join("\n"),
            self.log.dump(60)
        );
    }
}

/// Starts a reference peer (`script` is `peer.mjs` or `browser.mjs`) as
/// user `name` (password [`PASSWORD`]) of homeserver `hs` in `room`, with
/// extra options; its JSON lines go into `log` under a new index (its
/// `idx`), its stderr into `dir`.
pub fn spawn_reference(
    log: &Log,
    hs: &str,
    name: &str,
    script: &str,
    room: &str,
    extra: &[&str],
    dir: &Path,
) -> RefPeer {
    require_node_modules();
    let idx = log.name_next(name);
    let mut args = vec![
        "--homeserver".to_owned(),
        hs.to_owned(),
        "--user".to_owned(),
        name.to_owned(),
        "--password".to_owned(),
        PASSWORD.to_owned(),
        "--room".to_owned(),
        room.to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let stderr = dir.join(format!("{idx}-{name}.stderr.log"));
    let interop = interop_dir();
    let mut cmd = StdCommand::new("node");
    cmd.arg(interop.join(script))
        .args(&args)
        .current_dir(&interop);
    RefPeer::spawn(idx, name, cmd, &stderr, log.sender())
}

/// A reference peer process (and its process group: Chromium for
/// `browser.mjs`), killed when dropped.
pub struct RefPeer {
    pub idx: usize,
    name: String,
    pid: u32,
    stdin: Option<ChildStdin>,
    stderr_path: PathBuf,
}

impl RefPeer {
    fn spawn(
        idx: usize,
        name: &str,
        mut cmd: StdCommand,
        stderr_path: &Path,
        tx: mpsc::UnboundedSender<(usize, Ev)>,
    ) -> RefPeer {
        use std::os::unix::process::CommandExt;
        let stderr = std::fs::File::create(stderr_path).unwrap();
        let mut child: Child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str::<Value>(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "garbage", "line": line}));
                if tx.send((idx, Ev::Js(v))).is_err() {
                    break;
                }
            }
            let code = child.wait().ok().and_then(|s| s.code());
            let _ = tx.send((idx, Ev::JsExited(code)));
        });
        RefPeer {
            idx,
            name: name.to_owned(),
            pid,
            stdin,
            stderr_path: stderr_path.to_owned(),
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("writing to reference peer {}: {e}", self.name));
    }

    /// End of stdin makes the peer leave the call and exit.
    fn close_stdin(&mut self) {
        self.stdin = None;
    }
}

impl Drop for RefPeer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let tail = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            let lines: Vec<&str> = tail.lines().collect();
            let from = lines.len().saturating_sub(30);
            eprintln!(
                "---- stderr of reference peer {} (#{}), last lines ----\n{}",
                self.name,
                self.idx,
                lines[from..].join("\n")
            );
        }
        // The whole process group: node, and Chromium under browser.mjs.
        let _ = StdCommand::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pid)])
            .stderr(Stdio::null())
            .status();
    }
}

// ---- the event log -----------------------------------------------------

/// Everything every participant reported, and waiting on conditions.
pub struct Log {
    rx: mpsc::UnboundedReceiver<(usize, Ev)>,
    tx: mpsc::UnboundedSender<(usize, Ev)>,
    /// Every event so far, in arrival order.
    pub seen: Vec<Entry>,
    names: Arc<Mutex<Vec<String>>>,
}

impl Default for Log {
    fn default() -> Self {
        Self::new()
    }
}

impl Log {
    /// An empty log; participants report into it through [`Log::sender`].
    pub fn new() -> Log {
        let (tx, rx) = mpsc::unbounded_channel();
        Log {
            rx,
            tx,
            seen: Vec::new(),
            names: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Where participants send `(who, event)`.
    pub fn sender(&self) -> mpsc::UnboundedSender<(usize, Ev)> {
        self.tx.clone()
    }

    /// Names the next participant (for [`Log::dump`]); returns its index.
    pub fn name_next(&self, name: &str) -> usize {
        let mut names = self.names.lock().unwrap();
        names.push(name.to_owned());
        names.len() - 1
    }

    /// The participants' names, by index (unnamed ones are `p<index>`).
    pub fn names(&self) -> Vec<String> {
        self.names.lock().unwrap().clone()
    }

    /// Collects events for `d`.
    pub async fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while let Ok(Some((who, ev))) = timeout(
            end.saturating_duration_since(Instant::now()),
            self.rx.recv(),
        )
        .await
        {
            self.seen.push(Entry {
                t: Instant::now(),
                who,
                ev,
            });
        }
    }

    /// Waits for reference peer `idx`'s `ready` line and returns its device.
    pub async fn js_device(&mut self, idx: usize) -> DeviceKey {
        self.wait_for("the reference peer to be ready", 60, |s| {
            s.iter().any(|e| e.who == idx && e.js("ready").is_some())
        })
        .await;
        let v = self
            .seen
            .iter()
            .rev()
            .find_map(|e| (e.who == idx).then(|| e.js("ready")).flatten())
            .unwrap();
        DeviceKey::new(
            v["user_id"].as_str().unwrap(),
            v["device_id"].as_str().unwrap(),
        )
    }

    /// Takes in everything reported so far without waiting.
    pub fn pump(&mut self) {
        while let Ok((who, ev)) = self.rx.try_recv() {
            self.seen.push(Entry {
                t: Instant::now(),
                who,
                ev,
            });
        }
    }

    /// Waits until `cond` holds on the log, at most `secs` seconds; panics
    /// with the recent non-media events otherwise. Returns when it held.
    pub async fn wait_for(
        &mut self,
        what: &str,
        secs: u64,
        mut cond: impl FnMut(&[Entry]) -> bool,
    ) -> Instant {
        self.pump();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(&self.seen) {
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.rx.recv(),
            )
            .await
            {
                Ok(Some((who, ev))) => {
                    if let Ev::Js(v) = &ev
                        && v["event"] == "error"
                    {
                        eprintln!("reference peer #{who} reported an error: {v}");
                    }
                    self.seen.push(Entry {
                        t: Instant::now(),
                        who,
                        ev,
                    });
                }
                Ok(None) => panic!("event channel closed while waiting for {what}"),
                Err(_) => panic!(
                    "timed out after {secs} s waiting for {what}; recent events:\n{}",
                    self.dump(80)
                ),
            }
        }
        Instant::now()
    }

    /// The recordings groupcall participant `at` reported so far.
    pub fn recorded(&self, at: usize) -> Vec<PathBuf> {
        self.seen
            .iter()
            .filter_map(|e| match &e.ev {
                Ev::Rust(groupcall::client::ClientEvent::Recorded { path }) if e.who == at => {
                    Some(path.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// The last `n` events other than media counters, one per line.
    pub fn dump(&self, n: usize) -> String {
        let names = self.names.lock().unwrap().clone();
        let start = self.seen.first().map(|e| e.t);
        let mut lines: Vec<String> = self
            .seen
            .iter()
            .filter(|e| match &e.ev {
                Ev::Rust(ClientEvent::Media { .. } | ClientEvent::MediaSent { .. }) => false,
                Ev::Js(v) => !matches!(v["event"].as_str(), Some("media" | "media_sent")),
                _ => true,
            })
            .rev()
            .take(n)
            .map(|e| {
                let name = names
                    .get(e.who)
                    .cloned()
                    .unwrap_or_else(|| format!("p{}", e.who));
                let at = start.map(|s| e.t - s).unwrap_or_default();
                let what = match &e.ev {
                    Ev::Rust(ev) => format!("{ev:?}"),
                    Ev::Js(v) => v.to_string(),
                    Ev::JsExited(c) => format!("exited {c:?}"),
                };
                format!("{:>8.3}s {name}: {what}", at.as_secs_f64())
            })
            .collect();
        lines.reverse();
        lines.join("\n")
    }

    /// Mark for "since now".
    pub fn mark(&mut self) -> Instant {
        self.pump();
        Instant::now()
    }
}

// ---- conditions --------------------------------------------------------

/// Sum of the increases of cumulative counters `(key, value)` after
/// `since`; a value below the previous one is a restarted counter.
fn growth<K: Ord + Clone>(
    seen: &[Entry],
    since: Instant,
    mut f: impl FnMut(&Entry) -> Option<(K, u64)>,
) -> u64 {
    let mut last: BTreeMap<K, u64> = BTreeMap::new();
    let mut grown: BTreeMap<K, u64> = BTreeMap::new();
    for e in seen {
        let Some((k, v)) = f(e) else { continue };
        let prev = last.insert(k.clone(), v);
        if e.t < since {
            continue;
        }
        let inc = match prev {
            Some(p) if v >= p => v - p,
            _ => v,
        };
        *grown.entry(k).or_default() += inc;
    }
    grown.into_values().max().unwrap_or(0)
}

/// Frames of `kind` a groupcall participant `at` received from `from` after
/// `since` (the best stream; only `stream` if given).
pub fn rust_frames(
    seen: &[Entry],
    since: Instant,
    at: usize,
    from: &DeviceKey,
    kind: TrackKind,
    stream: Option<&str>,
) -> u64 {
    growth(seen, since, |e| match &e.ev {
        Ev::Rust(ClientEvent::Media {
            device,
            stream_id,
            kind: k,
            frames,
            ..
        }) if e.who == at
            && device == from
            && *k == kind
            && stream.is_none_or(|s| s == stream_id) =>
        {
            Some((stream_id.clone(), *frames))
        }
        _ => None,
    })
}

/// When `at` first logged an entry matching `pred` after `since`.
fn first_at(
    seen: &[Entry],
    since: Instant,
    at: usize,
    mut pred: impl FnMut(&Entry) -> bool,
) -> Option<Instant> {
    seen.iter()
        .find(|e| e.t >= since && e.who == at && pred(e))
        .map(|e| e.t)
}

/// When a groupcall participant `at` first reported its counters of
/// `from`'s `kind` frames after `since`. Counting from there leaves out
/// the frames of the report interval that straddles `since`, which a
/// cumulative report cannot split.
pub fn rust_report_after(
    seen: &[Entry],
    since: Instant,
    at: usize,
    from: &DeviceKey,
    kind: TrackKind,
) -> Option<Instant> {
    first_at(seen, since, at, |e| {
        matches!(&e.ev, Ev::Rust(ClientEvent::Media { device, kind: k, .. })
            if device == from && *k == kind)
    })
}

/// The frames a reference's `media` line counts as received: decoded video
/// frames; for audio the `audible` 10 ms frames (the sinks also produce
/// silence while no packets arrive).
fn js_count(v: &Value) -> u64 {
    let n = if v["kind"] == "audio" && !v["audible"].is_null() {
        &v["audible"]
    } else {
        &v["frames"]
    };
    n.as_u64().unwrap_or(0)
}

/// Frames of `kind` (`"audio"`/`"video"`) a reference peer `at` received
/// from `from` on a feed of `purpose` after `since` (the best track).
pub fn js_frames(
    seen: &[Entry],
    since: Instant,
    at: usize,
    from: &DeviceKey,
    kind: &str,
    purpose: &str,
) -> u64 {
    growth(seen, since, |e| {
        let v = e.js("media")?;
        (e.who == at
            && v["user_id"] == from.user_id.as_str()
            && v["device_id"] == from.device_id.as_str()
            && v["kind"] == kind
            && v["purpose"] == purpose)
            .then(|| (v["track_id"].as_str().unwrap_or("").to_owned(), js_count(v)))
    })
}

/// Whether groupcall participant `at` reported a connected peer to `dev`
/// after `since`.
pub fn rust_connected(seen: &[Entry], since: Instant, at: usize, dev: &DeviceKey) -> bool {
    rust_connected_at(seen, since, at, dev).is_some()
}

/// When groupcall participant `at` first reported a connected peer to `dev`
/// after `since`.
pub fn rust_connected_at(
    seen: &[Entry],
    since: Instant,
    at: usize,
    dev: &DeviceKey,
) -> Option<Instant> {
    first_at(
        seen,
        since,
        at,
        |e| matches!(e.call(), Some(CallEvent::PeerState { device, status: PeerStatus::Connected, .. }) if device == dev),
    )
}

/// When reference peer `at` first reported its call with `dev` connected
/// after `since`.
pub fn js_connected_at(
    seen: &[Entry],
    since: Instant,
    at: usize,
    dev: &DeviceKey,
) -> Option<Instant> {
    first_at(seen, since, at, |e| {
        e.js("call_state")
            .is_some_and(|v| v["state"] == "connected" && about(v, dev))
    })
}

/// When the first frame of `kind` from `from` was counted at `at` after
/// `since` (either side).
pub fn first_frames_at(
    seen: &[Entry],
    since: Instant,
    at: usize,
    from: &DeviceKey,
    kind: TrackKind,
) -> Option<Instant> {
    let js_kind = kind.as_str();
    first_at(seen, since, at, |e| match &e.ev {
        Ev::Rust(ClientEvent::Media {
            device,
            kind: k,
            frames,
            ..
        }) => device == from && *k == kind && *frames > 0,
        Ev::Js(v) => {
            v["event"] == "media" && about(v, from) && v["kind"] == js_kind && js_count(v) > 0
        }
        _ => false,
    })
}

/// A remote feed as groupcall participant `at` saw it appear after `since`.
pub fn rust_feed_added(
    seen: &[Entry],
    since: Instant,
    at: usize,
    from: &DeviceKey,
    purpose: FeedPurpose,
) -> Option<String> {
    seen.iter().find_map(|e| match e.call() {
        Some(CallEvent::FeedAdded {
            device,
            stream_id,
            purpose: p,
            ..
        }) if e.t >= since && e.who == at && device == from && *p == purpose => {
            Some(stream_id.clone())
        }
        _ => None,
    })
}

/// Reference peer `at` reported a JSON line after `since` matching `pred`.
pub fn js_saw(
    seen: &[Entry],
    since: Instant,
    at: usize,
    event: &str,
    mut pred: impl FnMut(&Value) -> bool,
) -> bool {
    seen.iter()
        .any(|e| e.t >= since && e.who == at && e.js(event).is_some_and(&mut pred))
}

/// A JSON line of a reference peer is about device `dev`.
pub fn about(v: &Value, dev: &DeviceKey) -> bool {
    v["user_id"] == dev.user_id.as_str() && v["device_id"] == dev.device_id.as_str()
}

/// Milliseconds from `a` to `b`.
pub fn ms(a: Instant, b: Instant) -> u128 {
    b.saturating_duration_since(a).as_millis()
}

/// Registers and logs in `names` on a test federation, the `i`th on server
/// `server_of(i)` (password [`PASSWORD`], stores under `dir`).
pub async fn federation_sessions(
    fed: &crate::synapse::Federation,
    names: &[String],
    server_of: impl Fn(usize) -> usize,
    dir: &std::path::Path,
) -> Vec<MatrixSession> {
    let mut sessions = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let hs = fed.server(server_of(i));
        hs.register_user(n, PASSWORD).await.unwrap();
        sessions.push(
            MatrixSession::login(&hs.base_url(), n, PASSWORD, dir.join(n))
                .await
                .unwrap(),
        );
    }
    sessions
}
