//! groupcall participants in one call through a real focus (this crate's
//! service, in-process), on a real Synapse: every participant receives
//! audio and video from every other through the focus, none calls another
//! directly, each uploads one audio and one video track whatever the size
//! of the call, and a screenshare reaches everyone.
//!
//! Run with `cargo test -p groupcall-focus --test through_focus -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::time::Duration;

use groupcall::client::{ClientEvent, JoinOptions};
use groupcall::matrix::{KeylessDevices, MatrixInput, MatrixSession, SyncOptions};
use groupcall::media::TrackKind;
use groupcall::proto::events::FeedPurpose;
use groupcall::proto::{CallEvent, Command, CreateOptions, DeviceKey, FocusRef, PeerStatus};
use groupcall_focus::config::Config;
use groupcall_focus::driver::{FocusHandle, FocusService};
use groupcall_focus::engine::EngineFigures;
use groupcall_testkit::*;
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::{RunningFocus, http_get, metric, metric_or_0};

/// A call of `n` groupcall participants through an in-process focus.
struct FocusCall {
    h: Harness,
    /// The focus engine's figures (every 500 ms).
    figures: tokio::sync::watch::Receiver<EngineFigures>,
    room: String,
    focus: FocusHandle,
    focus_config: Config,
    focus_dev: DeviceKey,
    names: Vec<String>,
    devices: Vec<DeviceKey>,
    parts: Vec<Participant>,
    t0: Instant,
}

impl FocusCall {
    async fn start(n: usize) -> FocusCall {
        Self::start_with(n, false).await
    }

