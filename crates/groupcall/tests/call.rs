//! A real group call: three groupcall participants on a real Synapse, real
//! Olm, real WebRTC over UDP on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::path::PathBuf;

use groupcall::client::{ClientEvent, JoinOptions};
use groupcall::matrix::{CreateRoomOptions, MatrixSession};
use groupcall::media::TrackKind;
use groupcall::proto::events::FeedPurpose;
use groupcall::proto::{CallEvent, Command, CreateOptions, DeviceKey, PeerStatus};
use groupcall_testkit::{Entry, Ev, Harness, PASSWORD, spawn_participant};
use groupcall_testkit::{assert_decodes, count_ivf, count_ogg};
use tokio::time::Instant;

/// The client event of a groupcall participant.
fn client(e: &Entry) -> Option<&ClientEvent> {
    match &e.ev {
        Ev::Rust(c) => Some(c),
        _ => None,
    }
}

fn connected_since(seen: &[Entry], since: Instant, at: usize, dev: &DeviceKey) -> bool {
    seen.iter().any(|e| {
        e.t >= since
            && e.who == at
            && matches!(e.call(), Some(CallEvent::PeerState { device, status: PeerStatus::Connected, .. }) if device == dev)
    })
}

/// The highest frame count from `dev` at `at` (of `stream` if given).
fn frames_from(
    seen: &[Entry],
    at: usize,
    dev: &DeviceKey,
    kind: TrackKind,
    stream: Option<&str>,
) -> u64 {
    seen.iter()
        .filter_map(|e| match client(e)? {
            ClientEvent::Media {
                device,
                kind: k,
                frames,
                stream_id,
                ..
            } if e.who == at
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_participants_full_mesh_with_media_mute_screenshare_and_rejoin() {
    let mut h = Harness::new().await;
    let hs = h.hs.clone();
    let tmp = h.tmp.path().to_owned();
    let names = ["alice", "bob", "carol"];
    let mut sessions = Vec::new();
    for n in names {
        h.register(n).await;
        sessions.push(
            MatrixSession::login(&hs, n, PASSWORD, tmp.join(n))
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
    let record: Vec<PathBuf> = names.iter().map(|n| tmp.join(format!("rec-{n}"))).collect();

    let tx = h.log.sender();
    for n in names {
        h.log.name_next(n);
    }
    let log = &mut h.log;
    let mut parts = Vec::new();
    let t0 = Instant::now();
    for (i, s) in sessions.iter().enumerate() {
        let mut opts = JoinOptions::new(room.clone());
        opts.create = (i == 0).then(CreateOptions::default);
        opts.record_dir = Some(record[i].clone());
        parts.push(spawn_participant(tx.clone(), i, s.clone(), opts).await);
        if i == 0 {
            log.wait_for("the creator to join", 20, |s| {
                s.iter().any(|e| {
                    e.who == 0 && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
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
        .filter_map(|e| match client(e)? {
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
            s.iter().any(|e| {
                e.who == at
                    && matches!(e.call(), Some(CallEvent::FeedChanged { device, audio_muted: true, .. }) if *device == devices[0])
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
                s.iter().find_map(|e| match e.call()? {
                    CallEvent::FeedAdded {
                        device,
                        purpose: FeedPurpose::Screenshare,
                        stream_id,
                        ..
                    } if e.who == at && *device == devices[1] => Some(stream_id.clone()),
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
            s.iter().any(|e| {
                e.who == at
                    && matches!(e.call(), Some(CallEvent::FeedRemoved { device, stream_id }) if *device == devices[1] && *stream_id == share_stream)
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
            s.iter().any(|e| {
                e.t >= t_leave
                    && e.who == at
                    && matches!(e.call(), Some(CallEvent::PeerState { device, status: PeerStatus::Closed(_) | PeerStatus::Failed(_), .. }) if *device == devices[2])
            }) && s.iter().any(|e| {
                e.t >= t_leave
                    && e.who == at
                    && matches!(e.call(), Some(CallEvent::ParticipantLeft { device, .. }) if *device == devices[2])
            })
        })
    })
    .await;
    let t_rejoin = Instant::now();
    let carol_again = MatrixSession::login(&hs, "carol", PASSWORD, tmp.join("carol"))
        .await
        .unwrap();
    assert_eq!(
        carol_again.device_id(),
        devices[2].device_id,
        "same device after re-login"
    );
    let mut opts = JoinOptions::new(room.clone());
    opts.record_dir = Some(record[2].clone());
    parts.push(spawn_participant(tx.clone(), 2, carol_again, opts).await);
    log.wait_for("carol re-called and connected after rejoining", 60, |s| {
        let new_session = s.iter().any(|e| {
            e.t >= t_rejoin && e.who == 0 && matches!(e.call(), Some(CallEvent::ParticipantJoined { device, .. }) if *device == devices[2])
        });
        new_session
            && [0, 1].iter().all(|&at| connected_since(s, t_rejoin, at, &devices[2]))
            && [0, 1].iter().all(|&b| connected_since(s, t_rejoin, 2, &devices[b]))
    })
    .await;

    log.wait_for("media from carol's new streams at alice and bob", 30, |s| {
        let new_streams: Vec<String> = s
            .iter()
            .filter_map(|e| match e.call()? {
                CallEvent::FeedAdded {
                    device, stream_id, ..
                } if e.t >= t_rejoin && e.who == 0 && *device == devices[2] => {
                    Some(stream_id.clone())
                }
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
    // Every participant's task ended: all it reported is in the channel.
    drop(tx);
    log.pump();
    let recorded: BTreeMap<usize, Vec<PathBuf>> =
        log.seen.iter().fold(BTreeMap::new(), |mut m, e| {
            if let Some(ClientEvent::Recorded { path }) = client(e) {
                m.entry(e.who).or_default().push(path.clone());
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
        let decoded = assert_decodes(p, 11);
        eprintln!(
            "FIGURE call: {} decodes to {decoded} video frames",
            p.display()
        );
    }
    for p in &ogg {
        assert!(count_ogg(p) > 50, "{} has too few packets", p.display());
        let decoded = assert_decodes(p, 51);
        eprintln!(
            "FIGURE call: {} decodes to {decoded} audio frames",
            p.display()
        );
    }
    drop(h);
}
