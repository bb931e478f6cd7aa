//! Tests of the `groupcall` binary: usage errors, login and room errors
//! against a real local Synapse, and a real call between two `groupcall
//! join --json` processes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use groupcall_testkit::synapse::{Synapse, SynapseOptions};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use groupcall_testkit::Proc;

const BIN: &str = env!("CARGO_BIN_EXE_groupcall");

/// The outcome of a finished run.
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    /// The `error: ...` lines of stderr.
    fn errors(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect()
    }

    /// The single error line, which must contain every one of `words`.
    fn assert_error(&self, code: i32, words: &[&str]) {
        let errors = self.errors();
        assert_eq!(
            self.code,
            Some(code),
            "exit code; stderr:\n{}\nstdout:\n{}",
            self.stderr,
            self.stdout
        );
        assert_eq!(errors.len(), 1, "one error line; stderr:\n{}", self.stderr);
        eprintln!("exit {code}: {}", errors[0]);
        for w in words {
            assert!(
                errors[0].to_lowercase().contains(&w.to_lowercase()),
                "`{w}` not in `{}`",
                errors[0]
            );
        }
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("stack backtrace"),
            "{}",
            self.stderr
        );
    }
}

/// Runs the binary to its end (stdin closed), with a time limit.
async fn run(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("groupcall {args:?} did not finish in 90 s"))
        .unwrap();
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn usage_errors() {
    let out = run(&["join", "--bogus"]).await;
    out.assert_error(2, &["--bogus"]);

    let out = run(&["join", "--homeserver", "http://127.0.0.1:1"]).await;
    out.assert_error(2, &["--user", "--room"]);

    let out = run(&["fly"]).await;
    out.assert_error(2, &["fly"]);

    let out = run(&["synapse", "--user", "nopassword"]).await;
    out.assert_error(2, &["NAME:PASSWORD"]);

    let base = [
        "join",
        "--homeserver",
        "http://127.0.0.1:1",
        "--user",
        "alice",
        "--room",
        "!r:localhost",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().chain(extra).copied().collect()
    };
    let out = run(&with(&["--voice", "--video", "pattern"])).await;
    out.assert_error(2, &["--voice"]);

    let out = run(&with(&[])).await;
    out.assert_error(1, &["password"]);

    let out = run(&with(&["--password", "x", "--audio", "/nonexistent/a.ogg"])).await;
    out.assert_error(1, &["audio", "/nonexistent/a.ogg"]);

    let out = run(&with(&["--password", "x", "--video", "/nonexistent/v.ivf"])).await;
    out.assert_error(1, &["video", "/nonexistent/v.ivf"]);

    let out = run(&with(&["--password", "x", "--audio", "none", "--voice"])).await;
    out.assert_error(1, &["nothing to send"]);

    let out = run(&["join", "--help"]).await;
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.contains("--create-call"), "{}", out.stdout);
}

