//! The MSC3898 client in headless Chromium (`interop/focus-client.mjs`:
//! the browser's own RTCPeerConnection and data channel, libwebrtc) in one
//! call with two groupcall clients, all through the focus (this crate's
//! service, in-process) on a real Synapse: the Chromium client decodes the
//! groupcall clients' video and hears their audio, and they receive its
//! audio and video; nobody calls anybody but the focus.
//!
//! Run with `cargo test -p groupcall-focus --test chromium -- --nocapture`.
//! It needs `interop/node_modules` (`scripts/setup-node`) and Chromium
//! (`scripts/setup-system`).
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
async fn chromium_client_and_groupcall_through_the_focus() {
    require_chromium();
    let mut h = Harness::new().await;
    for n in ["amy", "bob", "chr"] {
        h.register(n).await;
    }
    let amy = h.login("amy").await;
    let bob = h.login("bob").await;
    let focus = RunningFocus::start(&h, &amy).await;
    let room = focus.room.clone();
    let focus_arg = format!("{}/{}", focus.device.user_id, focus.device.device_id);

    let t0 = h.log.mark();
    let clients = vec![("amy", amy), ("bob", bob)];
    // The Chromium client enters once amy has created the call, while bob
    // joins.
    let (mut members, parts) = join_through_focus(&mut h, &focus, clients, |h| {
        let args = [
            "--focus",
            &focus_arg,
            "--candidate-ip",
            "127.0.0.1",
            "--media-interval",
            "200",
        ];
        Some(Member {
            idx: h.spawn_js("chr", "focus-client.mjs", &room, &args),
            rust: false,
            name: "chr".to_owned(),
            dev: DeviceKey::new("", ""),
        })
    })
    .await;
    let chr = members[1].idx;
    members[1].dev = h.js_device(chr).await;

    // The Chromium client's call with the focus: answered over Olm, the
    // channel open.
    let t_answered = h
        .log
        .wait_for(
            "the focus to answer the Chromium client over Olm",
            60,
            |s| {
                js_saw(s, t0, chr, "call_state", |v| {
                    v["state"] == "answered" && v["encrypted"] == true
                })
            },
        )
        .await;
    let t_channel = h
        .log
        .wait_for("the Chromium client's data channel to open", 30, |s| {
            js_saw(s, t0, chr, "channel_open", |v| v["label"] == "m.call")
        })
        .await;
    // Audio and video on all 6 directions (at Chromium: decoded video
    // frames and audible audio).
    let t_media = wait_media(&mut h, t0, &members, 50, 20, 90).await;
    let figures = pair_figures(&h.log.seen, t0, &members);
    eprintln!(
        "FIGURE chromium: 2 groupcall + 1 Chromium MSC3898 client through the focus: Chromium answered {} ms, channel open {} ms, audio and video on all 3 pairs both ways {} ms after the first join; pairs (media both ways): {figures}",
        ms(t0, t_answered),
        ms(t0, t_channel),
        ms(t0, t_media),
    );

    // Through the focus only: the groupcall clients never called each
    // other or the Chromium client; the focus serves all three.
    assert_only_through(&h.log.seen, t0, &members, &focus.device);
    assert_eq!(
        focus.handle.status().participants,
        3,
        "participants at the focus"
    );

    h.quit_js(chr).await;
    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}
