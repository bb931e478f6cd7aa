//! An application that pushes its own video frames (`VideoSource::Push`)
//! through a real focus on a real Synapse: the focus's key-frame requests
//! (for subscribers that need one: a new subscriber, coalesced) reach the
//! application as `ClientEvent::KeyframeRequested` from the focus; the
//! application answers with a key frame, and a participant joining later
//! sees the pushed video.
//!
//! Run with `cargo test -p groupcall-focus --test push -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use groupcall::client::{ClientEvent, JoinOptions, VideoSource, join_call};
use groupcall::media::{FrameSource, IvfSource, TrackKind};
use groupcall::proto::{CallEvent, Command, CreateOptions};
use groupcall_testkit::*;
use tokio::time::Instant;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pushing_application_is_asked_for_key_frames_through_the_focus() {
    let mut h = Harness::new().await;
    for name in ["p0", "p1", "p2"] {
        h.register(name).await;
    }
    let s0 = h.login("p0").await;
    let focus = RunningFocus::start(&h, &s0).await;
    let p0_dev = groupcall::proto::DeviceKey::new(s0.user_id(), s0.device_id());

    // p0 pushes the test pattern itself, frame by frame; a key-frame
    // request makes its next frame a key frame.
    let mut o = JoinOptions::new(focus.room.clone());
    o.create = Some(CreateOptions::default());
    o.focus = Some(focus.focus_ref.clone());
    o.video = VideoSource::Push;
    let mut handle = join_call(s0, o).await.expect("p0 joins");
    let pusher = handle.frame_pusher();
    let commander = handle.commander();
    let wanted = Arc::new(AtomicBool::new(false));
    let honoured = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let push_task = {
        let (wanted, honoured) = (wanted.clone(), honoured.clone());
        tokio::spawn(async move {
            let mut src = IvfSource::test_pattern().unwrap();
            let mut tick = tokio::time::interval(Duration::from_millis(33));
            loop {
                tick.tick().await;
                if wanted.swap(false, Ordering::SeqCst) && src.request_keyframe() {
                    honoured.fetch_add(1, Ordering::SeqCst);
                }
                let Some(f) = src.next_frame() else { break };
                if !pusher.push(TrackKind::Video, f.data, Duration::from_millis(33)) {
                    break;
                }
            }
        })
    };
    let idx0 = h.log.name_next("p0");
    let tx = h.log.sender();
    let events_task = {
        let wanted = wanted.clone();
        tokio::spawn(async move {
            while let Some(ev) = handle.next_event().await {
                if let ClientEvent::KeyframeRequested { .. } = &ev {
                    wanted.store(true, Ordering::SeqCst);
                }
                if tx.send((idx0, Ev::Rust(ev))).is_err() {
                    break;
                }
            }
        })
    };
    h.log
        .wait_for("p0 to join", 30, |s| {
            s.iter().any(|e| {
                e.who == idx0 && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
            })
        })
        .await;

    let mut parts = Vec::new();
    let mut join = async |h: &mut Harness, name: &str| {
        let s = h.login(name).await;
        let mut o = JoinOptions::new(focus.room.clone());
        o.focus = Some(focus.focus_ref.clone());
        let (idx, p) = h.join_rust(name, s, o).await;
        parts.push(p);
        idx
    };
    let idx1 = join(&mut h, "p1").await;
    let t1 = Instant::now();
    let keyframe_asked = |h: &Harness, since: Instant| {
        h.log.seen.iter().find_map(|e| match &e.ev {
            Ev::Rust(ClientEvent::KeyframeRequested { device, .. })
                if e.who == idx0 && e.t >= since && *device == focus.device =>
            {
                Some(e.t)
            }
            _ => None,
        })
    };
    let wait_video = async |h: &mut Harness, idx: usize, since: Instant| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            h.log.pump();
            if rust_frames(&h.log.seen, since, idx, &p0_dev, TrackKind::Video, None) >= 20 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no pushed video at {idx}\n{}",
                h.log.dump(60)
            );
            h.log.run_for(Duration::from_millis(250)).await;
        }
    };
    wait_video(&mut h, idx1, t1).await;
    let asked1 = keyframe_asked(&h, t1).expect("the focus asked p0 for a key frame for p1");

    // p2 joins later: asked again, and it sees the pushed video.
    let idx2 = join(&mut h, "p2").await;
    let t2 = Instant::now();
    wait_video(&mut h, idx2, t2).await;
    let asked2 = keyframe_asked(&h, t2).expect("the focus asked p0 for a key frame for p2");
    eprintln!(
        "FIGURE push: the focus's key-frame requests reached the pushing application {} ms and {} ms after p1 and p2 joined; {} honoured",
        asked1.duration_since(t1).as_millis(),
        asked2.duration_since(t2).as_millis(),
        honoured.load(Ordering::SeqCst)
    );
    assert!(honoured.load(Ordering::SeqCst) >= 2);

    for p in &parts {
        p.commander.send(Command::Leave);
    }
    commander.send(Command::Leave);
    for p in parts {
        p.done.await.unwrap();
    }
    events_task.await.unwrap();
    push_task.abort();
    focus.stop().await;
    h.shutdown().await;
}
