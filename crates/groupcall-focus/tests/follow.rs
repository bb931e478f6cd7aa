//! Two foci serving one room on a real Synapse, and a client that follows
//! the members' choice (`JoinOptions::follow_foci`, MSC3898 "Choosing a
//! focus"): it joins the focus the others are active on, and when they move
//! to the other focus (`Command::SetFocus`), it moves too: its call with the
//! first focus ends (`focus_switch`) and media flows through the second.
//!
//! Run with `cargo test -p groupcall-focus --test follow -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::time::Duration;

use groupcall::client::JoinOptions;
use groupcall::matrix::CreateRoomOptions;
use groupcall::proto::{CallEvent, Command, CreateOptions, DeviceKey, FocusRef, PeerStatus};
use groupcall_focus::driver::{FocusHandle, FocusService};
use groupcall_testkit::*;
use tokio::time::Instant;

mod common;
use common::*;

/// A focus account `name`, its service allowing `allow`.
async fn start_focus(h: &Harness, name: &str, allow: &str) -> (FocusHandle, FocusRef) {
    let user = h.register(name).await;
    let handle = FocusService::start(focus_config(h, &user, allow))
        .await
        .expect("the focus starts");
    let r = FocusRef {
        user_id: handle.user_id().to_owned(),
        device_id: handle.device_id().to_owned(),
    };
    (handle, r)
}

fn key(f: &FocusRef) -> DeviceKey {
    DeviceKey::new(f.user_id.clone(), f.device_id.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_following_client_joins_the_members_focus_and_moves_with_them() {
    let mut h = Harness::new().await;
    for name in ["p0", "p1", "p2"] {
        h.register(name).await;
    }
    let s0 = h.login("p0").await;
    let (mut fa, a) = start_focus(&h, "focus-a", s0.user_id()).await;
    let (mut fb, b) = start_focus(&h, "focus-b", s0.user_id()).await;
    let room = s0
        .create_call_room(CreateRoomOptions {
            name: Some("two foci".into()),
            invite: vec![a.user_id.clone(), b.user_id.clone()],
            encrypted: false,
            public: true,
        })
        .await
        .unwrap();
    for f in [&fa, &fb] {
        let mut status = f.watch_status();
        tokio::time::timeout(Duration::from_secs(30), async {
            while status.borrow().rooms < 1 {
                status.changed().await.unwrap();
            }
        })
        .await
        .expect("the focus joins the room");
    }

    // p0 and p1 publish to A; p2 follows the members.
    let t0 = Instant::now();
    let mut members = Vec::new();
    let mut parts = Vec::new();
    for (i, name) in ["p0", "p1", "p2"].into_iter().enumerate() {
        let s = if i == 0 {
            s0.clone()
        } else {
            h.login(name).await
        };
        let dev = DeviceKey::new(s.user_id(), s.device_id());
        let mut o = JoinOptions::new(room.clone());
        o.create = (i == 0).then(CreateOptions::default);
        if i < 2 {
            o.focus = Some(a.clone());
        } else {
            o.follow_foci = true;
        }
        let (idx, p) = h.join_rust(name, s, o).await;
        members.push(Member {
            idx,
            rust: true,
            name: name.to_owned(),
            dev,
        });
        parts.push(p);
        if i == 0 {
            h.log
                .wait_for("the creator to join", 30, |s| {
                    s.iter().any(|e| {
                        e.who == idx
                            && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
                    })
                })
                .await;
        }
    }
    wait_media(&mut h, t0, &members, 50, 20, 90).await;
    h.log.pump();
    assert_only_through(&h.log.seen, t0, &members, &key(&a));
    eprintln!(
        "FIGURE follow: the following client joined the members' focus; media on every pair {:.1} s after the first join",
        t0.elapsed().as_secs_f64()
    );

    // p0 and p1 move to B: p2 follows. Until it does, p0 and p1 (at B) and
    // p2 (at A) are at different foci and call each other in the mesh; those
    // calls end when p2 arrives at B. Both sides of such a call may end it
    // at once; what crosses the hangup is taken as `Accepted::AfterEnd`, not
    // refused, so any refused signalling still fails the test.
    let t_move = Instant::now();
    parts[0].commander.send(Command::SetFocus(Some(b.clone())));
    parts[1].commander.send(Command::SetFocus(Some(b.clone())));
    let p2 = members[2].idx;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        h.log.pump();
        let seen = &h.log.seen;
        let at_b = rust_connected(seen, t_move, p2, &key(&b));
        let left_a = seen.iter().any(|e| {
            e.who == p2
                && matches!(e.call(), Some(CallEvent::PeerState { device, status: PeerStatus::Closed(r), .. })
                    if *device == key(&a) && r == "focus_switch")
        });
        if at_b && left_a {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "p2 did not move to B (at B {at_b}, left A {left_a})\n{}",
            h.log.dump(60)
        );
        h.log.run_for(Duration::from_millis(250)).await;
    }
    let moved = t_move.elapsed();
    let t_media = Instant::now();
    wait_media(&mut h, t_media, &members, 50, 20, 60).await;
    h.log.pump();
    // Everyone connected to B since the move; (during the move members at
    // different foci may meet in the mesh for a moment: foci do not cascade
    // yet) no direct call since media flows through B.
    for m in &members {
        assert!(
            rust_connected(&h.log.seen, t_move, m.idx, &key(&b)),
            "{} at B",
            m.name
        );
        for o in &members {
            assert!(
                m.idx == o.idx || !rust_connected(&h.log.seen, t_media, m.idx, &o.dev),
                "{} connected to {} directly",
                m.name,
                o.name
            );
        }
    }
    eprintln!(
        "FIGURE follow: the members moved to another focus; the following client was connected there {:.1} s later, media on every pair through it {:.1} s after the move",
        moved.as_secs_f64(),
        t_move.elapsed().as_secs_f64()
    );

    leave_all(parts).await;
    for f in [&mut fa, &mut fb] {
        f.shutdown();
    }
    fa.wait().await.unwrap();
    fb.wait().await.unwrap();
    h.shutdown().await;
}
