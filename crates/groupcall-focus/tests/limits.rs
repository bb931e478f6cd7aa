//! The focus's limits against a real Synapse: a call that is full at the
//! focus turns the next client down (`focus_full`); that client names no
//! active focus and meets the others in the mesh, who stay at the focus
//! with each other; every pair has media both ways. When a place frees up,
//! its retries (on a backoff) bring it to the focus, and its mesh calls end.
//!
//! Run with `cargo test -p groupcall-focus --test limits -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::time::Duration;

use groupcall::client::ClientEvent;
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, Command, PeerStatus};
use groupcall_testkit::*;
use tokio::time::Instant;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_focus_turns_the_next_client_to_the_mesh_until_a_place_frees_up() {
    let mut h = Harness::new().await;
    for name in ["p0", "p1", "p2"] {
        h.register(name).await;
    }
    let s0 = h.login("p0").await;
    let focus =
        RunningFocus::start_with(&h, &s0, "[limits]\nmax_participants_per_call = 2\n").await;
    let s1 = h.login("p1").await;
    let s2 = h.login("p2").await;
    let t0 = Instant::now();
    h.allow_anomaly("focus_full");
    let (members, mut parts) = join_through_focus(
        &mut h,
        &focus,
        vec![("p0", s0), ("p1", s1), ("p2", s2)],
        |_| None,
    )
    .await;
    wait_media(&mut h, t0, &members, 50, 20, 90).await;
    eprintln!(
        "FIGURE limits: a focus for 2 and 3 clients: media on every pair {:.1} s after the first join",
        t0.elapsed().as_secs_f64()
    );

    // p0 and p1 through the focus; p2 turned down, in the mesh with both.
    h.log.pump();
    let seen = &h.log.seen;
    let [p0, p1, p2] = [&members[0], &members[1], &members[2]];
    assert!(!rust_connected(seen, t0, p0.idx, &p1.dev), "p0-p1 direct");
    for (a, b) in [(p0, p2), (p1, p2)] {
        assert!(
            rust_connected(seen, t0, a.idx, &b.dev),
            "{}-{} in the mesh",
            a.name,
            b.name
        );
    }
    let turned_down = seen.iter().any(|e| {
        e.who == p2.idx
            && matches!(e.call(), Some(CallEvent::PeerState { device, status: PeerStatus::Closed(r) | PeerStatus::Failed(r), .. })
                if *device == focus.device && r == "focus_full")
    });
    assert!(turned_down, "p2 was turned down with focus_full");
    let addr = focus.handle.http_addr().expect("the focus's HTTP endpoint");
    let m = http_get(addr, "/metrics").await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("groupcall_focus_refusals_total{reason=\"focus_full\"}")),
        "{m}"
    );

    // p1 leaves: p2's next call to the focus is answered; its mesh call
    // with p0 ends and they meet at the focus.
    let t_free = Instant::now();
    let p1_part = parts.remove(1);
    p1_part.commander.send(Command::Leave);
    p1_part.done.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        h.log.pump();
        let seen = &h.log.seen;
        let at_focus = rust_connected(seen, t_free, p2.idx, &focus.device);
        let mesh_ended = seen.iter().any(|e| {
            e.who == p2.idx
                && e.t >= t_free
                && matches!(e.call(), Some(CallEvent::PeerState { device, status: PeerStatus::Closed(r), .. })
                    if *device == p0.dev && r == "focus_back")
        });
        if at_focus && mesh_ended {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "p2 not back at the focus (connected {at_focus}, mesh ended {mesh_ended})\n{}",
            h.log.dump(60)
        );
        h.log.run_for(Duration::from_millis(250)).await;
    }
    eprintln!(
        "FIGURE limits: a place freed up; the turned-down client was at the focus {:.1} s later (retries on a backoff)",
        t_free.elapsed().as_secs_f64()
    );
    let pair = [p0.clone(), p2.clone()];
    let t_media = Instant::now();
    wait_media(&mut h, t_media, &pair, 50, 20, 30).await;
    h.log.pump();
    assert!(
        !rust_connected(&h.log.seen, t_media, p0.idx, &p2.dev),
        "p0-p2 direct again"
    );
    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_upload_limit_reaches_every_publisher_as_a_target_bitrate() {
    let mut h = Harness::new().await;
    for name in ["p0", "p1"] {
        h.register(name).await;
    }
    let s0 = h.login("p0").await;
    let focus =
        RunningFocus::start_with(&h, &s0, "[limits]\nmax_kbps_per_participant = 300\n").await;
    let s1 = h.login("p1").await;
    let t0 = Instant::now();
    let (members, parts) =
        join_through_focus(&mut h, &focus, vec![("p0", s0), ("p1", s1)], |_| None).await;
    wait_media(&mut h, t0, &members, 50, 20, 90).await;
    // The focus tells each publisher its limit (REMB on its one camera
    // track: all of it; repeated every second, reported once).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        h.log.pump();
        let told: Vec<Vec<u64>> = members
            .iter()
            .map(|m| {
                h.log
                    .seen
                    .iter()
                    .filter_map(|e| match &e.ev {
                        Ev::Rust(ClientEvent::TargetBitrate { device, bps })
                            if e.who == m.idx && *device == focus.device =>
                        {
                            Some(*bps)
                        }
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        if told.iter().all(|t| !t.is_empty()) {
            for t in &told {
                assert!(t.iter().all(|b| *b == 300_000), "{told:?}");
            }
            eprintln!(
                "FIGURE limits: the focus's upload limit (300 kbit/s) had reached both publishers as a target bitrate by {:.1} s after the first join",
                t0.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the limit did not reach the publishers: {told:?}"
        );
        h.log.run_for(Duration::from_millis(250)).await;
    }
    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}

/// A publisher that does not slow down for the limit it is told: both
/// clients send the built-in pattern without simulcast (pre-encoded,
/// about 270 kbit/s; REMB cannot slow it), the limit is 150 kbit/s. The
/// focus holds their video back (it is over the share: 150 kbit/s less
/// the audio) and forwards their audio on; the call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publisher_over_the_upload_limit_has_its_video_held_back_and_its_audio_goes_on() {
    let mut h = Harness::new().await;
    for name in ["p0", "p1"] {
        h.register(name).await;
    }
    let s0 = h.login("p0").await;
    let focus =
        RunningFocus::start_with(&h, &s0, "[limits]\nmax_kbps_per_participant = 150\n").await;
    let s1 = h.login("p1").await;
    let t0 = Instant::now();
    let (members, parts) = join_through_focus_with(
        &mut h,
        &focus,
        vec![("p0", s0), ("p1", s1)],
        |_| None,
        |_, o| o.simulcast = None,
    )
    .await;
    // Audio both ways first (video may be held back before it arrives).
    wait_media(&mut h, t0, &members, 50, 0, 90).await;
    let addr = focus.handle.http_addr().expect("the focus's HTTP endpoint");
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        let m = http_get(addr, "/metrics").await;
        if metric_or_0(&m, "groupcall_focus_layers_policed_total") >= 2 {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "both publishers' video not held back:\n{m}"
        );
        h.log.run_for(Duration::from_millis(250)).await;
    };
    eprintln!(
        "FIGURE limits: both publishers' video (about 270 kbit/s) held back against a 150 kbit/s limit {:.1} s after the first join",
        held.duration_since(t0).as_secs_f64()
    );
    // 4 s with the video held back: no video frame either way, the audio
    // all there (20 ms frames: 200 in 4 s). Counted, for each direction and
    // kind, over the 4 reports after its first report that follows the
    // hold plus 500 ms: a report is cumulative over its 1 s interval, so
    // the one that straddles a mark would bring in frames forwarded before
    // the hold.
    h.log.run_for(Duration::from_millis(500)).await;
    let mark = h.log.mark();
    let pairs = [(&members[0], &members[1]), (&members[1], &members[0])];
    let kinds = [TrackKind::Audio, TrackKind::Video];
    let firsts_of = |seen: &[Entry]| -> Option<Vec<[Instant; 2]>> {
        pairs
            .iter()
            .map(|(at, from)| {
                let [a, v] = kinds.map(|k| rust_report_after(seen, mark, at.idx, &from.dev, k));
                Some([a?, v?])
            })
            .collect()
    };
    h.log
        .wait_for("a media report from both receivers", 5, |s| {
            firsts_of(s).is_some()
        })
        .await;
    let firsts = firsts_of(&h.log.seen).expect("waited for");
    let last = firsts.iter().flatten().max().copied().unwrap_or(mark);
    // Each report is due 1 s after the one before; 200 ms spare for the
    // fourth.
    h.log
        .run_for((last + Duration::from_millis(4200)).saturating_duration_since(Instant::now()))
        .await;
    h.log.pump();
    for ((at, from), first) in pairs.iter().zip(&firsts) {
        let [audio, video] = [0, 1].map(|i| {
            let since = first[i] + Duration::from_millis(1);
            rust_frames(&h.log.seen, since, at.idx, &from.dev, kinds[i], None)
        });
        eprintln!(
            "FIGURE limits: {}<-{} in 4 s held back: {audio} audio frames, {video} video frames",
            at.name, from.name
        );
        assert_eq!(video, 0, "{}<-{}: video held back", at.name, from.name);
        assert!(
            audio >= 180,
            "{}<-{}: audio goes on ({audio})",
            at.name,
            from.name
        );
    }
    let m = http_get(addr, "/metrics").await;
    assert!(
        metric_or_0(&m, "groupcall_focus_drops_total{reason=\"over_limit\"}") > 100,
        "{m}"
    );
    assert_eq!(metric_or_0(&m, "groupcall_focus_participants"), 2, "{m}");
    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}
