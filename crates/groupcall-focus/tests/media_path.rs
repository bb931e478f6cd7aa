//! The media path at the focus, with one client's network damaged by the
//! test-only media fault layer (`JoinOptions::media_faults`: loss, an
//! incoming rate cap, a black hole on that client's media UDP), on a real
//! Synapse, on loopback:
//! - NACKs from lossy subscribers are answered (resends counted at the
//!   focus) and their video keeps coming;
//! - PLIs from many subscribers reach the publisher coalesced;
//! - a new video subscription's first key frame reaches the subscriber's
//!   peer within 1 s (timed at the focus);
//! - a throttled subscriber does not slow the others down, and the focus
//!   stops its video so that its audio comes through;
//! - a black-holed client is dropped by the focus, and gives the focus up,
//!   on the ping timeouts, and returns when its network does.
//!
//! Run one at a time: `cargo test -p groupcall-focus --test media_path
//! <name> -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::time::Duration;

use groupcall::client::JoinOptions;
use groupcall::faults::{MediaFaultOptions, MediaFaults};
use groupcall::matrix::MatrixSession;
use groupcall::media::TrackKind;
use groupcall::proto::{
    CallEvent, Command, Config as CoreConfig, CreateOptions, DeviceKey, FocusRef, PeerStatus,
};
use groupcall_focus::driver::FocusHandle;
use groupcall_focus::engine::EngineFigures;
use groupcall_focus::forward::Counters;
use groupcall_testkit::*;
use tokio::time::Instant;

mod common;
use common::{RunningFocus, http_get, metric};

/// How to set a call up.
#[derive(Default)]
struct Setup {
    /// Participants.
    n: usize,
    /// Appended to focus.toml.
    focus_toml: &'static str,
    /// The clients' `focus_ping_timeout_ms`, if not the default.
    client_ping_timeout_ms: Option<u64>,
    /// Participants that record what they receive.
    record: Vec<usize>,
    /// Participants with video retransmission (NACK/RTX) off
    /// (`JoinOptions::retransmission`).
    no_retransmission: Vec<usize>,
    /// Participants that join only when [`FocusCall::join_late`] is
    /// called (the last ones).
    late: usize,
}

/// A call of groupcall participants through an in-process focus, each
/// with a media fault layer (inactive until the test sets it).
struct FocusCall {
    h: Harness,
    figures: tokio::sync::watch::Receiver<EngineFigures>,
    room: String,
    focus: FocusHandle,
    focus_dev: DeviceKey,
    focus_ref: FocusRef,
    names: Vec<String>,
    devices: Vec<DeviceKey>,
    parts: Vec<Participant>,
    /// Each participant's media fault layer.
    faults: Vec<MediaFaults>,
    /// Sessions of the late joiners, not joined yet.
    waiting: Vec<(usize, MatrixSession)>,
    setup: Setup,
    t0: Instant,
}

impl FocusCall {
    async fn start(setup: Setup) -> FocusCall {
        let h = Harness::new().await;
        let n = setup.n;
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
        let RunningFocus {
            handle: focus,
            focus_ref,
            device: focus_dev,
            room,
            figures,
            ..
        } = RunningFocus::start_with(&h, &sessions[0], setup.focus_toml).await;
        let faults: Vec<MediaFaults> = (0..n)
            .map(|i| MediaFaults::new(MediaFaultOptions::new(0x5eed + i as u64)))
            .collect();
        let mut c = FocusCall {
            h,
            figures,
            room,
            focus,
            focus_dev,
            focus_ref,
            names,
            devices,
            parts: Vec::new(),
            faults,
            waiting: Vec::new(),
            setup,
            t0: Instant::now(),
        };
        let late_from = n - c.setup.late;
        for (i, s) in sessions.into_iter().enumerate() {
            if i >= late_from {
                c.waiting.push((i, s));
            } else {
                c.join(i, s).await;
            }
        }
        c
    }

    async fn join(&mut self, i: usize, s: MatrixSession) {
        let mut o = JoinOptions::new(self.room.clone());
        o.create = (i == 0).then(CreateOptions::default);
        o.focus = Some(self.focus_ref.clone());
        o.media_faults = Some(self.faults[i].clone());
        o.retransmission = !self.setup.no_retransmission.contains(&i);
        if let Some(ms) = self.setup.client_ping_timeout_ms {
            let mut core = CoreConfig::new("", "");
            core.focus_ping_timeout_ms = ms;
            o.core = Some(core);
        }
        if self.setup.record.contains(&i) {
            o.record_dir = Some(self.h.tmp.path().join(format!("rec-{}", self.names[i])));
        }
        let (_, p) = self.h.join_rust(&self.names[i], s, o).await;
        self.parts.push(p);
        if i == 0 {
            self.h
                .log
                .wait_for("the creator to join", 30, |s| {
                    s.iter().any(|e| {
                        e.who == 0
                            && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
                    })
                })
                .await;
        }
    }

