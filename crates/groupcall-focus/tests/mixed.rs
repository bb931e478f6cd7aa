//! A mixed call on a real Synapse: three groupcall clients publish to a
//! focus (this crate's service, in-process) and a reference matrix-js-sdk
//! peer (`interop/peer.mjs`, no focus mode) joins the same call in the
//! mesh. All 6 pairs carry audio and video both ways; the groupcall
//! clients reach each other through the focus only, and the reference
//! directly.
//!
//! The user ids interleave (amy < ben < cat < dan; the smaller calls the
//! larger), so the mesh calls go both ways: amy (groupcall) calls ben (the
//! reference), ben calls cat and dan.
//!
//! Run with `cargo test -p groupcall-focus --test mixed -- --nocapture`.
//! It needs `interop/node_modules` (`scripts/setup-node`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use groupcall::proto::DeviceKey;
use groupcall_testkit::*;

mod common;
use common::{
    Member, RunningFocus, assert_only_through, join_through_focus, leave_all, pair_figures,
    wait_media,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_through_the_focus_and_a_reference_in_the_mesh() {
    let mut h = Harness::new().await;
    for n in ["amy", "ben", "cat", "dan"] {
        h.register(n).await;
    }
    let amy = h.login("amy").await;
    let cat = h.login("cat").await;
    let dan = h.login("dan").await;
    let focus = RunningFocus::start(&h, &amy).await;
    let room = focus.room.clone();

    let t0 = h.log.mark();
    let clients = vec![("amy", amy), ("cat", cat), ("dan", dan)];
    // The reference enters once amy has created the call, while the others
    // join.
    let (mut members, parts) = join_through_focus(&mut h, &focus, clients, |h| {
        Some(Member {
            idx: h.spawn_js("ben", "peer.mjs", &room, &["--media-interval", "200"]),
            rust: false,
            name: "ben".to_owned(),
            dev: DeviceKey::new("", ""),
        })
    })
    .await;
    let ben = members[1].idx;
    members[1].dev = h.js_device(ben).await;
    let ben_dev = members[1].dev.clone();
    let gc: Vec<Member> = members.iter().filter(|m| m.rust).cloned().collect();

    // Connected: each groupcall client to the focus and to the reference,
    // the reference to each groupcall client.
    let t_conn = h
        .log
        .wait_for(
            "every groupcall client connected to the focus and the reference (both ends)",
            60,
            |s| {
                gc.iter().all(|m| {
                    rust_connected(s, t0, m.idx, &focus.device)
                        && rust_connected(s, t0, m.idx, &ben_dev)
                        && js_connected_at(s, t0, ben, &m.dev).is_some()
                })
            },
        )
        .await;
    // Audio and video on all 12 directions (at the reference: decoded video
    // frames and audible audio).
    let t_media = wait_media(&mut h, t0, &members, 50, 20, 90).await;
    let figures = pair_figures(&h.log.seen, t0, &members);
    eprintln!(
        "FIGURE mixed: 3 groupcall through the focus + 1 reference in the mesh: connected {} ms, audio and video on all 6 pairs both ways {} ms after the first join; pairs (media both ways): {figures}",
        ms(t0, t_conn),
        ms(t0, t_media),
    );

    // The groupcall clients never called each other directly (each
    // connected to the focus), nor did the reference call the focus; the
    // focus serves exactly the three.
    let seen = &h.log.seen;
    assert_only_through(seen, t0, &gc, &focus.device);
    assert!(
        js_connected_at(seen, t0, ben, &focus.device).is_none(),
        "the reference connected to the focus"
    );
    assert_eq!(
        focus.handle.status().participants,
        3,
        "participants at the focus"
    );

    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}
