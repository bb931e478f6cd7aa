//! `groupcall focus`: a bad configuration is one clear error line (exit 1);
//! against a real Synapse, the binary serves /health and drains on SIGTERM,
//! exiting 0 after the grace period. With groupcall clients in a call
//! through the process:
//! - SIGKILL mid-call: the clients fall back to the mesh (media on every
//!   pair within 10 s); the process restarted (same data dir, same device):
//!   they return to it and their mesh calls end.
//! - SIGTERM mid-call: the focus drains and tells its clients
//!   (`m.call.focus_draining`); its media goes on while they set up the
//!   mesh, every pair has media over its direct call before the grace
//!   period ends, and each client leaves the focus itself
//!   (`focus_draining`) once the mesh reaches everyone; the process exits
//!   0 at the end of the grace period.
//!
//! Run with `cargo test -p groupcall-cli --test focus -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::process::Stdio;
use std::time::Duration;

use groupcall::client::JoinOptions;
use groupcall::matrix::{CreateRoomOptions, MatrixSession};
use groupcall::media::TrackKind;
use groupcall::proto::{
    CallEvent, Command as CallCommand, CreateOptions, DeviceKey, FocusRef, PeerStatus,
};
use groupcall_testkit::synapse::{Synapse, SynapseOptions};
use groupcall_testkit::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;

mod common;
use common::{FocusSpec, write_focus_config};

const BIN: &str = env!("CARGO_BIN_EXE_groupcall");

/// Runs `groupcall focus --config PATH` to its end: exit code and stderr.
async fn run_focus(config: &std::path::Path) -> (Option<i32>, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(BIN)
            .args(["focus", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .output(),
    )
    .await
    .expect("exits within 30 s")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("error:")).collect()
}

#[tokio::test]
async fn bad_configuration_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let (code, stderr) = run_focus(&missing).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        error_lines(&stderr),
        [format!(
            "error: {}: cannot read the configuration: No such file or directory (os error 2)",
            missing.display()
        )],
        "{stderr}"
    );

    let bad = dir.path().join("focus.toml");
    std::fs::write(
        &bad,
        "homeserver = \"http://127.0.0.1:1\"\nuser = \"focus\"\npassword = \"x\"\n",
    )
    .unwrap();
    let (code, stderr) = run_focus(&bad).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        error_lines(&stderr),
        [format!(
            "error: {}: password: passwords do not go into the configuration: use password_file \
             or password_env",
            bad.display()
        )],
        "{stderr}"
    );

    std::fs::write(&bad, "homeserver = \n").unwrap();
    let (code, stderr) = run_focus(&bad).await;
    assert_eq!(code, Some(1), "{stderr}");
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with(&format!("error: {}: line 1: not valid TOML", bad.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()))
}

