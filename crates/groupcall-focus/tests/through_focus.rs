//! groupcall participants in one call through a real focus (this crate's
//! service, in-process), on a real Synapse: every participant receives
//! audio and video from every other through the focus, and none calls
//! another directly.
//!
//! Run with `cargo test -p groupcall-focus --test through_focus -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::time::Duration;

use groupcall::client::JoinOptions;
use groupcall::matrix::{CreateRoomOptions, MatrixSession};
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, Command, CreateOptions, DeviceKey, FocusRef};
use groupcall_focus::config::Config;
use groupcall_focus::driver::FocusService;
use groupcall_testkit::*;
use tokio::time::Instant;

/// Writes a focus.toml allowing `allow` and loads it.
fn focus_config(h: &Harness, focus_user: &str, allow: &str) -> Config {
    let dir = h.tmp.path().join("focus-conf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("password"), format!("{PASSWORD}\n")).unwrap();
    let text = format!(
        r#"homeserver = "{hs}"
user = "{focus_user}"
password_file = "password"
data_dir = "data"
allow = ["{allow}"]
http_listen = "127.0.0.1:0"

[media]
bind = ["127.0.0.1:0"]

[drain]
grace_period = "1s"
"#,
        hs = h.hs,
    );
    let path = dir.join("focus.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_participants_see_and_hear_each_other_through_the_focus() {
    const N: usize = 3;
    let mut h = Harness::new().await;
    let focus_user = h.register("focus").await;
    let names: Vec<String> = (0..N).map(|i| format!("p{i}")).collect();
    for n in &names {
        h.register(n).await;
    }
    let mut sessions: Vec<MatrixSession> = Vec::new();
    for n in &names {
        sessions.push(h.login(n).await);
    }
    let devices: Vec<DeviceKey> = sessions
        .iter()
        .map(|s| DeviceKey::new(s.user_id(), s.device_id()))
        .collect();

    // The focus runs; the first participant's room invites it.
    let mut focus = FocusService::start(focus_config(&h, &focus_user, &devices[0].user_id))
        .await
        .expect("the focus starts");
    let focus_ref = FocusRef {
        user_id: focus.user_id().to_owned(),
        device_id: focus.device_id().to_owned(),
    };
    let room = sessions[0]
        .create_call_room(CreateRoomOptions {
            name: Some("through the focus".into()),
            invite: vec![focus_user.clone()],
            encrypted: false,
            public: true,
        })
        .await
        .unwrap();
    let mut status = focus.watch_status();
    tokio::time::timeout(Duration::from_secs(30), async {
        while status.borrow().rooms < 1 {
            status.changed().await.unwrap();
        }
    })
    .await
    .expect("the focus joins the room");

    let t0 = Instant::now();
    let mut parts = Vec::new();
    for (i, s) in sessions.into_iter().enumerate() {
        let mut o = JoinOptions::new(room.clone());
        o.create = (i == 0).then(CreateOptions::default);
        o.focus = Some(focus_ref.clone());
        let (_, p) = h.join_rust(&names[i], s, o).await;
        parts.push(p);
        if i == 0 {
            h.log
                .wait_for("the creator to join", 30, |s| {
                    s.iter().any(|e| {
                        e.who == 0
                            && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
                    })
                })
                .await;
        }
    }

    // Every participant hears and sees every other, through the focus.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        h.log.pump();
        let seen = &h.log.seen;
        let mut missing = Vec::new();
        for at in 0..N {
            for from in 0..N {
                if at == from {
                    continue;
                }
                let a = rust_frames(seen, t0, at, &devices[from], TrackKind::Audio, None);
                let v = rust_frames(seen, t0, at, &devices[from], TrackKind::Video, None);
                if a < 50 || v < 20 {
                    missing.push(format!(
                        "{}<-{} (audio {a}, video {v})",
                        names[at], names[from]
                    ));
                }
            }
        }
        if missing.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            panic!(
                "media through the focus missing: {}\nrecent events:\n{}",
                missing.join(", "),
                h.log.dump(80)
            );
        }
        h.log.run_for(Duration::from_millis(250)).await;
    }
    eprintln!(
        "FIGURE through_focus: {N} participants, audio and video both ways on every pair {:.1} s after the first join",
        t0.elapsed().as_secs_f64()
    );
    // No participant called another directly: each has one peer, the focus.
    let focus_dev = DeviceKey::new(focus_ref.user_id.clone(), focus_ref.device_id.clone());
    for at in 0..N {
        for (from, dev) in devices.iter().enumerate() {
            assert!(
                from == at || !rust_connected(&h.log.seen, t0, at, dev),
                "{} connected to {} directly",
                names[at],
                names[from]
            );
        }
        assert!(
            rust_connected(&h.log.seen, t0, at, &focus_dev),
            "{} connected to the focus",
            names[at]
        );
    }

    for p in &parts {
        p.commander.send(Command::Leave);
    }
    for p in parts {
        p.done.await.unwrap();
    }
    focus.shutdown();
    focus.wait().await.unwrap();
    h.shutdown().await;
}
