//! Candidates, STUN, liveness, the push/pull frame API and bad input, over
//! real UDP on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use groupcall_media::{
    FeedPurpose, LocalFeed, MediaError, MediaPeer, OggOpusSource, PeerConfig, PeerEvent,
    PeerEvents, TrackKind, stun,
};
use tokio::net::UdpSocket;

const WAIT: Duration = Duration::from_secs(10);

fn init_tracing() {
    groupcall_testkit::init_tracing("warn");
}

async fn until(
    events: &mut PeerEvents,
    what: &str,
    pred: impl Fn(&PeerEvent) -> bool,
) -> PeerEvent {
    groupcall_testkit::media::peer_event_until(events, WAIT, what, pred).await
}

fn strip_candidates(sdp: &str) -> String {
    let mut out: String = sdp
        .lines()
        .filter(|l| !l.starts_with("a=candidate"))
        .collect::<Vec<_>>()
        .join("\r\n");
    out.push_str("\r\n");
    out
}

fn audio_feed(stream: &str) -> LocalFeed {
    LocalFeed {
        stream_id: stream.to_string(),
        purpose: FeedPurpose::Usermedia,
        audio_track_id: Some(format!("{stream}-audio")),
        video_track_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_candidates_connect() {
    init_tracing();
    let (a, mut a_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    let (b, mut b_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    let offer = a.create_offer(&[audio_feed("sa")]).await.unwrap();
    // The offer also asks to receive video although A sends none.
    assert!(offer.contains("m=video"), "{offer}");
    let answer = b
        .accept_offer(&strip_candidates(&offer), &[audio_feed("sb")])
        .await
        .unwrap();
    a.apply_answer(&strip_candidates(&answer)).await.unwrap();

    let a_cands = a.local_candidates().await.unwrap();
    assert_eq!(a_cands.len(), 1);
    assert!(a_cands[0].candidate.starts_with("candidate:"));
    assert!(a_cands[0].sdp_mid.is_some());
    for c in &a_cands {
        b.add_remote_candidate(&c.candidate, c.sdp_mid.as_deref(), c.sdp_m_line_index)
            .await
            .unwrap();
    }
    b.add_remote_candidate("", None, None).await.unwrap();
    for c in b.local_candidates().await.unwrap() {
        // With the "a=" prefix, as some clients send it.
        a.add_remote_candidate(&format!("a={}", c.candidate), None, Some(0))
            .await
            .unwrap();
    }
    a.add_remote_candidate("a=end-of-candidates", None, None)
        .await
        .unwrap();
    until(&mut a_ev, "A connected", |e| {
        matches!(e, PeerEvent::Connected)
    })
    .await;
    until(&mut b_ev, "B connected", |e| {
        matches!(e, PeerEvent::Connected)
    })
    .await;
}

/// A tiny STUN server answering every Binding request with a made-up
/// mapped address (127.0.0.2, same port).
async fn fake_stun_server() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            if let Some(tid) = stun::binding_request_id(&buf[..n]) {
                let mapped: SocketAddr = format!("127.0.0.2:{}", from.port()).parse().unwrap();
                let _ = s
                    .send_to(&stun::encode_binding_success(&tid, mapped), from)
                    .await;
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_gives_server_reflexive_candidate() {
    init_tracing();
    let server = fake_stun_server().await;
    let cfg = PeerConfig {
        stun_server: Some(server),
        ..PeerConfig::default()
    };
    let (a, _ev) = MediaPeer::new(cfg).await.unwrap();
    let port = a.local_addrs()[0].port();
    let cands = a.local_candidates().await.unwrap();
    let srflx = cands
        .iter()
        .find(|c| c.candidate.contains("typ srflx"))
        .expect("no srflx candidate");
    assert!(
        srflx
            .candidate
            .contains(&format!("127.0.0.2 {port} typ srflx")),
        "{srflx:?}"
    );
    let offer = a.create_offer(&[audio_feed("s")]).await.unwrap();
    assert!(offer.contains("typ srflx"), "{offer}");
    assert!(offer.contains("typ host"), "{offer}");

    // A STUN server that never answers: the peer still comes up, host only.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let cfg = PeerConfig {
        stun_server: Some(silent.local_addr().unwrap()),
        stun_timeout: Duration::from_millis(300),
        ..PeerConfig::default()
    };
    let t0 = Instant::now();
    let (b, _ev) = MediaPeer::new(cfg).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    let cands = b.local_candidates().await.unwrap();
    assert_eq!(cands.len(), 1);
}

/// Forwards datagrams between A and B through two sockets, and can cut the
/// link without either side closing.
struct Proxy {
    /// Faces A (put into the answer A receives).
    pa: SocketAddr,
    /// Faces B (put into the offer B receives).
    pb: SocketAddr,
    cut: Arc<AtomicBool>,
}

async fn proxy(a: SocketAddr, b: SocketAddr) -> Proxy {
    let sa = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let sb = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let cut = Arc::new(AtomicBool::new(false));
    let p = Proxy {
        pa: sa.local_addr().unwrap(),
        pb: sb.local_addr().unwrap(),
        cut: cut.clone(),
    };
    for (from, to, dest) in [(sa.clone(), sb.clone(), b), (sb, sa, a)] {
        let cut = cut.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, _)) = from.recv_from(&mut buf).await {
                if !cut.load(Ordering::Relaxed) {
                    let _ = to.send_to(&buf[..n], dest).await;
                }
            }
        });
    }
    p
}

