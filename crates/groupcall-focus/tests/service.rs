//! The focus as a service against a real local Synapse: invites from the
//! allow-list joined, others declined and counted, the call state and the
//! call to-device events reaching the core, `/health` and `/metrics`, the
//! drain, a restart on the stored device, configuration errors.
//!
//! Run with `cargo test -p groupcall-focus --test service -- --test-threads=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use groupcall::matrix::{
    CALL_EVENT_TYPE, CALL_MEMBER_EVENT_TYPE, CreateRoomOptions, KeylessDevices, MatrixSession,
};
use groupcall_focus::config::Config;
use groupcall_focus::driver::{
    CallToDevice, CoreOutput, DriverError, FocusCore, FocusHandle, FocusService, FocusState,
};
use groupcall_proto::room::{RoomCallState, RoomChange};
use groupcall_testkit::synapse::{Synapse, SynapseOptions};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const PASSWORD: &str = "focus-test-pw";

/// A Synapse with the bot account and two users, one test at a time.
struct Env {
    synapse: Synapse,
    tmp: TempDir,
    focus_user: String,
    alice: MatrixSession,
    mallory: MatrixSession,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

async fn env() -> Env {
    let serial = groupcall_testkit::serial().await;
    groupcall_testkit::init_tracing("warn,groupcall_focus=info,matrix_sdk_crypto=error");
    let synapse = Synapse::start(SynapseOptions::default())
        .await
        .expect("synapse");
    let tmp = tempfile::Builder::new()
        .prefix("groupcall-focus-")
        .tempdir()
        .unwrap();
    let focus_user = synapse
        .register_user("focus", PASSWORD)
        .await
        .unwrap()
        .user_id;
    let mut sessions = Vec::new();
    for name in ["alice", "mallory"] {
        let user = synapse.register_user(name, PASSWORD).await.unwrap();
        sessions.push(
            MatrixSession::login(
                &synapse.base_url(),
                &user.user_id,
                PASSWORD,
                tmp.path().join(name),
            )
            .await
            .unwrap(),
        );
    }
    let mallory = sessions.pop().unwrap();
    let alice = sessions.pop().unwrap();
    Env {
        synapse,
        tmp,
        focus_user,
        alice,
        mallory,
        _serial: serial,
    }
}

impl Env {
    /// Writes focus.toml (the password in a file next to it) allowing
    /// `allow`, and returns its path.
    fn config_file(&self, allow: &[&str], grace: &str) -> PathBuf {
        let dir = self.tmp.path().join("focus-conf");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("password"), format!("{PASSWORD}\n")).unwrap();
        let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
        let text = format!(
            r#"homeserver = "{hs}"
user = "{user}"
password_file = "password"
data_dir = "data"
allow = [{allow}]
http_listen = "127.0.0.1:0"

[media]
bind = ["127.0.0.1:0"]

[drain]
grace_period = "{grace}"
"#,
            hs = self.synapse.base_url(),
            user = self.focus_user,
            allow = allow.join(", "),
        );
        let path = dir.join("focus.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn config(&self, allow: &[&str], grace: &str) -> Config {
        Config::load(self.config_file(allow, grace)).unwrap()
    }

    /// Waits (20 s at most) until the homeserver, asked by `asker`, has the
    /// focus's membership in `room` at `want`.
    async fn focus_membership(&self, asker: &MatrixSession, room: &str, want: &str, what: &str) {
        eventually(Duration::from_secs(20), what, || async {
            membership(asker, room, &self.focus_user).await.as_deref() == Some(want)
        })
        .await;
    }

    /// A call room created by `creator`, inviting the focus.
    async fn room_inviting_focus(&self, creator: &MatrixSession) -> String {
        creator
            .create_call_room(CreateRoomOptions {
                name: Some("focus test".into()),
                invite: vec![self.focus_user.clone()],
                encrypted: false,
                public: false,
            })
            .await
            .unwrap()
    }
}

/// The focus's membership in `room` as the homeserver has it (asked by a
/// member of the room).
async fn membership(asker: &MatrixSession, room: &str, user: &str) -> Option<String> {
    asker
        .fetch_room_state(room, "m.room.member")
        .await
        .unwrap()
        .into_iter()
        .find(|e| e["state_key"] == user)
        .and_then(|e| e["content"]["membership"].as_str().map(str::to_owned))
}

/// Polls `check` every 100 ms until it is true; fails the test after
/// `timeout`.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out ({timeout:?}): {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP/1.1 GET: status, the head's lines, body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body.len(), "Content-Length matches the body");
    (status, head.to_owned(), body.to_owned())
}

