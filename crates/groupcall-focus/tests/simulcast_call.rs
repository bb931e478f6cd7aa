//! Simulcast through the focus on a real Synapse (issue 12): groupcall
//! clients publish three layers to the in-process focus, subscribers ask
//! for a size (`Command::FocusVideoSize`, the width and height of MSC3898
//! `m.call.track_subscription`) and get the layer that covers it; what they
//! received is checked in their recordings, decoded by ffmpeg, sizes read
//! by ffprobe (not by our own counters).
//!
//! Run with `cargo test -p groupcall-focus --test simulcast_call -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::path::PathBuf;
use std::time::Duration;

use groupcall::client::{ClientEvent, JoinOptions};
use groupcall::proto::Command;
use groupcall_testkit::media::{FrameSize, assert_decodes, decoded_frame_sizes};
use groupcall_testkit::*;
use tokio::time::Instant;

mod common;
use common::*;

/// p0 publishes; p1 and p2 receive and record. The focus's settings get
/// `extra`.
async fn start(extra: &str) -> (Harness, RunningFocus, Vec<Member>, Vec<Participant>) {
    let mut h = Harness::new().await;
    for name in ["p0", "p1", "p2"] {
        h.register(name).await;
    }
    let s0 = h.login("p0").await;
    let focus = RunningFocus::start_with(&h, &s0, extra).await;
    let mut clients = vec![("p0", s0)];
    for name in ["p1", "p2"] {
        clients.push((name, h.login(name).await));
    }
    let rec = h.tmp.path().to_owned();
    let (members, parts) = join_through_focus_with(
        &mut h,
        &focus,
        clients,
        |_| None,
        move |i, o: &mut JoinOptions| {
            // Simulcast to the focus (the client's default, set here so
            // that the test does not depend on it).
            o.simulcast = Some(groupcall::media::SimulcastConfig::default());
            if i > 0 {
                o.record_dir = Some(rec.join(format!("rec-p{i}")));
            }
        },
    )
    .await;
    (h, focus, members, parts)
}

/// `at`'s video recording of `from` (complete once `at` left).
fn video_of(h: &mut Harness, at: &Member, from: &Member) -> PathBuf {
    h.log.pump();
    let tag = format!("_{}_", from.name);
    h.log
        .seen
        .iter()
        .find_map(|e| match &e.ev {
            Ev::Rust(ClientEvent::Recorded { path })
                if e.who == at.idx
                    && path.extension().is_some_and(|x| x == "ivf")
                    && path
                        .file_name()
                        .is_some_and(|f| f.to_string_lossy().contains(&tag)) =>
            {
                Some(path.clone())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("{} has no video recording of {}", at.name, from.name))
}

/// The frames of `sizes` at `t >= from` seconds, as (width, height).
fn after(sizes: &[FrameSize], from: f64) -> Vec<(u32, u32)> {
    sizes
        .iter()
        .filter(|f| f.t >= from)
        .map(|f| (f.width, f.height))
        .collect()
}

/// "N x WxH, ..." runs in order.
fn runs(sizes: &[(u32, u32)]) -> Vec<((u32, u32), usize)> {
    let mut runs: Vec<((u32, u32), usize)> = Vec::new();
    for s in sizes {
        match runs.last_mut() {
            Some((last, n)) if last == s => *n += 1,
            _ => runs.push((*s, 1)),
        }
    }
    runs
}

fn ask(p: &Participant, w: u32, h: u32) {
    p.commander.send(Command::FocusVideoSize {
        device: None,
        size: Some((w, h)),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_asking_different_sizes_get_different_layers_at_once() {
    let (mut h, focus, members, parts) = start("").await;
    ask(&parts[1], 320, 180);
    ask(&parts[2], 1280, 720);
    let t0 = Instant::now();
    wait_media(&mut h, t0, &members, 50, 30, 90).await;
    h.log.run_for(Duration::from_secs(6)).await;
    let held = t0.elapsed().as_secs_f64();
    leave_all(parts).await;
    let mut shares = Vec::new();
    for (at, want) in [(1, (320, 180)), (2, (1280, 720))] {
        let file = video_of(&mut h, &members[at], &members[0]);
        assert_decodes(&file, 100);
        let sizes = decoded_frame_sizes(&file);
        // The last 5 s of the recording.
        let end = sizes.last().map_or(0.0, |f| f.t);
        let tail = after(&sizes, end - 5.0);
        let share = tail.iter().filter(|s| **s == want).count() as f64 / tail.len().max(1) as f64;
        assert!(
            tail.len() >= 100 && share >= 0.99,
            "{} asked {want:?}: {:?}",
            members[at].name,
            runs(&tail)
        );
        shares.push(format!(
            "{} asked {}x{}: {:.0} % of its last {} frames at that size ({:?})",
            members[at].name,
            want.0,
            want.1,
            100.0 * share,
            tail.len(),
            runs(&after(&sizes, 0.0))
        ));
    }
    eprintln!(
        "FIGURE simulcast_call: same publisher, same time ({held:.1} s of call): {}",
        shares.join("; ")
    );
    focus.stop().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_forced_switches_decode_cleanly_with_no_inter_frame_before_the_key_frame() {
    let (mut h, focus, members, parts) = start("").await;
    ask(&parts[1], 320, 180);
    let t0 = Instant::now();
    wait_media(&mut h, t0, &members, 50, 30, 90).await;
    // 20 switches, 1 s apart (key frames come every 500 ms, and the focus
    // asks for one at once).
    for i in 0..20 {
        if i % 2 == 0 {
            ask(&parts[1], 1280, 720);
        } else {
            ask(&parts[1], 320, 180);
        }
        h.log.run_for(Duration::from_secs(1)).await;
    }
    h.log.run_for(Duration::from_secs(1)).await;
    let figures = focus.figures.borrow().clone();
    leave_all(parts).await;
    let file = video_of(&mut h, &members[1], &members[0]);
    let frames = assert_decodes(&file, 500);
    let sizes = decoded_frame_sizes(&file);
    let all = after(&sizes, 0.0);
    let changes = runs(&all).len() - 1;
    let t = &figures.totals;
    let lat: Vec<f64> = figures
        .switch_latencies
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    let max_lat = lat.iter().copied().fold(0.0, f64::max);
    // The longest gap between two decoded frames of the recording.
    let gap = sizes
        .windows(2)
        .map(|w| w[1].t - w[0].t)
        .fold(0.0, f64::max);
    eprintln!(
        "FIGURE simulcast_call: 20 forced switches on a real Synapse: {frames} frames decoded by ffmpeg without an error, {changes} size changes in the recording, layer switches at the focus {}, inter frames before the key frame {}, fallbacks {}, switch latency at the focus max {max_lat:.0} ms over {} switches, longest gap between decoded frames {:.0} ms",
        t.layer_switches,
        t.inter_before_keyframe,
        t.layer_switch_fallbacks,
        lat.len(),
        gap * 1000.0
    );
    assert!(changes >= 20, "size changes {changes}: {:?}", runs(&all));
    assert_eq!(t.inter_before_keyframe, 0);
    assert_eq!(t.layer_switch_fallbacks, 0);
    focus.stop().await;
    h.shutdown().await;
}