fn retarget(sdp: &str, from: SocketAddr, to: SocketAddr) -> String {
    let out = sdp.replace(
        &format!(" {} {} typ host", from.ip(), from.port()),
        &format!(" {} {} typ host", to.ip(), to.port()),
    );
    assert_ne!(out, sdp, "no candidate for {from}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_reports_disconnect_failure_and_recovery() {
    init_tracing();
    let cfg = PeerConfig {
        disconnect_timeout: Duration::from_millis(1000),
        failed_timeout: Duration::from_millis(2500),
        ..PeerConfig::default()
    };
    let (a, mut a_ev) = MediaPeer::new(cfg.clone()).await.unwrap();
    let (b, mut b_ev) = MediaPeer::new(cfg).await.unwrap();
    let (a_addr, b_addr) = (a.local_addrs()[0], b.local_addrs()[0]);
    let p = proxy(a_addr, b_addr).await;
    a.set_source("sa-audio", OggOpusSource::tone()).unwrap();
    b.set_source("sb-audio", OggOpusSource::tone()).unwrap();

    let offer = a.create_offer(&[audio_feed("sa")]).await.unwrap();
    let answer = b
        .accept_offer(&retarget(&offer, a_addr, p.pb), &[audio_feed("sb")])
        .await
        .unwrap();
    a.apply_answer(&retarget(&answer, b_addr, p.pa))
        .await
        .unwrap();
    until(&mut a_ev, "A connected", |e| {
        matches!(e, PeerEvent::Connected)
    })
    .await;
    until(&mut b_ev, "B connected", |e| {
        matches!(e, PeerEvent::Connected)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.stats().await.unwrap().remote[0].received.frames > 0);

    p.cut.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    until(&mut a_ev, "A disconnected", |e| {
        matches!(e, PeerEvent::Disconnected)
    })
    .await;
    let t_disc = t0.elapsed();
    until(&mut a_ev, "A failed", |e| matches!(e, PeerEvent::Failed)).await;
    let t_fail = t0.elapsed();
    eprintln!("link cut: Disconnected after {t_disc:?}, Failed after {t_fail:?}");
    assert!(t_disc >= Duration::from_millis(700), "{t_disc:?}");
    assert!(t_fail >= Duration::from_millis(2000), "{t_fail:?}");
    until(&mut b_ev, "B failed", |e| matches!(e, PeerEvent::Failed)).await;

    p.cut.store(false, Ordering::Relaxed);
    let t0 = Instant::now();
    until(&mut a_ev, "A reconnected", |e| {
        matches!(e, PeerEvent::Connected)
    })
    .await;
    until(&mut b_ev, "B reconnected", |e| {
        matches!(e, PeerEvent::Connected)
    })
    .await;
    eprintln!("link restored: Connected again after {:?}", t0.elapsed());
    let n = a.stats().await.unwrap().remote[0].received.frames;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.stats().await.unwrap().remote[0].received.frames > n + 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_frames_are_pulled_on_the_other_side() {
    init_tracing();
    let (a, mut a_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    let rx_cfg = PeerConfig {
        deliver_frames: true,
        ..PeerConfig::default()
    };
    let (b, mut b_ev) = MediaPeer::new(rx_cfg).await.unwrap();
    let feed = LocalFeed {
        stream_id: "push".into(),
        purpose: FeedPurpose::Usermedia,
        audio_track_id: Some("push-a".into()),
        video_track_id: Some("push-v".into()),
    };
    let offer = a.create_offer(std::slice::from_ref(&feed)).await.unwrap();
    let answer = b.accept_offer(&offer, &[]).await.unwrap();
    a.apply_answer(&answer).await.unwrap();
    until(&mut a_ev, "A connected", |e| {
        matches!(e, PeerEvent::Connected)
    })
    .await;

    // Real VP8 frames from the built-in pattern, pushed by hand.
    let ivf = groupcall_media::ivf::IvfReader::new(groupcall_media::source::BUILTIN_PATTERN_IVF)
        .unwrap()
        .frames()
        .unwrap();
    let opus =
        groupcall_media::ogg::OggOpusStream::parse(groupcall_media::source::BUILTIN_TONE_OGG)
            .unwrap();
    // A delta frame first: dropped by the sender until a key frame comes.
    a.send_frame("push-v", ivf[1].data.to_vec(), Duration::from_millis(33))
        .unwrap();
    for (v, p) in ivf.iter().zip(&opus.packets).take(20) {
        a.send_frame("push-v", v.data.to_vec(), Duration::from_micros(33_333))
            .unwrap();
        a.send_frame("push-a", p.data.clone(), Duration::from_millis(20))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut video = Vec::new();
    let mut audio = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while video.len() < 20 || audio.len() < 20 {
        let ev = tokio::time::timeout_at(deadline, b_ev.recv())
            .await
            .expect("frames did not arrive")
            .unwrap();
        if let PeerEvent::Frame(f) = ev {
            assert_eq!(&*f.stream_id, "push");
            match f.kind {
                TrackKind::Video => video.push(f),
                TrackKind::Audio => audio.push(f),
            }
        }
    }
    assert!(
        video[0].keyframe,
        "first delivered video frame is not a key frame"
    );
    for (i, f) in video.iter().enumerate() {
        assert_eq!(&f.data[..], ivf[i].data, "video frame {i}");
        assert_eq!(&*f.track_id, "push-v");
    }
    for w in video.windows(2) {
        assert_eq!(w[1].rtp_time - w[0].rtp_time, 2999);
    }
    for (i, f) in audio.iter().enumerate() {
        assert_eq!(&f.data[..], &opus.packets[i].data[..], "audio packet {i}");
    }
    for w in audio.windows(2) {
        assert_eq!(w[1].rtp_time - w[0].rtp_time, 960);
    }

    // B asks for a key frame; A has no source for the track, so A's user is told.
    b.request_keyframe("push-v").unwrap();
    until(
        &mut a_ev,
        "key frame request",
        |e| matches!(e, PeerEvent::KeyframeRequested { track_id, .. } if track_id == "push-v"),
    )
    .await;
    b.close().await.unwrap();
    until(&mut a_ev, "A sees close", |e| {
        matches!(e, PeerEvent::Closed)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_errors() {
    init_tracing();
    let (a, _a_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    assert!(matches!(
        a.apply_answer("v=0\r\n").await,
        Err(MediaError::NoPendingOffer)
    ));
    for garbage in ["", "hello", "v=0\r\nm=audio x\r\n", "\u{0}\u{1}\u{2}"] {
        assert!(matches!(
            a.accept_offer(garbage, &[]).await,
            Err(MediaError::RemoteSdp(_))
        ));
    }
    for cand in [
        "candidate:garbage",
        "nonsense",
        "candidate:1 1 udp x 1.2.3.4 5 typ host",
    ] {
        assert!(matches!(
            a.add_remote_candidate(cand, None, None).await,
            Err(MediaError::BadCandidate { .. })
        ));
    }
    // mDNS candidates are ignored, not refused.
    a.add_remote_candidate(
        "candidate:1 1 udp 2113937151 0a1b2c3d-1111-2222-3333-444455556666.local 54321 typ host",
        Some("0"),
        Some(0),
    )
    .await
    .unwrap();
    let bad_feed = LocalFeed {
        stream_id: "has space".into(),
        ..audio_feed("x")
    };
    assert!(matches!(
        a.create_offer(&[bad_feed]).await,
        Err(MediaError::InvalidFeed(_))
    ));
    assert!(matches!(
        a.create_offer(&[audio_feed("x"), audio_feed("x")]).await,
        Err(MediaError::InvalidFeed(_))
    ));
    // A garbage answer to a real offer: error, and the offer stays pending.
    a.create_offer(&[audio_feed("x")]).await.unwrap();
    assert!(a.apply_answer("garbage").await.is_err());
    // The peer still works.
    let (b, mut b_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    let offer = a.create_offer(&[audio_feed("x")]).await.unwrap();
    let answer = b.accept_offer(&offer, &[]).await.unwrap();
    a.apply_answer(&answer).await.unwrap();
    until(&mut b_ev, "B connected", |e| {
        matches!(e, PeerEvent::Connected)
    })
    .await;
    // Datagrams of junk at the peer's socket do not hurt it.
    let junk = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..200u8 {
        let len = (i as usize * 7) % 300;
        let data: Vec<u8> = (0..len).map(|j| (j as u8).wrapping_mul(i)).collect();
        let _ = junk.send_to(&data, b.local_addrs()[0]).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(b.stats().await.unwrap().connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unspecified_bind_address_expands_to_interfaces() {
    init_tracing();
    // Only binds and writes SDP: no traffic leaves the machine.
    let cfg = PeerConfig {
        bind_addrs: vec!["0.0.0.0".parse().unwrap()],
        ..PeerConfig::default()
    };
    let (a, _ev) = MediaPeer::new(cfg).await.unwrap();
    assert!(!a.local_addrs().is_empty());
    for addr in a.local_addrs() {
        assert!(!addr.ip().is_unspecified(), "{addr}");
        assert_ne!(addr.port(), 0);
    }
    let offer = a.create_offer(&[audio_feed("s")]).await.unwrap();
    for addr in a.local_addrs() {
        assert!(
            offer.contains(&format!(" {} {} typ host", addr.ip(), addr.port())),
            "{addr} missing in\n{offer}"
        );
    }
    a.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_connecting_reports_failed() {
    init_tracing();
    let cfg = PeerConfig {
        failed_timeout: Duration::from_millis(1500),
        ..PeerConfig::default()
    };
    let (a, mut a_ev) = MediaPeer::new(cfg.clone()).await.unwrap();
    let (b, _b_ev) = MediaPeer::new(cfg).await.unwrap();
    let (a_addr, b_addr) = (a.local_addrs()[0], b.local_addrs()[0]);
    let p = proxy(a_addr, b_addr).await;
    p.cut.store(true, Ordering::Relaxed);
    let offer = a.create_offer(&[audio_feed("sa")]).await.unwrap();
    let answer = b
        .accept_offer(&retarget(&offer, a_addr, p.pb), &[])
        .await
        .unwrap();
    let t0 = Instant::now();
    a.apply_answer(&retarget(&answer, b_addr, p.pa))
        .await
        .unwrap();
    let ev = until(&mut a_ev, "A failed", |e| {
        matches!(e, PeerEvent::Failed | PeerEvent::Connected)
    })
    .await;
    assert!(matches!(ev, PeerEvent::Failed), "{ev:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t0.elapsed()
    );
}

/// `retransmission: false` (a diagnostic knob) offers VP8 without RTX and
/// without `nack` feedback; the default offers both. PLI stays either way.
#[tokio::test]
async fn retransmission_off_offers_vp8_without_rtx_and_nack() {
    init_tracing();
    let feed = LocalFeed {
        stream_id: "sv".to_string(),
        purpose: FeedPurpose::Usermedia,
        audio_track_id: Some("sv-audio".to_string()),
        video_track_id: Some("sv-video".to_string()),
    };
    for retransmission in [true, false] {
        let (a, _ev) = MediaPeer::new(PeerConfig {
            retransmission,
            ..PeerConfig::default()
        })
        .await
        .unwrap();
        let offer = a.create_offer(std::slice::from_ref(&feed)).await.unwrap();
        let has = |s: &str| offer.lines().any(|l| l.trim_end() == s);
        let rtx = offer.lines().any(|l| l.contains(" rtx/90000"));
        assert!(offer.contains("VP8/90000"), "{offer}");
        assert!(has("a=rtcp-fb:96 nack pli"), "{offer}");
        assert_eq!(has("a=rtcp-fb:96 nack"), retransmission, "{offer}");
        assert_eq!(rtx, retransmission, "{offer}");
    }
}
