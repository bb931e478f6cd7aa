//! A real group call: three groupcall participants on a real Synapse, real
//! Olm, real WebRTC over UDP on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use groupcall::client::{CallCommander, ClientEvent, JoinOptions, join_call};
use groupcall::matrix::{CreateRoomOptions, MatrixSession};
use groupcall::media::TrackKind;
use groupcall::proto::events::FeedPurpose;
use groupcall::proto::{CallEvent, Command, CreateOptions, DeviceKey, PeerStatus};
use groupcall_synapse::{Synapse, SynapseOptions};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

type Tagged = (usize, ClientEvent);

struct Participant {
    commander: CallCommander,
    done: tokio::task::JoinHandle<()>,
}

/// Joins and forwards every event, tagged with `idx`, into `tx`.
async fn start(
    session: MatrixSession,
    opts: JoinOptions,
    idx: usize,
    tx: mpsc::UnboundedSender<Tagged>,
) -> Participant {
    let mut handle = join_call(session, opts).await.expect("join");
    let commander = handle.commander();
    let done = tokio::spawn(async move {
        while let Some(ev) = handle.next_event().await {
            if tx.send((idx, ev)).is_err() {
                break;
            }
        }
        let _ = handle.finished().await;
    });
    Participant { commander, done }
}

/// Everything seen so far, and helpers to wait for conditions on it.
struct Log {
    rx: mpsc::UnboundedReceiver<Tagged>,
    seen: Vec<(Instant, usize, ClientEvent)>,
}

