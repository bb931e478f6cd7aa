//! The active speaker through a real focus (this crate's service,
//! in-process) on a real Synapse: groupcall clients send the RFC 6464
//! level of their audio, the focus's forwarder names the loudest
//! participant, and every client of the call hears of it over the data
//! channel (`m.call.active_speaker`, `CallEvent::ActiveSpeaker`). A client
//! in recent-speakers mode (N = 1) then receives the camera video of the
//! current speaker only, and everyone's audio. Chromium (libwebrtc) sends
//! the levels natively: the focus names it too, and it is told.
//!
//! Run with `cargo test -p groupcall-focus --test speaker -- --nocapture`
//! (the Chromium test needs `interop/node_modules` and Chromium, as
//! `tests/chromium.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::path::PathBuf;
use std::time::Duration;

use groupcall::client::AudioSource;
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, Command, Config, DeviceKey};
use groupcall_testkit::*;
use tokio::time::Instant;

mod common;
use common::{Member, RunningFocus, http_get, join_through_focus_with, leave_all};

/// The speakers `at` was told of since `since`, with when.
fn speakers(seen: &[Entry], since: Instant, at: usize) -> Vec<(Instant, Option<DeviceKey>)> {
    seen.iter()
        .filter(|e| e.who == at && e.t >= since)
        .filter_map(|e| match e.call() {
            Some(CallEvent::ActiveSpeaker { device, .. }) => Some((e.t, device.clone())),
            _ => None,
        })
        .collect()
}

/// Waits (up to `secs`) until the last speaker each of `members` was told
/// of since `since` is `who`; returns when each was told.
async fn wait_speaker(
    h: &mut Harness,
    members: &[Member],
    since: Instant,
    who: &DeviceKey,
    secs: u64,
) -> Vec<Instant> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        h.log.pump();
        let told: Vec<Option<Instant>> = members
            .iter()
            .map(|m| match speakers(&h.log.seen, since, m.idx).last() {
                Some((t, Some(d))) if d == who => Some(*t),
                _ => None,
            })
            .collect();
        if let Some(all) = told.iter().copied().collect::<Option<Vec<Instant>>>() {
            return all;
        }
        if Instant::now() >= deadline {
            let state: Vec<String> = members
                .iter()
                .map(|m| {
                    let last = speakers(&h.log.seen, since, m.idx).last().cloned();
                    format!("{}: {:?}", m.name, last.map(|(_, d)| d))
                })
                .collect();
            panic!(
                "not everyone was told that {who} speaks: {}\nrecent events:\n{}",
                state.join(", "),
                h.log.dump(80)
            );
        }
        h.log.run_for(Duration::from_millis(100)).await;
    }
}

