//! TURN against a real coturn on 127.0.0.1 (`scripts/setup-system` installs
//! it; the test kit starts it): relay-only peers
//! connect and carry audio and video both ways through the relay; slow
//! allocations are trickled; bad credentials fail cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use groupcall_media::{
    IceServer, IvfSource, LocalFeed, MediaPeer, OggOpusSource, PeerConfig, PeerEvent, PeerEvents,
    PeerStats, TrackKind, stun,
};
use groupcall_testkit::coturn;
use groupcall_testkit::coturn::Coturn;
use tokio::net::UdpSocket;

const WAIT: Duration = Duration::from_secs(15);

fn init_tracing() {
    groupcall_testkit::init_tracing("warn");
}

fn turn_server(turn: &Coturn, user: &str) -> IceServer {
    let (username, password) = turn.credentials(user, Duration::from_secs(3600));
    IceServer::turn([turn.turn_url()], username, password)
}

async fn until(
    events: &mut PeerEvents,
    what: &str,
    pred: impl Fn(&PeerEvent) -> bool,
) -> PeerEvent {
    groupcall_testkit::media::peer_event_until(events, WAIT, what, pred).await
}

fn candidates(sdp: &str) -> Vec<&str> {
    sdp.lines()
        .filter(|l| l.starts_with("a=candidate"))
        .collect()
}

fn received(stats: &PeerStats, kind: TrackKind) -> u64 {
    stats
        .remote
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.received.frames)
        .sum()
}

fn attach_sources(peer: &MediaPeer, stream: &str) {
    peer.set_source(&format!("{stream}-audio"), OggOpusSource::tone())
        .unwrap();
    peer.set_source(
        &format!("{stream}-video"),
        IvfSource::test_pattern().unwrap(),
    )
    .unwrap();
}

/// Offer from `a`, answer from `b`; returns (offer, answer, time from the
/// answer being applied to both sides connected).
async fn connect(
    a: &MediaPeer,
    a_ev: &mut PeerEvents,
    b: &MediaPeer,
    b_ev: &mut PeerEvents,
) -> (String, String, Duration) {
    let offer = a.create_offer(&[LocalFeed::usermedia("sa")]).await.unwrap();
    let answer = b
        .accept_offer(&offer, &[LocalFeed::usermedia("sb")])
        .await
        .unwrap();
    let t0 = Instant::now();
    a.apply_answer(&answer).await.unwrap();
    until(a_ev, "A connected", |e| matches!(e, PeerEvent::Connected)).await;
    until(b_ev, "B connected", |e| matches!(e, PeerEvent::Connected)).await;
    (offer, answer, t0.elapsed())
}

