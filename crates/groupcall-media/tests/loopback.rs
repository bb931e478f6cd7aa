//! Two `MediaPeer`s in one process over real UDP on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use groupcall_media::ivf::IvfReader;
use groupcall_media::ogg::OggOpusStream;
use groupcall_media::{
    IvfRecorder, IvfSource, LocalFeed, MediaPeer, OggOpusRecorder, OggOpusSource, PeerConfig,
    PeerEvent, PeerEvents, PeerStats, SinkFilter, TrackKind,
};

const WAIT: Duration = Duration::from_secs(10);

fn init_tracing() {
    groupcall_testkit::init_tracing("warn");
}

/// Event reader that remembers events nobody asked for yet.
struct Watch {
    name: &'static str,
    events: PeerEvents,
    seen: Vec<PeerEvent>,
}

impl Watch {
    fn new(name: &'static str, events: PeerEvents) -> Self {
        Self {
            name,
            events,
            seen: Vec::new(),
        }
    }

    async fn until(&mut self, what: &str, pred: impl Fn(&PeerEvent) -> bool) -> PeerEvent {
        if let Some(i) = self.seen.iter().position(&pred) {
            return self.seen.remove(i);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) if pred(&ev) => return ev,
                Ok(Some(ev)) => self.seen.push(ev),
                Ok(None) => panic!("{}: event stream ended waiting for {what}", self.name),
                Err(_) => panic!(
                    "{}: timed out waiting for {what}; saw {:?}",
                    self.name, self.seen
                ),
            }
        }
    }

    fn drain(&mut self) {
        while let Some(ev) = self.events.try_recv() {
            self.seen.push(ev);
        }
    }
}

fn is_track(ev: &PeerEvent, stream: &str, kind: TrackKind) -> bool {
    matches!(ev, PeerEvent::RemoteTrack { stream_id, kind: k, .. } if stream_id == stream && *k == kind)
}

fn is_removed(ev: &PeerEvent, stream: &str) -> bool {
    matches!(ev, PeerEvent::RemoteTrackRemoved { stream_id, .. } if stream_id == stream)
}

fn received(stats: &PeerStats, stream: &str, kind: TrackKind) -> u64 {
    stats
        .remote
        .iter()
        .filter(|r| r.stream_id == stream && r.kind == kind)
        .map(|r| r.received.frames)
        .sum()
}

fn active(stats: &PeerStats, stream: &str) -> bool {
    stats
        .remote
        .iter()
        .any(|r| r.stream_id == stream && r.active)
}

/// Waits until `stream`'s `kind` track on `peer` has received more than `n` frames.
async fn wait_frames(peer: &MediaPeer, stream: &str, kind: TrackKind, n: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = received(&peer.stats().await.unwrap(), stream, kind);
        if got > n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{stream} {kind}: only {got} frames, wanted > {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("groupcall-media");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}-{name}", std::process::id()))
}