    /// Joins the participants held back by `Setup::late`.
    async fn join_late(&mut self) {
        for (i, s) in std::mem::take(&mut self.waiting) {
            self.join(i, s).await;
        }
    }

    /// Audio and video from everyone (joined) to everyone, since `since`.
    async fn wait_media(&mut self, since: Instant, secs: u64) {
        let n = self.parts.len();
        let devices = self.devices.clone();
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.h.log.pump();
            let seen = &self.h.log.seen;
            let mut missing = Vec::new();
            for at in 0..n {
                for from in (0..n).filter(|f| *f != at) {
                    let a = rust_frames(seen, since, at, &devices[from], TrackKind::Audio, None);
                    let v = rust_frames(seen, since, at, &devices[from], TrackKind::Video, None);
                    if a < 50 || v < 20 {
                        missing.push(format!("p{at}<-p{from} (audio {a}, video {v})"));
                    }
                }
            }
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "media through the focus: missing {}\n{}",
                missing.join(", "),
                self.h.log.dump(80)
            );
            self.h.log.run_for(Duration::from_millis(250)).await;
        }
    }

    /// Frames of `kind` `at` received from `from` during `[since, now]`.
    fn frames(&mut self, since: Instant, at: usize, from: usize, kind: TrackKind) -> u64 {
        self.h.log.pump();
        rust_frames(&self.h.log.seen, since, at, &self.devices[from], kind, None)
    }

    /// The figures as the engine published them last.
    fn figures(&self) -> EngineFigures {
        self.figures.borrow().clone()
    }

    /// The forwarder's counters of the (only) call, as last published.
    fn counters(&self) -> Counters {
        call_counters(&self.figures())
    }

    async fn finish(self) {
        self.finish_with(|_| {}).await;
    }

    /// Ends the call; `check(h)` runs after everyone left (recordings are
    /// complete then).
    async fn finish_with(mut self, check: impl FnOnce(&mut Harness)) {
        for p in &self.parts {
            p.commander.send(Command::Leave);
        }
        for p in std::mem::take(&mut self.parts) {
            p.done.await.unwrap();
        }
        check(&mut self.h);
        self.focus.shutdown();
        self.focus.wait().await.unwrap();
        self.h.shutdown().await;
    }
}

/// The forwarder's counters of the first call in `f`.
fn call_counters(f: &EngineFigures) -> Counters {
    f.calls.first().map(|f| f.counters).unwrap_or_default()
}

/// Keyframe requests between two readings of the counters: (received from
/// subscribers, sent to publishers, folded).
fn keyframe_requests(k0: &Counters, k: &Counters) -> (u64, u64, u64) {
    (
        k.keyframe_requests_received - k0.keyframe_requests_received,
        k.keyframe_requests_sent - k0.keyframe_requests_sent,
        k.keyframe_requests_coalesced - k0.keyframe_requests_coalesced,
    )
}

