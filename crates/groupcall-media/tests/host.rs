//! Several peers of one participant on one socket: three participants (one
//! `MediaHost` each, one UDP socket each on 127.0.0.1) in a full mesh, media
//! both ways on every pair, the recorded streams decodable.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_range_loop
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use groupcall_media::ivf::IvfReader;
use groupcall_media::ogg::OggOpusStream;
use groupcall_media::{
    IvfRecorder, IvfSource, LocalFeed, MediaHost, MediaPeer, OggOpusRecorder, OggOpusSource,
    PeerConfig, PeerEvent, PeerEvents, PeerStats, SinkFilter, TrackKind,
};

const WAIT: Duration = Duration::from_secs(15);

/// The tests count the process's sockets: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("groupcall-media");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}-host-{name}", std::process::id()))
}

async fn until(ev: &mut PeerEvents, what: &str, pred: impl Fn(&PeerEvent) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(e)) if pred(&e) => return,
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

fn received(stats: &PeerStats, stream: &str, kind: TrackKind) -> u64 {
    stats
        .remote
        .iter()
        .filter(|r| r.stream_id == stream && r.kind == kind)
        .map(|r| r.received.frames)
        .sum()
}

/// `Some(true)` if ffmpeg decodes the whole file without an error message;
/// `None` if ffmpeg is not installed.
fn ffmpeg_decodes(path: &std::path::Path) -> Option<bool> {
    let dec = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "null", "-"])
        .output()
        .ok()?;
    let errors = String::from_utf8_lossy(&dec.stderr).to_string();
    eprintln!("ffmpeg {}: errors {:?}", path.display(), errors.trim());
    Some(dec.status.success() && errors.trim().is_empty())
}

struct Side {
    peer: MediaPeer,
    events: PeerEvents,
}

/// Sockets this process holds, from `/proc/self/fd` (`None` without procfs).
/// The UDP sockets this process holds, from `/proc` (other sockets, such as
/// a runtime's internal ones, come and go between tests).
fn open_sockets() -> Option<usize> {
    Some(groupcall_testkit::udp_sockets().len())
}

