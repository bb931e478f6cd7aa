//! The mesh across federation: groupcall participants on two homeservers
//! (a local test federation of two Synapses on loopback, see
//! `groupcall_synapse::Federation`) in one call, no focus. Their signalling
//! is Olm-encrypted to-device, over federation between servers; media goes
//! peer to peer over UDP on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use groupcall::client::{ClientEvent, JoinOptions, join_call};
use groupcall::matrix::CreateRoomOptions;
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, Command, CreateOptions, DeviceKey};
use groupcall_testkit::synapse::{Federation, FederationOptions};
use groupcall_testkit::{
    Entry, Ev, assert_recordings_of, federation_sessions, first_frames_at, ms, rust_connected_at,
    rust_frames,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// Participants per homeserver.
const PER_SERVER: usize = 2;
const SERVERS: usize = 2;

/// Everything the participants reported, stamped when it was reported
/// (the forwarding task stamps it: the test only reads the channel while
/// it waits, and joins the participants one after the other).
struct Log {
    rx: mpsc::UnboundedReceiver<(usize, Instant, Ev)>,
    seen: Vec<Entry>,
}

impl Log {
    fn push(&mut self, who: usize, t: Instant, ev: Ev) {
        self.seen.push(Entry { t, who, ev });
    }

    async fn wait_for(&mut self, what: &str, secs: u64, mut cond: impl FnMut(&[Entry]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(&self.seen) {
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.rx.recv(),
            )
            .await
            {
                Ok(Some((who, t, ev))) => self.push(who, t, ev),
                Ok(None) => panic!("event channel closed while waiting for {what}"),
                Err(_) => {
                    let tail: Vec<String> = self
                        .seen
                        .iter()
                        .filter(|e| {
                            !matches!(
                                e.ev,
                                Ev::Rust(ClientEvent::Media { .. } | ClientEvent::MediaSent { .. })
                            )
                        })
                        .rev()
                        .take(60)
                        .map(|e| format!("p{}: {:?}", e.who, e.ev))
                        .collect();
                    panic!(
                        "timed out after {secs} s waiting for {what}; recent events:\n{}",
                        tail.join("\n")
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mesh_across_two_homeservers_two_participants_each() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| "warn,matrix_sdk_crypto=error,groupcall=info".into()),
        )
        .with_test_writer()
        .try_init();
    let t_fed = Instant::now();
    let fed = Federation::start(FederationOptions {
        servers: SERVERS,
        ..FederationOptions::default()
    })
    .await
    .expect("test federation");
    eprintln!(
        "federation of {SERVERS} homeservers up in {:?}: {:?}",
        t_fed.elapsed(),
        fed.servers()
            .iter()
            .map(|s| s.server_name())
            .collect::<Vec<_>>()
    );

    // alice, bob on server 0; carol, dave on server 1.
    let names = ["alice", "bob", "carol", "dave"];
    let server_of = |i: usize| i / PER_SERVER;
    let tmp = tempfile::tempdir().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let sessions = federation_sessions(&fed, &names, server_of, tmp.path()).await;
    let devices: Vec<DeviceKey> = sessions
        .iter()
        .map(|s| DeviceKey::new(s.user_id(), s.device_id()))
        .collect();
    for (i, d) in devices.iter().enumerate() {
        assert!(
            d.user_id
                .as_str()
                .ends_with(fed.server(server_of(i)).server_name()),
            "{} is a user of server {}",
            d.user_id,
            server_of(i)
        );
    }

    // A private call room on server 0; the others are invited (across the
    // federation for carol and dave) and join it when they join the call.
    let room = sessions[0]
        .create_call_room(CreateRoomOptions {
            name: Some("federated call".into()),
            invite: sessions[1..]
                .iter()
                .map(|s| s.user_id().to_owned())
                .collect(),
            encrypted: false,
            public: false,
        })
        .await
        .unwrap();

    let record: Vec<PathBuf> = names
        .iter()
        .map(|n| tmp.path().join(format!("rec-{n}")))
        .collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut log = Log {
        rx,
        seen: Vec::new(),
    };
    let mut commanders = Vec::new();
    let mut tasks = Vec::new();
    let mut join_start = Vec::new();
    let t0 = Instant::now();
    for (i, s) in sessions.iter().enumerate() {
        let mut opts = JoinOptions::new(room.clone());
        opts.create = (i == 0).then(CreateOptions::default);
        opts.record_dir = Some(record[i].clone());
        // Olm only, both ways: plaintext signalling would be refused.
        opts.require_encrypted = true;
        join_start.push(Instant::now());
        let mut handle = join_call(s.clone(), opts).await.expect("join_call");
        commanders.push(handle.commander());
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = handle.next_event().await {
                if tx.send((i, Instant::now(), Ev::Rust(ev))).is_err() {
                    break;
                }
            }
            let _ = handle.finished().await;
        }));
        if i == 0 {
            log.wait_for("the creator to join", 30, |s| {
                s.iter().any(|e| {
                    e.who == 0 && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
                })
            })
            .await;
        }
    }
    let t_last_join = *join_start.last().unwrap();
    let n = names.len();
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|a| ((a + 1)..n).map(move |b| (a, b)))
        .collect();

    // 1. A full mesh forms: every pair connected, seen from both sides.
    log.wait_for("every pair connected (both sides)", 120, |s| {
        pairs.iter().all(|&(a, b)| {
            rust_connected_at(s, t0, a, &devices[b]).is_some()
                && rust_connected_at(s, t0, b, &devices[a]).is_some()
        })
    })
    .await;

    // 2. Audio and video both ways on every pair.
    log.wait_for("audio and video both ways on every pair", 60, |s| {
        pairs.iter().all(|&(a, b)| {
            [(a, b), (b, a)].iter().all(|&(at, from)| {
                rust_frames(s, t0, at, &devices[from], TrackKind::Audio, None) > 100
                    && rust_frames(s, t0, at, &devices[from], TrackKind::Video, None) > 20
            })
        })
    })
    .await;

    // Setup times: per pair from the later of the two joins to both sides
    // connected, and to the first frames both ways.
    let across = |a: usize, b: usize| server_of(a) != server_of(b);
    let mut worst_across = 0;
    let mut worst_local = 0;
    let mut t_mesh = t0;
    let mut t_media = t0;
    for &(a, b) in &pairs {
        let start = join_start[a].max(join_start[b]);
        let s = &log.seen;
        let connected = rust_connected_at(s, t0, a, &devices[b])
            .unwrap()
            .max(rust_connected_at(s, t0, b, &devices[a]).unwrap());
        let media = [(a, b), (b, a)]
            .iter()
            .flat_map(|&(at, from)| {
                [TrackKind::Audio, TrackKind::Video]
                    .map(|k| first_frames_at(s, t0, at, &devices[from], k).unwrap())
            })
            .max()
            .unwrap();
        t_mesh = t_mesh.max(connected);
        t_media = t_media.max(media);
        let c = ms(start, connected);
        if across(a, b) {
            worst_across = worst_across.max(c);
        } else {
            worst_local = worst_local.max(c);
        }
        eprintln!(
            "FIGURE federation mesh: pair {}-{} ({}): connected {c} ms, first audio+video both ways {} ms after the later join",
            names[a],
            names[b],
            if across(a, b) {
                "across homeservers"
            } else {
                "same homeserver"
            },
            ms(start, media)
        );
    }
    eprintln!(
        "FIGURE federation mesh: {SERVERS} homeservers x {PER_SERVER} participants: full mesh ({} pairs, {} across homeservers, connected at both ends) {} ms after the last join started, first audio+video both ways on every pair {} ms after it; slowest pair to connect: across {worst_across} ms, same homeserver {worst_local} ms",
        pairs.len(),
        pairs.iter().filter(|&&(a, b)| across(a, b)).count(),
        ms(t_last_join, t_mesh),
        ms(t_last_join, t_media)
    );

    // 3. Signalling is Olm-encrypted both ways, across servers included.
    for (i, d) in devices.iter().enumerate() {
        for (j, other) in devices.iter().enumerate() {
            if i == j {
                continue;
            }
            let to = log.seen.iter().find_map(|e| match &e.ev {
                Ev::Rust(ClientEvent::SignallingTo {
                    device, encrypted, ..
                }) if e.who == i && device == other => Some(*encrypted),
                _ => None,
            });
            assert_eq!(
                to,
                Some(true),
                "{} -> {}: signalling not reported Olm-encrypted",
                d.user_id,
                other.user_id
            );
        }
    }
    let received: Vec<(usize, String, String, bool)> = log
        .seen
        .iter()
        .filter_map(|e| match &e.ev {
            Ev::Rust(ClientEvent::Signalling {
                sender,
                event_type,
                encrypted,
                ..
            }) => Some((e.who, sender.clone(), event_type.clone(), *encrypted)),
            _ => None,
        })
        .collect();
    assert!(
        received.iter().all(|(_, _, _, enc)| *enc),
        "plaintext signalling seen: {received:?}"
    );
    let received_across = received
        .iter()
        .filter(|(at, sender, _, _)| {
            devices
                .iter()
                .position(|d| d.user_id.as_str() == sender)
                .is_some_and(|from| across(*at, from))
        })
        .count();
    assert!(
        received_across >= 4 * 3,
        "expected invite/answer/select_answer on each of the 4 pairs across servers, saw {received_across}: {received:?}"
    );
    eprintln!(
        "FIGURE federation mesh: {} signalling messages received, all Olm-encrypted, {received_across} of them across homeservers",
        received.len()
    );

    // 4. Everyone leaves; every participant recorded audio and video from
    //    each of the three others, and the recordings decode.
    for c in &commanders {
        c.send(Command::Leave);
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(tx);
    while let Some((who, t, ev)) = log.rx.recv().await {
        log.push(who, t, ev);
    }
    let recorded: BTreeMap<usize, Vec<PathBuf>> =
        log.seen.iter().fold(BTreeMap::new(), |mut m, e| {
            if let Ev::Rust(ClientEvent::Recorded { path }) = &e.ev {
                m.entry(e.who).or_default().push(path.clone());
            }
            m
        });
    let mut total = (0, 0);
    for at in 0..n {
        let files = recorded.get(&at).cloned().unwrap_or_default();
        for from in (0..n).filter(|&f| f != at) {
            let (v, a) = assert_recordings_of(
                &files,
                names[at].as_str(),
                &names[from],
                &devices[from].device_id,
            );
            total.0 += v;
            total.1 += a;
        }
    }
    eprintln!(
        "FIGURE federation mesh: {} recordings (each participant, each of the 3 others, audio and video) decode: {} video and {} audio frames in all",
        n * (n - 1) * 2,
        total.0,
        total.1
    );
    drop(fed);
}