/// Three subscribers lose 15 % of what reaches them: they NACK, the focus
/// re-sends (counted at the focus), and their video keeps coming nearly as
/// often as a clean subscriber's, where a fourth with the same loss and
/// retransmission off gets fewer frames; what a lossy subscriber recorded
/// decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lossy_subscribers_are_repaired_by_resends() {
    const N: usize = 5;
    const LOSS: f64 = 0.15;
    // p4: the control, lossy too, with retransmission off.
    const CONTROL: usize = 4;
    let mut c = FocusCall::start(Setup {
        n: N,
        record: vec![1],
        no_retransmission: vec![CONTROL],
        ..Setup::default()
    })
    .await;
    let t0 = c.t0;
    c.wait_media(t0, 90).await;
    let before = c.figures();
    let k0 = call_counters(&before);

    // p1..p4 lose 15 % of their incoming datagrams; p0 does not.
    for i in 1..N {
        c.faults[i].set_loss_in(LOSS);
    }
    let t_loss = Instant::now();
    c.h.log.run_for(Duration::from_secs(12)).await;
    // Let the last stats reach the figures.
    c.h.log.run_for(Duration::from_millis(1500)).await;
    let after = c.figures();
    let secs = t_loss.elapsed().as_secs_f64();

    // Video p0 -> p1 (lossy) vs p1 -> p0 (clean) and p2 -> p0: frames
    // received over the same window.
    let clean = c.frames(t_loss, 0, 1, TrackKind::Video);
    let lossy: Vec<u64> = (1..CONTROL)
        .map(|at| c.frames(t_loss, at, 0, TrackKind::Video))
        .collect();
    let control = c.frames(t_loss, CONTROL, 0, TrackKind::Video);
    let lost: Vec<u64> = (1..N).map(|i| c.faults[i].counts().in_lost).collect();
    let k = call_counters(&after);
    let nacks = after.nacks_received - before.nacks_received;
    let resends = after.nack_resends - before.nack_resends;
    let (kf_in, kf_out, kf_folded) = keyframe_requests(&k0, &k);
    eprintln!(
        "FIGURE media_path: {:.0} % incoming loss on 4 of {N} subscribers for {secs:.1} s: datagrams lost {lost:?}; at the focus {nacks} NACK messages received, {resends} packets re-sent; video frames from p0 at the lossy p1..p3 {lossy:?}, at the lossy p4 without retransmission {control}, p1's at the clean p0 {clean}",
        LOSS * 100.0
    );
    eprintln!(
        "FIGURE media_path: keyframe requests from subscribers {kf_in}, sent to publishers {kf_out}, folded {kf_folded} (forwarder NACK cache: received {}, served {})",
        k.nacks_received - k0.nacks_received,
        k.nacks_served - k0.nacks_served
    );
    assert!(lost.iter().all(|l| *l > 100), "loss applied: {lost:?}");
    assert!(nacks > 0, "NACKs received at the focus");
    assert!(resends > 0, "packets re-sent by the focus");
    for (i, v) in lossy.iter().enumerate() {
        assert!(
            *v * 10 >= clean * 8,
            "p{} received {v} video frames from p0, the clean p0 {clean} from p1",
            i + 1
        );
    }
    // Without the resends, the same loss costs frames (at least 8 % fewer
    // than the lossy subscribers' mean; 16-20 % in three runs).
    let mean = lossy.iter().sum::<u64>() as f64 / lossy.len() as f64;
    assert!(
        (control as f64) < mean * 0.92,
        "p4 (no retransmission) {control} vs {lossy:?}"
    );
    // The metrics say the same.
    let addr = c.focus.http_addr().expect("the focus's HTTP endpoint");
    let m = http_get(addr, "/metrics").await;
    assert!(
        metric(&m, "groupcall_focus_nacks_received_total") >= after.nacks_received,
        "{m}"
    );
    assert!(
        metric(&m, "groupcall_focus_nacks_served_total") >= after.nack_resends,
        "{m}"
    );
    assert!(
        metric(&m, "groupcall_focus_keyframe_requests_received_total") > 0,
        "{m}"
    );

    // The lossy decoders asked for key frames now and then (each on its
    // own: independent losses do not make requests coincide, so few are
    // folded; the next test makes them coincide).
    assert!(kf_in > 0, "keyframe requests from subscribers");
    assert!(kf_out >= 1, "a keyframe request reached a publisher");

    for i in 1..N {
        c.faults[i].set_loss_in(0.0);
    }
    let p0 = c.names[0].clone();
    c.finish_with(|h| {
        // What the lossy p1 recorded of p0's video decodes without an
        // error.
        h.log.pump();
        let ivf = h
            .log
            .seen
            .iter()
            .find_map(|e| match &e.ev {
                Ev::Rust(groupcall::client::ClientEvent::Recorded { path })
                    if e.who == 1
                        && path.extension().is_some_and(|x| x == "ivf")
                        && path
                            .file_name()
                            .is_some_and(|f| f.to_string_lossy().contains(&format!("_{p0}_"))) =>
                {
                    Some(path.clone())
                }
                _ => None,
            })
            .expect("p1's recording of p0's video");
        let frames = assert_decodes(&ivf, 100);
        eprintln!(
            "FIGURE media_path: the lossy p1's recording of p0's video decodes with ffmpeg without an error: {frames} frames"
        );
    })
    .await;
}

