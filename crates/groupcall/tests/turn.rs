//! TURN from the homeserver: a real Synapse configured with a real coturn's
//! shared secret hands out TURN credentials on `/voip/turnServer`, and a
//! call where one participant is relay-only carries media through coturn.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::time::Duration;

use groupcall::client::{ClientEvent, JoinOptions, join_call};
use groupcall::matrix::{CreateRoomOptions, MatrixSession};
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, CreateOptions, DeviceKey, PeerStatus};
use groupcall_testkit::coturn;
use groupcall_testkit::coturn::{Coturn, rest_password};
use groupcall_testkit::synapse::{Synapse, SynapseOptions};
use serde_json::json;
use tokio::time::{Instant, timeout};

fn init_tracing() {
    groupcall_testkit::init_tracing("warn,matrix_sdk_crypto=error,groupcall=info");
}

async fn synapse_with_turn(turn: &Coturn, lifetime: &str) -> Synapse {
    let mut options = SynapseOptions::default();
    let extra = json!({
        "turn_uris": [turn.turn_url(), "turn:127.0.0.1:9?transport=tcp"],
        "turn_shared_secret": turn.secret(),
        "turn_user_lifetime": lifetime,
        "turn_allow_guests": false,
    });
    if let serde_json::Value::Object(m) = extra {
        options.extra_config = m;
    }
    Synapse::start(options).await.expect("synapse")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_servers_come_from_the_homeserver() {
    init_tracing();
    let turn = coturn().await;
    let synapse = synapse_with_turn(&turn, "1h").await;
    let tmp = tempfile::tempdir().unwrap();
    synapse.register_user("alice", "secret-pw").await.unwrap();
    let s = MatrixSession::login(&synapse.base_url(), "alice", "secret-pw", tmp.path())
        .await
        .unwrap();
    let t = s.turn_servers().await.unwrap().expect("TURN configured");
    assert_eq!(
        t.uris,
        vec![
            turn.turn_url(),
            "turn:127.0.0.1:9?transport=tcp".to_string()
        ]
    );
    assert_eq!(t.ttl, Duration::from_secs(3600));
    // TURN REST API credentials from the shared secret.
    let (expiry, user) = t.username.split_once(':').unwrap();
    assert_eq!(user, "@alice:localhost");
    let expiry: u64 = expiry.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 3500..=now + 3700).contains(&expiry),
        "{expiry} vs {now}"
    );
    assert_eq!(t.password, rest_password(turn.secret(), &t.username));
    // The watch holds the same servers.
    let w = s.watch_turn_servers().await;
    assert_eq!(w.ice_servers().len(), 1);
    assert_eq!(w.current().unwrap().uris, t.uris);

    // A homeserver without TURN answers nothing.
    let plain = Synapse::start(SynapseOptions::default()).await.unwrap();
    plain.register_user("bob", "secret-pw").await.unwrap();
    let s = MatrixSession::login(
        &plain.base_url(),
        "bob",
        "secret-pw",
        tmp.path().join("bob"),
    )
    .await
    .unwrap();
    assert_eq!(s.turn_servers().await.unwrap(), None);
    assert!(s.watch_turn_servers().await.ice_servers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_only_participant_talks_through_the_homeservers_turn() {
    init_tracing();
    let turn = coturn().await;
    let synapse = synapse_with_turn(&turn, "1h").await;
    let hs = synapse.base_url();
    let tmp = tempfile::tempdir().unwrap();
    let mut sessions = Vec::new();
    for n in ["alice", "bob"] {
        synapse.register_user(n, "secret-pw").await.unwrap();
        sessions.push(
            MatrixSession::login(&hs, n, "secret-pw", tmp.path().join(n))
                .await
                .unwrap(),
        );
    }
    let room = sessions[0]
        .create_call_room(CreateRoomOptions {
            name: Some("turn call".into()),
            invite: vec![sessions[1].user_id().to_owned()],
            encrypted: false,
            public: false,
        })
        .await
        .unwrap();
    let devices: Vec<DeviceKey> = sessions
        .iter()
        .map(|s| DeviceKey::new(s.user_id(), s.device_id()))
        .collect();

    let t0 = Instant::now();
    let mut handles = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        let mut opts = JoinOptions::new(room.clone());
        opts.create = (i == 0).then(CreateOptions::default);
        // Bob has no host candidates: only coturn's relay.
        opts.relay_only = i == 1;
        handles.push(join_call(s.clone(), opts).await.expect("join"));
    }

    // Both directions connected, then audio and video both ways.
    let mut connected = [false, false];
    let mut frames = [[0u64; 2]; 2];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut connected_after = None;
    while frames.iter().flatten().any(|f| *f < 30) {
        for (i, h) in handles.iter_mut().enumerate() {
            let other = &devices[1 - i];
            while let Ok(Some(ev)) = timeout(Duration::from_millis(20), h.next_event()).await {
                match ev {
                    ClientEvent::Call(CallEvent::PeerState {
                        device,
                        status: PeerStatus::Connected,
                        ..
                    }) if &device == other => {
                        connected[i] = true;
                        if connected == [true, true] && connected_after.is_none() {
                            connected_after = Some(t0.elapsed());
                        }
                    }
                    ClientEvent::Media {
                        device,
                        kind,
                        frames: n,
                        ..
                    } if &device == other => {
                        let k = usize::from(kind == TrackKind::Video);
                        frames[i][k] = frames[i][k].max(n);
                    }
                    _ => {}
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no media both ways through TURN: connected {connected:?}, frames {frames:?}; \
             coturn log:\n{}",
            turn.log_tail(30)
        );
    }
    eprintln!(
        "relay-only call: connected {:?} after the joins started, media both ways after {:?} \
         (frames [alice, bob][audio, video] = {frames:?})",
        connected_after,
        t0.elapsed()
    );

    // Bob's allocation is on coturn under his homeserver-issued name.
    let bob_prefix = ":@bob:localhost";
    for h in handles {
        h.leave().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let usage: Vec<_> = turn
            .usage()
            .into_iter()
            .filter(|u| u.username.ends_with(bob_prefix))
            .collect();
        if usage
            .iter()
            .any(|u| u.received_packets > 50 && u.sent_packets > 50)
        {
            eprintln!("coturn usage of bob's allocation: {:?}", usage.last());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "coturn relayed nothing for bob: {usage:?}\n{}",
            turn.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
