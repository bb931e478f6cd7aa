//! Tests of the peer workers with real media peers on loopback (no
//! homeserver): ordering within a peer, independence between peers,
//! closing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

type Rx = mpsc::UnboundedReceiver<(PeerHandle, FromPeer)>;
type Tx = mpsc::UnboundedSender<(PeerHandle, FromPeer)>;

/// A started worker: its queue, its close signal and its task.
struct Worker {
    ops: mpsc::UnboundedSender<PeerOp>,
    close: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Each worker's peer on a media host of its own (as peers of different
/// participants are).
fn worker(handle: u64, config: PeerConfig, tx: &Tx) -> Worker {
    let (ops, ops_rx) = mpsc::unbounded_channel();
    let (close, close_rx) = oneshot::channel();
    let host = groupcall_media::MediaHost::spawn(&config.bind_addrs).map_err(|e| e.to_string());
    let task = tokio::spawn(peer_worker(
        PeerHandle(handle),
        host,
        config,
        ops_rx,
        close_rx,
        tx.clone(),
    ));
    Worker { ops, close, task }
}

fn feeds(stream: &str) -> Vec<groupcall_media::LocalFeed> {
    vec![groupcall_media::LocalFeed::usermedia(stream)]
}

/// What a message is, for comparing sequences.
fn kind(m: &FromPeer) -> &'static str {
    match m {
        FromPeer::Created(_) => "created",
        FromPeer::Offer { .. } => "offer",
        FromPeer::Answer { .. } => "answer",
        FromPeer::Failed(_) => "failed",
        FromPeer::Event(PeerEvent::Connected) => "connected",
        FromPeer::Event(_) => "event",
        FromPeer::Stats(_) => "stats",
    }
}

/// Receives until `pred` holds for a message (returned), keeping what came
/// before in `seen`.
async fn until(
    rx: &mut Rx,
    seen: &mut Vec<(u64, &'static str)>,
    mut pred: impl FnMut(u64, &FromPeer) -> bool,
) -> FromPeer {
    let wait = async {
        loop {
            let (h, m) = rx.recv().await.expect("worker channel closed");
            seen.push((h.0, kind(&m)));
            if pred(h.0, &m) {
                return m;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("no such message within 20 s")
}

/// A peer whose gathering never ends (its STUN server never answers, and it
/// waits for gathering up to 60 s) does not hold back another peer's offer,
/// asked for after its own; closing it abandons its waiting offer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_waiting_for_gathering_holds_back_no_other_peer() {
    // Never answers: bound and never read.
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let slow_config = PeerConfig {
        stun_server: Some(blackhole.local_addr().unwrap()),
        stun_timeout: Duration::from_secs(120),
        gather_wait: Duration::from_secs(60),
        ..PeerConfig::default()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let slow = worker(1, slow_config, &tx);
    let fast = worker(2, PeerConfig::default(), &tx);
    slow.ops
        .send(PeerOp::CreateOffer {
            feeds: feeds("slow"),
            ice_restart: false,
        })
        .unwrap();
    fast.ops
        .send(PeerOp::CreateOffer {
            feeds: feeds("fast"),
            ice_restart: false,
        })
        .unwrap();
    let mut seen = Vec::new();
    until(&mut rx, &mut seen, |h, m| {
        h == 2 && matches!(m, FromPeer::Offer { .. })
    })
    .await;
    assert!(
        !seen.contains(&(1, "offer")),
        "the slow peer's offer cannot be ready: {seen:?}"
    );
    // Closing the slow peer abandons its offer: the worker ends long before
    // its 60 s gathering wait, without reporting one.
    drop(slow.close);
    tokio::time::timeout(Duration::from_secs(20), slow.task)
        .await
        .expect("the closed worker ended")
        .unwrap();
    while let Ok((h, m)) = rx.try_recv() {
        seen.push((h.0, kind(&m)));
    }
    assert!(
        !seen.contains(&(1, "offer")),
        "a closed peer reports no offer: {seen:?}"
    );
    drop(fast.ops);
    drop(fast.close);
    fast.task.await.unwrap();
}

/// Two workers set up a real connection through their queues: offer,
/// answer, apply. Each peer reports `created` first, its SDP before any of
/// its events, and answers a stats request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_operations_run_in_order_and_its_events_follow_its_results() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = worker(1, PeerConfig::default(), &tx);
    let b = worker(2, PeerConfig::default(), &tx);
    let mut seen = Vec::new();
    a.ops
        .send(PeerOp::CreateOffer {
            feeds: feeds("a"),
            ice_restart: false,
        })
        .unwrap();
    let FromPeer::Offer {
        sdp: offer,
        feeds: offered,
    } = until(&mut rx, &mut seen, |h, m| {
        h == 1 && matches!(m, FromPeer::Offer { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        offered[0].stream_id, "a",
        "the offer's feeds are the request's"
    );
    b.ops
        .send(PeerOp::AcceptOffer {
            sdp: offer,
            feeds: feeds("b"),
        })
        .unwrap();
    let FromPeer::Answer { sdp: answer, .. } = until(&mut rx, &mut seen, |h, m| {
        h == 2 && matches!(m, FromPeer::Answer { .. })
    })
    .await
    else {
        unreachable!()
    };
    a.ops.send(PeerOp::ApplyAnswer { sdp: answer }).unwrap();
    let mut connected = [false, false];
    until(&mut rx, &mut seen, |h, m| {
        if matches!(m, FromPeer::Event(PeerEvent::Connected)) {
            connected[h as usize - 1] = true;
        }
        connected == [true, true]
    })
    .await;
    a.ops.send(PeerOp::Stats).unwrap();
    let FromPeer::Stats(stats) = until(&mut rx, &mut seen, |h, m| {
        h == 1 && matches!(m, FromPeer::Stats(_))
    })
    .await
    else {
        unreachable!()
    };
    assert!(stats.is_some(), "a live peer reports its counters");
    for (h, sdp) in [(1, "offer"), (2, "answer")] {
        let mine: Vec<_> = seen
            .iter()
            .filter(|(x, _)| *x == h)
            .map(|(_, k)| *k)
            .collect();
        assert_eq!(mine.first(), Some(&"created"), "peer {h}: {mine:?}");
        let at = mine.iter().position(|k| *k == sdp).unwrap();
        assert!(
            mine[..at].iter().all(|k| *k == "created"),
            "peer {h}: no event before its {sdp}: {mine:?}"
        );
    }
    for w in [a, b] {
        drop(w.close);
        tokio::time::timeout(Duration::from_secs(20), w.task)
            .await
            .expect("worker ended")
            .unwrap();
    }
}