#[tokio::test]
async fn the_binary_drains_on_sigterm_and_exits_0() {
    let _serial = groupcall_testkit::serial().await;
    let synapse = Synapse::start(SynapseOptions::default())
        .await
        .expect("synapse");
    let user = synapse.register_user("focus", "focus-pw").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, addr) = write_focus_toml(
        dir.path(),
        &synapse.base_url(),
        &user.user_id,
        "localhost",
        "1500ms",
    );
    let (mut child, log) = start_healthy(&config, &addr).await;
    let pid = Pid::from_raw(child.id().unwrap() as i32);
    let sent = Instant::now();
    kill(pid, Signal::SIGTERM).unwrap();
    let (status, body) = loop {
        if let Some((status, body)) = get(&addr, "/health").await
            && body.contains("draining")
        {
            break (status, body);
        }
        assert!(sent.elapsed() < Duration::from_secs(1), "never draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200, "{body}");
    let metrics = get(&addr, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains("\ngroupcall_focus_draining 1\n"),
        "{metrics}"
    );

    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits within 15 s")
        .unwrap();
    let took = sent.elapsed();
    let log = log.await.unwrap();
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(6),
        "exited {took:?} after SIGTERM (grace 1.5 s)\n{log}"
    );
    for step in [
        "focus: started",
        "focus: synced with the homeserver",
        "draining",
        "focus: grace period over",
        "focus: stopped",
    ] {
        assert!(log.contains(step), "`{step}` not logged:\n{log}");
    }
    assert!(error_lines(&log).is_empty(), "{log}");

    // Again (the stored device), and a second signal during the drain
    // stops it at once with exit code 1.
    let (mut child, log) = start_healthy(&config, &addr).await;
    let pid = Pid::from_raw(child.id().unwrap() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    let sent = Instant::now();
    while !get(&addr, "/health")
        .await
        .is_some_and(|(_, body)| body.contains("draining"))
    {
        assert!(sent.elapsed() < Duration::from_secs(1), "never draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(pid, Signal::SIGINT).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits at once")
        .unwrap();
    let took = sent.elapsed();
    let log = log.await.unwrap();
    assert_eq!(exit.code(), Some(1), "{log}");
    assert!(took < Duration::from_millis(1400), "took {took:?}\n{log}");
    assert!(log.contains("reused_device=true"), "{log}");
    assert_eq!(
        error_lines(&log),
        ["error: stopped by a second SIGINT during the drain"],
        "{log}"
    );
}

/// Writes `dir`/focus.toml: the homeserver `hs`, the bot account `user`
/// (its password in `FOCUS_TEST_PASSWORD`), invites accepted from `allow`,
/// media on loopback, HTTP on a free loopback port, a drain of `grace`.
/// Returns its path and the HTTP address.
fn write_focus_toml(
    dir: &std::path::Path,
    hs: &str,
    user: &str,
    allow: &str,
    grace: &str,
) -> (std::path::PathBuf, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let spec = FocusSpec {
        hs,
        user,
        allow,
        top: "",
        media: "",
        grace,
    };
    let config = write_focus_config(dir, spec, &addr, "127.0.0.1");
    (config, addr)
}

/// Starts `groupcall focus` and waits until /health says running and
/// synced; returns the child and its stderr (complete once it exits).
async fn start_healthy(
    config: &std::path::Path,
    addr: &str,
) -> (tokio::process::Child, tokio::task::JoinHandle<String>) {
    let p = FocusProcess::start(config, addr, "focus-pw", 0).await;
    (p.child, p.log)
}

/// The focus process and where it answers.
struct FocusProcess {
    child: Child,
    log: tokio::task::JoinHandle<String>,
    /// Its /health once it was running and synced.
    health: Value,
}

impl FocusProcess {
    /// Starts `groupcall focus --config PATH` and waits until /health says
    /// running and synced (with `rooms` rooms joined).
    async fn start(
        config: &std::path::Path,
        addr: &str,
        password: &str,
        rooms: u64,
    ) -> FocusProcess {
        let mut child = Command::new(BIN)
            .args(["focus", "--config"])
            .arg(config)
            .env("FOCUS_TEST_PASSWORD", password)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let log = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, body)) = get(addr, "/health").await {
                let health: Value = serde_json::from_str(&body).unwrap();
                if health["state"] == "running"
                    && health["sync_ok"] == true
                    && health["rooms"].as_u64() >= Some(rooms)
                {
                    return FocusProcess { child, log, health };
                }
            }
            assert!(Instant::now() < deadline, "the focus never became healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().unwrap() as i32)
    }
}

/// Three groupcall clients in a call through the focus process.
struct Call {
    h: Harness,
    config: std::path::PathBuf,
    addr: String,
    focus: FocusProcess,
    focus_dev: DeviceKey,
    devices: Vec<DeviceKey>,
    parts: Vec<Participant>,
    t0: Instant,
}

const N: usize = 3;

impl Call {
    /// A call of [`N`] through a focus process draining for `grace`.
    async fn start(grace: &str) -> Call {
        let mut h = Harness::new().await;
        let focus_user = h.register("focus").await;
        let mut sessions = Vec::new();
        for i in 0..N {
            h.register(&format!("p{i}")).await;
            sessions.push(h.login(&format!("p{i}")).await);
        }
        let devices: Vec<DeviceKey> = sessions
            .iter()
            .map(|s: &MatrixSession| DeviceKey::new(s.user_id(), s.device_id()))
            .collect();

        let dir = h.tmp.path().join("focus");
        std::fs::create_dir_all(&dir).unwrap();
        let (config, addr) = write_focus_toml(&dir, &h.hs, &focus_user, &devices[0].user_id, grace);
        let focus = FocusProcess::start(&config, &addr, PASSWORD, 0).await;
        let focus_ref = FocusRef {
            user_id: focus.health["user_id"].as_str().unwrap().to_owned(),
            device_id: focus.health["device_id"].as_str().unwrap().to_owned(),
        };
        let room = sessions[0]
            .create_call_room(CreateRoomOptions {
                name: Some("through the focus process".into()),
                invite: vec![focus_user],
                encrypted: false,
                public: true,
            })
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !get(&addr, "/health")
            .await
            .is_some_and(|(_, b)| b.contains("\"rooms\":1"))
        {
            assert!(Instant::now() < deadline, "the focus never joined the room");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let t0 = Instant::now();
        let mut parts = Vec::new();
        for (i, s) in sessions.into_iter().enumerate() {
            let mut o = JoinOptions::new(room.clone());
            o.create = (i == 0).then(CreateOptions::default);
            o.focus = Some(focus_ref.clone());
            // Counters every 100 ms: the drain's checks count frames in
            // windows of 1.5 s, and a peer closed between two reports
            // (the focus's, as the mesh takes over) never reports the
            // frames since its last one.
            o.stats_interval = Duration::from_millis(100);
            let (_, p) = h.join_rust(&format!("p{i}"), s, o).await;
            parts.push(p);
            if i == 0 {
                h.log
                    .wait_for("the creator to join", 30, |s| {
                        s.iter().any(|e| {
                            e.who == 0
                                && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
                        })
                    })
                    .await;
            }
        }
        Call {
            h,
            config,
            addr,
            focus,
            focus_dev: DeviceKey::new(focus_ref.user_id, focus_ref.device_id),
            devices,
            parts,
            t0,
        }
    }

    /// Waits (at most `secs`) until every ordered pair has media since
    /// `since` (and, with `direct`, over a direct call, not the focus).
    async fn wait_media(&mut self, what: &str, since: Instant, secs: u64, direct: bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.h.log.pump();
            let seen = &self.h.log.seen;
            let mut missing = Vec::new();
            for at in 0..N {
                for from in (0..N).filter(|f| *f != at) {
                    let dev = &self.devices[from];
                    let a = rust_frames(seen, since, at, dev, TrackKind::Audio, None);
                    let v = rust_frames(seen, since, at, dev, TrackKind::Video, None);
                    let d = !direct || rust_connected(seen, since, at, dev);
                    if a < 20 || v < 10 || !d {
                        missing.push(format!("p{at}<-p{from} (audio {a}, video {v}, direct {d})"));
                    }
                }
            }
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: missing {}\n{}",
                missing.join(", "),
                self.h.log.dump(80)
            );
            self.h.log.run_for(Duration::from_millis(250)).await;
        }
    }

    /// Every client connected to the focus since `since`.
    async fn wait_at_focus(&mut self, since: Instant, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.h.log.pump();
            let at: Vec<bool> = (0..N)
                .map(|i| rust_connected(&self.h.log.seen, since, i, &self.focus_dev))
                .collect();
            if at.iter().all(|b| *b) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not at the focus: {at:?}\n{}",
                self.h.log.dump(80)
            );
            self.h.log.run_for(Duration::from_millis(250)).await;
        }
    }

    /// Hangups each client got from the focus since `since`, with reasons.
    fn closed_by_focus(&mut self, since: Instant) -> Vec<Vec<String>> {
        self.h.log.pump();
        (0..N)
            .map(|at| {
                self.h
                    .log
                    .seen
                    .iter()
                    .filter(|e| e.who == at && e.t >= since)
                    .filter_map(|e| match e.call() {
                        Some(CallEvent::PeerState {
                            device,
                            status: PeerStatus::Closed(r) | PeerStatus::Failed(r),
                            ..
                        }) if *device == self.focus_dev => Some(r.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .collect()
    }

    async fn finish(mut self) {
        for p in &self.parts {
            p.commander.send(CallCommand::Leave);
        }
        for p in std::mem::take(&mut self.parts) {
            p.done.await.unwrap();
        }
        let _ = self.focus.child.start_kill();
        let _ = self.focus.child.wait().await;
        self.h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_focus_process_leaves_the_call_in_the_mesh_until_it_is_back() {
    let mut c = Call::start("3s").await;
    let t0 = c.t0;
    c.wait_media("media through the focus", t0, 90, false).await;
    c.wait_at_focus(t0, 5).await;

    // SIGKILL: no drain, no goodbyes. The clients notice the silence.
    c.h.allow_anomaly("focus_unreachable");
    c.h.allow_anomaly("focus_ping_timeout");
    let t_kill = Instant::now();
    kill(c.focus.pid(), Signal::SIGKILL).unwrap();
    let status = c.focus.child.wait().await.unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    c.wait_media("the mesh after SIGKILL", t_kill, 30, true)
        .await;
    let fallback = t_kill.elapsed();
    eprintln!(
        "FIGURE cli focus: focus process SIGKILLed; media on every pair in the mesh {:.1} s later",
        fallback.as_secs_f64()
    );
    assert!(
        fallback < Duration::from_secs(10),
        "the mesh took {fallback:?}"
    );

    // Restarted: the same device (its data dir); the clients return.
    let t_back = Instant::now();
    c.focus = FocusProcess::start(&c.config, &c.addr, PASSWORD, 1).await;
    assert_eq!(
        c.focus.health["device_id"].as_str(),
        Some(c.focus_dev.device_id.as_str()),
        "the restarted focus reuses its device"
    );
    c.wait_at_focus(t_back, 90).await;
    eprintln!(
        "FIGURE cli focus: focus process restarted; every client connected to it again {:.1} s later",
        t_back.elapsed().as_secs_f64()
    );
    // Media through it, and the mesh calls ended for it.
    let t_media = Instant::now();
    c.wait_media("media through the restarted focus", t_media, 60, false)
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.h.log.pump();
        let mesh_left: Vec<usize> = (0..N)
            .filter(|at| {
                !c.h.log.seen.iter().any(|e| {
                    e.who == *at
                        && e.t >= t_back
                        && matches!(e.call(), Some(CallEvent::PeerState { status: PeerStatus::Closed(r), device, .. })
                            if (r == "focus_back") && *device != c.focus_dev)
                })
            })
            .collect();
        if mesh_left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "clients {mesh_left:?} kept their mesh calls\n{}",
            c.h.log.dump(80)
        );
        c.h.log.run_for(Duration::from_millis(250)).await;
    }
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigtermed_focus_process_drains_and_its_clients_go_on_in_the_mesh() {
    // The grace period is long enough for the mesh to form on a loaded
    // machine (it formed in about 2 s here).
    const GRACE: Duration = Duration::from_secs(10);
    let mut c = Call::start("10s").await;
    let t0 = c.t0;
    c.wait_media("media through the focus", t0, 90, false).await;

    // SIGTERM: the focus drains and tells its clients; they call each
    // other while its media goes on. (Once they left it, their usual retry
    // reaches the draining focus, which turns it down.)
    c.h.allow_anomaly("focus_shutdown");
    let t_term = Instant::now();
    kill(c.focus.pid(), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !get(&c.addr, "/health")
        .await
        .is_some_and(|(_, b)| b.contains("draining"))
    {
        assert!(Instant::now() < deadline, "never draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The call goes on meanwhile: video on every pair in the first second
    // and a half (through the focus, or already the mesh).
    let t_draining = Instant::now();
    c.h.log.run_for(Duration::from_millis(1500)).await;
    c.h.log.pump();
    for at in 0..N {
        for from in (0..N).filter(|f| *f != at) {
            let v = rust_frames(
                &c.h.log.seen,
                t_draining,
                at,
                &c.devices[from],
                TrackKind::Video,
                None,
            );
            assert!(v >= 5, "p{at}<-p{from}: {v} video frames while draining");
        }
    }
    // Before the grace period ends: media on every pair over its direct
    // call, and every client has left the focus itself.
    c.wait_media(
        "the mesh during the drain",
        t_term,
        GRACE.as_secs() - 3,
        true,
    )
    .await;
    let mesh_after = t_term.elapsed();
    let deadline = t_term + GRACE - Duration::from_secs(1);
    let left_after = loop {
        let told = c.closed_by_focus(t_term);
        if told.iter().all(|r| r.iter().any(|r| r == "focus_draining")) {
            break t_term.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "not every client left the draining focus: {told:?}\n{}",
            c.h.log.dump(60)
        );
        c.h.log.run_for(Duration::from_millis(100)).await;
    };
    assert!(
        c.focus.child.try_wait().unwrap().is_none(),
        "the focus exited before its grace period ended"
    );

    // It exits 0 at the end of the grace period, having hung up on no one:
    // nobody was left.
    let exit = tokio::time::timeout(Duration::from_secs(20), c.focus.child.wait())
        .await
        .expect("the focus exits")
        .unwrap();
    let took = t_term.elapsed();
    let log = (&mut c.focus.log).await.unwrap();
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(
        took >= GRACE - Duration::from_millis(100),
        "exited {took:?} after SIGTERM (grace {GRACE:?})\n{log}"
    );
    // Each left it before it hung up on anyone (a later call to it, after
    // the time it said it stops, may meet its refusal or nobody).
    let told = c.closed_by_focus(t_term);
    assert!(
        told.iter()
            .all(|r| r.first().map(String::as_str) == Some("focus_draining")),
        "hung up on by the focus: {told:?}"
    );
    // The mesh goes on after the focus is gone (its calls connected
    // during the drain; the focus has exited, so media now is the mesh's).
    let t_exit = Instant::now();
    c.wait_media("the mesh after the drain", t_exit, 30, false)
        .await;
    eprintln!(
        "FIGURE cli focus: SIGTERM (grace {GRACE:?}); every client told at once; media on every pair over direct calls {:.1} s after the signal, \
         every client had left the focus {:.1} s after it (the focus exited 0 after {:.1} s)",
        mesh_after.as_secs_f64(),
        left_after.as_secs_f64(),
        took.as_secs_f64()
    );
    c.finish().await;
}