/// Creates a room with `alice`'s access token, with this power-level
/// override; `bob` may join (public room).
async fn create_room(hs: &Synapse, token: &str, power_levels: Value) -> String {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = http
        .post(format!("{}/_matrix/client/v3/createRoom", hs.base_url()))
        .bearer_auth(token)
        .json(&json!({
            "preset": "public_chat",
            "power_level_content_override": power_levels,
        }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let body: Value = resp.json().await.unwrap();
    body["room_id"].as_str().unwrap().to_owned()
}

fn join_args<'a>(
    hs: &'a str,
    user: &'a str,
    pw: &'a str,
    room: &'a str,
    dir: &'a Path,
) -> Vec<String> {
    [
        "join",
        "--homeserver",
        hs,
        "--user",
        user,
        "--password",
        pw,
        "--room",
        room,
        "--json",
        "--data-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([dir.display().to_string()])
    .collect()
}

async fn run_owned(args: Vec<String>) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&refs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_room_errors() {
    let hs = Synapse::start(SynapseOptions::default()).await.unwrap();
    let url = hs.base_url();
    let alice = hs.register_user("alice", "alice-pw").await.unwrap();
    hs.register_user("bob", "bob-pw").await.unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let d = |name: &str| dirs.path().join(name);

    // Only power level 100 may send call member events.
    let forbidden = create_room(
        &hs,
        &alice.access_token,
        json!({ "events": {
            "org.matrix.msc3401.call.member": 100,
            "m.call.member": 100,
            "org.matrix.msc3401.call": 100,
            "m.call": 100,
        }}),
    )
    .await;
    // Call events allowed, for a call of alice alone.
    let solo = create_room(
        &hs,
        &alice.access_token,
        json!({ "events": {
            "org.matrix.msc3401.call.member": 0,
            "org.matrix.msc3401.call": 0,
        }}),
    )
    .await;
    // Call events allowed, but no call.
    let callless = create_room(
        &hs,
        &alice.access_token,
        json!({ "events": {
            "org.matrix.msc3401.call.member": 0,
            "org.matrix.msc3401.call": 0,
        }}),
    )
    .await;

    let mut solo_args = join_args(&url, "alice", "alice-pw", &solo, &d("a4"));
    solo_args.extend(["--create-call", "--duration", "2", "--voice"].map(String::from));

    let started = Instant::now();
    let (wrong_pw, unknown_room, unknown_alias, not_permitted, no_call, alone) = tokio::join!(
        run_owned(join_args(&url, "alice", "wrong", &callless, &d("a1"))),
        run_owned(join_args(
            &url,
            "@alice:localhost",
            "alice-pw",
            "!doesnotexist:localhost",
            &d("a2")
        )),
        run_owned(join_args(
            &url,
            "alice",
            "alice-pw",
            "#nowhere:localhost",
            &d("a3")
        )),
        run_owned(join_args(&url, "bob", "bob-pw", &forbidden, &d("b1"))),
        run_owned(join_args(&url, "bob", "bob-pw", &callless, &d("b2"))),
        run_owned(solo_args),
    );
    eprintln!("six runs took {:?}", started.elapsed());

    // --duration ends a call cleanly.
    assert_eq!(alone.code, Some(0), "{}", alone.stderr);
    let lines: Vec<Value> = alone
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["event"] == "joined" && v["created"] == true),
        "{}",
        alone.stdout
    );
    assert_eq!(
        lines.last(),
        Some(&json!({"event": "left"})),
        "{}",
        alone.stdout
    );

    wrong_pw.assert_error(1, &["password"]);
    unknown_room.assert_error(1, &["!doesnotexist:localhost"]);
    unknown_alias.assert_error(1, &["#nowhere:localhost"]);
    not_permitted.assert_error(1, &["permission", "org.matrix.msc3401.call.member"]);
    no_call.assert_error(1, &["--create-call"]);
    for out in [
        &wrong_pw,
        &unknown_room,
        &unknown_alias,
        &not_permitted,
        &no_call,
    ] {
        assert!(out.stdout.is_empty(), "stdout: {}", out.stdout);
    }
}

/// Starts `groupcall` with `args`, stdin closed.
fn spawn(name: &str, args: &[String]) -> Proc {
    spawn_with(name, args, Stdio::null())
}

fn spawn_with(name: &str, args: &[String], stdin: Stdio) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env(
        "RUST_LOG",
        "warn,groupcall=debug,groupcall_proto=debug,groupcall_media=info",
    );
    Proc::spawn_cmd(name, cmd, stdin)
}

/// Whether `p` has seen, from `other`: a connected peer and media frames of
/// both kinds.
fn call_is_up(p: &Proc, other: &str) -> bool {
    let from_other = |v: &&Value| v["user_id"] == other;
    let connected = p
        .seen
        .iter()
        .filter(from_other)
        .any(|v| v["event"] == "peer_state" && v["state"] == "connected");
    let frames = |kind: &str| {
        p.seen.iter().filter(from_other).any(|v| {
            v["event"] == "media" && v["kind"] == kind && v["frames"].as_u64().unwrap_or(0) > 0
        })
    };
    connected && frames("audio") && frames("video")
}