async fn health(handle: &FocusHandle) -> Value {
    let (status, head, body) = get(handle.http_addr().unwrap(), "/health").await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    serde_json::from_str(&body).unwrap()
}

async fn metrics(handle: &FocusHandle) -> String {
    let (status, head, body) = get(handle.http_addr().unwrap(), "/metrics").await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    body
}

/// The value of an unlabelled or labelled sample line in a metrics text.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

async fn synced(handle: &FocusHandle) {
    let mut status = handle.watch_status();
    tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.sync_ok))
        .await
        .expect("the focus syncs within 30 s")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_when_an_allowed_user_invites_and_declines_others() {
    let env = env().await;
    let alice = env.alice.user_id().to_owned();
    // An invite that waits for the focus to start.
    let early = env.room_inviting_focus(&env.alice).await;
    let mut focus = FocusService::start(env.config(&[&alice], "1s"))
        .await
        .unwrap();
    assert_eq!(focus.user_id(), env.focus_user);
    env.focus_membership(
        &env.alice,
        &early,
        "join",
        "the focus joins a room it was invited to before it started",
    )
    .await;
    synced(&focus).await;

    // Invited by alice (allowed): the homeserver has the focus joined.
    let room = env.room_inviting_focus(&env.alice).await;
    env.focus_membership(&env.alice, &room, "join", "the focus joins alice's room")
        .await;
    eventually(
        Duration::from_secs(5),
        "/health counts the room",
        || async { health(&focus).await["rooms"] == 2 },
    )
    .await;

    // Invited by mallory (not allowed): declined (membership leave, never
    // join), counted.
    let room2 = env.room_inviting_focus(&env.mallory).await;
    env.focus_membership(
        &env.mallory,
        &room2,
        "leave",
        "the focus declines mallory's room",
    )
    .await;
    let text = metrics(&focus).await;
    assert_eq!(
        sample(
            &text,
            r#"groupcall_focus_refusals_total{reason="invite_not_allowed"}"#
        ),
        Some(1),
        "{text}"
    );
    assert_eq!(sample(&text, "groupcall_focus_rooms"), Some(2), "{text}");
    let h = health(&focus).await;
    assert_eq!(h["rooms"], 2, "{h}");
    assert_eq!(h["state"], "running", "{h}");

    focus.shutdown();
    focus.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_endpoints() {
    let env = env().await;
    let alice = env.alice.user_id().to_owned();
    let mut focus = FocusService::start(env.config(&[&alice], "1s"))
        .await
        .unwrap();
    synced(&focus).await;
    let addr = focus.http_addr().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    let h = health(&focus).await;
    assert_eq!(h["state"], "running", "{h}");
    assert_eq!(h["sync_ok"], true, "{h}");
    assert_eq!(h["calls"], 0, "{h}");
    assert_eq!(h["participants"], 0, "{h}");
    assert_eq!(h["user_id"], env.focus_user.as_str(), "{h}");
    assert_eq!(h["device_id"], focus.device_id(), "{h}");

    let text = metrics(&focus).await;
    assert!(
        text.starts_with("# HELP groupcall_focus_draining "),
        "{text}"
    );
    assert_eq!(sample(&text, "groupcall_focus_draining"), Some(0), "{text}");
    assert_eq!(sample(&text, "groupcall_focus_calls"), Some(0), "{text}");
    assert!(
        text.contains("# TYPE groupcall_focus_refusals_total counter\n"),
        "{text}"
    );

    let (status, _, _) = get(addr, "/nothing").await;
    assert_eq!(status, 404);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 405 "), "{raw}");

    focus.shutdown();
    focus.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_refuses_invites_and_stops_after_the_grace_period() {
    let env = env().await;
    let alice = env.alice.user_id().to_owned();
    let config = env.config(&[&alice], "2s");
    let mut focus = FocusService::start(config.clone()).await.unwrap();
    synced(&focus).await;
    let device = focus.device_id().to_owned();

    let started = Instant::now();
    focus.shutdown();
    focus.shutdown(); // idempotent
    eventually(Duration::from_secs(1), "/health says draining", || async {
        health(&focus).await["state"] == "draining"
    })
    .await;
    assert_eq!(focus.status().state, FocusState::Draining);
    let text = metrics(&focus).await;
    assert_eq!(sample(&text, "groupcall_focus_draining"), Some(1), "{text}");

    // While draining, even an allowed user's invite is declined and counted.
    let room = env.room_inviting_focus(&env.alice).await;
    eventually(
        Duration::from_secs(2),
        "the invite is refused while draining",
        || async {
            let text = metrics(&focus).await;
            sample(
                &text,
                r#"groupcall_focus_refusals_total{reason="invite_draining"}"#,
            ) == Some(1)
        },
    )
    .await;

    tokio::time::timeout(Duration::from_secs(10), focus.wait())
        .await
        .expect("stops within 10 s")
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "stopped {took:?} after shutdown (grace 2 s)"
    );
    assert_eq!(focus.status().state, FocusState::Stopped);
    assert!(
        get_fails(focus.http_addr().unwrap()).await,
        "the HTTP endpoint no longer answers"
    );
    assert_ne!(
        membership(&env.alice, &room, &env.focus_user)
            .await
            .as_deref(),
        Some("join")
    );

    // A restart reuses the device stored in the data directory.
    let mut again = FocusService::start(config).await.unwrap();
    assert_eq!(again.device_id(), device);
    synced(&again).await;
    again.shutdown();
    again.wait().await.unwrap();
}

/// Whether a GET gets no HTTP answer (the endpoint stopped answering).
async fn get_fails(addr: SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return true;
    };
    let _ = stream.write_all(b"GET /health HTTP/1.1\r\n\r\n").await;
    let mut raw = String::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut raw)).await;
    !matches!(read, Ok(Ok(_)) if raw.starts_with("HTTP/1.1 200"))
}

