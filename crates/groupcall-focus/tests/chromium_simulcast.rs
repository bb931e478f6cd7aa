//! Chromium's own simulcast and VP8 temporal layers through the focus on a
//! real Synapse (issue 12): the MSC3898 client in headless Chromium
//! (`interop/focus-client.mjs --simulcast`, three `sendEncodings` q, h, f
//! of its fake camera; `--scalability L1T3` for temporal layers) publishes
//! to the in-process focus; groupcall clients subscribe asking a size
//! (`Command::FocusVideoSize`) and record what they get. The recordings are
//! judged by ffmpeg and ffprobe (sizes, frame rates, decoding errors), not
//! by our own counters.
//!
//! Run with `cargo test -p groupcall-focus --test chromium_simulcast -- --nocapture`.
//! It needs `interop/node_modules` (`scripts/setup-node`), Chromium,
//! ffmpeg and ffprobe (`scripts/setup-system`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::path::PathBuf;
use std::time::Duration;

use groupcall::client::{ClientEvent, JoinOptions, VideoSource};
use groupcall::media::TrackKind;
use groupcall::proto::Command;
use groupcall_testkit::media::{FrameSize, assert_decodes, decoded_frame_sizes};
use groupcall_testkit::*;
use serde_json::Value;
use tokio::time::Instant;

mod common;
use common::*;

/// The Chromium client's camera (`--camera`): its simulcast layers are a
/// quarter, half and all of it. Chromium sends three layers only from a
/// 960x540 input on (from 640x360 it sends two: q and h, never f).
const CAMERA: (u32, u32) = (1280, 720);
/// `--camera` for [`CAMERA`] at 15 frames per second.
const CAMERA_ARG: &str = "1280x720@15";
/// The camera of the temporal layer tests: half as wide and high (a
/// quarter of the pixels to encode; its top layer, 320x180, needs some
/// 200 kbit/s where 1280x720 needs over 1 Mbit/s more, which Chromium's
/// estimate did not always keep on a loaded machine), so Chromium sends
/// two layers, 160x90 (q) and 320x180 (h).
const SMALL_CAMERA: (u32, u32) = (640, 360);
/// `--camera` for [`SMALL_CAMERA`].
const SMALL_CAMERA_ARG: &str = "640x360@15";

/// A call through the focus: `subscribers` groupcall clients (audio only,
/// recording what they receive; the first creates the call), the Chromium
/// client `chr` publishing with `chr_args`, and with `chs_args` a second
/// Chromium client `chs` (a subscriber: its own video goes to nobody's
/// recording checks). Members: the subscribers in order, then `chr`.
struct Call {
    h: Harness,
    focus: RunningFocus,
    members: Vec<Member>,
    parts: Vec<Participant>,
    chr: Member,
    chs: Option<usize>,
}

async fn start(subscribers: &[&str], chr_args: &[&str], chs_args: Option<&[&str]>) -> Call {
    require_chromium();
    let mut h = Harness::new().await;
    for n in subscribers.iter().chain(&["chr", "chs"]) {
        h.register(n).await;
    }
    let mut clients = Vec::new();
    for n in subscribers {
        clients.push((*n, h.login(n).await));
    }
    let focus = RunningFocus::start(&h, &clients[0].1).await;
    let t_start = Instant::now();
    let room = focus.room.clone();
    let focus_arg = format!("{}/{}", focus.device.user_id, focus.device.device_id);
    let rec = h.tmp.path().to_owned();
    let mut args = vec![
        "--focus",
        &focus_arg,
        "--candidate-ip",
        "127.0.0.1",
        "--media-interval",
        "1000",
    ];
    let mut chs_args_all = args.clone();
    chs_args_all.extend_from_slice(chs_args.unwrap_or_default());
    let mut chs = None;
    let (mut members, parts) = join_through_focus_with(
        &mut h,
        &focus,
        clients,
        |h| {
            chs = chs_args.map(|_| h.spawn_js("chs", "focus-client.mjs", &room, &chs_args_all));
            None
        },
        move |i, o: &mut JoinOptions| {
            // Subscribers only: no video of their own for Chromium to
            // decode (the machine has 2 cores).
            o.video = VideoSource::None;
            o.record_dir = Some(rec.join(format!("rec-{i}")));
        },
    )
    .await;
    if let Some(chs) = chs {
        // Its start (a second browser) takes the CPU for seconds: over
        // before chr publishes, so that chr's bandwidth estimate ramps up
        // undisturbed.
        h.log
            .wait_for("chs's data channel to open", 60, |s| {
                js_saw(s, t_start, chs, "channel_open", |_| true)
            })
            .await;
        h.log.run_for(Duration::from_secs(2)).await;
    }
    args.extend_from_slice(chr_args);
    let idx = h.spawn_js("chr", "focus-client.mjs", &room, &args);
    let chr = Member {
        idx,
        rust: false,
        name: "chr".to_owned(),
        dev: h.js_device(idx).await,
    };
    members.push(chr.clone());
    Call {
        h,
        focus,
        members,
        parts,
        chr,
        chs,
    }
}

