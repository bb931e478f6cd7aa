//! Integration tests of the Matrix transport against a real local Synapse
//! (started by groupcall-synapse; installed into the cache on first use).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use groupcall::matrix::{
    CALL_MEMBER_EVENT_TYPE, CreateRoomOptions, MatrixError, MatrixInput, MatrixSession, SyncHandle,
    SyncOptions,
};
use groupcall_testkit::synapse::{Synapse, SynapseOptions};
use matrix_sdk::ruma::api::client::membership::joined_rooms;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::mpsc::Receiver;

fn init_tracing() {
    groupcall_testkit::init_tracing("groupcall=debug,groupcall_synapse=info");
}

/// A logged-in, syncing user.
struct Peer {
    session: MatrixSession,
    rx: Receiver<MatrixInput>,
    _sync: SyncHandle,
    _dir: TempDir,
}

async fn peer(hs: &Synapse, name: &str) -> Peer {
    let user = hs.register_user(name, &format!("{name}-pw")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let session = MatrixSession::login(&hs.base_url(), &user.user_id, &user.password, dir.path())
        .await
        .unwrap();
    let (sync, mut rx) = session.start_sync(SyncOptions::default());
    wait_for(&mut rx, Duration::from_secs(20), |i| {
        matches!(i, MatrixInput::Synced { first: true })
    })
    .await;
    Peer {
        session,
        rx,
        _sync: sync,
        _dir: dir,
    }
}

/// Waits for the first input matching `pred`, skipping others.
async fn wait_for(
    rx: &mut Receiver<MatrixInput>,
    timeout: Duration,
    pred: impl Fn(&MatrixInput) -> bool,
) -> MatrixInput {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(input)) if pred(&input) => return input,
            Ok(Some(_)) => {}
            Ok(None) => panic!("sync channel closed"),
            Err(_) => panic!("timed out after {timeout:?} waiting for an input"),
        }
    }
}

/// Whether an input matching `pred` arrives within `window`.
async fn arrives_within(
    rx: &mut Receiver<MatrixInput>,
    window: Duration,
    pred: impl Fn(&MatrixInput) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(input)) if pred(&input) => return true,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return false,
        }
    }
}

fn is_state(i: &MatrixInput, room: &str, ty: &str, key: &str) -> bool {
    matches!(i, MatrixInput::State { room_id, event }
        if room_id == room
            && event["type"] == ty
            && event["state_key"] == key)
}