async fn start_sources(peer: &MediaPeer, stream: &str) {
    peer.set_source(&format!("{stream}-audio"), OggOpusSource::tone())
        .unwrap();
    peer.set_source(
        &format!("{stream}-video"),
        IvfSource::test_pattern().unwrap(),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_exchange_media_and_renegotiate() {
    init_tracing();
    let (a, a_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    let (b, b_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    let mut a_ev = Watch::new("A", a_ev);
    let mut b_ev = Watch::new("B", b_ev);

    let a_user = LocalFeed::usermedia("streamA");
    let b_user = LocalFeed::usermedia("streamB");
    start_sources(&a, "streamA").await;
    start_sources(&b, "streamB").await;

    // Recorders on B for what A sends.
    let ogg_path = tmp("a-audio.ogg");
    let ivf_path = tmp("a-video.ivf");
    b.add_sink(
        SinkFilter::stream("streamA", TrackKind::Audio),
        OggOpusRecorder::create(&ogg_path).unwrap(),
    )
    .unwrap();
    b.add_sink(
        SinkFilter::stream("streamA", TrackKind::Video),
        IvfRecorder::create(&ivf_path).unwrap(),
    )
    .unwrap();

    // Offer/answer in memory; candidates only in the SDP.
    let offer = a.create_offer(std::slice::from_ref(&a_user)).await.unwrap();
    assert!(
        offer.contains("typ host"),
        "no host candidate in offer:\n{offer}"
    );
    assert!(offer.contains("a=msid:streamA streamA-audio"), "{offer}");
    assert!(offer.contains("a=msid:streamA streamA-video"), "{offer}");
    assert!(offer.contains("a=group:BUNDLE"));
    assert!(offer.contains("opus/48000/2") && offer.contains("VP8/90000"));
    // The audio level (RFC 6464) is negotiated as libwebrtc does.
    assert!(
        offer.contains("a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n"),
        "{offer}"
    );

    let answer = b
        .accept_offer(&offer, std::slice::from_ref(&b_user))
        .await
        .unwrap();
    assert!(answer.contains("typ host"), "{answer}");
    assert!(answer.contains("a=msid:streamB streamB-audio"), "{answer}");
    assert!(answer.contains("a=msid:streamB streamB-video"), "{answer}");
    assert!(
        answer.contains("a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n"),
        "{answer}"
    );
    assert!(
        !answer.contains("a=msid:streamA"),
        "answer echoes the offerer's msid:\n{answer}"
    );

    let t0 = Instant::now();
    a.apply_answer(&answer).await.unwrap();
    a_ev.until("A connected", |e| matches!(e, PeerEvent::Connected))
        .await;
    let t_a = t0.elapsed();
    b_ev.until("B connected", |e| matches!(e, PeerEvent::Connected))
        .await;
    let t_b = t0.elapsed();
    eprintln!("time to connected after answer: A {t_a:?}, B {t_b:?}");

    // Remote tracks carry the sender's stream ids.
    b_ev.until("B sees A audio", |e| {
        is_track(e, "streamA", TrackKind::Audio)
    })
    .await;
    b_ev.until("B sees A video", |e| {
        is_track(e, "streamA", TrackKind::Video)
    })
    .await;
    a_ev.until("A sees B audio", |e| {
        is_track(e, "streamB", TrackKind::Audio)
    })
    .await;
    a_ev.until("A sees B video", |e| {
        is_track(e, "streamB", TrackKind::Video)
    })
    .await;

    // Each track's first frame is reported as it comes, and the
    // counters already hold it.
    for (w, stream) in [(&mut b_ev, "streamA"), (&mut a_ev, "streamB")] {
        for kind in [TrackKind::Audio, TrackKind::Video] {
            w.until("first frame", |e| {
                matches!(e, PeerEvent::FirstFrame { stream_id, kind: k, received, .. } if stream_id == stream && *k == kind && received.frames == 1)
            })
            .await;
        }
    }
    assert!(received(&b.stats().await.unwrap(), "streamA", TrackKind::Video) >= 1);

    // Media flows both ways.
    wait_frames(&b, "streamA", TrackKind::Audio, 0).await;
    wait_frames(&b, "streamA", TrackKind::Video, 0).await;
    let s0 = (
        b.stats().await.unwrap(),
        a.stats().await.unwrap(),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s1 = (
        b.stats().await.unwrap(),
        a.stats().await.unwrap(),
        Instant::now(),
    );
    let secs = (s1.2 - s0.2).as_secs_f64();
    let rate = |s0: &PeerStats, s1: &PeerStats, st: &str, k| {
        (received(s1, st, k) - received(s0, st, k)) as f64 / secs
    };
    let b_audio = rate(&s0.0, &s1.0, "streamA", TrackKind::Audio);
    let b_video = rate(&s0.0, &s1.0, "streamA", TrackKind::Video);
    let a_audio = rate(&s0.1, &s1.1, "streamB", TrackKind::Audio);
    let a_video = rate(&s0.1, &s1.1, "streamB", TrackKind::Video);
    eprintln!(
        "frames/s received: B<-A audio {b_audio:.1} video {b_video:.1}; A<-B audio {a_audio:.1} video {a_video:.1}"
    );
    for r in [b_audio, a_audio] {
        assert!(r > 40.0, "audio rate {r}");
    }
    for r in [b_video, a_video] {
        assert!(r > 20.0, "video rate {r}");
    }
    let st = b.stats().await.unwrap();
    let vid = st
        .remote
        .iter()
        .find(|r| r.stream_id == "streamA" && r.kind == TrackKind::Video)
        .unwrap();
    assert!(vid.received.keyframes >= 1, "{vid:?}");
    assert_eq!(st.frames_unmatched, 0);

    // Mute A's audio: B's audio count stops; unmute: resumes.
    a.set_muted("streamA-audio", true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m0 = received(&b.stats().await.unwrap(), "streamA", TrackKind::Audio);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let m1 = received(&b.stats().await.unwrap(), "streamA", TrackKind::Audio);
    assert!(m1 - m0 <= 1, "muted audio still flowing: {m0} -> {m1}");
    assert!(wait_frames(&b, "streamA", TrackKind::Video, 0).await > 0);
    a.set_muted("streamA-audio", false).unwrap();
    wait_frames(&b, "streamA", TrackKind::Audio, m1 + 10).await;

    // A adds a screenshare: a second remote video stream appears on B.
    let a_screen = LocalFeed::screenshare("screenA");
    a.set_source("screenA-video", IvfSource::test_pattern().unwrap())
        .unwrap();
    let offer2 = a
        .create_offer(&[a_user.clone(), a_screen.clone()])
        .await
        .unwrap();
    assert!(offer2.contains("a=msid:screenA screenA-video"), "{offer2}");
    let answer2 = b
        .accept_offer(&offer2, std::slice::from_ref(&b_user))
        .await
        .unwrap();
    a.apply_answer(&answer2).await.unwrap();
    b_ev.until("B sees A screenshare", |e| {
        is_track(e, "screenA", TrackKind::Video)
    })
    .await;
    wait_frames(&b, "screenA", TrackKind::Video, 20).await;
    let before = received(&b.stats().await.unwrap(), "streamA", TrackKind::Audio);
    wait_frames(&b, "streamA", TrackKind::Audio, before + 10).await;

    // And removes it again.
    let offer3 = a.create_offer(std::slice::from_ref(&a_user)).await.unwrap();
    assert!(!offer3.contains("a=msid:screenA"), "{offer3}");
    let answer3 = b
        .accept_offer(&offer3, std::slice::from_ref(&b_user))
        .await
        .unwrap();
    a.apply_answer(&answer3).await.unwrap();
    b_ev.until("B loses A screenshare", |e| is_removed(e, "screenA"))
        .await;
    assert!(!active(&b.stats().await.unwrap(), "screenA"));
    let v = received(&b.stats().await.unwrap(), "streamA", TrackKind::Video);
    wait_frames(&b, "streamA", TrackKind::Video, v + 10).await;

    // The answerer renegotiates too: B adds its own screenshare.
    let b_screen = LocalFeed::screenshare("screenB");
    b.set_source("screenB-video", IvfSource::test_pattern().unwrap())
        .unwrap();
    let offer4 = b
        .create_offer(&[b_user.clone(), b_screen.clone()])
        .await
        .unwrap();
    let answer4 = a
        .accept_offer(&offer4, std::slice::from_ref(&a_user))
        .await
        .unwrap();
    b.apply_answer(&answer4).await.unwrap();
    a_ev.until("A sees B screenshare", |e| {
        is_track(e, "screenB", TrackKind::Video)
    })
    .await;
    wait_frames(&a, "screenB", TrackKind::Video, 20).await;

    // ICE restart keeps media flowing.
    let offer5 = a.restart_ice(std::slice::from_ref(&a_user)).await.unwrap();
    let ufrag = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("a=ice-ufrag:"))
            .map(str::to_string)
    };
    assert_ne!(ufrag(&offer5), ufrag(&offer), "ICE restart kept the ufrag");
    let answer5 = b
        .accept_offer(&offer5, &[b_user.clone(), b_screen.clone()])
        .await
        .unwrap();
    a.apply_answer(&answer5).await.unwrap();
    let v = received(&b.stats().await.unwrap(), "streamA", TrackKind::Video);
    wait_frames(&b, "streamA", TrackKind::Video, v + 15).await;
    let v = received(&a.stats().await.unwrap(), "screenB", TrackKind::Video);
    wait_frames(&a, "screenB", TrackKind::Video, v + 15).await;

    // Recordings parse back with our readers (and ffprobe/ffmpeg).
    let errors = b.finish_sinks().await.unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let ogg = std::fs::read(&ogg_path).unwrap();
    let parsed = OggOpusStream::parse(&ogg).unwrap();
    assert!(
        parsed.packets.len() > 100,
        "{} packets",
        parsed.packets.len()
    );
    assert_eq!(parsed.last_granule, Some(parsed.total_samples()));
    let ivf = std::fs::read(&ivf_path).unwrap();
    let reader = IvfReader::new(&ivf).unwrap();
    let header = reader.header().clone();
    assert_eq!((header.width, header.height), (320, 240));
    let frames = reader.frames().unwrap();
    assert!(frames.len() > 60, "{} frames", frames.len());
    assert_eq!(frames.len() as u32, header.frame_count);
    eprintln!(
        "recorded {} Opus packets ({} bytes), {} VP8 frames ({} bytes)",
        parsed.packets.len(),
        ogg.len(),
        frames.len(),
        ivf.len()
    );
    // ffprobe sees Opus and VP8, ffmpeg decodes both without an error
    // (ffmpeg is required: scripts/setup-system installs it).
    for (p, codec) in [(&ogg_path, "opus"), (&ivf_path, "vp8")] {
        let codecs = groupcall_testkit::media::ffprobe_codecs(p);
        assert!(
            codecs.contains(codec),
            "ffprobe sees {codecs:?} in {}",
            p.display()
        );
        let decoded = groupcall_testkit::assert_decodes(p, 1);
        eprintln!(
            "ffprobe {}: {codecs}; ffmpeg decodes {decoded} frames",
            p.display()
        );
    }

    // Closing A: B learns it (DTLS close_notify).
    a.close().await.unwrap();
    a_ev.until("A closed", |e| matches!(e, PeerEvent::Closed))
        .await;
    b_ev.until("B sees close", |e| matches!(e, PeerEvent::Closed))
        .await;
    b_ev.drain();
    let _ = std::fs::remove_file(&ogg_path);
    let _ = std::fs::remove_file(&ivf_path);
}
