//! Sending simulcast (issue 12): a peer configured for simulcast sends the
//! built-in pattern's three layers to a peer of this crate over UDP on
//! 127.0.0.1; a remote that refuses simulcast gets one layer; a key frame
//! request names one layer; a capped uplink stops the top layers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use groupcall_media::sink::FrameSink;
use groupcall_media::{
    Frame, IvfRecorder, LocalFeed, MediaPeer, Mid, OggOpusSource, PeerConfig, PeerEvent,
    PeerEvents, Rid, SimulcastConfig, SimulcastSource, SinkError, SinkFilter, TrackKind,
};

const WAIT: Duration = Duration::from_secs(10);

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("groupcall-media");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}-{name}", std::process::id()))
}

/// Every received video frame: when, which layer, key frame or not.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

/// When a frame came, its RID, whether it was a key frame, its RTP time.
type Seen = (Instant, Option<String>, bool, u64);

/// Attaches a sink to the receiver before it answers.
type AddSink = Box<dyn FnOnce(&MediaPeer)>;

impl FrameSink for Log {
    fn write_frame(&mut self, f: &Frame) -> Result<(), SinkError> {
        self.0.lock().unwrap().push((
            Instant::now(),
            f.rid.map(|r| r.to_string()),
            f.keyframe,
            f.rtp_time,
        ));
        Ok(())
    }
    fn finish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

impl Log {
    fn frames(&self, rid: Option<&str>) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r, _, _)| r.as_deref() == rid)
            .count()
    }
    /// Whether a layer has fewer than `n` frames yet; fails the test
    /// after `deadline`.
    fn some_layer_below(&self, n: usize, deadline: Instant) -> bool {
        let counts = ["q", "h", "f"].map(|r| self.frames(Some(r)));
        let below = counts.iter().any(|c| *c < n);
        assert!(!below || Instant::now() < deadline, "layers: {counts:?}");
        below
    }
    fn first_key_after(&self, rid: &str, t: Instant) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(at, r, k, _)| *at > t && *k && r.as_deref() == Some(rid))
            .map(|(at, _, _, _)| *at)
    }
}