/// Participants joining a running call: each new video subscription's
/// first key frame reaches the subscriber's peer within 1 s of the
/// subscription starting at the forwarder; then everyone resubscribes at
/// once: again within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_subscriber_gets_its_first_keyframe_within_a_second() {
    let mut c = FocusCall::start(Setup {
        n: 4,
        late: 2,
        ..Setup::default()
    })
    .await;
    let t0 = c.t0;
    c.wait_media(t0, 90).await;
    c.join_late().await;
    c.wait_media(Instant::now(), 90).await;
    let f = c.figures();
    eprintln!(
        "FIGURE media_path: first key frame to a new video subscriber (2 joined late, 4 in the call): {} waits, longest {:?}, latest {:?}, {} still waiting",
        f.keyframe_waits.len(),
        f.keyframe_wait_max,
        f.keyframe_waits,
        f.keyframe_waits_pending
    );
    // 4 participants, each subscribed to 3 video tracks.
    assert!(f.keyframe_waits.len() >= 12, "{:?}", f.keyframe_waits);

    // Everyone drops and takes back everyone else's media.
    let done_before = f.keyframe_waits.len();
    let k0 = call_counters(&f);
    for p in &c.parts {
        p.commander
            .send(Command::FocusSubscriptions(Some(Vec::new())));
    }
    c.h.log.run_for(Duration::from_secs(2)).await;
    for p in &c.parts {
        p.commander.send(Command::FocusSubscriptions(None));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let f = loop {
        let f = c.figures();
        if f.keyframe_waits.len() >= (done_before + 12).min(64) && f.keyframe_waits_pending == 0 {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "resubscriptions' first key frames: {:?}, {} pending",
            f.keyframe_waits,
            f.keyframe_waits_pending
        );
        c.h.log.run_for(Duration::from_millis(250)).await;
    };
    let max = f.keyframe_wait_max.expect("waits");
    eprintln!(
        "FIGURE media_path: after everyone resubscribed at once: {} waits in all, longest {} ms, latest {:?}",
        f.keyframe_waits.len(),
        max.as_millis(),
        &f.keyframe_waits[f.keyframe_waits.len().saturating_sub(12)..]
    );
    assert!(
        max < Duration::from_secs(1),
        "longest first-keyframe wait {max:?}"
    );
    c.wait_media(Instant::now(), 30).await;
    let (kf_in, kf_out, kf_folded) = keyframe_requests(&k0, &c.counters());
    // The resubscriptions' own keyframe requests (one per new video
    // subscription) were folded per track too.
    eprintln!(
        "FIGURE media_path: everyone resubscribed at once (4 video tracks, 3 subscribers each): keyframe requests from subscribers {kf_in}, sent to publishers {kf_out}, folded {kf_folded} (the new subscriptions' own requests included)"
    );
    assert!(kf_out >= 1, "a keyframe request reached a publisher");
    c.finish().await;
}

/// The publisher p0 loses 5 % of what it sends, with retransmission off
/// (so the focus cannot repair its stream): every gap reaches all three
/// subscribers alike, their decoders ask for a key frame at about the same
/// moment, and fewer requests reach p0 than the subscribers sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plis_from_many_subscribers_reach_the_publisher_coalesced() {
    const N: usize = 4;
    let mut c = FocusCall::start(Setup {
        n: N,
        no_retransmission: vec![0],
        ..Setup::default()
    })
    .await;
    let t0 = c.t0;
    c.wait_media(t0, 90).await;
    let k0 = c.counters();
    c.faults[0].set_loss_out(0.05);
    let t = Instant::now();
    c.h.log.run_for(Duration::from_secs(10)).await;
    c.faults[0].set_loss_out(0.0);
    c.h.log.run_for(Duration::from_millis(600)).await;
    let (kf_in, kf_out, kf_folded) = keyframe_requests(&k0, &c.counters());
    let lost = c.faults[0].counts().out_lost;
    let video: Vec<u64> = (1..N)
        .map(|at| c.frames(t, at, 0, TrackKind::Video))
        .collect();
    eprintln!(
        "FIGURE media_path: p0 lost {lost} of its outgoing datagrams over {:.1} s: keyframe requests from subscribers {kf_in}, sent to publishers {kf_out}, folded {kf_folded}; video frames from p0 at p1..p3 {video:?}",
        t.elapsed().as_secs_f64()
    );
    assert!(lost > 0);
    assert!(kf_in >= 3, "the subscribers asked: {kf_in}");
    assert!(kf_out >= 1, "a keyframe request reached the publisher");
    assert!(
        kf_out < kf_in,
        "coalesced: {kf_out} sent for {kf_in} received"
    );
    c.finish().await;
}

