//! Tests of `groupcall demo`: a whole call on a local Synapse with its
//! report, and the ways it must fail clearly without leaving processes
//! behind (busy port, Synapse not installable, a participant that never
//! connects).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_groupcall");

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    fn errors(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect()
    }

    /// Exit 1 with exactly one error line holding every word.
    fn assert_error(&self, words: &[&str]) {
        assert_eq!(self.code, Some(1), "exit code; stderr:\n{}", self.stderr);
        let errors = self.errors();
        assert_eq!(errors.len(), 1, "one error line; stderr:\n{}", self.stderr);
        eprintln!("{} (after {:?})", errors[0], self.took);
        for w in words {
            assert!(
                errors[0].to_lowercase().contains(&w.to_lowercase()),
                "`{w}` not in `{}`",
                errors[0]
            );
        }
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
    }

    /// The pid of the local Synapse, from the `synapse` JSON line.
    fn synapse_pid(&self) -> Option<u32> {
        self.lines()
            .iter()
            .find(|v| v["event"] == "synapse")
            .and_then(|v| v["pid"].as_u64())
            .map(|p| p as u32)
    }
}

async fn demo(args: &[&str], envs: &[(&str, &Path)], limit: Duration) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let t = Instant::now();
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("groupcall demo {args:?} took longer than {limit:?}"))
        .unwrap();
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: t.elapsed(),
    };
    eprintln!("--- stderr of demo {args:?}:\n{}", run.stderr);
    run
}

/// Whether a process runs: `pgrep -f PATTERN` lists it (and /proc has it).
fn alive(pid: u32, pattern: &str) -> bool {
    let out = std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == pid.to_string());
    listed || Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether the local Synapse with this pid still runs.
fn synapse_alive(pid: u32) -> bool {
    alive(pid, "synapse.app.homeserver")
}

