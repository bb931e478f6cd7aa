//! Renegotiation glare through a real focus on a real Synapse, forced by
//! the test: the focus is stalled (a test hook) while a client unsubscribes
//! from everything (the focus must offer it fewer tracks) and then starts a
//! screenshare (it offers); when the focus runs again it makes its offer on
//! reading the unsubscription, before it reads the client's offer. Both
//! offers cross: the focus (the polite side) yields and makes its offer
//! again after; the client (impolite) ignores the focus's. The call goes on
//! and the screenshare arrives.
//!
//! Run with `cargo test -p groupcall-focus --test glare -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::time::Duration;

use groupcall::media::TrackKind;
use groupcall::proto::events::FeedPurpose;
use groupcall::proto::{CallEvent, Command};
use groupcall_focus::engine::EngineInput;
use groupcall_testkit::*;
use tokio::time::Instant;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offers_that_cross_are_resolved_and_the_call_goes_on() {
    let mut h = Harness::new().await;
    for name in ["p0", "p1"] {
        h.register(name).await;
    }
    let s0 = h.login("p0").await;
    let focus = RunningFocus::start(&h, &s0).await;
    let s1 = h.login("p1").await;
    let t0 = Instant::now();
    let (members, parts) =
        join_through_focus(&mut h, &focus, vec![("p0", s0), ("p1", s1)], |_| None).await;
    wait_media(&mut h, t0, &members, 50, 20, 90).await;
    let mut figures = focus.figures.clone();
    assert_eq!(figures.borrow().offers_yielded, 0);

    // The focus stalls; meanwhile p0 wants nobody's media (the focus will
    // offer it fewer tracks) and starts a screenshare (p0 offers).
    let p0 = members[0].clone();
    let t_glare = Instant::now();
    // (Only once the stall has begun: a message the focus read before it
    // would be answered at once, with no crossing.)
    let (started, stalled) = tokio::sync::oneshot::channel();
    focus
        .inputs
        .send(EngineInput::Stall {
            duration: Duration::from_millis(2000),
            started,
        })
        .unwrap();
    stalled.await.expect("the stall begins");
    parts[0]
        .commander
        .send(Command::FocusSubscriptions(Some(Vec::new())));
    tokio::time::sleep(Duration::from_millis(200)).await;
    parts[0].commander.send(Command::Screenshare(true));
    let yielded = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let n = figures.borrow_and_update().offers_yielded;
            if n > 0 {
                return n;
            }
            figures.changed().await.unwrap();
        }
    })
    .await
    .expect("the focus's offer crossed p0's and yielded");
    assert_eq!(yielded, 1);

    // p0's screenshare reaches p1, and the call goes on both ways.
    let deadline = Instant::now() + Duration::from_secs(30);
    let share = loop {
        h.log.pump();
        let share = h.log.seen.iter().find_map(|e| match e.call() {
            Some(CallEvent::FeedAdded {
                device,
                stream_id,
                purpose: FeedPurpose::Screenshare,
                ..
            }) if e.who == members[1].idx && *device == p0.dev => Some(stream_id.clone()),
            _ => None,
        });
        if let Some(s) = share
            && rust_frames(
                &h.log.seen,
                t_glare,
                members[1].idx,
                &p0.dev,
                TrackKind::Video,
                Some(&s),
            ) >= 10
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "p0's screenshare did not reach p1 after the glare\n{}",
            h.log.dump(60)
        );
        h.log.run_for(Duration::from_millis(250)).await;
    };
    // p0 wants everyone again: the call goes on both ways.
    parts[0].commander.send(Command::FocusSubscriptions(None));
    let t_after = Instant::now();
    wait_media(&mut h, t_after, &members, 50, 20, 30).await;
    eprintln!(
        "FIGURE glare: offers crossed (focus stalled 2 s); the focus yielded once, the screenshare {share} reached p1 and media flowed both ways {:.1} s after the glare began",
        t_glare.elapsed().as_secs_f64()
    );
    assert_eq!(focus.figures.borrow().offers_yielded, 1, "one glare only");
    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}