fn is_member_state_with(i: &MatrixInput, room: &str, key: &str, calls: &Value) -> bool {
    matches!(i, MatrixInput::State { room_id, event }
        if room_id == room
            && event["type"] == CALL_MEMBER_EVENT_TYPE
            && event["state_key"] == key
            && &event["content"]["m.calls"] == calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_device_encrypted_and_plaintext() {
    init_tracing();
    let hs = Synapse::start(SynapseOptions::default()).await.unwrap();
    let alice = peer(&hs, "alice").await;
    let mut bob = peer(&hs, "bob").await;
    let bob_device = bob.session.device_id();
    let alice_device = alice.session.device_id();

    // Encrypted: alice and bob share no room, so bob's keys are queried.
    let invite = json!({
        "call_id": "c1", "party_id": alice_device, "version": "1", "seq": 0,
        "offer": { "type": "offer", "sdp": "v=0" }, "lifetime": 60000,
    });
    let t0 = Instant::now();
    alice
        .session
        .send_to_device(
            "m.call.invite",
            vec![(
                bob.session.user_id().to_owned(),
                bob_device.clone(),
                invite.clone(),
            )],
            true,
        )
        .await
        .unwrap();
    let got = wait_for(
        &mut bob.rx,
        Duration::from_secs(10),
        |i| matches!(i, MatrixInput::ToDevice { event_type, .. } if event_type == "m.call.invite"),
    )
    .await;
    eprintln!("encrypted to-device took {:?}", t0.elapsed());
    match got {
        MatrixInput::ToDevice {
            sender,
            sender_device,
            content,
            encrypted,
            ..
        } => {
            assert!(encrypted);
            assert_eq!(sender, "@alice:localhost");
            assert_eq!(sender_device.as_deref(), Some(alice_device.as_str()));
            assert_eq!(content, invite);
        }
        other => panic!("unexpected {other:?}"),
    }

    // Plaintext.
    let hangup = json!({ "call_id": "c1", "version": "1", "seq": 1, "reason": "user_hangup" });
    alice
        .session
        .send_to_device(
            "m.call.hangup",
            vec![(
                bob.session.user_id().to_owned(),
                bob_device.clone(),
                hangup.clone(),
            )],
            false,
        )
        .await
        .unwrap();
    let got = wait_for(
        &mut bob.rx,
        Duration::from_secs(10),
        |i| matches!(i, MatrixInput::ToDevice { event_type, .. } if event_type == "m.call.hangup"),
    )
    .await;
    assert_eq!(
        got,
        MatrixInput::ToDevice {
            sender: "@alice:localhost".to_owned(),
            sender_device: None,
            event_type: "m.call.hangup".to_owned(),
            content: hangup,
            encrypted: false,
        }
    );

    // Several encrypted messages in one call, per-device contents, arrive in order.
    let msgs: Vec<_> = (2..5)
        .map(|seq| {
            (
                bob.session.user_id().to_owned(),
                bob_device.clone(),
                json!({ "call_id": "c1", "seq": seq }),
            )
        })
        .collect();
    alice
        .session
        .send_to_device("m.call.candidates", msgs, true)
        .await
        .unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        if let MatrixInput::ToDevice {
            content, encrypted, ..
        } = wait_for(&mut bob.rx, Duration::from_secs(10), |i| {
            matches!(i, MatrixInput::ToDevice { event_type, .. } if event_type == "m.call.candidates")
        })
        .await
        {
            assert!(encrypted);
            seqs.push(content["seq"].as_i64().unwrap());
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, vec![2, 3, 4]);

    // An unknown device is a typed error, not silence.
    let err = alice
        .session
        .send_to_device(
            "m.call.invite",
            vec![(
                bob.session.user_id().to_owned(),
                "NOSUCHDEVICE".to_owned(),
                json!({}),
            )],
            true,
        )
        .await
        .unwrap_err();
    match err {
        MatrixError::ToDeviceFailed { failed, .. } => {
            assert_eq!(
                failed,
                vec![("@bob:localhost".to_owned(), "NOSUCHDEVICE".to_owned())]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_room_state_through_sync() {
    init_tracing();
    let hs = Synapse::start(SynapseOptions::default()).await.unwrap();
    let mut alice = peer(&hs, "alice").await;
    let mut bob = peer(&hs, "bob").await;

    let room = alice
        .session
        .create_call_room(CreateRoomOptions {
            name: Some("call".to_owned()),
            invite: vec![bob.session.user_id().to_owned()],
            encrypted: true,
            public: false,
        })
        .await
        .unwrap();
    let joined = bob.session.join_room(&room).await.unwrap();
    assert_eq!(joined, room);
    // Bob's sync delivers the room's state, including his own join.
    wait_for(&mut bob.rx, Duration::from_secs(10), |i| {
        is_state(i, &room, "m.room.member", "@bob:localhost")
    })
    .await;

    // Members may send call state; nobody but admins the power levels.
    bob.session
        .ensure_can_send_state(&room, CALL_MEMBER_EVENT_TYPE)
        .await
        .unwrap();
    assert!(
        bob.session
            .can_send_state(&room, "org.matrix.msc3401.call")
            .await
            .unwrap()
    );
    assert!(
        !bob.session
            .can_send_state(&room, "m.room.power_levels")
            .await
            .unwrap()
    );
    match bob
        .session
        .ensure_can_send_state(&room, "m.room.power_levels")
        .await
        .unwrap_err()
    {
        MatrixError::NotPermitted { ours, required, .. } => {
            assert_eq!((ours, required), (0, 100));
        }
        other => panic!("unexpected {other:?}"),
    }

    let calls = json!([{ "m.call_id": "c1", "m.devices": [{
        "device_id": alice.session.device_id(), "session_id": "s1",
        "expires_ts": 4_102_444_800_000_u64, "feeds": [{ "purpose": "m.usermedia" }],
    }]}]);
    let t0 = Instant::now();
    alice
        .session
        .send_state(
            &room,
            CALL_MEMBER_EVENT_TYPE,
            "@alice:localhost",
            json!({ "m.calls": calls }),
        )
        .await
        .unwrap();
    let got = wait_for(&mut bob.rx, Duration::from_secs(10), |i| {
        is_member_state_with(i, &room, "@alice:localhost", &calls)
    })
    .await;
    eprintln!("state event reached the other side in {:?}", t0.elapsed());
    if let MatrixInput::State { event, .. } = got {
        assert_eq!(event["sender"], "@alice:localhost");
        assert!(event["origin_server_ts"].as_u64().is_some());
        assert_eq!(event["room_id"], room.as_str());
    }
    // The sender sees it too.
    wait_for(&mut alice.rx, Duration::from_secs(10), |i| {
        is_member_state_with(i, &room, "@alice:localhost", &calls)
    })
    .await;

    // The store answers by raw type string; unknown types are empty.
    let members = bob
        .session
        .room_state(&room, CALL_MEMBER_EVENT_TYPE)
        .await
        .unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["content"]["m.calls"], calls);
    assert!(
        bob.session
            .room_state(&room, "m.call.member")
            .await
            .unwrap()
            .is_empty()
    );
    let room_members = bob
        .session
        .room_state(&room, "m.room.member")
        .await
        .unwrap();
    assert_eq!(room_members.len(), 2);
    let fetched = bob
        .session
        .fetch_room_state(&room, CALL_MEMBER_EVENT_TYPE)
        .await
        .unwrap();
    assert_eq!(fetched.len(), 1);

    // A stable-name event goes through the same path.
    bob.session
        .send_state(
            &room,
            "m.call.member",
            "@bob:localhost",
            json!({ "m.calls": [] }),
        )
        .await
        .unwrap();
    wait_for(&mut alice.rx, Duration::from_secs(10), |i| {
        is_state(i, &room, "m.call.member", "@bob:localhost")
    })
    .await;

    // Several types from one request: all of the first type, then the
    // next, whatever order the homeserver lists them in; a repeated type
    // once; a type the room lacks contributes nothing.
    let several = bob
        .session
        .fetch_room_states(
            &room,
            &[
                "m.call.member",
                "m.room.member",
                "m.call.member",
                "m.nothing.here",
                CALL_MEMBER_EVENT_TYPE,
            ],
        )
        .await
        .unwrap();
    let types: Vec<&str> = several
        .iter()
        .map(|v| v["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "m.call.member",
            "m.room.member",
            "m.room.member",
            CALL_MEMBER_EVENT_TYPE
        ]
    );

    // Unknown room is a typed error.
    let err = bob
        .session
        .room_state("!nope:localhost", CALL_MEMBER_EVENT_TYPE)
        .await
        .unwrap_err();
    assert!(matches!(err, MatrixError::UnknownRoom { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_state_events() {
    init_tracing();
    let hs = Synapse::start(SynapseOptions::default()).await.unwrap();
    let mut alice = peer(&hs, "alice").await;
    assert!(alice.session.supports_delayed_events().await.unwrap());
    let room = alice
        .session
        .create_call_room(CreateRoomOptions::default())
        .await
        .unwrap();
    let key = "@alice:localhost";
    let live = json!([{ "m.call_id": "c1", "m.devices": [] }]);
    alice
        .session
        .send_state(
            &room,
            CALL_MEMBER_EVENT_TYPE,
            key,
            json!({ "m.calls": live }),
        )
        .await
        .unwrap();
    wait_for(&mut alice.rx, Duration::from_secs(10), |i| {
        is_member_state_with(i, &room, key, &live)
    })
    .await;

    // 1. Fires after its delay; restarts push it back.
    let hangup = json!({ "m.calls": [] });
    let empty = json!([]);
    let t0 = Instant::now();
    let id = alice
        .session
        .schedule_delayed_state(&room, CALL_MEMBER_EVENT_TYPE, key, hangup.clone(), 2000)
        .await
        .unwrap();
    let listed = alice.session.delayed_events().await.unwrap();
    assert!(
        listed.iter().any(|d| d["delay_id"] == id.as_str()),
        "{listed:?}"
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        alice.session.restart_delayed(&id).await.unwrap();
    }
    // 2.4 s have passed: without the restarts it would have fired.
    wait_for(&mut alice.rx, Duration::from_secs(10), |i| {
        is_member_state_with(i, &room, key, &empty)
    })
    .await;
    let fired_after = t0.elapsed();
    eprintln!("delayed event fired after {fired_after:?}");
    assert!(
        fired_after >= Duration::from_millis(4400),
        "{fired_after:?}"
    );
    // Once sent, it is gone.
    let err = alice.session.restart_delayed(&id).await.unwrap_err();
    assert!(
        matches!(
            err,
            MatrixError::DelayedEventNotFound { .. } | MatrixError::Api { status: 409, .. }
        ),
        "{err:?}"
    );

    // 2. Cancelled: never fires.
    alice
        .session
        .send_state(
            &room,
            CALL_MEMBER_EVENT_TYPE,
            key,
            json!({ "m.calls": live }),
        )
        .await
        .unwrap();
    wait_for(&mut alice.rx, Duration::from_secs(10), |i| {
        is_member_state_with(i, &room, key, &live)
    })
    .await;
    let id = alice
        .session
        .schedule_delayed_state(&room, CALL_MEMBER_EVENT_TYPE, key, hangup.clone(), 1500)
        .await
        .unwrap();
    alice.session.cancel_delayed(&id).await.unwrap();
    assert!(
        !arrives_within(&mut alice.rx, Duration::from_millis(3000), |i| {
            is_member_state_with(i, &room, key, &empty)
        })
        .await,
        "a cancelled delayed event was sent"
    );

    // 3. Sent on demand long before its delay.
    let id = alice
        .session
        .schedule_delayed_state(&room, CALL_MEMBER_EVENT_TYPE, key, hangup, 600_000)
        .await
        .unwrap();
    let t1 = Instant::now();
    alice.session.send_delayed_now(&id).await.unwrap();
    wait_for(&mut alice.rx, Duration::from_secs(10), |i| {
        is_member_state_with(i, &room, key, &empty)
    })
    .await;
    assert!(t1.elapsed() < Duration::from_secs(5));

    // Unknown ids are a typed error.
    let err = alice
        .session
        .cancel_delayed("syd_nonexistent")
        .await
        .unwrap_err();
    assert!(
        matches!(err, MatrixError::DelayedEventNotFound { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_restore_and_errors() {
    init_tracing();
    let hs = Synapse::start(SynapseOptions::default()).await.unwrap();
    let user = hs.register_user("carol", "carol-pw").await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let err = MatrixSession::login(&hs.base_url(), "carol", "wrong", dir.path())
        .await
        .unwrap_err();
    assert!(matches!(err, MatrixError::WrongPassword { .. }), "{err:?}");
    assert!(err.to_string().contains("wrong user name or password"));

    let first = MatrixSession::login(&hs.base_url(), "carol", "carol-pw", dir.path())
        .await
        .unwrap();
    let device = first.device_id();
    assert_ne!(device, user.device_id);
    assert_eq!(first.user_id(), "@carol:localhost");
    let room = first
        .create_call_room(CreateRoomOptions::default())
        .await
        .unwrap();
    drop(first);

    // A second run reuses the device: by restore and by login.
    let restored = MatrixSession::restore(dir.path()).await.unwrap();
    assert_eq!(restored.device_id(), device);
    restored.client().whoami().await.unwrap();
    // Room operations do not need a sync first: the room state store is
    // in memory, so a restored session knows no rooms until it syncs.
    restored.leave_room(&room).await.unwrap();
    let joined = restored
        .client()
        .send(joined_rooms::v3::Request::new())
        .await
        .unwrap();
    assert!(
        joined.joined_rooms.iter().all(|r| r.as_str() != room),
        "{:?}",
        joined.joined_rooms
    );
    drop(restored);
    let again = MatrixSession::login(&hs.base_url(), "@carol:localhost", "carol-pw", dir.path())
        .await
        .unwrap();
    assert_eq!(again.device_id(), device);
    drop(again);

    // Another account in the same directory is refused.
    hs.register_user("dan", "dan-pw").await.unwrap();
    let err = MatrixSession::login(&hs.base_url(), "dan", "dan-pw", dir.path())
        .await
        .unwrap_err();
    assert!(
        matches!(err, MatrixError::SessionMismatch { .. }),
        "{err:?}"
    );

    let empty = tempfile::tempdir().unwrap();
    let err = MatrixSession::restore(empty.path()).await.unwrap_err();
    assert!(matches!(err, MatrixError::NoSession { .. }), "{err:?}");

    // Joining a room that does not exist reports the homeserver's error.
    let again = MatrixSession::restore(dir.path()).await.unwrap();
    let err = again.join_room("!missing:localhost").await.unwrap_err();
    assert!(
        matches!(err, MatrixError::Api { .. } | MatrixError::Forbidden { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_recovers_from_homeserver_restart() {
    init_tracing();
    let mut hs = Synapse::start(SynapseOptions::default()).await.unwrap();
    let mut alice = peer(&hs, "alice").await;
    let bob = peer(&hs, "bob").await;

    hs.stop().await.unwrap();
    let down = wait_for(&mut alice.rx, Duration::from_secs(40), |i| {
        matches!(i, MatrixInput::Disconnected { .. })
    })
    .await;
    assert!(matches!(
        down,
        MatrixInput::Disconnected { fatal: false, .. }
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    hs.restart().await.unwrap();
    let t0 = Instant::now();
    wait_for(&mut alice.rx, Duration::from_secs(20), |i| {
        matches!(i, MatrixInput::Synced { first: false })
    })
    .await;
    eprintln!("sync recovered {:?} after the restart", t0.elapsed());

    bob.session
        .send_to_device(
            "m.call.invite",
            vec![(
                alice.session.user_id().to_owned(),
                alice.session.device_id(),
                json!({ "n": 1 }),
            )],
            true,
        )
        .await
        .unwrap();
    let got = wait_for(&mut alice.rx, Duration::from_secs(10), |i| {
        matches!(i, MatrixInput::ToDevice { .. })
    })
    .await;
    assert!(matches!(
        got,
        MatrixInput::ToDevice {
            encrypted: true,
            ..
        }
    ));
}