/// Waits until no media host of an earlier test holds a socket (a host's
/// task may end a moment after its last peer closed).
async fn no_media_sockets() {
    let deadline = Instant::now() + Duration::from_secs(5);
    while groupcall_media::live_socket_count() != 0 {
        assert!(Instant::now() < deadline, "media sockets left open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_participants_one_socket_each_full_mesh() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    no_media_sockets().await;
    let sockets_before = groupcall_media::live_socket_count();
    let fds_before = open_sockets();
    let names = ["p0", "p1", "p2"];
    let hosts: Vec<MediaHost> = names
        .iter()
        .map(|_| MediaHost::spawn(&["127.0.0.1".parse().unwrap()]).unwrap())
        .collect();
    for h in &hosts {
        assert_eq!(h.socket_count(), 1);
    }
    // sides[i][j]: participant i's peer towards participant j.
    let mut sides: Vec<Vec<Option<Side>>> =
        (0..3).map(|_| (0..3).map(|_| None).collect()).collect();
    for (i, host) in hosts.iter().enumerate() {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let (peer, events) = host.new_peer(PeerConfig::default()).unwrap();
            let stream = names[i];
            peer.set_source(&format!("{stream}-audio"), OggOpusSource::tone())
                .unwrap();
            peer.set_source(
                &format!("{stream}-video"),
                IvfSource::test_pattern().unwrap(),
            )
            .unwrap();
            sides[i][j] = Some(Side { peer, events });
        }
    }
    // Every peer of a participant is on its host's one socket.
    for (i, host) in hosts.iter().enumerate() {
        for s in sides[i].iter().flatten() {
            assert_eq!(s.peer.local_addrs(), host.local_addrs());
        }
    }
    // Recorders on p0 for what p1 sends.
    let ogg = tmp("p1-audio.ogg");
    let ivf = tmp("p1-video.ivf");
    {
        let p0_to_p1 = &sides[0][1].as_ref().unwrap().peer;
        p0_to_p1
            .add_sink(
                SinkFilter::stream("p1", TrackKind::Audio),
                OggOpusRecorder::create(&ogg).unwrap(),
            )
            .unwrap();
        p0_to_p1
            .add_sink(
                SinkFilter::stream("p1", TrackKind::Video),
                IvfRecorder::create(&ivf).unwrap(),
            )
            .unwrap();
    }

    // Negotiate every pair (the smaller index offers), all pairs at once.
    let t0 = Instant::now();
    let mut negotiations = Vec::new();
    for i in 0..3 {
        for j in (i + 1)..3 {
            let a = &sides[i][j].as_ref().unwrap().peer;
            let b = &sides[j][i].as_ref().unwrap().peer;
            let (fa, fb) = (
                LocalFeed::usermedia(names[i]),
                LocalFeed::usermedia(names[j]),
            );
            negotiations.push(async move {
                let offer = a.create_offer(&[fa]).await.unwrap();
                let answer = b.accept_offer(&offer, &[fb]).await.unwrap();
                a.apply_answer(&answer).await.unwrap();
            });
        }
    }
    futures_join(negotiations).await;
    for row in sides.iter_mut() {
        for s in row.iter_mut().flatten() {
            until(&mut s.events, "connected", |e| {
                matches!(e, PeerEvent::Connected)
            })
            .await;
        }
    }
    eprintln!("3 pairs connected {:?} after the first offer", t0.elapsed());

    // Media both ways on every pair.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut ok = true;
        let mut report = Vec::new();
        for i in 0..3 {
            for j in 0..3 {
                let Some(s) = &sides[i][j] else { continue };
                let st = s.peer.stats().await.unwrap();
                let (au, vi) = (
                    received(&st, names[j], TrackKind::Audio),
                    received(&st, names[j], TrackKind::Video),
                );
                report.push(format!("{}<-{}: audio {au} video {vi}", names[i], names[j]));
                ok &= au >= 50 && vi >= 30;
                // Media came over the shared socket.
                let pair = st.selected_pair.expect("selected pair");
                assert_eq!(pair.local, hosts[i].local_addrs()[0]);
                assert_eq!(pair.remote, hosts[j].local_addrs()[0]);
            }
        }
        if ok {
            eprintln!("frames received: {}", report.join("; "));
            break;
        }
        assert!(Instant::now() < deadline, "media did not flow: {report:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still one socket per participant.
    for h in &hosts {
        assert_eq!(h.socket_count(), 1);
        assert_eq!(h.peer_count(), 2);
    }
    assert_eq!(groupcall_media::live_socket_count() - sockets_before, 3);
    // The kernel agrees: three more sockets in this process for six peers.
    if let (Some(before), Some(now)) = (fds_before, open_sockets()) {
        assert_eq!(
            now - before,
            3,
            "UDP sockets in /proc/self/fd: {before} -> {now}"
        );
    }

    // What p0 recorded from p1 decodes.
    let errors = sides[0][1]
        .as_ref()
        .unwrap()
        .peer
        .finish_sinks()
        .await
        .unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let ogg_bytes = std::fs::read(&ogg).unwrap();
    let parsed = OggOpusStream::parse(&ogg_bytes).unwrap();
    assert!(
        parsed.packets.len() >= 50,
        "{} Opus packets recorded",
        parsed.packets.len()
    );
    assert_eq!(parsed.last_granule, Some(parsed.total_samples()));
    let ivf_bytes = std::fs::read(&ivf).unwrap();
    let reader = IvfReader::new(&ivf_bytes).unwrap();
    let header = reader.header().clone();
    assert_eq!((header.width, header.height), (320, 240));
    let frames = reader.frames().unwrap();
    assert!(frames.len() >= 30, "{} VP8 frames recorded", frames.len());
    assert_eq!(frames.len() as u32, header.frame_count);
    assert!(
        frames
            .first()
            .and_then(|f| groupcall_media::ivf::vp8_frame_info(f.data))
            .is_some_and(|i| i.keyframe),
        "the recording starts with a key frame"
    );
    for p in [&ogg, &ivf] {
        if let Some(ok) = ffmpeg_decodes(p) {
            assert!(ok, "{} does not decode", p.display());
        }
    }

    // Closing one peer leaves the participant's other peers running.
    sides[0][1].as_ref().unwrap().peer.close().await.unwrap();
    let s02 = &sides[0][2].as_ref().unwrap().peer;
    let before = received(&s02.stats().await.unwrap(), "p2", TrackKind::Audio);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = received(&s02.stats().await.unwrap(), "p2", TrackKind::Audio);
    assert!(
        after > before + 10,
        "p0<-p2 audio stalled: {before} -> {after}"
    );
    assert_eq!(hosts[0].peer_count(), 1);

    for h in &hosts {
        h.close().await;
    }
    drop(sides);
    assert_eq!(groupcall_media::live_socket_count(), sockets_before);
}

/// Runs the futures concurrently on this task.
async fn futures_join<F: std::future::Future<Output = ()>>(futs: Vec<F>) {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut done = vec![false; futs.len()];
    std::future::poll_fn(|cx| {
        for (f, d) in futs.iter_mut().zip(done.iter_mut()) {
            if !*d && f.as_mut().poll(cx).is_ready() {
                *d = true;
            }
        }
        if done.iter().all(|d| *d) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// One participant's host with eleven peers (its side of a 12-participant
/// mesh) on one socket, each to a participant of its own: all connect and
/// carry audio and video both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_peers_on_one_socket() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    no_media_sockets().await;
    let sockets_before = groupcall_media::live_socket_count();
    const N: usize = 11;
    let host = MediaHost::spawn(&["127.0.0.1".parse().unwrap()]).unwrap();
    let mut pairs = Vec::new();
    for i in 0..N {
        let (a, a_ev) = host.new_peer(PeerConfig::default()).unwrap();
        let (b, b_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
        let remote = format!("r{i}");
        for (p, stream) in [(&a, "me"), (&b, remote.as_str())] {
            p.set_source(&format!("{stream}-audio"), OggOpusSource::tone())
                .unwrap();
            p.set_source(
                &format!("{stream}-video"),
                IvfSource::test_pattern().unwrap(),
            )
            .unwrap();
        }
        pairs.push((a, a_ev, b, b_ev, remote));
    }
    let t0 = Instant::now();
    let mut negotiations = Vec::new();
    for (a, _, b, _, remote) in &pairs {
        negotiations.push(async move {
            let offer = a.create_offer(&[LocalFeed::usermedia("me")]).await.unwrap();
            let answer = b
                .accept_offer(&offer, &[LocalFeed::usermedia(remote)])
                .await
                .unwrap();
            a.apply_answer(&answer).await.unwrap();
        });
    }
    futures_join(negotiations).await;
    for (_, a_ev, _, b_ev, _) in &mut pairs {
        until(a_ev, "host side connected", |e| {
            matches!(e, PeerEvent::Connected)
        })
        .await;
        until(b_ev, "remote connected", |e| {
            matches!(e, PeerEvent::Connected)
        })
        .await;
    }
    eprintln!(
        "{N} pairs connected {:?} after the first offer",
        t0.elapsed()
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let mut ok = true;
        let mut report = Vec::new();
        for (a, _, b, _, remote) in &pairs {
            let (sa, sb) = (a.stats().await.unwrap(), b.stats().await.unwrap());
            let got = [
                received(&sa, remote, TrackKind::Audio),
                received(&sa, remote, TrackKind::Video),
                received(&sb, "me", TrackKind::Audio),
                received(&sb, "me", TrackKind::Video),
            ];
            ok &= got[0] >= 50 && got[1] >= 30 && got[2] >= 50 && got[3] >= 30;
            assert_eq!(
                sa.selected_pair.expect("selected pair").local,
                host.local_addrs()[0]
            );
            report.push(format!("{remote}: {got:?}"));
        }
        if ok {
            eprintln!("frames [in audio, in video, out audio, out video]: {report:?}");
            break;
        }
        assert!(Instant::now() < deadline, "media did not flow: {report:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(host.socket_count(), 1);
    assert_eq!(host.peer_count(), N);
    // This host's one socket and one per remote (each its own host).
    assert_eq!(groupcall_media::live_socket_count() - sockets_before, 1 + N);
    for (a, _, b, _, _) in &pairs {
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
    host.close().await;
}