/// (width, height) of the first video stream, by ffprobe.
fn ffprobe_size(path: &Path) -> (u32, u32) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.trim().split(',').map(|v| v.parse::<u32>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

async fn until(
    events: &mut PeerEvents,
    what: &str,
    pred: impl Fn(&PeerEvent) -> bool,
) -> PeerEvent {
    groupcall_testkit::media::peer_event_until(events, WAIT, what, pred).await
}

fn sim_config() -> PeerConfig {
    PeerConfig {
        simulcast: Some(SimulcastConfig::default()),
        ..PeerConfig::default()
    }
}

/// Connects a simulcast sender to a plain receiver; `munge` may edit the
/// offer before the receiver sees it. Returns both peers, the sender's
/// events and the answer.
async fn connect(
    munge: impl Fn(&str) -> String,
    sinks: Vec<AddSink>,
) -> (MediaPeer, PeerEvents, MediaPeer, String, String) {
    let (b, _b_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    connect_to(b, munge, sinks).await
}

/// [`connect`] with a receiver made by the caller.
async fn connect_to(
    b: MediaPeer,
    munge: impl Fn(&str) -> String,
    sinks: Vec<AddSink>,
) -> (MediaPeer, PeerEvents, MediaPeer, String, String) {
    let (a, a_ev) = MediaPeer::new(sim_config()).await.unwrap();
    a.set_source("a-audio", OggOpusSource::tone()).unwrap();
    a.set_source("a-video", SimulcastSource::test_pattern().unwrap())
        .unwrap();
    for add in sinks {
        add(&b);
    }
    let offer = a.create_offer(&[LocalFeed::usermedia("a")]).await.unwrap();
    let answer = b
        .accept_offer(&munge(&offer), &[LocalFeed::usermedia("b")])
        .await
        .unwrap();
    a.apply_answer(&answer).await.unwrap();
    (a, a_ev, b, offer, answer)
}

fn video_section(sdp: &str) -> &str {
    let start = sdp.find("m=video").unwrap();
    let rest = &sdp[start..];
    let end = rest[1..].find("\nm=").map(|i| i + 1).unwrap_or(rest.len());
    &rest[..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_layers_decode_at_their_sizes_and_a_pli_names_one_layer() {
    groupcall_testkit::init_tracing("warn");
    let log = Log::default();
    let paths: Vec<PathBuf> = ["q", "h", "f"]
        .iter()
        .map(|r| tmp(&format!("sim-{r}.ivf")))
        .collect();
    let mut sinks: Vec<AddSink> = Vec::new();
    for (rid, path) in ["q", "h", "f"].iter().zip(&paths) {
        let path = path.clone();
        let rid = rid.to_string();
        sinks.push(Box::new(move |b: &MediaPeer| {
            b.add_sink(SinkFilter::layer(rid), IvfRecorder::create(&path).unwrap())
                .unwrap()
        }));
    }
    let l2 = log.clone();
    sinks.push(Box::new(move |b: &MediaPeer| {
        b.add_sink(SinkFilter::kind(TrackKind::Video), l2).unwrap()
    }));
    let (a, mut a_ev, b, offer, answer) = connect(|s| s.to_string(), sinks).await;

    // The offer's camera line: three send layers, lowest first, and the
    // header extensions that carry mid and RID.
    let v = video_section(&offer);
    for line in [
        "a=rid:q send",
        "a=rid:h send",
        "a=rid:f send",
        "a=simulcast:send q;h;f",
        "urn:ietf:params:rtp-hdrext:sdes:mid",
        "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
        "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
    ] {
        assert!(v.contains(line), "offer lacks {line}:\n{v}");
    }
    assert!(
        video_section(&answer).contains("a=simulcast:recv q;h;f"),
        "{answer}"
    );
    let ev = until(&mut a_ev, "layers", |e| {
        matches!(e, PeerEvent::SimulcastLayers { .. })
    })
    .await;
    let PeerEvent::SimulcastLayers {
        sending, paused, ..
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(sending, ["q", "h", "f"]);
    assert!(paused.is_empty());

    // Media flows on every layer.
    let deadline = Instant::now() + WAIT;
    while log.some_layer_below(60, deadline) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(log.frames(None), 0, "frames without a RID");

    // A PLI on the top layer, right after a natural key frame of "q" and
    // "h" (written on the same frames; "h" after "q"): the top layer sends
    // a key frame soon, the others not (their next one is 500 ms away).
    // The first time "f" is in phase with them too, so its key frame can
    // only be the PLI's answer; later rounds find "f" out of phase.
    let mid = {
        let stats = b.stats().await.unwrap();
        let r = stats
            .remote
            .iter()
            .find(|r| r.kind == TrackKind::Video)
            .unwrap()
            .mid
            .clone();
        Mid::from(r.as_str())
    };
    let mut delays = Vec::new();
    for _ in 0..3 {
        let before = Instant::now();
        let deadline = before + Duration::from_secs(2);
        let key = loop {
            if let Some(t) = log.first_key_after("h", before) {
                break t;
            }
            assert!(Instant::now() < deadline, "no key frame on h");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // Every packet of that instant is in.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let asked = Instant::now();
        assert!(asked.duration_since(key) < Duration::from_millis(100));
        b.request_keyframe_on(mid, Some(Rid::from("f")), false)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let got = log.first_key_after("f", asked).expect("a key frame on f");
        let delay = got.duration_since(asked);
        assert!(delay < Duration::from_millis(150), "{delay:?}");
        assert!(
            log.first_key_after("q", asked)
                .is_none_or(|t| t > asked + Duration::from_millis(250))
        );
        assert!(
            log.first_key_after("h", asked)
                .is_none_or(|t| t > asked + Duration::from_millis(250))
        );
        delays.push(delay);
    }
    eprintln!(
        "FIGURE simulcast: a PLI on layer f gave its key frame after {delays:?} (frames every 33 ms)"
    );

    let errors = b.finish_sinks().await.unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let sizes: Vec<(u32, u32)> = paths.iter().map(|p| ffprobe_size(p)).collect();
    assert_eq!(sizes, [(320, 180), (640, 360), (1280, 720)]);
    for p in &paths {
        let n = groupcall_testkit::media::assert_decodes(p, 60);
        eprintln!("FIGURE simulcast: {} decodes, {n} frames", p.display());
        let _ = std::fs::remove_file(p);
    }
    let stats = a.stats().await.unwrap();
    assert_eq!(stats.rtp_write_dropped, 0);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Removes the simulcast lines from an offer: what a remote that does not
/// know simulcast sees.
fn strip_simulcast(sdp: &str) -> String {
    sdp.split("\r\n")
        .filter(|l| !l.starts_with("a=simulcast") && !l.starts_with("a=rid:"))
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_without_simulcast_gets_one_layer() {
    groupcall_testkit::init_tracing("warn");
    let log = Log::default();
    let path = tmp("nosim.ivf");
    let p2 = path.clone();
    let l2 = log.clone();
    let sinks: Vec<AddSink> = vec![
        Box::new(move |b: &MediaPeer| {
            b.add_sink(
                SinkFilter::kind(TrackKind::Video),
                IvfRecorder::create(&p2).unwrap(),
            )
            .unwrap()
        }),
        Box::new(move |b: &MediaPeer| b.add_sink(SinkFilter::kind(TrackKind::Video), l2).unwrap()),
    ];
    let (a, _a_ev, b, _offer, answer) = connect(strip_simulcast, sinks).await;
    assert!(!answer.contains("a=simulcast"), "{answer}");
    let deadline = Instant::now() + WAIT;
    while log.frames(None) < 60 {
        assert!(
            Instant::now() < deadline,
            "only {} frames",
            log.frames(None)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in ["q", "h", "f"] {
        assert_eq!(log.frames(Some(r)), 0, "frames on {r}");
    }
    let errors = b.finish_sinks().await.unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    // The middle layer.
    assert_eq!(ffprobe_size(&path), (640, 360));
    let n = groupcall_testkit::media::assert_decodes(&path, 60);
    eprintln!(
        "FIGURE simulcast: one layer (640x360) to a remote without simulcast, {n} frames decode"
    );
    let _ = std::fs::remove_file(&path);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_uplink_stops_the_top_layers_and_they_resume() {
    groupcall_testkit::init_tracing("warn");
    let log = Log::default();
    let l2 = log.clone();
    let sinks: Vec<AddSink> = vec![Box::new(move |b: &MediaPeer| {
        b.add_sink(SinkFilter::kind(TrackKind::Video), l2).unwrap()
    })];
    let (a, mut a_ev, b, _, _) = connect(|s| s.to_string(), sinks).await;
    let layers = |e: &PeerEvent| match e {
        PeerEvent::SimulcastLayers { sending, .. } => Some(sending.clone()),
        _ => None,
    };
    let first = until(&mut a_ev, "layers", |e| layers(e).is_some()).await;
    assert_eq!(layers(&first).unwrap(), ["q", "h", "f"]);
    // Let every layer's bitrate be measured (1 s windows).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(log.frames(Some("f")) > 30);

    // The receiver asks for at most 400 kbit/s (REMB): only "q" fits
    // (q + h is about 480 kbit/s).
    let capped = Instant::now();
    b.limit_incoming_bitrate(400_000).unwrap();
    let ev = until(&mut a_ev, "a layer drop", |e| layers(e).is_some()).await;
    let drop_after = capped.elapsed();
    let sending = layers(&ev).unwrap();
    // What fits 400 kbit/s by the measured rates: "q" and maybe "h"; never
    // "f" (about 900 kbit/s alone).
    assert!(sending == ["q"] || sending == ["q", "h"], "{ev:?}");
    if let PeerEvent::SimulcastLayers { estimate_bps, .. } = &ev {
        assert_eq!(*estimate_bps, Some(400_000));
    }
    assert!(drop_after >= Duration::from_secs(1), "{drop_after:?}");
    assert!(drop_after < Duration::from_secs(2), "{drop_after:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (f0, h0, q0) = (
        log.frames(Some("f")),
        log.frames(Some("h")),
        log.frames(Some("q")),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(log.frames(Some("f")), f0, "f still arrives");
    if sending.len() == 1 {
        assert_eq!(log.frames(Some("h")), h0, "h still arrives");
    } else {
        assert!(log.frames(Some("h")) >= h0 + 30, "h stopped");
    }
    assert!(log.frames(Some("q")) >= q0 + 30, "q stopped");

    // Lifted: one layer back every 3 s, each from a key frame.
    let lifted = Instant::now();
    b.limit_incoming_bitrate(5_000_000).unwrap();
    let mut back = Vec::new();
    loop {
        let ev = until(&mut a_ev, "a layer resumes", |e| layers(e).is_some()).await;
        let now = layers(&ev).unwrap();
        back.push((now.clone(), lifted.elapsed()));
        if now == ["q", "h", "f"] {
            break;
        }
    }
    let f_back = lifted.elapsed();
    assert!(f_back >= Duration::from_secs(3), "{back:?}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(log.frames(Some("f")) > f0 + 15, "f did not resume");
    let first_f = log
        .0
        .lock()
        .unwrap()
        .iter()
        .find(|(t, r, _, _)| *t > lifted && r.as_deref() == Some("f"))
        .map(|(_, _, k, _)| *k);
    assert_eq!(first_f, Some(true), "f resumed on a delta frame");
    eprintln!(
        "FIGURE simulcast: REMB 400 kbit/s -> sending {sending:?} after {drop_after:?}; 5 Mbit/s -> back {back:?}"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// The uplink through a real bottleneck: the receiver's host drops what
/// exceeds 400 kbit/s (the media fault layer's token bucket); str0m's
/// transport-wide congestion control estimate falls and the governor
/// pauses the top layers; lifted, the estimate (probing towards every
/// layer) grows back and the layers resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twcc_under_a_rate_cap_pauses_the_top_layers_and_they_resume() {
    use groupcall_media::{MediaFaultOptions, MediaFaults, MediaHost};
    groupcall_testkit::init_tracing("warn");
    let faults = MediaFaults::new(MediaFaultOptions::new(7));
    let host =
        MediaHost::spawn_with_faults(&[std::net::Ipv4Addr::LOCALHOST.into()], faults.clone())
            .unwrap();
    let (b, _b_ev) = host.new_peer(PeerConfig::default()).unwrap();
    let log = Log::default();
    let l2 = log.clone();
    let sinks: Vec<AddSink> = vec![Box::new(move |b: &MediaPeer| {
        b.add_sink(SinkFilter::kind(TrackKind::Video), l2).unwrap()
    })];
    let (a, mut a_ev, b, _, _) = connect_to(b, |s| s.to_string(), sinks).await;
    let layers = |e: &PeerEvent| match e {
        PeerEvent::SimulcastLayers {
            sending,
            estimate_bps,
            ..
        } => Some((sending.clone(), *estimate_bps)),
        _ => None,
    };
    let first = until(&mut a_ev, "layers", |e| layers(e).is_some()).await;
    assert_eq!(layers(&first).unwrap().0, ["q", "h", "f"]);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(log.frames(Some("f")) > 60);
    // Uncapped, the estimate kept every layer.
    while let Some(ev) = a_ev.try_recv() {
        if let Some((sending, est)) = layers(&ev) {
            panic!("layers changed before the cap: {sending:?} at {est:?}");
        }
    }

    let capped = Instant::now();
    faults.set_rate_in_kbps(Some(400));
    let ev = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ev = until(&mut a_ev, "a layer drop", |e| layers(e).is_some()).await;
            if !layers(&ev).unwrap().0.contains(&"f".to_string()) {
                return ev;
            }
        }
    })
    .await
    .expect("f paused within 10 s of the cap");
    let drop_after = capped.elapsed();
    let (sending, est) = layers(&ev).unwrap();
    eprintln!(
        "FIGURE simulcast: 400 kbit/s cap -> sending {sending:?} after {drop_after:?}, TWCC estimate {est:?}"
    );
    assert!(est.is_some_and(|e| e < 1_000_000), "{est:?}");
    // Frames of "f" written before the pause still arrive for a while
    // (str0m's pacer drains its queue at the fallen estimate, and frames
    // complete by retransmission): wait for 3 s without one, counted from
    // the pause at the earliest; then none may come.
    let paused_at = Instant::now();
    let last_f = || {
        log.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, r, _, _)| r.as_deref() == Some("f"))
            .map(|(t, _, _, _)| *t)
    };
    loop {
        let quiet_since = last_f().map_or(paused_at, |t| t.max(paused_at));
        if quiet_since.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert!(
            paused_at.elapsed() < Duration::from_secs(15),
            "f keeps coming"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let late: Vec<(Duration, u64)> = log
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, r, _, _)| *t > paused_at && r.as_deref() == Some("f"))
        .map(|(t, _, _, rtp)| (t.duration_since(paused_at), *rtp))
        .collect();
    eprintln!(
        "FIGURE simulcast: frames of f after the pause was reported (arrival, RTP time): {late:?}"
    );
    let f0 = log.frames(Some("f"));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(log.frames(Some("f")), f0, "f still arrives");

    let lifted = Instant::now();
    faults.set_rate_in_kbps(None);
    let mut back = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            let ev = groupcall_testkit::media::peer_event_until(
                &mut a_ev,
                Duration::from_secs(40),
                "a layer resumes",
                |e| layers(e).is_some(),
            )
            .await;
            let (now, est) = layers(&ev).unwrap();
            back.push((now.clone(), est, lifted.elapsed()));
            if now == ["q", "h", "f"] {
                return;
            }
        }
    })
    .await;
    eprintln!("FIGURE simulcast: cap lifted -> {back:?}");
    assert!(r.is_ok(), "f did not resume within 40 s: {back:?}");
    // Its frames arrive again (it starts at its next key frame; what the
    // pacer still holds goes first).
    let resumed = Instant::now();
    while log.frames(Some("f")) <= f0 + 15 {
        assert!(
            resumed.elapsed() < Duration::from_secs(5),
            "f did not resume: {} frames since",
            log.frames(Some("f")) - f0
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "FIGURE simulcast: 15 frames of f arrived {:?} after it resumed",
        resumed.elapsed()
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Pushed layers: the application hands one frame per layer; each goes out
/// under its RID; a PLI for one layer reaches the application as a key
/// frame request naming that RID; a single pushed frame on the simulcast
/// line goes out under the lowest RID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_layers_go_out_under_their_rids_and_a_pli_names_the_layer() {
    use groupcall_media::source::BUILTIN_PATTERN_LAYERS;
    use groupcall_media::{FrameSource, IvfSource};
    groupcall_testkit::init_tracing("warn");
    let log = Log::default();
    let l2 = log.clone();
    let (b, _b_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    b.add_sink(SinkFilter::kind(TrackKind::Video), l2).unwrap();
    let (a, mut a_ev) = MediaPeer::new(sim_config()).await.unwrap();
    let offer = a.create_offer(&[LocalFeed::usermedia("a")]).await.unwrap();
    let answer = b
        .accept_offer(&offer, &[LocalFeed::usermedia("b")])
        .await
        .unwrap();
    a.apply_answer(&answer).await.unwrap();
    let mut sources: Vec<(String, IvfSource)> = BUILTIN_PATTERN_LAYERS
        .iter()
        .map(|(rid, _, _, ivf)| (rid.to_string(), IvfSource::from_bytes(ivf).unwrap()))
        .collect();
    let frame = Duration::from_millis(33);
    let mut push = |n: usize| {
        for _ in 0..n {
            let layers = sources
                .iter_mut()
                .map(|(rid, s)| (rid.clone(), s.next_frame().unwrap().data))
                .collect();
            a.send_layer_frames("a-video", layers, frame).unwrap();
        }
    };
    // Until connected, nothing goes out; push in real time after.
    let deadline = Instant::now() + WAIT;
    while log.some_layer_below(30, deadline) {
        push(1);
        tokio::time::sleep(frame).await;
    }
    let mid = {
        let stats = b.stats().await.unwrap();
        let r = stats
            .remote
            .iter()
            .find(|r| r.kind == TrackKind::Video)
            .unwrap();
        Mid::from(r.mid.as_str())
    };
    b.request_keyframe_on(mid, Some(Rid::from("h")), false)
        .unwrap();
    let ev = until(&mut a_ev, "the key frame request", |e| {
        matches!(e, PeerEvent::KeyframeRequested { .. })
    })
    .await;
    let PeerEvent::KeyframeRequested { track_id, rid, .. } = ev else {
        unreachable!()
    };
    assert_eq!(track_id, "a-video");
    assert_eq!(rid, Some(Rid::from("h")));

    // One frame without layers: under the lowest RID.
    let q0 = log.frames(Some("q"));
    let (h0, f0) = (log.frames(Some("h")), log.frames(Some("f")));
    let mut single = IvfSource::from_bytes(BUILTIN_PATTERN_LAYERS[0].3).unwrap();
    for _ in 0..10 {
        a.send_frame("a-video", single.next_frame().unwrap().data, frame)
            .unwrap();
        tokio::time::sleep(frame).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        log.frames(Some("q")) >= q0 + 8,
        "{} -> {}",
        q0,
        log.frames(Some("q"))
    );
    assert_eq!((log.frames(Some("h")), log.frames(Some("f"))), (h0, f0));
    assert_eq!(log.frames(None), 0);
    a.close().await.unwrap();
    b.close().await.unwrap();
}
