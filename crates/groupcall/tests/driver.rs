//! The client driver with a real Synapse: what it asks of the media layer
//! reaches peers made later. (That one peer's media operations never hold
//! up another's is shown without a homeserver: the peer workers' unit tests
//! in `src/client_tests.rs` and the peer set's in `groupcall-media`. A
//! Synapse-level test of it here relied on each peer gathering on its own
//! socket, which a participant's shared socket and gathering made moot.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use groupcall::client::JoinOptions;
use groupcall_testkit::Harness;

/// A mute asked for before a peer exists reaches that peer: alice mutes her
/// audio while alone in the call, then bob joins. Bob is told the feed is
/// muted (the invite's metadata) and gets alice's video but not one audio
/// frame: the media layer of the new peer was muted as well, not only the
/// metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mute_before_a_peer_exists_reaches_it() {
    use groupcall::media::TrackKind;
    use groupcall::proto::{CallEvent, Command, CreateOptions, DeviceKey};

    let mut h = Harness::new().await;
    for name in ["alice", "bob"] {
        h.register(name).await;
    }
    let alice_session = h.login("alice").await;
    let bob_session = h.login("bob").await;
    let room = h.room(&alice_session).await;
    let alice_dev = DeviceKey::new(alice_session.user_id(), alice_session.device_id());
    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    let (a, pa) = h.join_rust("alice", alice_session, opts).await;
    h.log
        .wait_for("alice joined", 30, |s| {
            s.iter()
                .any(|e| e.who == a && matches!(e.call(), Some(CallEvent::Joined { .. })))
        })
        .await;
    pa.commander.send(Command::SetAudioMuted(true));
    let (b, pb) = h
        .join_rust("bob", bob_session, JoinOptions::new(room))
        .await;
    h.log
        .wait_for("alice's feed at bob, audio muted", 30, |s| {
            s.iter().any(|e| {
                e.who == b
                    && matches!(e.call(), Some(CallEvent::FeedAdded { device, audio_muted: true, .. }) if *device == alice_dev)
            })
        })
        .await;
    let t0 = h.t_start;
    h.log
        .wait_for("60 video frames from alice at bob", 60, |s| {
            groupcall_testkit::rust_frames(s, t0, b, &alice_dev, TrackKind::Video, None) >= 60
        })
        .await;
    let audio =
        groupcall_testkit::rust_frames(&h.log.seen, t0, b, &alice_dev, TrackKind::Audio, None);
    let video =
        groupcall_testkit::rust_frames(&h.log.seen, t0, b, &alice_dev, TrackKind::Video, None);
    eprintln!("bob got {video} video frames and {audio} audio frames from alice (muted)");
    assert_eq!(
        audio, 0,
        "alice's muted audio reached bob ({audio} frames, with {video} video frames)"
    );
    for p in [pa, pb] {
        p.commander.send(Command::Leave);
        p.done.await.unwrap();
    }
}