/// Lets media flow and checks both directions got audio and video; `a`
/// is the offerer of [`connect`].
async fn media_both_ways(a: &MediaPeer, b: &MediaPeer) -> (PeerStats, PeerStats) {
    attach_sources(a, "sa");
    attach_sources(b, "sb");
    let deadline = Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (sa, sb) = (a.stats().await.unwrap(), b.stats().await.unwrap());
        let enough = |s: &PeerStats| {
            received(s, TrackKind::Audio) >= 50 && received(s, TrackKind::Video) >= 30
        };
        if enough(&sa) && enough(&sb) {
            return (sa, sb);
        }
        assert!(
            Instant::now() < deadline,
            "media did not flow both ways: A {sa:?} B {sb:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_peer_connects_through_coturn() {
    init_tracing();
    let turn = coturn().await;
    let b_server = turn_server(&turn, "bob");
    let b_user = b_server.username.clone().unwrap();
    let (a, mut a_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    let (b, mut b_ev) = MediaPeer::new(PeerConfig {
        ice_servers: vec![b_server],
        relay_only: true,
        // Room for a loaded CI machine; the allocation takes ~10 ms.
        gather_wait: Duration::from_secs(2),
        ..PeerConfig::default()
    })
    .await
    .unwrap();

    // B offers: only its relayed candidate, allocated within the wait.
    let (offer, _answer, took) = connect(&b, &mut b_ev, &a, &mut a_ev).await;
    let cands = candidates(&offer);
    assert_eq!(cands.len(), 1, "{offer}");
    assert!(cands[0].contains("typ relay"), "{offer}");
    let sb = b.stats().await.unwrap();
    let gathering = sb.gathering_time.expect("gathering finished");
    assert!(gathering < Duration::from_secs(2), "{gathering:?}");
    let relayed = sb.relays[0].relayed.expect("relayed address");
    assert!(cands[0].contains(&format!("{} {} typ relay", relayed.ip(), relayed.port())));
    let (lo, hi) = turn.relay_ports();
    assert!(
        (lo..=hi).contains(&relayed.port()),
        "{relayed} not a coturn relay port"
    );
    println!(
        "gathering (TURN allocation) {gathering:?}, connected via relay {took:?} after the answer"
    );

    let (sb, sa) = media_both_ways(&b, &a).await;
    // B sends from its relayed address; A talks to that address.
    let pair = sb.selected_pair.expect("B has a selected pair");
    assert!(pair.relayed, "{pair:?}");
    assert_eq!(pair.local, relayed);
    let pair_a = sa.selected_pair.expect("A has a selected pair");
    assert_eq!(pair_a.remote, relayed);
    assert!(!pair_a.relayed);
    let r = &sb.relays[0];
    assert!(r.packets_sent > 100 && r.packets_received > 100, "{r:?}");
    assert!(
        r.channel_data_sent > 0 && r.channel_data_received > 0,
        "{r:?}"
    );
    assert_eq!((r.permissions, r.channels), (1, 1), "{r:?}");
    assert!(r.error.is_none());

    // Closing releases the allocation; coturn's own counters saw the media.
    b.close().await.unwrap();
    a.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let usage = loop {
        let u: Vec<_> = turn
            .usage()
            .into_iter()
            .filter(|u| u.username == b_user)
            .collect();
        if let Some(last) = u.last().filter(|u| u.received_packets > 100) {
            break last.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no usage for {b_user} in coturn's log:\n{}",
            turn.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(usage.sent_packets > 100, "{usage:?}");
    println!("coturn usage for B's session: {usage:?}; B relay counters {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_relay_only() {
    init_tracing();
    let turn = coturn().await;
    let cfg = |user: &str| PeerConfig {
        ice_servers: vec![turn_server(&turn, user)],
        relay_only: true,
        gather_wait: Duration::from_secs(2),
        ..PeerConfig::default()
    };
    let (a, mut a_ev) = MediaPeer::new(cfg("alice")).await.unwrap();
    let (b, mut b_ev) = MediaPeer::new(cfg("bob")).await.unwrap();
    let (offer, answer, took) = connect(&a, &mut a_ev, &b, &mut b_ev).await;
    for sdp in [&offer, &answer] {
        let c = candidates(sdp);
        assert!(c.len() == 1 && c[0].contains("typ relay"), "{sdp}");
    }
    println!("relay to relay: connected {took:?} after the answer");
    let (sa, sb) = media_both_ways(&a, &b).await;
    let ra = sa.relays[0].relayed.unwrap();
    let rb = sb.relays[0].relayed.unwrap();
    assert_eq!(
        sa.selected_pair.map(|p| (p.local, p.remote, p.relayed)),
        Some((ra, rb, true))
    );
    assert_eq!(
        sb.selected_pair.map(|p| (p.local, p.remote, p.relayed)),
        Some((rb, ra, true))
    );

    // An ICE restart keeps the relayed candidates; media goes on.
    let offer = a.restart_ice(&[LocalFeed::usermedia("sa")]).await.unwrap();
    assert!(candidates(&offer)[0].contains(&format!("{} typ relay", ra.port())));
    let answer = b
        .accept_offer(&offer, &[LocalFeed::usermedia("sb")])
        .await
        .unwrap();
    a.apply_answer(&answer).await.unwrap();
    let before = received(&sa, TrackKind::Video);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sa = a.stats().await.unwrap();
    assert!(received(&sa, TrackKind::Video) > before + 20, "{sa:?}");
    assert!(sa.selected_pair.unwrap().relayed);
}

/// A UDP forwarder that delays every datagram by `delay` each way: stands
/// in for a far away TURN server.
async fn delaying_proxy(target: SocketAddr, delay: Duration) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let client = Arc::new(tokio::sync::Mutex::new(None::<SocketAddr>));
    {
        let (front, back, client) = (front.clone(), back.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().await = Some(from);
                let data = buf[..n].to_vec();
                let back = back.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = back.send_to(&data, target).await;
                });
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = back.recv_from(&mut buf).await {
            let Some(to) = *client.lock().await else {
                continue;
            };
            let data = buf[..n].to_vec();
            let front = front.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = front.send_to(&data, to).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_turn_server_is_trickled() {
    init_tracing();
    let turn = coturn().await;
    // Two round trips of 500 ms: the allocation takes ~1 s, longer than
    // the 300 ms an offer waits.
    let proxy = delaying_proxy(turn.addr(), Duration::from_millis(250)).await;
    let (username, password) = turn.credentials("bob", Duration::from_secs(3600));
    let server = IceServer::turn([format!("turn:{proxy}?transport=udp")], username, password);
    let (a, mut a_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    let t0 = Instant::now();
    let (b, mut b_ev) = MediaPeer::new(PeerConfig {
        ice_servers: vec![server],
        relay_only: true,
        ..PeerConfig::default()
    })
    .await
    .unwrap();
    let offer = b.create_offer(&[LocalFeed::usermedia("sb")]).await.unwrap();
    let offered_after = t0.elapsed();
    assert!(
        offered_after >= Duration::from_millis(300) && offered_after < Duration::from_millis(900),
        "offer took {offered_after:?}"
    );
    assert!(candidates(&offer).is_empty(), "{offer}");
    assert!(!b.gathering_complete());
    let answer = a
        .accept_offer(&offer, &[LocalFeed::usermedia("sa")])
        .await
        .unwrap();
    b.apply_answer(&answer).await.unwrap();
    // The relayed candidate comes later, with the end of gathering.
    let ev = until(&mut b_ev, "late candidates", |e| {
        matches!(e, PeerEvent::LocalCandidates { .. })
    })
    .await;
    let PeerEvent::LocalCandidates {
        candidates: late,
        complete,
    } = ev
    else {
        unreachable!()
    };
    let trickled_after = t0.elapsed();
    assert!(complete);
    assert_eq!(late.len(), 1, "{late:?}");
    assert!(late[0].candidate.contains("typ relay"));
    assert!(b.gathering_complete());
    for c in &late {
        a.add_remote_candidate(&c.candidate, c.sdp_mid.as_deref(), c.sdp_m_line_index)
            .await
            .unwrap();
    }
    until(&mut a_ev, "A connected", |e| {
        matches!(e, PeerEvent::Connected)
    })
    .await;
    until(&mut b_ev, "B connected", |e| {
        matches!(e, PeerEvent::Connected)
    })
    .await;
    println!(
        "slow TURN: offer after {offered_after:?} without candidates, relay candidate trickled \
         after {trickled_after:?}, connected after {:?}",
        t0.elapsed()
    );
    let s = b.stats().await.unwrap();
    assert!(s.selected_pair.unwrap().relayed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_turn_password_fails_cleanly() {
    init_tracing();
    let turn = coturn().await;
    let (username, _) = turn.credentials("mallory", Duration::from_secs(3600));
    let (a, mut a_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
    let (b, mut b_ev) = MediaPeer::new(PeerConfig {
        ice_servers: vec![IceServer::turn(
            [turn.turn_url()],
            username,
            "not the password",
        )],
        ..PeerConfig::default()
    })
    .await
    .unwrap();
    // The host candidate still works; the relay is reported as failed.
    connect(&b, &mut b_ev, &a, &mut a_ev).await;
    let s = b.stats().await.unwrap();
    assert!(s.gathering_time.unwrap() < Duration::from_millis(1500));
    let err = s.relays[0].error.clone().expect("an error");
    assert!(err.contains("401"), "{err}");
    assert!(s.relays[0].relayed.is_none());
    assert!(!s.selected_pair.unwrap().relayed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_url_gives_srflx_and_unusable_urls_are_skipped() {
    init_tracing();
    // A fake STUN server that maps everyone to 127.0.0.2 (same port).
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = s.local_addr().unwrap();
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
    let cfg = PeerConfig {
        ice_servers: vec![
            IceServer::stun(format!("stun:{server}")),
            IceServer {
                urls: vec![
                    "turns:127.0.0.1:5349".into(),
                    "turn:127.0.0.1:3478?transport=tcp".into(),
                    "http://nonsense".into(),
                    // No credentials: skipped.
                    "turn:127.0.0.1:3478".into(),
                ],
                ..IceServer::default()
            },
        ],
        ..PeerConfig::default()
    };
    let t0 = Instant::now();
    let (a, _ev) = MediaPeer::new(cfg).await.unwrap();
    let offer = a.create_offer(&[LocalFeed::usermedia("s")]).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    let port = a.local_addrs()[0].port();
    assert!(
        offer.contains(&format!("127.0.0.2 {port} typ srflx")),
        "{offer}"
    );
    let s = a.stats().await.unwrap();
    assert!(s.relays.is_empty());
    assert!(a.gathering_complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_allocation_for_all_peers_of_a_host() {
    init_tracing();
    let turn = coturn().await;
    let server = turn_server(&turn, "carol");
    let user = server.username.clone().unwrap();
    // Carol's host: three relay-only peers, to three other participants.
    let host = groupcall_media::MediaHost::spawn(&["127.0.0.1".parse().unwrap()]).unwrap();
    let cfg = || PeerConfig {
        ice_servers: vec![server.clone()],
        relay_only: true,
        gather_wait: Duration::from_secs(2),
        ..PeerConfig::default()
    };
    let mut relayed = None;
    let mut pairs = Vec::new();
    for i in 0..3 {
        let (c, mut c_ev) = host.new_peer(cfg()).unwrap();
        let (r, mut r_ev) = MediaPeer::new(PeerConfig::default()).await.unwrap();
        let (offer, _answer, took) = connect(&c, &mut c_ev, &r, &mut r_ev).await;
        let cands = candidates(&offer);
        assert_eq!(cands.len(), 1, "{offer}");
        assert!(cands[0].contains("typ relay"), "{offer}");
        let s = c.stats().await.unwrap();
        let addr = s.relays[0].relayed.expect("relayed address");
        // Every peer offers the same relayed address.
        assert_eq!(*relayed.get_or_insert(addr), addr);
        println!("peer {i}: connected via relay {addr} {took:?} after the answer");
        pairs.push((c, r));
    }
    for (c, r) in &pairs {
        let (sc, sr) = media_both_ways(c, r).await;
        let pair = sc.selected_pair.expect("selected pair");
        assert!(pair.relayed, "{pair:?}");
        assert_eq!(Some(pair.local), relayed);
        assert_eq!(sr.selected_pair.expect("remote pair").remote, pair.local);
    }
    // One allocation for the three peers: the host's figure and coturn's.
    assert_eq!(host.turn_allocations(), 1);
    assert_eq!(host.socket_count(), 1);
    assert_eq!(turn.allocations(&user), 1, "{}", turn.log_tail(40));
    let s = pairs[0].0.stats().await.unwrap();
    assert_eq!(s.relays.len(), 1);
    let r = &s.relays[0];
    // One permission (every remote is on 127.0.0.1), a channel per remote
    // address.
    assert_eq!((r.permissions, r.channels), (1, 3), "{r:?}");
    println!(
        "coturn allocations for {user}: {}; relay counters {r:?}",
        turn.allocations(&user)
    );
    for (c, r) in &pairs {
        c.close().await.unwrap();
        r.close().await.unwrap();
    }
    host.close().await;
}