    /// `record`: every participant records what it receives.
    async fn start_with(n: usize, record: bool) -> FocusCall {
        let mut h = Harness::new().await;
        let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
        for name in &names {
            h.register(name).await;
        }
        let mut sessions: Vec<MatrixSession> = Vec::new();
        for name in &names {
            sessions.push(h.login(name).await);
        }
        let devices: Vec<DeviceKey> = sessions
            .iter()
            .map(|s| DeviceKey::new(s.user_id(), s.device_id()))
            .collect();

        // The focus runs; the first participant's room invites it.
        let RunningFocus {
            handle: focus,
            focus_ref,
            device: focus_dev,
            room,
            figures,
            config,
            ..
        } = RunningFocus::start(&h, &sessions[0]).await;

        let t0 = Instant::now();
        let mut parts = Vec::new();
        for (i, s) in sessions.into_iter().enumerate() {
            let mut o = JoinOptions::new(room.clone());
            o.create = (i == 0).then(CreateOptions::default);
            o.focus = Some(focus_ref.clone());
            if record {
                o.record_dir = Some(h.tmp.path().join(format!("rec-{}", names[i])));
            }
            let (_, p) = h.join_rust(&names[i], s, o).await;
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
        FocusCall {
            h,
            figures,
            room,
            focus,
            focus_config: config,
            focus_dev,
            names,
            devices,
            parts,
            t0,
        }
    }

    /// Waits (at most `secs`) until `ok(at, from)` holds for every ordered
    /// pair; panics naming the pairs still missing.
    async fn wait_pairs(
        &mut self,
        what: &str,
        secs: u64,
        mut ok: impl FnMut(&[Entry], usize, usize) -> Result<(), String>,
    ) {
        let n = self.names.len();
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.h.log.pump();
            let seen = &self.h.log.seen;
            let mut missing = Vec::new();
            for at in 0..n {
                for from in (0..n).filter(|f| *f != at) {
                    if let Err(e) = ok(seen, at, from) {
                        missing.push(format!("{}<-{} ({e})", self.names[at], self.names[from]));
                    }
                }
            }
            if missing.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: missing {}\nrecent events:\n{}",
                    missing.join(", "),
                    self.h.log.dump(80)
                );
            }
            self.h.log.run_for(Duration::from_millis(250)).await;
        }
    }

    /// Audio and video from everyone to everyone, through the focus.
    async fn wait_media(&mut self, secs: u64) {
        let (t0, devices) = (self.t0, self.devices.clone());
        self.wait_pairs("media through the focus", secs, |seen, at, from| {
            let a = rust_frames(seen, t0, at, &devices[from], TrackKind::Audio, None);
            let v = rust_frames(seen, t0, at, &devices[from], TrackKind::Video, None);
            if a < 50 || v < 20 {
                return Err(format!("audio {a}, video {v}"));
            }
            Ok(())
        })
        .await;
    }

    /// No participant called another directly; each reached the focus and
    /// sent media to it alone.
    fn assert_only_the_focus(&mut self) {
        self.h.log.pump();
        let seen = &self.h.log.seen;
        let n = self.names.len();
        for at in 0..n {
            for (from, dev) in self.devices.iter().enumerate() {
                assert!(
                    from == at || !rust_connected(seen, self.t0, at, dev),
                    "{} connected to {} directly",
                    self.names[at],
                    self.names[from]
                );
            }
            assert!(
                rust_connected(seen, self.t0, at, &self.focus_dev),
                "{} connected to the focus",
                self.names[at]
            );
            let sent_to: Vec<&DeviceKey> = seen
                .iter()
                .filter_map(|e| match &e.ev {
                    Ev::Rust(ClientEvent::MediaSent { device, frames, .. })
                        if e.who == at && *frames > 0 =>
                    {
                        Some(device)
                    }
                    _ => None,
                })
                .collect();
            assert!(
                !sent_to.is_empty() && sent_to.iter().all(|d| **d == self.focus_dev),
                "{} sends media to the focus only: {sent_to:?}",
                self.names[at]
            );
        }
    }

    async fn finish(self) {
        self.finish_with(|_, _| {}).await;
    }

    /// Ends the call; `check(h, names)` runs after everyone left (the
    /// recordings are complete then).
    async fn finish_with(mut self, check: impl FnOnce(&mut Harness, &[String])) {
        for p in &self.parts {
            p.commander.send(Command::Leave);
        }
        for p in std::mem::take(&mut self.parts) {
            p.done.await.unwrap();
        }
        check(&mut self.h, &self.names);
        let mut focus = self.focus;
        focus.shutdown();
        focus.wait().await.unwrap();
        self.h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_participants_see_and_hear_each_other_through_the_focus() {
    let mut c = FocusCall::start_with(3, true).await;
    c.wait_media(90).await;
    eprintln!(
        "FIGURE through_focus: 3 participants, audio and video both ways on every pair {:.1} s after the first join",
        c.t0.elapsed().as_secs_f64()
    );
    c.assert_only_the_focus();
    // What each participant recorded of the others (through the focus)
    // decodes with ffmpeg without an error.
    c.finish_with(|h, names| {
        h.log.pump();
        let mut decoded = 0;
        for (at, name) in names.iter().enumerate() {
            let rec = h.log.recorded(at);
            for other in names.iter().filter(|o| *o != name) {
                let tag = format!("_{other}_");
                for ext in ["ogg", "ivf"] {
                    let file = rec
                        .iter()
                        .find(|p| {
                            p.extension().is_some_and(|e| e == ext)
                                && p.file_name().is_some_and(|f| f.to_string_lossy().contains(&tag))
                        })
                        .unwrap_or_else(|| panic!("{name} has no {ext} recording of {other}: {rec:?}"));
                    assert_decodes(file, if ext == "ogg" { 51 } else { 11 });
                    decoded += 1;
                }
            }
        }
        eprintln!("FIGURE through_focus: {decoded} recordings made through the focus decode with ffmpeg without an error");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_participants_upload_once_each_and_a_screenshare_reaches_everyone() {
    const N: usize = 8;
    let mut c = FocusCall::start(N).await;
    c.wait_media(120).await;
    eprintln!(
        "FIGURE through_focus: {N} participants, audio and video both ways on all {} directions {:.1} s after the first join",
        N * (N - 1),
        c.t0.elapsed().as_secs_f64()
    );
    c.assert_only_the_focus();

    // Counted at the focus: N participants, one audio and one video track
    // each, forwarding.
    let addr = c.focus.http_addr().expect("the focus's HTTP endpoint");
    let m = http_get(addr, "/metrics").await;
    assert_eq!(metric(&m, "groupcall_focus_participants"), N as u64, "{m}");
    assert_eq!(metric(&m, "groupcall_focus_tracks"), 2 * N as u64, "{m}");
    assert!(metric(&m, "groupcall_focus_packets_out_total") > 0, "{m}");

    // p0 shares its screen: through the focus to everyone.
    let t_share = Instant::now();
    c.parts[0].commander.send(Command::Screenshare(true));
    let p0 = c.devices[0].clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let share_stream = loop {
        c.h.log.pump();
        let found = c.h.log.seen.iter().find_map(|e| match e.call() {
            Some(CallEvent::FeedAdded {
                device,
                stream_id,
                purpose: FeedPurpose::Screenshare,
                ..
            }) if *device == p0 => Some(stream_id.clone()),
            _ => None,
        });
        if let Some(s) = found {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "nobody heard of p0's screenshare"
        );
        c.h.log.run_for(Duration::from_millis(250)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        c.h.log.pump();
        let seen = &c.h.log.seen;
        let missing: Vec<usize> = (1..N)
            .filter(|at| {
                rust_frames(
                    seen,
                    t_share,
                    *at,
                    &p0,
                    TrackKind::Video,
                    Some(&share_stream),
                ) < 10
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "p0's screenshare did not reach {missing:?}\n{}",
            c.h.log.dump(60)
        );
        c.h.log.run_for(Duration::from_millis(250)).await;
    }
    eprintln!(
        "FIGURE through_focus: p0's screenshare decoded by the other {} participants {:.1} s after it started",
        N - 1,
        t_share.elapsed().as_secs_f64()
    );
    let m = http_get(addr, "/metrics").await;
    assert_eq!(
        metric(&m, "groupcall_focus_tracks"),
        2 * N as u64 + 1,
        "{m}"
    );
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_focus_leaves_its_clients_in_the_mesh_and_they_return_when_it_is_back() {
    const N: usize = 3;
    let mut c = FocusCall::start(N).await;
    c.wait_media(90).await;
    c.assert_only_the_focus();

    // The focus dies (no goodbyes, its socket closed): each client's call
    // with it fails, as expected here.
    c.h.allow_anomaly("focus_unreachable");
    let t_kill = Instant::now();
    c.focus.abort();
    let devices = c.devices.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.h.log.pump();
        let seen = &c.h.log.seen;
        let mut missing = Vec::new();
        for at in 0..N {
            for from in (0..N).filter(|f| *f != at) {
                let direct = rust_connected(seen, t_kill, at, &devices[from]);
                let v = rust_frames(seen, t_kill, at, &devices[from], TrackKind::Video, None);
                let a = rust_frames(seen, t_kill, at, &devices[from], TrackKind::Audio, None);
                if !direct || v < 10 || a < 20 {
                    missing.push(format!(
                        "{at}<-{from} (direct {direct}, audio {a}, video {v})"
                    ));
                }
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no mesh after the focus died: {}\n{}",
            missing.join(", "),
            c.h.log.dump(80)
        );
        c.h.log.run_for(Duration::from_millis(250)).await;
    }
    let fallback = t_kill.elapsed();
    eprintln!(
        "FIGURE through_focus: focus killed; media on every pair in the mesh {:.1} s later",
        fallback.as_secs_f64()
    );

    // It comes back (same device, new session): the clients return to it.
    let t_back = Instant::now();
    c.focus = FocusService::start(c.focus_config.clone())
        .await
        .expect("the focus starts again");
    let focus_dev = c.focus_dev.clone();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        c.h.log.pump();
        let back: Vec<bool> = (0..N)
            .map(|at| rust_connected(&c.h.log.seen, t_back, at, &focus_dev))
            .collect();
        if back.iter().all(|b| *b) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back at the focus: {back:?}\n{}",
            c.h.log.dump(80)
        );
        c.h.log.run_for(Duration::from_millis(250)).await;
    }
    eprintln!(
        "FIGURE through_focus: focus restarted; every client connected to it again {:.1} s later",
        t_back.elapsed().as_secs_f64()
    );
    // And media flows through it again.
    let t_media = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        c.h.log.pump();
        let seen = &c.h.log.seen;
        let ok = (0..N).all(|at| {
            (0..N).filter(|f| *f != at).all(|from| {
                rust_frames(seen, t_media, at, &devices[from], TrackKind::Video, None) >= 10
            })
        });
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no media after the focus came back\n{}",
            c.h.log.dump(80)
        );
        c.h.log.run_for(Duration::from_millis(250)).await;
    }
    // The mesh calls ended: every client closed its calls with the others.
    c.h.log.pump();
    for at in 0..N {
        let closed = c
            .h
            .log
            .seen
            .iter()
            .filter(|e| {
                e.who == at
                    && matches!(e.call(), Some(CallEvent::PeerState { status: PeerStatus::Closed(r), .. }) if r == "focus_back")
            })
            .count();
        assert!(
            closed >= 1,
            "{} ended no mesh call for the focus",
            c.names[at]
        );
    }
    assert!(
        fallback < Duration::from_secs(10),
        "the mesh took over {fallback:?} after the focus died"
    );
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_and_plaintext_are_refused_and_a_member_who_leaves_the_room_is_cut_off() {
    let mut c = FocusCall::start(2).await;
    c.wait_media(90).await;
    let addr = c.focus.http_addr().expect("the focus's HTTP endpoint");
    let conf =
        c.h.log
            .seen
            .iter()
            .find_map(|e| match e.call() {
                Some(CallEvent::Joined { call_id, .. }) => Some(call_id.clone()),
                _ => None,
            })
            .expect("the call id");

    // A stranger joins the room but not the call, and calls the focus.
    c.h.register("stranger").await;
    let x = c.h.login("stranger").await;
    x.join_room(&c.room).await.unwrap();
    let (sync, mut rx) = x.start_sync(SyncOptions::default());
    let invite = |session: &str| {
        json!({"version": "1", "call_id": format!("x-{session}"), "party_id": x.device_id(),
            "conf_id": conf, "device_id": x.device_id(), "sender_session_id": session,
            "dest_session_id": c.focus_dev.device_id, "seq": 0, "lifetime": 60000,
            "offer": {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"}})
    };
    let to_focus = |content: Value| {
        vec![(
            c.focus_dev.user_id.clone(),
            c.focus_dev.device_id.clone(),
            content,
        )]
    };
    let report = x
        .send_signalling(
            "m.call.invite",
            to_focus(invite("s1")),
            true,
            KeylessDevices::Refuse,
        )
        .await;
    assert!(report.error.is_none(), "{:?}", report.error);
    // Turned down (after the hold for the homeserver's lag) with the reason.
    let reject = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rx.recv().await {
                Some(MatrixInput::ToDevice {
                    event_type,
                    content,
                    sender,
                    ..
                }) if sender == c.focus_dev.user_id => break (event_type, content),
                Some(_) => {}
                None => panic!("the stranger's sync ended"),
            }
        }
    })
    .await
    .expect("the focus answers the stranger");
    assert_eq!(reject.0, "m.call.reject");
    assert_eq!(reject.1["reason"], "not_member");
    assert_eq!(reject.1["call_id"], "x-s1");
    // In plaintext: refused without an answer.
    x.send_signalling(
        "m.call.invite",
        to_focus(invite("s2")),
        false,
        KeylessDevices::Plaintext,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = http_get(addr, "/metrics").await;
        let refused = |r: &str| {
            metric_or_0(
                &m,
                &format!("groupcall_focus_refusals_total{{reason=\"{r}\"}}"),
            )
        };
        if refused("not_member") == 1 && refused("plaintext") == 1 {
            assert_eq!(metric(&m, "groupcall_focus_participants"), 2, "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "refusals not counted:\n{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sync.stop();

    // A member of the call (at the focus) whose invite names a session that
    // is not its current one: a stale session, turned down (after the hold
    // for the homeserver's lag); its real call with the focus goes on.
    c.h.register("late").await;
    let late = c.h.login("late").await;
    let late_dev = DeviceKey::new(late.user_id(), late.device_id());
    let mut o = JoinOptions::new(c.room.clone());
    o.focus = Some(FocusRef {
        user_id: c.focus_dev.user_id.clone(),
        device_id: c.focus_dev.device_id.clone(),
    });
    let (late_idx, late_part) = c.h.join_rust("late", late.clone(), o).await;
    let t_late = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rust_connected(&c.h.log.seen, t_late, late_idx, &c.focus_dev) {
        assert!(Instant::now() < deadline, "late never reached the focus");
        c.h.log.run_for(Duration::from_millis(250)).await;
    }
    let stale = json!({"version": "1", "call_id": "late-stale", "party_id": late_dev.device_id,
        "conf_id": conf, "device_id": late_dev.device_id, "sender_session_id": "not-its-session",
        "dest_session_id": c.focus_dev.device_id, "seq": 0, "lifetime": 60000,
        "offer": {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"}});
    // The focus's reject is addressed to that session: late's client
    // ignores it, as it should.
    c.h.allow_anomaly("for another session (dest_session_id not-its-session)");
    let report = late
        .send_signalling(
            "m.call.invite",
            to_focus(stale),
            true,
            KeylessDevices::Refuse,
        )
        .await;
    assert!(report.error.is_none(), "{:?}", report.error);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = http_get(addr, "/metrics").await;
        let stale = metric_or_0(
            &m,
            "groupcall_focus_refusals_total{reason=\"stale_session\"}",
        );
        if stale == 1 {
            assert_eq!(metric(&m, "groupcall_focus_participants"), 3, "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "stale session not refused:\n{m}");
        c.h.log.run_for(Duration::from_millis(200)).await;
    }
    late_part.commander.send(Command::Leave);
    late_part.done.await.unwrap();

    // The call went on: media both ways.
    let t = Instant::now();
    c.t0 = t;
    c.wait_media(30).await;

    // p1 leaves the room (from another of its devices): the focus stops
    // serving it at once.
    let p1_other = c.h.login("p1").await;
    let t_leave = Instant::now();
    p1_other.leave_room(&c.room).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = http_get(addr, "/metrics").await;
        if metric(&m, "groupcall_focus_participants") == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "p1 still served:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cut = t_leave.elapsed();
    eprintln!(
        "FIGURE through_focus: a member who left the room was cut off by the focus {} ms after its leave was sent",
        cut.as_millis()
    );
    assert!(cut < Duration::from_secs(2), "cut off after {cut:?}");
    // p1's own client can no longer update its member entry: expected.
    c.h.allow_anomaly("not in room");
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_change_reaches_the_forwarder_within_a_second() {
    const N: usize = 3;
    let mut c = FocusCall::start(N).await;
    c.wait_media(90).await;
    // Everyone receives everyone else's audio and video: 3 x 2 x 2.
    let wait_subs = |mut figures: tokio::sync::watch::Receiver<EngineFigures>, want: usize| async move {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let f = figures.borrow_and_update().clone();
                if f.subscriptions == want {
                    return f;
                }
                figures.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{want} subscriptions at the focus"))
    };
    wait_subs(c.figures.clone(), 12).await;

    // p0 wants p1 only: p2's two tracks stop at the focus.
    let t = std::time::Instant::now();
    c.parts[0]
        .commander
        .send(Command::FocusSubscriptions(Some(vec![
            c.devices[1].clone(),
        ])));
    let f = wait_subs(c.figures.clone(), 10).await;
    let off = f
        .last_subscription_change
        .expect("a change")
        .duration_since(t);
    // p2 again: back to 12.
    let t = std::time::Instant::now();
    c.parts[0].commander.send(Command::FocusSubscriptions(None));
    let f = wait_subs(c.figures.clone(), 12).await;
    let on = f
        .last_subscription_change
        .expect("a change")
        .duration_since(t);
    eprintln!(
        "FIGURE through_focus: a subscription change applied at the focus {} ms (unsubscribe) and {} ms (subscribe) after the client asked",
        off.as_millis(),
        on.as_millis()
    );
    assert!(
        off < Duration::from_secs(1) && on < Duration::from_secs(1),
        "{off:?} / {on:?}"
    );
    // And p2's video reaches p0 again.
    let since = Instant::now();
    let p2 = c.devices[2].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.h.log.pump();
        if rust_frames(&c.h.log.seen, since, 0, &p2, TrackKind::Video, None) >= 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "p2's video did not come back to p0"
        );
        c.h.log.run_for(Duration::from_millis(250)).await;
    }
    c.finish().await;
}
