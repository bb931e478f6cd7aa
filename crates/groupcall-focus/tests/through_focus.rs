//! groupcall participants in one call through a real focus (this crate's
//! service, in-process), on a real Synapse: every participant receives
//! audio and video from every other through the focus, and none calls
//! another directly.
//!
//! Run with `cargo test -p groupcall-focus --test through_focus -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use groupcall_testkit::*;

mod common;
use common::{
    Member, RunningFocus, assert_only_through, join_through_focus, leave_all, wait_media,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_participants_see_and_hear_each_other_through_the_focus() {
    const N: usize = 3;
    let mut h = Harness::new().await;
    let names: Vec<String> = (0..N).map(|i| format!("p{i}")).collect();
    for n in &names {
        h.register(n).await;
    }
    let mut sessions = Vec::new();
    for n in &names {
        sessions.push((n.as_str(), h.login(n).await));
    }

    // The focus runs; the first participant's room invites it.
    let focus = RunningFocus::start(&h, &sessions[0].1).await;
    let t0 = h.log.mark();
    let (members, parts): (Vec<Member>, _) =
        join_through_focus(&mut h, &focus, sessions, |_| None).await;

    // Every participant hears and sees every other, through the focus.
    wait_media(&mut h, t0, &members, 50, 20, 90).await;
    eprintln!(
        "FIGURE through_focus: {N} participants, audio and video both ways on every pair {:.1} s after the first join",
        t0.elapsed().as_secs_f64()
    );
    // No participant called another directly: each has one peer, the focus.
    assert_only_through(&h.log.seen, t0, &members, &focus.device);

    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}