fn ask(p: &Participant, w: u32, h: u32) {
    p.commander.send(Command::FocusVideoSize {
        device: None,
        size: Some((w, h)),
    });
}

impl Call {
    /// Waits (up to `secs`) until every subscriber has `video` video frames
    /// of the Chromium client since `since`.
    async fn wait_video(&mut self, since: Instant, video: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.h.log.pump();
            let short: Vec<String> = self
                .members
                .iter()
                .filter(|m| m.rust)
                .filter_map(|m| {
                    let n = rust_frames(
                        &self.h.log.seen,
                        since,
                        m.idx,
                        &self.chr.dev,
                        TrackKind::Video,
                        None,
                    );
                    (n < video).then(|| format!("{} ({n})", m.name))
                })
                .collect();
            if short.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "video of chr missing after {secs} s at {}\nrecent events:\n{}",
                    short.join(", "),
                    self.h.log.dump(60)
                );
            }
            self.h.log.run_for(Duration::from_millis(250)).await;
        }
    }

    /// Chromium client `chr`'s `sent` lines (its outbound-rtp stats), in
    /// order.
    fn sent(&self) -> Vec<Value> {
        self.h
            .log
            .seen
            .iter()
            .filter(|e| e.who == self.chr.idx)
            .filter_map(|e| e.js("sent"))
            .cloned()
            .collect()
    }

    /// Waits (up to `secs`) until `chr` sends its layer `rid` at `width`
    /// (its bandwidth estimate allowing it); returns the estimate, kbit/s,
    /// of each `sent` line until then (one a second).
    async fn wait_top_layer(&mut self, rid: &str, width: u32, secs: u64) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.h.log.pump();
            let sent = self.sent();
            let top = sent.last().is_some_and(|v| {
                let l = &v["video"]["layers"][rid];
                l["width"] == width && l["fps"].as_f64().is_some_and(|x| x >= 10.0)
            });
            let bwe = sent
                .iter()
                .map(|v| v["bwe_bps"].as_f64().map_or(0, |b| (b / 1000.0) as u64))
                .collect();
            if top {
                return bwe;
            }
            if Instant::now() >= deadline {
                panic!(
                    "chr's layer {rid} not sent after {secs} s: estimates {bwe:?} kbit/s; {}",
                    sent.last().map_or("nothing sent".to_owned(), layers_of)
                );
            }
            self.h.log.run_for(Duration::from_millis(250)).await;
        }
    }

    /// The Chromium client's last `sent` line (its outbound-rtp stats).
    fn last_sent(&self) -> Option<Value> {
        self.sent().pop()
    }

    /// The `media` lines of Chromium client `at` about `chr`'s video.
    fn chr_video_at(&self, at: usize) -> Vec<Value> {
        self.h
            .log
            .seen
            .iter()
            .filter(|e| e.who == at)
            .filter_map(|e| e.js("media"))
            .filter(|v| v["kind"] == "video" && about(v, &self.chr.dev))
            .cloned()
            .collect()
    }

    /// `at`'s video recording of the Chromium client (complete once `at`
    /// left).
    fn video_of(&mut self, at: usize) -> PathBuf {
        self.h.log.pump();
        let who = self.members[at].idx;
        self.h
            .log
            .seen
            .iter()
            .find_map(|e| match &e.ev {
                Ev::Rust(ClientEvent::Recorded { path })
                    if e.who == who
                        && path.extension().is_some_and(|x| x == "ivf")
                        && path
                            .file_name()
                            .is_some_and(|f| f.to_string_lossy().contains("_chr_")) =>
                {
                    Some(path.clone())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{} has no video recording of chr", self.members[at].name))
    }

    /// Everyone leaves; the focus and Synapse stop.
    async fn end(mut self) {
        if let Some(chs) = self.chs {
            self.h.quit_js(chs).await;
        }
        self.h.quit_js(self.chr.idx).await;
        self.focus.stop().await;
        self.h.shutdown().await;
    }
}

/// Per layer of a `sent` line: "rid WxH N fps (limitation)".
fn layers_of(sent: &Value) -> String {
    let video = &sent["video"];
    let Some(layers) = video["layers"].as_object() else {
        return format!(
            "one encoding {}x{} {} fps {}",
            video["width"], video["height"], video["fps"], video["scalability"]
        );
    };
    let mut out: Vec<String> = layers
        .iter()
        .map(|(rid, l)| {
            format!(
                "{rid} {}x{} {} fps {} ({}, {} kbit/s target)",
                l["width"],
                l["height"],
                l["fps"],
                l["scalability"],
                l["limitation"],
                l["target_bps"].as_f64().map_or(0.0, |b| b / 1000.0).round()
            )
        })
        .collect();
    out.sort();
    format!(
        "{}; estimate {} kbit/s",
        out.join(", "),
        sent["bwe_bps"].as_f64().map_or(0.0, |b| b / 1000.0).round()
    )
}

/// The frames of `sizes` in the last `secs` seconds of the recording.
fn tail(sizes: &[FrameSize], secs: f64) -> &[FrameSize] {
    let end = sizes.last().map_or(0.0, |f| f.t);
    let from = sizes.partition_point(|f| f.t < end - secs);
    &sizes[from..]
}

/// Frames per second over `frames` (by their presentation times).
fn fps(frames: &[FrameSize]) -> f64 {
    match (frames.first(), frames.last()) {
        (Some(a), Some(b)) if b.t > a.t => (frames.len() - 1) as f64 / (b.t - a.t),
        _ => 0.0,
    }
}

/// The share of `frames` of size `want`.
fn share(frames: &[FrameSize], want: (u32, u32)) -> f64 {
    frames
        .iter()
        .filter(|f| (f.width, f.height) == want)
        .count() as f64
        / frames.len().max(1) as f64
}

/// Runs of frames of one size, in order: (size, frames).
fn size_runs(frames: &[FrameSize]) -> Vec<((u32, u32), usize)> {
    let mut runs: Vec<((u32, u32), usize)> = Vec::new();
    for f in frames {
        match runs.last_mut() {
            Some((s, n)) if *s == (f.width, f.height) => *n += 1,
            _ => runs.push(((f.width, f.height), 1)),
        }
    }
    runs
}

/// "N x WxH" runs in order.
fn runs(frames: &[FrameSize]) -> String {
    size_runs(frames)
        .iter()
        .map(|((w, h), n)| format!("{n} x {w}x{h}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Chromium's three simulcast encodings through the focus: a subscriber
/// asking the smallest layer's size and one asking the camera's get those
/// layers at the same time, read from their recordings by ffprobe (Chromium
/// sends its top layer only once its bandwidth estimate, from the focus's
/// transport-wide congestion control feedback, allows it). Then the first
/// one is switched 10 times between the two sizes: it follows, the focus
/// switching only at key frames of the target layer; both recordings
/// decode without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_simulcast_layers_reach_subscribers_by_requested_size() {
    const SWITCHES: usize = 10;
    let low = (CAMERA.0 / 4, CAMERA.1 / 4);
    let mut c = start(
        &["p1", "p2"],
        &["--simulcast", "--camera", CAMERA_ARG],
        None,
    )
    .await;
    ask(&c.parts[0], low.0, low.1);
    ask(&c.parts[1], CAMERA.0, CAMERA.1);
    let t0 = Instant::now();
    c.wait_video(t0, 30, 60).await;
    let t_video = t0.elapsed();
    let ramp = c.wait_top_layer("f", CAMERA.0, 40).await;
    c.h.log.run_for(Duration::from_secs(5)).await;
    let sent = c.last_sent().expect("chr reports what it sends");
    // p1 alternates, 1 s apart, ending on the low layer.
    for i in 0..SWITCHES {
        let w = if i % 2 == 0 { CAMERA } else { low };
        ask(&c.parts[0], w.0, w.1);
        c.h.log.run_for(Duration::from_secs(1)).await;
    }
    c.h.log.run_for(Duration::from_secs(2)).await;
    let figures = c.focus.figures.borrow().clone();
    leave_all(std::mem::take(&mut c.parts)).await;

    // p2 never changed: the top layer from its first frame of it on (the
    // whole time p1 had the low one and was switched), and in its last 4 s.
    let file = c.video_of(1);
    let p2_frames = assert_decodes(&file, 100);
    let p2 = decoded_frame_sizes(&file);
    let p2_tail = tail(&p2, 4.0);
    let p2_top = p2
        .iter()
        .position(|f| (f.width, f.height) == CAMERA)
        .map_or(&[][..], |i| &p2[i..]);
    assert!(
        p2_tail.len() >= 40
            && share(p2_tail, CAMERA) >= 0.99
            && p2_top.len() >= 200
            && share(p2_top, CAMERA) >= 0.99,
        "p2 asked {CAMERA:?}: {}; chr sends {}",
        runs(&p2),
        layers_of(&sent)
    );
    // p1: the low layer (while p2 had the top one), then every switch.
    let file = c.video_of(0);
    let p1_frames = assert_decodes(&file, 100);
    let p1 = decoded_frame_sizes(&file);
    let p1_runs = size_runs(&p1);
    let first = p1_runs.first().copied().unwrap_or_default();
    assert!(
        first.0 == low && first.1 >= 45,
        "p1 asked {low:?} first: {}; chr sends {}",
        runs(&p1),
        layers_of(&sent)
    );
    assert!(
        p1_runs.len() > SWITCHES && p1_runs.last().is_some_and(|r| r.0 == low),
        "p1 switched {SWITCHES} times: {}",
        runs(&p1)
    );
    let gap = p1.windows(2).map(|w| w[1].t - w[0].t).fold(0.0, f64::max);
    let t = &figures.totals;
    let lats: Vec<u128> = figures
        .switch_latencies
        .iter()
        .map(|d| d.as_millis())
        .collect();
    let lat_max = lats.iter().copied().max().unwrap_or(0);
    eprintln!(
        "FIGURE chromium_simulcast: Chromium simulcast through the focus, video at both subscribers {} ms after they asked; chr's bandwidth estimate each second until it sent its top layer {ramp:?} kbit/s; chr sends {}; p1 asked {}x{} then switched {SWITCHES} times: {p1_frames} frames decoded without error, {}; p2 asked {}x{}: {p2_frames} frames decoded without error, {:.0} % of its last 4 s ({} frames, {:.1} fps) at that size; focus: {} layer switches (latencies {lats:?} ms, max {lat_max} ms; {} deferred to a later key frame because the current layer was mid-frame, {} key frame requests), {} inter frames before the key frame, {} fallbacks; longest gap between p1's decoded frames {:.0} ms",
        t_video.as_millis(),
        layers_of(&sent),
        low.0,
        low.1,
        runs(&p1),
        CAMERA.0,
        CAMERA.1,
        100.0 * share(p2_tail, CAMERA),
        p2_tail.len(),
        fps(p2_tail),
        t.layer_switches,
        t.layer_switches_deferred,
        t.keyframe_requests_sent,
        t.inter_before_keyframe,
        t.layer_switch_fallbacks,
        gap * 1000.0,
    );
    assert_eq!(t.inter_before_keyframe, 0);
    assert_eq!(t.layer_switch_fallbacks, 0);
    c.end().await;
}

/// Chromium's VP8 temporal layers (`--scalability L1T3` on each simulcast
/// encoding: TL0 at a quarter of the frame rate) through the focus: a
/// subscriber asking a thumbnail (half the smallest layer's size) gets
/// that layer's temporal layer 0 only (the forwarder's automatic choice),
/// one asking the smallest layer's size gets all of it, one asking the
/// camera's size the top layer Chromium sends (320x180: from a 640x360
/// camera it never sends the third, which the focus skips); ffprobe counts
/// clearly fewer frames per second in the thumbnail's recording, and every
/// recording decodes without an error. A Chromium subscriber asking the
/// thumbnail too decodes every frame it gets (libwebrtc follows the
/// PictureID / TL0PICIDX chain the focus rewrote around the dropped
/// frames).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_temporal_layers_give_a_thumbnail_fewer_frames_per_second() {
    let low = (SMALL_CAMERA.0 / 4, SMALL_CAMERA.1 / 4);
    let top = (SMALL_CAMERA.0 / 2, SMALL_CAMERA.1 / 2);
    let thumb = (low.0 / 2, low.1 / 2);
    let thumb_arg = format!("{}x{}", thumb.0, thumb.1);
    let mut c = start(
        &["p1", "p2", "p3"],
        &[
            "--simulcast",
            "--scalability",
            "L1T3",
            "--camera",
            SMALL_CAMERA_ARG,
        ],
        Some(&["--want", &thumb_arg, "--camera", "160x90@5"]),
    )
    .await;
    let wants = [thumb, low, SMALL_CAMERA];
    for (p, w) in c.parts.iter().zip(wants) {
        ask(p, w.0, w.1);
    }
    let t0 = Instant::now();
    c.wait_video(t0, 10, 60).await;
    let ramp = c.wait_top_layer("h", top.0, 40).await;
    c.h.log.run_for(Duration::from_secs(7)).await;
    let sent = c.last_sent().expect("chr reports what it sends");
    // chs, a Chromium subscriber asking the thumbnail too: libwebrtc's
    // receiver checks the VP8 PictureID / TL0PICIDX chain that the focus
    // rewrote around the dropped frames. Its last 5 one-second reports.
    let chs = c.chr_video_at(c.chs.unwrap());
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let (chs_first, chs_last) = match chs.len() {
        l if l >= 6 => (&chs[l - 6], &chs[l - 1]),
        l => panic!("chs reported chr's video {l} times: {chs:?}"),
    };
    let chs_fps = (n(chs_last, "frames") - n(chs_first, "frames")) as f64 / 5.0;
    let chs_line = format!(
        "chs (Chromium) asked {}x{}: {}x{} at {chs_fps:.1} fps decoded over its last 5 s, {} frames received, {} decoded, {} dropped, {} freezes, {} PLIs, {} NACKs",
        thumb.0,
        thumb.1,
        chs_last["width"],
        chs_last["height"],
        n(chs_last, "frames_received"),
        n(chs_last, "frames"),
        n(chs_last, "frames_dropped"),
        n(chs_last, "freezes"),
        n(chs_last, "plis"),
        n(chs_last, "nacks"),
    );
    let figures = c.focus.figures.borrow().clone();
    leave_all(std::mem::take(&mut c.parts)).await;
    let mut rates = Vec::new();
    let mut lines = Vec::new();
    for (at, want) in wants.iter().enumerate() {
        let file = c.video_of(at);
        let frames = assert_decodes(&file, 20);
        let sizes = decoded_frame_sizes(&file);
        let last = tail(&sizes, 6.0);
        let rate = fps(last);
        rates.push(rate);
        let (w, h) = last.last().map_or((0, 0), |f| (f.width, f.height));
        lines.push(format!(
            "{} asked {}x{}: {w}x{h} at {rate:.1} fps over the last 6 s, {frames} frames decoded without error",
            c.members[at].name, want.0, want.1
        ));
    }
    eprintln!(
        "FIGURE chromium_simulcast: Chromium VP8 temporal layers (L1T3) through the focus: chr's bandwidth estimate each second until it sent its layer h {ramp:?} kbit/s; chr sends {}; {}; {chs_line}; focus: {} packets of a temporal layer dropped, {} inter frames before the key frame",
        layers_of(&sent),
        lines.join("; "),
        figures.totals.drops.temporal,
        figures.totals.inter_before_keyframe,
    );
    // The thumbnail and the smallest size get the same layer: the
    // thumbnail at most half the frame rate (L1T3's TL0 is a quarter).
    for (at, want) in [(0, low), (1, low), (2, top)] {
        let file = c.video_of(at);
        let sizes = decoded_frame_sizes(&file);
        let last = tail(&sizes, 6.0);
        assert!(
            last.len() >= 10 && share(last, want) >= 0.99,
            "{} asked {:?}, got {}",
            c.members[at].name,
            wants[at],
            runs(last)
        );
    }
    assert!(
        rates[1] >= 10.0 && rates[2] >= 10.0,
        "full frame rates: {rates:?}"
    );
    assert!(
        rates[0] >= 2.0 && rates[0] <= 0.5 * rates[1],
        "the thumbnail gets clearly fewer frames per second: {rates:?}"
    );
    assert!(figures.totals.drops.temporal > 0);
    // Chromium decodes every frame it gets, at the thumbnail's rate.
    assert!(
        chs_last["width"] == low.0 && chs_fps >= 2.0 && chs_fps <= 0.5 * rates[1],
        "{chs_line}"
    );
    assert!(
        n(chs_last, "frames_dropped") == 0
            && n(chs_last, "frames") + 1 >= n(chs_last, "frames_received"),
        "{chs_line}"
    );
    assert_eq!(figures.totals.inter_before_keyframe, 0);
    c.end().await;
}

/// One encoding with VP8 temporal layers (`--scalability L1T3`, no
/// simulcast): a subscriber asking half the size (a thumbnail) should get
/// temporal layer 0 only, as with simulcast.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_one_encoding_with_temporal_layers_gives_a_thumbnail_fewer_frames_per_second() {
    let thumb = (SMALL_CAMERA.0 / 2, SMALL_CAMERA.1 / 2);
    let mut c = start(
        &["p1", "p2"],
        &["--scalability", "L1T3", "--camera", SMALL_CAMERA_ARG],
        None,
    )
    .await;
    ask(&c.parts[0], thumb.0, thumb.1);
    ask(&c.parts[1], SMALL_CAMERA.0, SMALL_CAMERA.1);
    let t0 = Instant::now();
    c.wait_video(t0, 30, 60).await;
    c.h.log.run_for(Duration::from_secs(7)).await;
    let sent = c.last_sent().expect("chr reports what it sends");
    let figures = c.focus.figures.borrow().clone();
    leave_all(std::mem::take(&mut c.parts)).await;
    let mut rates = Vec::new();
    for at in 0..2 {
        let file = c.video_of(at);
        assert_decodes(&file, 20);
        rates.push(fps(tail(&decoded_frame_sizes(&file), 6.0)));
    }
    eprintln!(
        "FIGURE chromium_simulcast: one Chromium encoding with L1T3 through the focus: chr sends {}; p1 asked {}x{}: {:.1} fps, p2 asked {}x{}: {:.1} fps (last 6 s, ffprobe); focus: {} packets of a temporal layer dropped",
        layers_of(&sent),
        thumb.0,
        thumb.1,
        rates[0],
        SMALL_CAMERA.0,
        SMALL_CAMERA.1,
        rates[1],
        figures.totals.drops.temporal,
    );
    assert!(
        rates[1] >= 10.0 && rates[0] >= 2.0 && rates[0] <= 0.5 * rates[1],
        "the thumbnail gets clearly fewer frames per second: {rates:?}"
    );
    c.end().await;
}
