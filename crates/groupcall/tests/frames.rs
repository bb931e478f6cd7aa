//! A library user pushes its own encoded frames and pulls received ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::collections::HashSet;
use std::time::Duration;

use groupcall::client::{AudioSource, ClientEvent, JoinOptions, VideoSource, join_call};
use groupcall::matrix::{CreateRoomOptions, MatrixSession};
use groupcall::media::TrackKind;
use groupcall::proto::CreateOptions;
use groupcall_testkit::synapse::{Synapse, SynapseOptions};
use tokio::time::{Instant, timeout};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushed_frames_arrive_byte_exact_at_the_other_participant() {
    groupcall_testkit::init_tracing("warn,matrix_sdk_crypto=error,groupcall=info");
    let synapse = Synapse::start(SynapseOptions::default())
        .await
        .expect("synapse");
    let hs = synapse.base_url();
    let tmp = tempfile::tempdir().unwrap();
    synapse.register_user("pusher", "pw-pw-pw").await.unwrap();
    synapse.register_user("puller", "pw-pw-pw").await.unwrap();
    let a = MatrixSession::login(&hs, "pusher", "pw-pw-pw", tmp.path().join("a"))
        .await
        .unwrap();
    let b = MatrixSession::login(&hs, "puller", "pw-pw-pw", tmp.path().join("b"))
        .await
        .unwrap();
    let room = a
        .create_call_room(CreateRoomOptions {
            name: None,
            invite: vec![b.user_id().to_owned()],
            encrypted: false,
            public: false,
        })
        .await
        .unwrap();

    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    opts.audio = AudioSource::Push;
    opts.video = VideoSource::None;
    let mut pusher = join_call(a, opts).await.unwrap();
    let frames = pusher.frame_pusher();
    let mut opts = JoinOptions::new(room);
    opts.deliver_frames = true;
    let mut puller = join_call(b, opts).await.unwrap();

    // Push distinct 20 ms "Opus packets" (transport does not decode them).
    let pushing = tokio::spawn(async move {
        for i in 0u32..1500 {
            let mut data = vec![0xFC, 0xFF, 0xFE];
            data.extend_from_slice(&i.to_be_bytes());
            if !frames.push(TrackKind::Audio, data, Duration::from_millis(20)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let drain_pusher = tokio::spawn(async move { while pusher.next_event().await.is_some() {} });

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = HashSet::new();
    while seen.len() < 50 {
        let ev = timeout(
            deadline.saturating_duration_since(Instant::now()),
            puller.next_event(),
        )
        .await
        .expect("timed out waiting for pushed frames")
        .expect("call ended");
        if let ClientEvent::Frame { frame, .. } = ev {
            assert_eq!(frame.kind, TrackKind::Audio);
            assert_eq!(
                &frame.data[..3],
                &[0xFC, 0xFF, 0xFE],
                "frame bytes changed in transit"
            );
            seen.insert(u32::from_be_bytes(frame.data[3..7].try_into().unwrap()));
        }
    }
    pushing.abort();
    drain_pusher.abort();
    puller.leave().await.unwrap();
}