/// What the recording core saw.
#[derive(Debug)]
enum Seen {
    Room(String, Vec<RoomChange>),
    Left(String),
    ToDevice(CallToDevice),
}

struct RecordingCore(mpsc::UnboundedSender<Seen>);

impl FocusCore for RecordingCore {
    fn room_changed(
        &mut self,
        _now_ms: u64,
        room_id: &str,
        _state: &RoomCallState,
        changes: &[RoomChange],
    ) -> Vec<CoreOutput> {
        let _ = self
            .0
            .send(Seen::Room(room_id.to_owned(), changes.to_vec()));
        Vec::new()
    }

    fn to_device(
        &mut self,
        _now_ms: u64,
        event: CallToDevice,
        _rooms: &BTreeMap<String, RoomCallState>,
    ) -> Vec<CoreOutput> {
        let _ = self.0.send(Seen::ToDevice(event));
        Vec::new()
    }

    fn room_left(&mut self, _now_ms: u64, room_id: &str) -> Vec<CoreOutput> {
        let _ = self.0.send(Seen::Left(room_id.to_owned()));
        Vec::new()
    }
}

async fn next_seen(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    timeout: Duration,
    mut pred: impl FnMut(&Seen) -> bool,
) -> Seen {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(s)) if pred(&s) => return s,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the core was dropped"),
            Err(_) => panic!("timed out after {timeout:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_state_and_call_to_device_events_reach_the_core() {
    let env = env().await;
    let alice = env.alice.user_id().to_owned();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut focus = FocusService::start_with_core(env.config(&[&alice], "1s"), RecordingCore(tx))
        .await
        .unwrap();
    synced(&focus).await;
    let room = env.room_inviting_focus(&env.alice).await;
    env.focus_membership(&env.alice, &room, "join", "the focus joins")
        .await;

    // Alice starts a call and joins it with one device.
    let alice_device = env.alice.device_id();
    env.alice
        .send_state(
            &room,
            CALL_EVENT_TYPE,
            "call1",
            json!({"m.intent": "m.prompt", "m.type": "m.video"}),
        )
        .await
        .unwrap();
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000;
    env.alice
        .send_state(
            &room,
            CALL_MEMBER_EVENT_TYPE,
            &alice,
            json!({"m.calls": [{"m.call_id": "call1", "m.devices": [{
                "device_id": alice_device, "session_id": "S1", "expires_ts": expires,
                "feeds": [{"purpose": "m.usermedia"}],
            }]}]}),
        )
        .await
        .unwrap();
    let seen = next_seen(&mut rx, Duration::from_secs(10), |s| {
        matches!(s, Seen::Room(_, changes)
            if changes.iter().any(|c| matches!(c, RoomChange::DeviceJoined { .. })))
    })
    .await;
    let Seen::Room(seen_room, changes) = seen else {
        unreachable!()
    };
    assert_eq!(seen_room, room);
    assert!(
        changes.iter().any(
            |c| matches!(c, RoomChange::DeviceJoined { device, session_id }
            if device.user_id == alice && device.device_id == alice_device && session_id == "S1")
        ),
        "{changes:?}"
    );

    // A plaintext m.call.invite: no sender device, not encrypted.
    let content = json!({"call_id": "c1", "conf_id": "call1", "party_id": alice_device});
    let to_focus = |event_type: &'static str, encrypt: bool| {
        let message = (
            env.focus_user.clone(),
            focus.device_id().to_owned(),
            content.clone(),
        );
        env.alice
            .send_signalling(event_type, vec![message], encrypt, KeylessDevices::Refuse)
    };
    let report = to_focus("m.call.invite", false).await;
    assert!(report.error.is_none(), "{report:?}");
    let Seen::ToDevice(ev) = next_seen(&mut rx, Duration::from_secs(10), |s| {
        matches!(s, Seen::ToDevice(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(ev.event_type, "m.call.invite");
    assert_eq!(ev.sender, alice);
    assert_eq!(ev.sender_device, None);
    assert!(!ev.encrypted);
    assert_eq!(ev.content["call_id"], "c1");

    // An Olm-encrypted one: the sender device comes from the Olm session.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let report = to_focus("m.call.hangup", true).await;
        if !report.encrypted.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the focus's device keys never became known: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let Seen::ToDevice(ev) = next_seen(
        &mut rx,
        Duration::from_secs(10),
        |s| matches!(s, Seen::ToDevice(e) if e.event_type == "m.call.hangup"),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(ev.sender, alice);
    assert_eq!(ev.sender_device.as_deref(), Some(alice_device.as_str()));
    assert!(ev.encrypted);

    // Kicked: the core is told, /health no longer counts the room.
    env.alice
        .client()
        .get_room(room.as_str().try_into().unwrap())
        .unwrap()
        .kick_user(env.focus_user.as_str().try_into().unwrap(), Some("test"))
        .await
        .unwrap();
    let seen = next_seen(&mut rx, Duration::from_secs(10), |s| {
        matches!(s, Seen::Left(_))
    })
    .await;
    assert!(matches!(&seen, Seen::Left(r) if *r == room), "{seen:?}");
    assert_eq!(health(&focus).await["rooms"], 0);

    focus.shutdown();
    focus.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_are_clear() {
    let env = env().await;
    // A bad file: the error names the file and the field.
    let path = env.tmp.path().join("bad.toml");
    std::fs::write(
        &path,
        std::fs::read_to_string(env.config_file(&["@alice:localhost"], "1s"))
            .unwrap()
            .replace("grace_period", "grace"),
    )
    .unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: drain.grace: unknown key (known here: grace_period)",
            path.display()
        )
    );

    // A password file that is not there: start fails before logging in.
    let mut config = env.config(&["@alice:localhost"], "1s");
    std::fs::remove_file(env.tmp.path().join("focus-conf/password")).unwrap();
    let e = FocusService::start(config.clone()).await.unwrap_err();
    assert!(matches!(e, DriverError::Config(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("focus.toml: password_file: "), "{msg}");
    assert!(msg.contains("focus-conf/password"), "{msg}");

    // A wrong password: a login error, no device.
    std::fs::write(env.tmp.path().join("focus-conf/password"), "wrong\n").unwrap();
    let e = FocusService::start(config.clone()).await.unwrap_err();
    assert!(matches!(e, DriverError::Login(_)), "{e:?}");

    // An http_listen already taken.
    std::fs::write(env.tmp.path().join("focus-conf/password"), PASSWORD).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.http_listen = Some(taken.local_addr().unwrap());
    let e = FocusService::start(config).await.unwrap_err();
    assert!(matches!(e, DriverError::Http { .. }), "{e:?}");
    assert!(e.to_string().contains("http_listen"), "{e}");
}