/// One subscriber's incoming rate capped at 250 kbit/s (what exceeds it
/// dropped, as a congested link would; the three others' audio needs about
/// 160 kbit/s with its headers, their video about 850): the others' video
/// and audio keep their rates; the focus, told of the loss by the slow one's receiver
/// reports, stops its video, and its audio comes through again; when the
/// cap goes, its video comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_subscriber_does_not_slow_the_others() {
    const N: usize = 4;
    const CAP_KBPS: u32 = 250;
    let mut c = FocusCall::start(Setup {
        n: N,
        ..Setup::default()
    })
    .await;
    let t0 = c.t0;
    c.wait_media(t0, 90).await;
    let window = Duration::from_secs(8);
    // (video, audio) frames per second at p1, p2, p3 from p0.
    let rates = |c: &mut FocusCall, since: Instant| -> Vec<(f64, f64)> {
        let s = since.elapsed().as_secs_f64();
        (1..N)
            .map(|at| {
                (
                    c.frames(since, at, 0, TrackKind::Video) as f64 / s,
                    c.frames(since, at, 0, TrackKind::Audio) as f64 / s,
                )
            })
            .collect()
    };
    let t_before = Instant::now();
    c.h.log.run_for(window).await;
    let before = rates(&mut c, t_before);
    let k0 = c.counters();

    // p3's link: 250 kbit/s in.
    c.faults[3].set_rate_in_kbps(Some(CAP_KBPS));
    let t_slow = Instant::now();
    c.h.log.run_for(window).await;
    let during = rates(&mut c, t_slow);
    let over = c.faults[3].counts().in_over_rate;
    eprintln!(
        "FIGURE media_path: p3 capped at {CAP_KBPS} kbit/s in ({over} datagrams over the cap dropped): (video, audio) frames/s from p0 at p1, p2, p3 before {before:?}, in the first {} s of the cap {during:?}",
        window.as_secs()
    );
    assert!(over > 0, "the cap dropped something");
    for i in 0..2 {
        assert!(
            during[i].0 >= before[i].0 * 0.9 && during[i].1 >= before[i].1 * 0.9,
            "p{} from p0: {:?} before, {:?} during",
            i + 1,
            before[i],
            during[i]
        );
    }
    // The focus noticed and stopped p3's video.
    let f = c.figures();
    let k = call_counters(&f);
    let dropped = k.drops.congestion_video - k0.drops.congestion_video;
    eprintln!(
        "FIGURE media_path: the focus stopped p3's video {} time(s) ({} video packets not sent to it), {} subscriber(s) stopped now",
        f.congestion_episodes, dropped, f.congested_subscribers
    );
    assert!(f.congestion_episodes >= 1, "the focus stopped p3's video");
    assert!(dropped > 0);
    // Counted in /metrics (published every 500 ms: wait for it).
    let addr = c.focus.http_addr().expect("the focus's HTTP endpoint");
    c.h.log.run_for(Duration::from_millis(1200)).await;
    let m = http_get(addr, "/metrics").await;
    assert!(
        metric(
            &m,
            "groupcall_focus_drops_total{reason=\"congestion_video\"}"
        ) > 0,
        "{m}"
    );
    // Its audio comes through again while its video is stopped (the
    // focus tries video again after 4 s, then 8 s...: measured over the
    // next stretch, those tries included).
    let t_calm = Instant::now();
    c.h.log.run_for(window).await;
    let calm = rates(&mut c, t_calm);
    eprintln!(
        "FIGURE media_path: (video, audio) frames/s from p0 at p1, p2, p3 in the next {} s {calm:?}",
        window.as_secs()
    );
    for i in 0..2 {
        assert!(
            calm[i].0 >= before[i].0 * 0.9 && calm[i].1 >= before[i].1 * 0.9,
            "p{}: {:?} before, {:?} later",
            i + 1,
            before[i],
            calm[i]
        );
    }
    assert!(
        calm[2].1 >= before[2].1 * 0.8,
        "p3's audio: {:?} before, {:?} later",
        before[2],
        calm[2]
    );

    // The cap goes: p3's video comes back.
    c.faults[3].set_rate_in_kbps(None);
    let t_free = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if c.frames(t_free, 3, 0, TrackKind::Video) >= 30 {
            break;
        }
        assert!(Instant::now() < deadline, "p3's video did not come back");
        c.h.log.run_for(Duration::from_millis(250)).await;
    }
    eprintln!(
        "FIGURE media_path: cap lifted: p3 received 30 video frames from p0 {:.1} s later",
        t_free.elapsed().as_secs_f64()
    );
    c.finish().await;
}