impl Log {
    async fn wait_for(
        &mut self,
        what: &str,
        secs: u64,
        mut cond: impl FnMut(&[(Instant, usize, ClientEvent)]) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(&self.seen) {
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.rx.recv(),
            )
            .await
            {
                Ok(Some((i, ev))) => self.seen.push((Instant::now(), i, ev)),
                Ok(None) => panic!("event channel closed while waiting for {what}"),
                Err(_) => {
                    let tail: Vec<String> = self
                        .seen
                        .iter()
                        .filter(|(_, _, e)| {
                            !matches!(e, ClientEvent::Media { .. } | ClientEvent::MediaSent { .. })
                        })
                        .rev()
                        .take(60)
                        .map(|(_, i, e)| format!("p{i}: {e:?}"))
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

fn connected_since(
    seen: &[(Instant, usize, ClientEvent)],
    since: Instant,
    at: usize,
    dev: &DeviceKey,
) -> bool {
    seen.iter().any(|(t, i, e)| {
        *t >= since
            && *i == at
            && matches!(e, ClientEvent::Call(CallEvent::PeerState { device, status: PeerStatus::Connected, .. }) if device == dev)
    })
}

fn frames_from(
    seen: &[(Instant, usize, ClientEvent)],
    at: usize,
    dev: &DeviceKey,
    kind: TrackKind,
    stream: Option<&str>,
) -> u64 {
    seen.iter()
        .filter_map(|(_, i, e)| match e {
            ClientEvent::Media {
                device,
                kind: k,
                frames,
                stream_id,
                ..
            } if *i == at
                && device == dev
                && *k == kind
                && stream.is_none_or(|s| s == stream_id) =>
            {
                Some(*frames)
            }
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

fn count_ivf(path: &Path) -> usize {
    let data = std::fs::read(path).unwrap();
    groupcall::media::ivf::IvfReader::new(&data)
        .unwrap()
        .frames()
        .unwrap()
        .len()
}

fn count_ogg(path: &Path) -> usize {
    let data = std::fs::read(path).unwrap();
    let mut r = groupcall::media::ogg::OggPacketReader::new(&data);
    let mut n = 0;
    while r.next_packet().unwrap().is_some() {
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_participants_full_mesh_with_media_mute_screenshare_and_rejoin() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| "warn,matrix_sdk_crypto=error,groupcall=info".into()),
        )
        .with_test_writer()
        .try_init();
    let synapse = Synapse::start(SynapseOptions::default())
        .await
        .expect("synapse");
    let hs = synapse.base_url();
    let tmp = tempfile::tempdir().unwrap();
    let names = ["alice", "bob", "carol"];
    let mut sessions = Vec::new();
    for n in names {
        synapse.register_user(n, "secret-pw").await.unwrap();
        sessions.push(
            MatrixSession::login(&hs, n, "secret-pw", tmp.path().join(n))
                .await
                .unwrap(),
        );
    }
    let invite: Vec<String> = sessions[1..]
        .iter()
        .map(|s| s.user_id().to_owned())
        .collect();
    let room = sessions[0]
        .create_call_room(CreateRoomOptions {
            name: Some("call".into()),
            invite,
            encrypted: false,
            public: false,
        })
        .await
        .unwrap();
    let devices: Vec<DeviceKey> = sessions
        .iter()
        .map(|s| DeviceKey::new(s.user_id(), s.device_id()))
        .collect();
    let record: Vec<PathBuf> = names
        .iter()
        .map(|n| tmp.path().join(format!("rec-{n}")))
        .collect();

    let (tx, rx) = mpsc::unbounded_channel();
    let mut log = Log {
        rx,
        seen: Vec::new(),
    };
    let mut parts = Vec::new();
    let t0 = Instant::now();
    for (i, s) in sessions.iter().enumerate() {
        let mut opts = JoinOptions::new(room.clone());
        opts.create = (i == 0).then(CreateOptions::default);
        opts.record_dir = Some(record[i].clone());
        parts.push(start(s.clone(), opts, i, tx.clone()).await);
        if i == 0 {
            log.wait_for("the creator to join", 20, |s| {
                s.iter().any(|(_, i, e)| {
                    *i == 0
                        && matches!(
                            e,
                            ClientEvent::Call(CallEvent::Joined { created: true, .. })
                        )
                })
            })
            .await;
        }
    }

    // 1. A full mesh forms and media flows both ways on every pair.
    log.wait_for("every pair connected", 60, |s| {
        (0..3).all(|a| (0..3).all(|b| a == b || connected_since(s, t0, a, &devices[b])))
    })
    .await;
    let connected_after = t0.elapsed();
    log.wait_for("audio and video both ways on every pair", 60, |s| {
        (0..3).all(|a| {
            (0..3).all(|b| {
                a == b
                    || (frames_from(s, a, &devices[b], TrackKind::Audio, None) > 50
                        && frames_from(s, a, &devices[b], TrackKind::Video, None) > 10)
            })
        })
    })
    .await;
    eprintln!(
        "mesh of 3 connected {connected_after:?} after the first join; media both ways {:?}",
        t0.elapsed()
    );

    // 2. Signalling between groupcall participants is Olm-encrypted.
    let signalling: Vec<_> = log
        .seen
        .iter()
        .filter_map(|(_, _, e)| match e {
            ClientEvent::Signalling {
                encrypted,
                event_type,
                ..
            } => Some((event_type.clone(), *encrypted)),
            _ => None,
        })
        .collect();
    assert!(
        signalling.len() >= 9,
        "expected at least invite/answer/select_answer per pair: {signalling:?}"
    );
    assert!(
        signalling.iter().all(|(_, enc)| *enc),
        "plaintext signalling seen: {signalling:?}"
    );

    // 3. Mute on alice is seen by the others.
    parts[0].commander.send(Command::SetAudioMuted(true));
    log.wait_for("alice's audio mute at bob and carol", 15, |s| {
        [1, 2].iter().all(|&at| {
            s.iter().any(|(_, i, e)| {
                *i == at
                    && matches!(e, ClientEvent::Call(CallEvent::FeedChanged { device, audio_muted: true, .. }) if *device == devices[0])
            })
        })
    })
    .await;

    // 4. Screenshare on bob adds an m.screenshare feed at the others, with frames; off removes it.
    parts[1].commander.send(Command::Screenshare(true));
    let mut share_stream = String::new();
    log.wait_for("bob's screenshare feed at alice and carol", 20, |s| {
        let found: Vec<String> = [0, 2]
            .iter()
            .filter_map(|&at| {
                s.iter().find_map(|(_, i, e)| match e {
                    ClientEvent::Call(CallEvent::FeedAdded {
                        device,
                        purpose: FeedPurpose::Screenshare,
                        stream_id,
                        ..
                    }) if *i == at && *device == devices[1] => Some(stream_id.clone()),
                    _ => None,
                })
            })
            .collect();
        if found.len() == 2 {
            share_stream = found[0].clone();
            true
        } else {
            false
        }
    })
    .await;
    let stream = share_stream.clone();
    log.wait_for("screenshare video frames at alice and carol", 20, |s| {
        [0, 2]
            .iter()
            .all(|&at| frames_from(s, at, &devices[1], TrackKind::Video, Some(&stream)) > 10)
    })
    .await;
    parts[1].commander.send(Command::Screenshare(false));
    log.wait_for("bob's screenshare removed at alice and carol", 20, |s| {
        [0, 2].iter().all(|&at| {
            s.iter().any(|(_, i, e)| {
                *i == at
                    && matches!(e, ClientEvent::Call(CallEvent::FeedRemoved { device, stream_id }) if *device == devices[1] && *stream_id == share_stream)
            })
        })
    })
    .await;

    // 5. Carol leaves: the others see it and close her peer; she rejoins with
    //    a new session (a new login is a new client load, as MSC3401 puts
    //    it) and is called again.
    let t_leave = Instant::now();
    let carol = parts.pop().unwrap();
    carol.commander.send(Command::Leave);
    carol.done.await.unwrap();
    log.wait_for("carol gone at alice and bob", 20, |s| {
        [0, 1].iter().all(|&at| {
            s.iter().any(|(t, i, e)| {
                *t >= t_leave
                    && *i == at
                    && matches!(e, ClientEvent::Call(CallEvent::PeerState { device, status: PeerStatus::Closed(_) | PeerStatus::Failed(_), .. }) if *device == devices[2])
            }) && s.iter().any(|(t, i, e)| {
                *t >= t_leave
                    && *i == at
                    && matches!(e, ClientEvent::Call(CallEvent::ParticipantLeft { device, .. }) if *device == devices[2])
            })
        })
    })
    .await;
    let t_rejoin = Instant::now();
    let carol_again = MatrixSession::login(&hs, "carol", "secret-pw", tmp.path().join("carol"))
        .await
        .unwrap();
    assert_eq!(
        carol_again.device_id(),
        devices[2].device_id,
        "same device after re-login"
    );
    let mut opts = JoinOptions::new(room.clone());
    opts.record_dir = Some(record[2].clone());
    parts.push(start(carol_again, opts, 2, tx.clone()).await);
    log.wait_for("carol re-called and connected after rejoining", 60, |s| {
        let new_session = s.iter().any(|(t, i, e)| {
            *t >= t_rejoin && *i == 0 && matches!(e, ClientEvent::Call(CallEvent::ParticipantJoined { device, .. }) if *device == devices[2])
        });
        new_session
            && [0, 1].iter().all(|&at| connected_since(s, t_rejoin, at, &devices[2]))
            && [0, 1].iter().all(|&b| connected_since(s, t_rejoin, 2, &devices[b]))
    })
    .await;

    log.wait_for("media from carol's new streams at alice and bob", 30, |s| {
        let new_streams: Vec<String> = s
            .iter()
            .filter_map(|(t, i, e)| match e {
                ClientEvent::Call(CallEvent::FeedAdded {
                    device, stream_id, ..
                }) if *t >= t_rejoin && *i == 0 && *device == devices[2] => Some(stream_id.clone()),
                _ => None,
            })
            .collect();
        new_streams.iter().any(|st| {
            [0, 1].iter().all(|&at| {
                // Enough of both for the recordings checked below.
                frames_from(s, at, &devices[2], TrackKind::Video, Some(st)) > 20
                    && frames_from(s, at, &devices[2], TrackKind::Audio, Some(st)) > 60
            })
        })
    })
    .await;

    // 6. Everyone leaves; the recordings are valid files.
    for p in parts {
        p.commander.send(Command::Leave);
        p.done.await.unwrap();
    }
    drop(tx);
    while let Some((i, ev)) = log.rx.recv().await {
        log.seen.push((Instant::now(), i, ev));
    }
    let recorded: BTreeMap<usize, Vec<PathBuf>> =
        log.seen.iter().fold(BTreeMap::new(), |mut m, (_, i, e)| {
            if let ClientEvent::Recorded { path } = e {
                m.entry(*i).or_default().push(path.clone());
            }
            m
        });
    let alice_files = recorded.get(&0).expect("alice recorded");
    let ivf: Vec<_> = alice_files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ivf"))
        .collect();
    let ogg: Vec<_> = alice_files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ogg"))
        .collect();
    assert!(
        ivf.len() >= 2 && ogg.len() >= 2,
        "alice's recordings: {alice_files:?}"
    );
    // They decode (ffmpeg): no decoding error, at least as many frames.
    for p in &ivf {
        assert!(count_ivf(p) > 10, "{} has too few frames", p.display());
        let decoded = support::assert_decodes(p, 11);
        eprintln!(
            "FIGURE call: {} decodes to {decoded} video frames",
            p.display()
        );
    }
    for p in &ogg {
        assert!(count_ogg(p) > 50, "{} has too few packets", p.display());
        let decoded = support::assert_decodes(p, 51);
        eprintln!(
            "FIGURE call: {} decodes to {decoded} audio frames",
            p.display()
        );
    }
    drop(synapse);
}