/// Registers `names` and `others`, starts the focus (invited by the first
/// of `names`) and joins `names` through it; `options(i, o)` adjusts the
/// options of the `i`th.
async fn call(
    names: &[&str],
    others: &[&str],
    options: impl Fn(usize, &mut groupcall::client::JoinOptions),
) -> (
    Harness,
    RunningFocus,
    Vec<Member>,
    Vec<Participant>,
    Instant,
) {
    let mut h = Harness::new().await;
    for n in names.iter().chain(others) {
        h.register(n).await;
    }
    let mut clients = Vec::new();
    for n in names {
        clients.push((*n, h.login(n).await));
    }
    let focus = RunningFocus::start(&h, &clients[0].1).await;
    let t0 = h.log.mark();
    let (members, parts) =
        join_through_focus_with(&mut h, &focus, clients, |_| None, options).await;
    (h, focus, members, parts, t0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_participant_is_told_who_speaks() {
    let (mut h, focus, members, parts, t0) = call(&["p0", "p1", "p2"], &[], |_, _| {}).await;
    let dev = |i: usize| members[i].dev.clone();
    // p0 and p2 are muted: p1's tone makes p1 the speaker.
    parts[0].commander.send(Command::SetAudioMuted(true));
    parts[2].commander.send(Command::SetAudioMuted(true));
    let told = wait_speaker(&mut h, &members, t0, &dev(1), 90).await;
    let last = told.iter().max().copied().unwrap_or(t0);
    eprintln!(
        "FIGURE speaker: p1 (the only unmuted) named the active speaker at all 3 participants {} ms after the first join",
        ms(t0, last)
    );

    // p1 is muted and p2 unmuted: p2 becomes the speaker.
    let t_change = h.log.mark();
    parts[1].commander.send(Command::SetAudioMuted(true));
    parts[2].commander.send(Command::SetAudioMuted(false));
    let told = wait_speaker(&mut h, &members, t_change, &dev(2), 30).await;
    let latencies: Vec<String> = members
        .iter()
        .zip(&told)
        .map(|(m, t)| format!("{} {} ms", m.name, ms(t_change, *t)))
        .collect();
    let worst = told
        .iter()
        .map(|t| t.duration_since(t_change))
        .max()
        .unwrap_or_default();
    eprintln!(
        "FIGURE speaker: from p1 muted and p2 unmuted to ActiveSpeaker = p2 at the clients: {} (the forwarder's hold is 1 s and a silent track counts as such after 0.5 s)",
        latencies.join(", ")
    );
    assert!(worst < Duration::from_secs(5), "told after {worst:?}");
    // Since the change nobody was named but p2.
    h.log.pump();
    for m in &members {
        let names: Vec<Option<DeviceKey>> = speakers(&h.log.seen, t_change, m.idx)
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        assert_eq!(names, vec![Some(dev(2))], "{}", m.name);
    }
    // The operator sees it too: `/metrics` names p2 as the call's speaker,
    // after at least two announcements (p1, then p2).
    let addr = focus.handle.http_addr().expect("the focus's HTTP endpoint");
    let want = format!(
        "groupcall_focus_call_active_speaker{{call=\"{}/",
        focus.room
    );
    let speaker = format!(",speaker=\"{}/{}\"}} 1", dev(2).user_id, dev(2).device_id);
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = http_get(addr, "/metrics").await;
        let named = text
            .lines()
            .any(|l| l.starts_with(&want) && l.ends_with(&speaker));
        if named || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("groupcall_focus_call_active_speaker"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&want) && l.ends_with(&speaker)),
        "p2 not named in /metrics: {lines:?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with(&want)).count(),
        1,
        "one speaker series per call: {lines:?}"
    );
    let changes = lines
        .iter()
        .find(|l| l.starts_with("groupcall_focus_call_active_speaker_changes_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(changes.is_some_and(|n| n >= 2), "{lines:?}");
    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}

/// Runs for `window`; returns its start.
async fn window(h: &mut Harness, window: Duration) -> Instant {
    let since = h.log.mark();
    h.log.run_for(window).await;
    h.log.pump();
    since
}

/// Frames of `kind` participant `at` received from each of `from` since
/// `since`.
fn frames_from(
    h: &Harness,
    since: Instant,
    at: usize,
    from: &[&DeviceKey],
    kind: TrackKind,
) -> Vec<u64> {
    from.iter()
        .map(|d| rust_frames(&h.log.seen, since, at, d, kind, None))
        .collect()
}

/// Waits (up to `secs`) until `at` has received `n` video frames from
/// `from` since `since`; returns when.
async fn wait_video(
    h: &mut Harness,
    at: usize,
    from: &DeviceKey,
    since: Instant,
    n: u64,
    secs: u64,
) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        h.log.pump();
        if rust_frames(&h.log.seen, since, at, from, TrackKind::Video, None) >= n {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "#{at} got no video from {from}\nrecent events:\n{}",
            h.log.dump(80)
        );
        h.log.run_for(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_one_recent_speaker_only_the_speakers_video_comes_and_everyones_audio() {
    // p0 watches with N = 1. p1 and p2 send the tone (its level: -21 dBov);
    // p3 sends the same tone from a file, whose level is unknown: audible,
    // never a speaker.
    let tone = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../groupcall-media/media/tone.ogg"
    ));
    let (mut h, focus, members, parts, t0) = call(&["p0", "p1", "p2", "p3"], &[], |i, o| match i {
        0 => {
            let mut core = Config::new("", "");
            core.focus_recent_speakers = Some(1);
            o.core = Some(core);
        }
        3 => o.audio = AudioSource::File(tone.clone()),
        _ => {}
    })
    .await;
    let dev = |i: usize| members[i].dev.clone();
    let p0 = members[0].idx;
    parts[0].commander.send(Command::SetAudioMuted(true));
    parts[2].commander.send(Command::SetAudioMuted(true));

    // p1 speaks: p0 gets p1's video, nobody else's; audio from p1 and p3.
    wait_speaker(&mut h, &members[..1], t0, &dev(1), 90).await;
    wait_video(&mut h, p0, &dev(1), t0, 10, 30).await;
    let (d1, d2, d3) = (dev(1), dev(2), dev(3));
    let three = Duration::from_secs(3);
    let w = window(&mut h, three).await;
    let video = frames_from(&h, w, p0, &[&d1, &d2, &d3], TrackKind::Video);
    let audio = frames_from(&h, w, p0, &[&d1, &d3], TrackKind::Audio);
    // Meanwhile p1 (all video) receives p2's and p3's: they do send it.
    let at_p1 = frames_from(&h, w, members[1].idx, &[&d2, &d3], TrackKind::Video);
    eprintln!(
        "FIGURE speaker: recent speakers N=1, p1 speaking: p0 received in 3 s video p1 {} / p2 {} / p3 {} frames, audio p1 {} / p3 {} (p1 received video p2 {} / p3 {})",
        video[0], video[1], video[2], audio[0], audio[1], at_p1[0], at_p1[1]
    );
    assert!(video[0] >= 30, "p1's video: {video:?}");
    assert_eq!((video[1], video[2]), (0, 0), "only the speaker's video");
    assert!(
        audio.iter().all(|a| *a >= 50),
        "everyone's audio: {audio:?}"
    );
    assert!(
        at_p1.iter().all(|v| *v >= 30),
        "p2 and p3 send video: {at_p1:?}"
    );

    // p2 speaks instead: p2's video comes, p1's goes.
    let t_change = h.log.mark();
    parts[1].commander.send(Command::SetAudioMuted(true));
    parts[2].commander.send(Command::SetAudioMuted(false));
    let told = wait_speaker(&mut h, &members[..1], t_change, &dev(2), 30).await[0];
    let seen_at = wait_video(&mut h, p0, &dev(2), t_change, 10, 30).await;
    // Let what was in flight settle, then look.
    h.log.run_for(Duration::from_secs(1)).await;
    let w = window(&mut h, three).await;
    let video = frames_from(&h, w, p0, &[&d1, &d2, &d3], TrackKind::Video);
    let audio = frames_from(&h, w, p0, &[&d2, &d3], TrackKind::Audio);
    let at_p2 = frames_from(&h, w, members[2].idx, &[&d1, &d3], TrackKind::Video);
    eprintln!(
        "FIGURE speaker: recent speakers N=1, speaker p1 -> p2: p0 told {} ms and 10 video frames of p2 {} ms after the change; then in 3 s video p1 {} / p2 {} / p3 {} frames, audio p2 {} / p3 {} (p2 received video p1 {} / p3 {})",
        ms(t_change, told),
        ms(t_change, seen_at),
        video[0],
        video[1],
        video[2],
        audio[0],
        audio[1],
        at_p2[0],
        at_p2[1]
    );
    assert!(
        at_p2.iter().all(|v| *v >= 30),
        "p1 and p3 send video: {at_p2:?}"
    );
    assert_eq!(video[0], 0, "p1's video stopped: {video:?}");
    assert!(video[1] >= 30, "p2's video: {video:?}");
    assert_eq!(video[2], 0, "p3 never spoke: {video:?}");
    assert!(
        audio.iter().all(|a| *a >= 50),
        "everyone's audio: {audio:?}"
    );
    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chromium_client_takes_over_as_speaker_from_its_own_levels_and_is_told() {
    require_chromium();
    // amy sends the tone, bob no audio: amy is the speaker.
    let no_audio = |i: usize, o: &mut groupcall::client::JoinOptions| {
        if i == 1 {
            o.audio = AudioSource::None;
        }
    };
    let (mut h, focus, gc, parts, t0) = call(&["amy", "bob"], &["chr"], no_audio).await;
    let room = focus.room.clone();
    let focus_arg = format!("{}/{}", focus.device.user_id, focus.device.device_id);
    let amy_dev = gc[0].dev.clone();
    wait_speaker(&mut h, &gc, t0, &amy_dev, 90).await;
    // The Chromium client joins (its fake microphone beeps: loud in
    // bursts, quiet between them) and is told at once that amy speaks.
    let args = ["--focus", &focus_arg, "--candidate-ip", "127.0.0.1"];
    let chr = h.spawn_js("chr", "focus-client.mjs", &room, &args);
    let chr_dev = h.js_device(chr).await;
    h.log
        .wait_for("the Chromium client to be told amy speaks", 60, |s| {
            js_saw(s, t0, chr, "active_speaker", |v| about(v, &amy_dev))
        })
        .await;
    // amy is muted: the beeping Chromium client takes over.
    let t_change = h.log.mark();
    parts[0].commander.send(Command::SetAudioMuted(true));
    let told = wait_speaker(&mut h, &gc, t_change, &chr_dev, 30).await;
    let t_chr = h
        .log
        .wait_for("the Chromium client to be told it speaks", 30, |s| {
            js_saw(s, t_change, chr, "active_speaker", |v| about(v, &chr_dev))
        })
        .await;
    let last = told.iter().copied().chain([t_chr]).max().unwrap_or(t0);
    eprintln!(
        "FIGURE speaker: the Chromium client (libwebrtc's own audio levels, a beeping fake microphone) named the active speaker at both groupcall clients and at itself {} ms after the tone before it was muted",
        ms(t_change, last)
    );
    h.quit_js(chr).await;
    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}