#[tokio::test(flavor = "multi_thread")]
async fn three_participants_connect_with_media_and_a_report() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report");
    let run = demo(
        &[
            "--participants",
            "3",
            "--duration",
            "3",
            "--json",
            "--report-dir",
            report.to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
    let lines = run.lines();
    let summary = lines.last().unwrap();
    assert_eq!(summary["event"], "summary", "{summary}");
    assert_eq!(summary["pairs_total"], 3);
    assert_eq!(summary["pairs_connected"], 3);
    assert_eq!(summary["pairs_media_both_ways"], 3);
    assert_eq!(summary["pairs_media_recent"], 3);
    assert_eq!(summary["ok"], true);
    let dir = Path::new(summary["report_dir"].as_str().unwrap());
    assert_eq!(dir, report.canonicalize().unwrap());
    for p in summary["pairs"].as_array().unwrap() {
        assert!(p["media_both_ways"].as_bool().unwrap(), "{p}");
        assert_eq!(p["media_recent"], true, "{p}");
        assert!(p["frames_ab"].as_u64().unwrap() > 20, "{p}");
        assert!(p["frames_ba"].as_u64().unwrap() > 20, "{p}");
        assert!(p["bytes_ab"].as_u64().unwrap() > 1000, "{p}");
        assert!(p["connected_ms"].as_f64().unwrap() > 0.0, "{p}");
    }
    // groupcall's setup: exactly invite, answer and select_answer per pair.
    let sig = &summary["signalling"];
    assert_eq!(sig["to_device_messages_per_pair"], 3.0, "{sig}");

    // Progress lines came before: every pair connected, then the mesh.
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["event"] == "pair_connected")
            .count(),
        3
    );
    assert!(lines.iter().any(|l| l["event"] == "mesh_up"));
    // The table.
    assert!(run.stderr.contains("alice ↔ bob"), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("3/3 pairs with audio and video both ways")
    );

    // The report: summary, timeline with one bar per pair, page, recordings.
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(on_disk["pairs_media_both_ways"], 3);
    let svg = std::fs::read_to_string(dir.join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    assert_eq!(svg.matches(r#"<g class="pair">"#).count(), 3, "{svg}");
    for pair in ["alice ↔ bob", "alice ↔ carol", "bob ↔ carol"] {
        assert!(svg.contains(pair), "{pair} missing");
    }
    let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("<table>"));
    let recordings = summary["recordings"].as_array().unwrap();
    assert_eq!(
        recordings.len(),
        4,
        "alice records bob's and carol's audio and video: {recordings:?}"
    );
    for r in recordings {
        let f = dir.join(r.as_str().unwrap());
        assert!(
            std::fs::metadata(&f).unwrap().len() > 1000,
            "{}",
            f.display()
        );
    }

    let pid = run.synapse_pid().expect("the synapse line has a pid");
    assert!(!synapse_alive(pid), "Synapse (pid {pid}) still runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_synapse_port_is_a_clear_error() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("r");
    let run = demo(
        &[
            "--synapse-port",
            &port,
            "--report-dir",
            report.to_str().unwrap(),
            "--json",
        ],
        &[],
        Duration::from_secs(120),
    )
    .await;
    run.assert_error(&["busy", &port, "--synapse-port"]);
    assert!(run.synapse_pid().is_none(), "no Synapse was started");
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_synapse_install_offline_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let report = cache.path().join("r");
    let run = demo(
        &["--report-dir", report.to_str().unwrap(), "--json"],
        &[
            ("GROUPCALL_SYNAPSE_OFFLINE", Path::new("1")),
            ("GROUPCALL_CACHE_DIR", cache.path()),
        ],
        Duration::from_secs(120),
    )
    .await;
    run.assert_error(&["not installed", "GROUPCALL_SYNAPSE_OFFLINE"]);
    assert!(run.synapse_pid().is_none());
    // Nothing was installed either.
    assert!(!cache.path().join("synapse-venv").join("bin").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_participant_that_never_connects_fails_within_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("r");
    let run = demo(
        &[
            "--participants",
            "3",
            "--break-media",
            "--connect-timeout",
            "15",
            "--json",
            "--report-dir",
            report.to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(180),
    )
    .await;
    run.assert_error(&["did not connect", "within 15 s", "--connect-timeout"]);
    let err = run.errors()[0].to_owned();
    // Carol's pairs are named (alice ↔ bob usually connects; on a loaded
    // machine it may not have yet).
    assert!(err.contains("alice ↔ carol not connected"), "{err}");
    assert!(err.contains("bob ↔ carol not connected"), "{err}");
    let lines = run.lines();
    assert!(!lines.iter().any(|l| l["event"] == "summary"));
    // The error came at the timeout after the last join, not much later.
    let at = |what: &str| -> f64 {
        run.stderr
            .lines()
            .filter(|l| l.contains(what))
            .filter_map(|l| {
                l.strip_prefix('[')?
                    .split_once(" s]")?
                    .0
                    .trim()
                    .parse()
                    .ok()
            })
            .next_back()
            .unwrap_or_else(|| panic!("no `{what}` line"))
    };
    let waited = at("stopping everything") - at("joined the call");
    assert!(
        (14.0..20.0).contains(&waited),
        "gave up {waited} s after the last join"
    );
    let pid = run.synapse_pid().expect("the synapse line has a pid");
    assert!(!synapse_alive(pid), "Synapse (pid {pid}) still runs");
}

/// A participant whose media stops mid-call (`--stop-media-after`, a
/// hidden test option: carol mutes microphone and camera 2 s into the 7 s
/// of media): its pairs were up, but have had no media both ways in the
/// last seconds. The summary says so per pair, and the demo fails.
#[tokio::test(flavor = "multi_thread")]
async fn media_that_stops_mid_call_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("r");
    let run = demo(
        &[
            "--participants",
            "3",
            "--duration",
            "7",
            "--stop-media-after",
            "2",
            "--json",
            "--report-dir",
            report.to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(300),
    )
    .await;
    run.assert_error(&["media stopped", "2 of 3 pairs", "in the last 3 s"]);
    let err = run.errors()[0].to_owned();
    assert!(err.contains("alice ↔ carol (nothing"), "{err}");
    assert!(err.contains("bob ↔ carol (nothing"), "{err}");
    assert!(!err.contains("alice ↔ bob"), "{err}");
    let lines = run.lines();
    let summary = lines
        .iter()
        .find(|l| l["event"] == "summary")
        .expect("a summary before the error");
    // The old keys: every pair was up once.
    assert_eq!(summary["pairs_total"], 3, "{summary}");
    assert_eq!(summary["pairs_media_both_ways"], 3, "{summary}");
    // The new ones: only alice ↔ bob still had media at the end.
    assert_eq!(summary["pairs_media_recent"], 1, "{summary}");
    assert_eq!(summary["ok"], false, "{summary}");
    for p in summary["pairs"].as_array().unwrap() {
        let with_carol = p["a"] == "carol" || p["b"] == "carol";
        assert_eq!(p["media_both_ways"], true, "{p}");
        assert_eq!(p["media_recent"], !with_carol, "{p}");
    }
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(on_disk["pairs_media_recent"], 1);
    assert!(run.stderr.contains("stopped"), "{}", run.stderr);
    let pid = run.synapse_pid().expect("the synapse line has a pid");
    assert!(!synapse_alive(pid), "Synapse (pid {pid}) still runs");
}

/// A mixed call: two groupcall participants and one reference peer
/// (matrix-js-sdk in Node).
#[tokio::test(flavor = "multi_thread")]
async fn a_reference_peer_joins_the_demo() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("r");
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop");
    let run = demo(
        &[
            "--participants",
            "2",
            "--with-reference",
            "1",
            "--duration",
            "2",
            "--json",
            "--interop-dir",
            interop.to_str().unwrap(),
            "--report-dir",
            report.to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
    let summary = run.lines().last().cloned().unwrap();
    assert_eq!(summary["pairs_total"], 3, "{summary}");
    assert_eq!(summary["pairs_media_both_ways"], 3, "{summary}");
    let impls: Vec<&str> = summary["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["implementation"].as_str().unwrap())
        .collect();
    assert_eq!(impls, ["groupcall", "groupcall", "matrix-js-sdk"]);
    let pid = run.synapse_pid().unwrap();
    assert!(!synapse_alive(pid));
    // The reference peer is gone too.
    let node: Vec<u32> = run
        .lines()
        .iter()
        .filter(|l| l["event"] == "reference")
        .map(|l| l["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(node.len(), 1);
    assert!(
        !alive(node[0], "peer.mjs"),
        "node peer {} still runs",
        node[0]
    );
}

/// `--homeserver` with existing accounts: the same call on a homeserver the
/// demo did not start (here a Synapse the test runs).
#[tokio::test(flavor = "multi_thread")]
async fn any_homeserver_with_given_accounts() {
    let mut hs = groupcall_testkit::synapse::Synapse::start(
        groupcall_testkit::synapse::SynapseOptions::default(),
    )
    .await
    .unwrap();
    hs.register_user("ann", "ann-pw").await.unwrap();
    hs.register_user("ben", "ben-pw").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("r");
    let url = hs.base_url();
    let run = demo(
        &[
            "--homeserver",
            &url,
            "--user",
            "ann:ann-pw",
            "--user",
            "ben:ben-pw",
            "--duration",
            "1",
            "--json",
            "--report-dir",
            report.to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
    let lines = run.lines();
    assert!(run.synapse_pid().is_none(), "no Synapse of its own");
    let summary = lines.last().unwrap();
    assert_eq!(summary["pairs_total"], 1, "{summary}");
    assert_eq!(summary["pairs_media_both_ways"], 1, "{summary}");
    assert_eq!(summary["homeserver"], url.as_str());
    assert!(summary["signalling"].is_null(), "no proxy in front of it");
    let names: Vec<&str> = summary["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ann", "ben"]);
    // The homeserver is still there: the demo only stops what it started.
    assert!(hs.is_running());
    hs.stop().await.unwrap();
}

/// SIGTERM in the middle of the call: one error line, everyone leaves,
/// Synapse is stopped.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_everything() {
    use tokio::io::AsyncBufReadExt;
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("r");
    let mut child = Command::new(BIN)
        .args(["demo", "--participants", "2", "--duration", "60", "--json"])
        .arg("--report-dir")
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut pid = None;
    let wait = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["event"] == "synapse" {
                pid = v["pid"].as_u64().map(|p| p as u32);
            }
            if v["event"] == "mesh_up" {
                return;
            }
        }
        panic!("stdout ended before the mesh was up");
    };
    tokio::time::timeout(Duration::from_secs(120), wait)
        .await
        .expect("mesh up in time");
    let pid = pid.expect("synapse pid");
    let demo_pid = child.id().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(40), child.wait_with_output())
        .await
        .expect("exits soon after SIGTERM")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(errors, ["error: interrupted by SIGTERM"], "{stderr}");
    assert!(!synapse_alive(pid), "Synapse (pid {pid}) still runs");
}

/// Runs `groupcall demo --focus --duration 3 --json --record none` with
/// `extra`; it must succeed. Returns the run and its summary line.
async fn focus_demo(extra: &[&str]) -> (Run, Value) {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report");
    let mut args = vec!["--focus", "--duration", "3", "--json", "--record", "none"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--report-dir", report.to_str().unwrap()]);
    let run = demo(&args, &[], Duration::from_secs(300)).await;
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    let summary = run.lines().pop().unwrap();
    assert_eq!(summary["event"], "summary", "{summary}");
    assert_eq!(summary["ok"], true, "{summary}");
    (run, summary)
}

/// `groupcall demo --focus` without the Chromium client: four groupcall
/// participants meet through a focus the demo starts in its own process;
/// every pair has media both ways, each participant uploads one camera
/// video (and one audio) track to the focus, which forwards each to the
/// three others.
#[tokio::test(flavor = "multi_thread")]
async fn four_participants_through_a_local_focus() {
    let (run, summary) =
        focus_demo(&["--participants", "4", "--with-chromium-focus-client", "0"]).await;
    let lines = run.lines();
    let focus_started = lines.iter().find(|v| v["event"] == "focus").unwrap();
    let focus_user = focus_started["user_id"].as_str().unwrap();
    assert_eq!(summary["pairs_total"], 6, "{summary}");
    assert_eq!(
        summary["pairs_media_both_ways"], summary["pairs_total"],
        "{summary}"
    );
    assert_eq!(summary["pairs_connected"], 6, "{summary}");
    let focus = &summary["focus"];
    eprintln!("FIGURE demo --focus --participants 4: focus {focus}");
    assert_eq!(focus["user_id"], focus_user, "{focus}");
    assert_eq!(focus["uploads_per_participant"], 1, "{focus}");
    assert_eq!(focus["audio_uploads_per_participant"], 1, "{focus}");
    assert_eq!(focus["participants"], 4, "{focus}");
    // Each of the 4 receives audio and video of the 3 others.
    assert_eq!(focus["forwarded_streams"], 4 * 3 * 2, "{focus}");
    assert!(
        focus["packets_forwarded"].as_u64().unwrap() > 1000,
        "{focus}"
    );
    // Through the focus, not a mesh: the pairs' connection is the focus.
    assert!(
        run.stderr.contains("connected through the focus"),
        "{}",
        run.stderr
    );
}

/// `groupcall demo --focus` with its default Chromium MSC3898 client and a
/// reference peer: the groupcall participants and the Chromium client meet
/// through the focus, the reference peer meets the groupcall participants in
/// the mesh, and the pair of the reference peer and the Chromium client
/// (which cannot meet: one has no focus mode, the other only the focus) is
/// left out.
#[tokio::test(flavor = "multi_thread")]
async fn groupcall_chromium_and_a_reference_peer_around_a_local_focus() {
    let (_run, summary) = focus_demo(&["--participants", "2", "--with-reference", "1"]).await;
    let implementations: Vec<&str> = summary["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["implementation"].as_str().unwrap())
        .collect();
    assert_eq!(
        implementations,
        [
            "groupcall",
            "groupcall",
            "matrix-js-sdk",
            "chromium-msc3898"
        ]
    );
    assert_eq!(summary["pairs_total"], 5, "{summary}");
    assert_eq!(summary["pairs_left_out"], 1, "{summary}");
    assert_eq!(summary["pairs_media_both_ways"], 5, "{summary}");
    let pairs = summary["pairs"].as_array().unwrap();
    let pair = |a: &str, b: &str| {
        pairs
            .iter()
            .find(|p| p["a"] == a && p["b"] == b)
            .unwrap_or_else(|| panic!("no pair {a} ↔ {b}: {summary}"))
    };
    for (a, b) in [("alice", "bob"), ("alice", "chrome1"), ("bob", "chrome1")] {
        assert_eq!(
            pair(a, b)["state_a"],
            "connected (through the focus)",
            "{summary}"
        );
    }
    assert!(
        pairs
            .iter()
            .all(|p| p["b"] != "chrome1" || p["a"] != "ref1")
    );
    let focus = &summary["focus"];
    eprintln!("FIGURE demo --focus --participants 2 --with-reference 1: focus {focus}");
    // alice, bob and chrome1 each upload one audio and one video track and
    // receive the two others' (the reference peer is not on the focus).
    assert_eq!(focus["participants"], 3, "{focus}");
    assert_eq!(focus["uploads_per_participant"], 1, "{focus}");
    assert_eq!(focus["audio_uploads_per_participant"], 1, "{focus}");
    assert_eq!(focus["forwarded_streams"], 3 * 2 * 2, "{focus}");
    assert!(
        focus["packets_forwarded"].as_u64().unwrap() > 500,
        "{focus}"
    );
}

/// `groupcall demo --homeservers 2 --focus`: a local federation of two
/// Synapses, participants round-robin over them (alice, carol on hs0; bob,
/// dave on hs1), one focus per homeserver with cascade = true. Every pair
/// has media both ways, and the two foci link: `links` has one entry per
/// focus and link (per direction), each carrying the 2 participants x
/// (audio + video) of its side once.
#[tokio::test(flavor = "multi_thread")]
async fn two_homeservers_with_linked_foci() {
    let t = Instant::now();
    let (run, summary) = focus_demo(&[
        "--homeservers",
        "2",
        "--participants",
        "4",
        "--with-chromium-focus-client",
        "0",
    ])
    .await;
    eprintln!(
        "FIGURE demo --homeservers 2 --focus: took {:?}",
        t.elapsed()
    );
    assert_eq!(summary["pairs_total"], 6, "{summary}");
    assert_eq!(summary["pairs_media_both_ways"], 6, "{summary}");
    assert_eq!(summary["homeservers"], 2, "{summary}");
    let synapses: Vec<Value> = run
        .lines()
        .into_iter()
        .filter(|v| v["event"] == "synapse")
        .collect();
    assert_eq!(synapses.len(), 2, "{}", run.stdout);
    let links = summary["links"].as_array().unwrap();
    eprintln!("FIGURE demo --homeservers 2 --focus: links {links:?}");
    eprintln!(
        "FIGURE demo --homeservers 2 --focus: focus {}",
        summary["focus"]
    );
    assert_eq!(links.len(), 2, "one entry per direction: {links:?}");
    assert_ne!(links[0]["from"], links[1]["from"], "{links:?}");
    for l in links {
        assert_eq!(l["streams_carried"], 4, "{l}");
        assert_eq!(l["streams_subscribed"], 4, "{l}");
        assert!(l["packets"].as_u64().unwrap() > 100, "{l}");
    }
    assert_eq!(summary["foci"].as_array().unwrap().len(), 2, "{summary}");
    assert!(
        run.stderr.contains("focus0 -> focus1") && run.stderr.contains("focus1 -> focus0"),
        "{}",
        run.stderr
    );
    // Everything stopped: both Synapses are gone.
    for s in &synapses {
        let pid = s["pid"].as_u64().unwrap() as u32;
        assert!(!synapse_alive(pid), "Synapse (pid {pid}) still runs");
    }
}