/// `groupcall synapse` with these `NAME:PASSWORD` users: the process, its
/// ready line, the homeserver URL and the call room.
async fn synapse_with(users: &[&str]) -> (Proc, Value, String, String) {
    let mut args = vec!["synapse".to_owned()];
    for u in users {
        args.extend(["--user".to_owned(), (*u).to_owned()]);
    }
    let mut hs = spawn("synapse", &args);
    let ready = hs
        .wait_for(Duration::from_secs(180), |v| v["event"] == "synapse")
        .await;
    let url = ready["homeserver"].as_str().unwrap().to_owned();
    let room = ready["room_id"].as_str().unwrap().to_owned();
    (hs, ready, url, room)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_call_and_leave_on_sigterm() {
    // `groupcall synapse` gives a homeserver, users and a call room.
    let (mut hs, ready, url, room) = synapse_with(&["alice:alice-pw", "bob:bob-pw"]).await;
    assert_eq!(ready["users"][1]["user_id"], "@bob:localhost", "{ready}");

    let dirs = tempfile::tempdir().unwrap();
    let alice_dir = dirs.path().join("alice");
    let bob_dir = dirs.path().join("bob");
    let mut alice_args = join_args(&url, "alice", "alice-pw", &room, &alice_dir);
    alice_args.push("--create-call".into());
    let mut alice = spawn_with("alice", &alice_args, Stdio::piped());
    let mut alice_stdin = alice.child.stdin.take().unwrap();
    let joined = alice
        .wait_for(Duration::from_secs(60), |v| v["event"] == "joined")
        .await;
    assert_eq!(joined["created"], true, "{joined}");
    assert_eq!(joined["user_id"], "@alice:localhost", "{joined}");

    let mut bob = spawn("bob", &join_args(&url, "bob", "bob-pw", &room, &bob_dir));
    let joined_bob = bob
        .wait_for(Duration::from_secs(60), |v| v["event"] == "joined")
        .await;
    assert_eq!(joined_bob["created"], false, "{joined_bob}");
    assert_eq!(joined_bob["call_id"], joined["call_id"]);

    // Both see each other connected, with audio and video frames, within 30 s.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        alice.poll();
        bob.poll();
        if call_is_up(&alice, "@bob:localhost") && call_is_up(&bob, "@alice:localhost") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no call with media within 30 s.\n--- alice: {}\n--- bob: {}",
            alice.report(),
            bob.report()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "connected with media both ways after {:?}",
        started.elapsed()
    );
    for p in [&alice, &bob] {
        for v in &p.seen {
            assert_ne!(v["event"], "NOT JSON", "{}: {v}", p.name);
        }
        assert!(
            p.seen.iter().any(|v| v["event"] == "participant_joined"),
            "{}",
            p.report()
        );
        assert!(
            p.seen.iter().any(|v| v["event"] == "feed_added"),
            "{}",
            p.report()
        );
    }

    // Commands on stdin: an unknown one is a warning; muting reaches bob.
    alice_stdin.write_all(b"dance\nmute audio\n").await.unwrap();
    alice_stdin.flush().await.unwrap();
    let warning = alice
        .wait_for(Duration::from_secs(10), |v| v["event"] == "warning")
        .await;
    assert!(
        warning["message"].as_str().unwrap().contains("dance"),
        "{warning}"
    );
    bob.wait_for(Duration::from_secs(15), |v| {
        v["event"] == "feed_changed"
            && v["user_id"] == "@alice:localhost"
            && v["audio_muted"] == true
    })
    .await;
    // The end of stdin does not end the call: bob still gets alice's video.
    drop(alice_stdin);
    let video_frames = |p: &Proc| {
        p.seen
            .iter()
            .filter(|v| v["event"] == "media" && v["kind"] == "video")
            .filter_map(|v| v["frames"].as_u64())
            .max()
            .unwrap_or(0)
    };
    bob.poll();
    let before = video_frames(&bob);
    tokio::time::sleep(Duration::from_secs(3)).await;
    bob.poll();
    alice.poll();
    assert!(video_frames(&bob) > before, "{}", bob.report());
    assert!(
        !alice.seen.iter().any(|v| v["event"] == "left"),
        "{}",
        alice.report()
    );

    // SIGTERM: both leave cleanly.
    let leaving = Instant::now();
    alice.signal(Signal::SIGTERM);
    bob.signal(Signal::SIGTERM);
    let (a, b) = tokio::join!(
        alice.finish(Duration::from_secs(40)),
        bob.finish(Duration::from_secs(40))
    );
    eprintln!("both left after {:?}", leaving.elapsed());
    for (p, code) in [(&alice, a), (&bob, b)] {
        assert_eq!(code, Some(0), "{} exit code; {}", p.name, p.report());
        assert_eq!(
            p.seen.last(),
            Some(&json!({"event": "left"})),
            "{}",
            p.report()
        );
    }

    hs.signal(Signal::SIGTERM);
    assert_eq!(
        hs.finish(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        hs.report()
    );
}

/// `groupcall join --wait`: an answering bot in one command. It waits in a
/// room without a call; the reference starts one 10 s later; it reports the
/// call's start with its intent, joins, and both sides get media.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_wait_joins_a_call_the_reference_starts_later() {
    let (mut hs, _, url, room) = synapse_with(&["alice:alice-pw", "zed:zed-pw"]).await;
    let dirs = tempfile::tempdir().unwrap();
    let mut args = join_args(&url, "alice", "alice-pw", &room, &dirs.path().join("alice"));
    args.push("--wait".into());
    let mut alice = spawn("alice", &args);

    // Ten seconds without a call: still waiting, not failed.
    tokio::time::sleep(Duration::from_secs(10)).await;
    alice.poll();
    assert!(
        matches!(alice.child.try_wait(), Ok(None)),
        "groupcall join --wait exited; {}",
        alice.report()
    );
    assert!(
        !alice.seen.iter().any(|v| v["event"] == "joined"),
        "{}",
        alice.report()
    );

    let started = Instant::now();
    let mut zed = Proc::spawn_reference(
        "zed",
        &[
            "--homeserver",
            &url,
            "--user",
            "zed",
            "--password",
            "zed-pw",
            "--room",
            &room,
            "--create-call",
            "--intent",
            "ring",
        ]
        .map(String::from),
    );
    let zed_joined = zed
        .wait_for(Duration::from_secs(60), |v| v["event"] == "joined")
        .await;
    let call_id = zed_joined["call_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let call_started = alice
        .wait_for(Duration::from_secs(30), |v| v["event"] == "call_started")
        .await;
    assert_eq!(call_started["intent"], "m.ring", "{call_started}");
    assert_eq!(call_started["call_id"], call_id.as_str(), "{call_started}");
    let joined = alice
        .wait_for(Duration::from_secs(30), |v| v["event"] == "joined")
        .await;
    assert_eq!(joined["created"], false, "{joined}");
    assert_eq!(joined["call_id"], call_id.as_str(), "{joined}");
    eprintln!(
        "joined {:?} after the reference started the call",
        started.elapsed()
    );

    // Media both ways: groupcall's counters and the reference's decoded
    // video and audible audio.
    let deadline = Instant::now() + Duration::from_secs(30);
    let zed_got = |z: &Proc, kind: &str| {
        z.seen.iter().any(|v| {
            v["event"] == "media"
                && v["user_id"] == "@alice:localhost"
                && v["kind"] == kind
                && (if kind == "audio" {
                    &v["audible"]
                } else {
                    &v["frames"]
                })
                .as_u64()
                .unwrap_or(0)
                    > 0
        })
    };
    loop {
        alice.poll();
        zed.poll();
        if call_is_up(&alice, "@zed:localhost") && zed_got(&zed, "audio") && zed_got(&zed, "video")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no media both ways within 30 s.\n--- alice: {}\n--- zed: {}",
            alice.report(),
            zed.report()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "media both ways {:?} after the reference started the call",
        started.elapsed()
    );

    alice.signal(Signal::SIGTERM);
    assert_eq!(
        alice.finish(Duration::from_secs(40)).await,
        Some(0),
        "{}",
        alice.report()
    );
    drop(zed.child.stdin.take());
    let _ = zed.finish(Duration::from_secs(30)).await;
    hs.signal(Signal::SIGTERM);
    assert_eq!(
        hs.finish(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        hs.report()
    );
}

/// `groupcall bench setup` end to end, tiny: the floor (2 samples of each
/// component at the start, before each run and at the end) and one N=2 run
/// of each system on its own Synapse. Not
/// timed: it asserts that every figure is there and consistent, not how
/// large it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_setup_measures_the_floor_and_both_systems() {
    let args = [
        "bench",
        "setup",
        "--sizes",
        "2",
        "--reps",
        "1",
        "--cpu-window",
        "0",
        "--floor-reps",
        "2",
        "--json",
    ];
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("groupcall {args:?} did not finish in 300 s"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{report}");
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "a floor line and one per size; {report}");

    let floor = &lines[0]["floor"];
    let mut sum = 0.0;
    for part in ["member_state_hop", "to_device_hop", "handshake"] {
        let c = &floor[part];
        // 2 at the start, 2 before each of the two runs, 2 at the end.
        assert_eq!(c["samples"], 8, "{part}; {report}");
        let (min, median, max) = (
            c["min_ms"].as_f64().unwrap(),
            c["median_ms"].as_f64().unwrap(),
            c["max_ms"].as_f64().unwrap(),
        );
        assert!(
            0.0 < min && min <= median && median <= max,
            "{part}; {report}"
        );
        sum += median;
    }
    let floor_ms = floor["floor_ms"].as_f64().unwrap();
    assert!((floor_ms - sum).abs() < 1e-6, "{report}");
    // The start and the end alone, as well.
    for part in ["member_state_hop", "to_device_hop", "handshake"] {
        assert_eq!(lines[0]["floor_start"][part]["samples"], 2, "{report}");
        assert_eq!(lines[0]["floor_end"][part]["samples"], 2, "{report}");
    }

    let n2 = &lines[1];
    assert_eq!(n2["n"], 2, "{report}");
    for s in ["groupcall", "reference"] {
        assert_eq!(n2[format!("{s}_failed_runs")], 0, "{s}; {report}");
        assert_eq!(n2[format!("{s}_skipped_runs")], 0, "{s}; {report}");
        // At least invite, answer and select_answer per pair.
        assert!(
            n2[format!("{s}_todevice_per_pair")].as_f64().unwrap() >= 3.0,
            "{s}; {report}"
        );
    }
    assert_eq!(n2["groupcall_todevice_per_pair"], 3.0, "{report}");
    let gc = n2["groupcall_ms"].as_f64().unwrap();
    let rf = n2["reference_ms"].as_f64().unwrap();
    assert!(gc > 0.0 && rf > 0.0, "{report}");
    assert_eq!(n2["floor_ms"].as_f64(), Some(floor_ms), "{report}");
    let close = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-9;
    assert!(close(&n2["ratio"], gc / rf), "{report}");
    assert!(
        close(&n2["groupcall_floor_ratio"], gc / floor_ms),
        "{report}"
    );
    assert!(
        close(&n2["reference_floor_ratio"], rf / floor_ms),
        "{report}"
    );

    // The human-readable tables: the floor's parts and P1 against it.
    for want in [
        "member-state hop",
        "to-device hop",
        "ICE + DTLS handshake",
        "groupcall/floor",
        "groupcall/ref",
    ] {
        assert!(stdout.contains(want), "`{want}` missing; {report}");
    }
    assert!(!stdout.contains("Runs that did not complete"), "{report}");
}