/// A client's media path black-holed mid-call, with short ping intervals:
/// the focus drops it for a ping timeout and it gives the focus up for a
/// ping timeout, both within the timeout plus a margin and before ICE
/// would call the connection failed; when its network comes back, it
/// returns to the focus.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_black_holed_client_times_out_on_both_sides_and_comes_back() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    const MARGIN: Duration = Duration::from_millis(1500);
    let mut c = FocusCall::start(Setup {
        n: 3,
        focus_toml: "\n[heartbeat]\nping_interval = \"1s\"\nping_timeout = \"3s\"\n",
        client_ping_timeout_ms: Some(TIMEOUT.as_millis() as u64),
        ..Setup::default()
    })
    .await;
    let t0 = c.t0;
    c.wait_media(t0, 90).await;
    // Expected here: p2's call with the focus ends for the timeout.
    c.h.allow_anomaly("focus_ping_timeout");
    c.h.allow_anomaly("ping_timeout");
    c.h.allow_anomaly("no ping from the focus");

    let t_hole = Instant::now();
    c.faults[2].set_blackhole(true);
    let focus_dev = c.focus_dev.clone();
    // The client's side.
    let deadline = Instant::now() + Duration::from_secs(20);
    let client_gone = loop {
        c.h.log.pump();
        let found = c.h.log.seen.iter().find_map(|e| match e.call() {
            Some(CallEvent::PeerState {
                device,
                status: PeerStatus::Closed(r) | PeerStatus::Failed(r),
                ..
            }) if e.who == 2 && e.t >= t_hole && *device == focus_dev => Some((e.t, r.clone())),
            _ => None,
        });
        if let Some(x) = found {
            break x;
        }
        assert!(
            Instant::now() < deadline,
            "p2 never gave the focus up\n{}",
            c.h.log.dump(60)
        );
        c.h.log.run_for(Duration::from_millis(100)).await;
    };
    // The focus's side.
    let deadline = Instant::now() + Duration::from_secs(20);
    let focus_gone = loop {
        let f = c.figures();
        if let Some(n) = f.departures.get("ping_timeout")
            && *n >= 1
        {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the focus never dropped p2: {:?}",
            f.departures
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let client_after = client_gone.0.duration_since(t_hole);
    // The figures are published every 500 ms: the focus's time is at most
    // that late.
    let focus_after = focus_gone.duration_since(t_hole);
    let f = c.figures();
    eprintln!(
        "FIGURE media_path: p2 black-holed (ping interval 1 s, timeouts 3 s): it gave the focus up after {} ms ({}), the focus dropped it after at most {} ms (departures {:?})",
        client_after.as_millis(),
        client_gone.1,
        focus_after.as_millis(),
        f.departures
    );
    assert_eq!(client_gone.1, "focus_ping_timeout");
    // The timeout runs from the last ping heard (pings every second).
    let earliest = TIMEOUT - Duration::from_millis(1100);
    assert!(
        client_after >= earliest && client_after <= TIMEOUT + MARGIN,
        "{client_after:?}"
    );
    assert!(focus_after >= earliest, "{focus_after:?}");
    assert!(
        focus_after <= TIMEOUT + MARGIN + Duration::from_millis(500),
        "{focus_after:?}"
    );
    // ICE (5 s of silence to Disconnected, 15 s to Failed) had not
    // noticed: no failure reported by p2 before its timeout.
    c.h.log.pump();
    let failed_first = c.h.log.seen.iter().any(|e| {
        e.who == 2
            && e.t >= t_hole
            && e.t < client_gone.0
            && matches!(e.call(), Some(CallEvent::PeerState { device, status: PeerStatus::Reconnecting | PeerStatus::Failed(_), .. }) if *device == focus_dev)
    });
    assert!(!failed_first, "ICE noticed first\n{}", c.h.log.dump(40));

    // The network comes back: p2 returns to the focus, and media flows.
    let t_back = Instant::now();
    c.faults[2].set_blackhole(false);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        c.h.log.pump();
        if rust_connected(&c.h.log.seen, t_back, 2, &focus_dev) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "p2 not back at the focus\n{}",
            c.h.log.dump(60)
        );
        c.h.log.run_for(Duration::from_millis(250)).await;
    }
    eprintln!(
        "FIGURE media_path: network back: p2 connected to the focus again {:.1} s later",
        t_back.elapsed().as_secs_f64()
    );
    c.wait_media(Instant::now(), 60).await;
    c.finish().await;
}
