//! Interop with the reference implementation: groupcall participants and
//! matrix-js-sdk's `GroupCall` (the `interop/` peer, in Node with wrtc or in
//! headless Chromium) in the same MSC3401 call on a real Synapse, with real
//! WebRTC over UDP. Every test asserts on both sides' reports.
//!
//! `cargo test -p groupcall --test interop` (installs `interop/node_modules`
//! and Chromium when missing). Figures are printed with `--nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

mod support;

use groupcall::client::JoinOptions;
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, CreateOptions, DeviceKey};
use support::*;
use tokio::time::{Instant, timeout};

const T: u64 = 60;

/// Media counters every 100 ms where first-frame times are measured.
const FINE: std::time::Duration = std::time::Duration::from_millis(100);

/// Audio and video flow from `from` to `at`, whichever side each is on:
/// more than `audio` audio frames and `video` video frames since `since`.
fn media_ok(
    seen: &[Entry],
    since: Instant,
    at: (usize, bool),
    from: &DeviceKey,
    audio: u64,
    video: u64,
) -> bool {
    let (idx, rust) = at;
    if rust {
        rust_frames(seen, since, idx, from, TrackKind::Audio, None) > audio
            && rust_frames(seen, since, idx, from, TrackKind::Video, None) > video
    } else {
        // The reference counts 10 ms audio frames; we send 20 ms Opus packets.
        js_frames(seen, since, idx, from, "audio", "m.usermedia") > audio * 2
            && js_frames(seen, since, idx, from, "video", "m.usermedia") > video
    }
}

/// A groupcall participant and a reference peer in one call: connected and
/// audio + video both ways, with figures measured from `t0`.
async fn pair_media(
    h: &mut Harness,
    t0: Instant,
    rust: (usize, &DeviceKey),
    js: (usize, &DeviceKey),
) -> String {
    pair_media_from(h, t0, t0, rust, js).await
}

/// [`pair_media`] with figures measured from `t_fig`.
async fn pair_media_from(
    h: &mut Harness,
    t0: Instant,
    t_fig: Instant,
    rust: (usize, &DeviceKey),
    js: (usize, &DeviceKey),
) -> String {
    let (r, rdev) = rust;
    let (j, jdev) = js;
    h.log
        .wait_for("connected on both sides", T, |s| {
            rust_connected(s, t0, r, jdev) && js_connected_at(s, t0, j, rdev).is_some()
        })
        .await;
    h.log
        .wait_for("audio and video both ways", T, |s| {
            media_ok(s, t0, (r, true), jdev, 50, 20) && media_ok(s, t0, (j, false), rdev, 50, 20)
        })
        .await;
    let s = &h.log.seen;
    let f = |t: Option<Instant>| t.map(|t| ms(t_fig, t).to_string()).unwrap_or("-".into());
    format!(
        "connected: groupcall {} ms, reference {} ms; first video: at groupcall {} ms, at reference {} ms; first audio: at groupcall {} ms, at reference {} ms",
        f(rust_connected_at(s, t0, r, jdev)),
        f(js_connected_at(s, t0, j, rdev)),
        f(first_frames_at(s, t0, r, jdev, TrackKind::Video)),
        f(first_frames_at(s, t0, j, rdev, TrackKind::Video)),
        f(first_frames_at(s, t0, r, jdev, TrackKind::Audio)),
        f(first_frames_at(s, t0, j, rdev, TrackKind::Audio)),
    )
}

/// 1a. The reference creates the call; groupcall joins. The reference's
/// user id is the smaller, so it places the call (invite from js-sdk).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_creates_call_groupcall_joins() {
    let mut h = Harness::new().await;
    h.register("alice").await;
    h.register("bob").await;
    let bob = h.login("bob").await;
    let bob_dev = DeviceKey::new(bob.user_id(), bob.device_id());
    let room = h.room(&bob).await;

    let alice = h.spawn_js(
        "alice",
        "peer.mjs",
        &room,
        &["--create-call", "--media-interval", "100"],
    );
    let alice_dev = h.js_device(alice).await;
    let since = h.t_start;
    h.log
        .wait_for("the reference to create and enter the call", T, |s| {
            js_saw(s, since, alice, "joined", |v| v["created"] == true)
        })
        .await;
    let t0 = h.log.mark();
    let mut opts = JoinOptions::new(room.clone());
    opts.stats_interval = FINE;
    let (b, _bob_p) = h.join_rust("bob", bob, opts).await;
    let joined = h
        .log
        .wait_for("groupcall to join the reference's call", T, |s| {
            s.iter().any(|e| {
                e.who == b && matches!(e.call(), Some(CallEvent::Joined { created: false, .. }))
            })
        })
        .await;
    let figures = pair_media_from(&mut h, t0, joined, (b, &bob_dev), (alice, &alice_dev)).await;
    eprintln!(
        "FIGURES reference creates, groupcall joins: join_call {} ms; after groupcall joined: {figures}",
        ms(t0, joined)
    );
    h.shutdown().await;
}

/// 1b. groupcall creates the call; the reference joins. groupcall's user id
/// is the smaller, so it places the call (invite from groupcall).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groupcall_creates_call_reference_joins() {
    let mut h = Harness::new().await;
    h.register("carol").await;
    h.register("dave").await;
    let carol = h.login("carol").await;
    let carol_dev = DeviceKey::new(carol.user_id(), carol.device_id());
    let room = h.room(&carol).await;

    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    opts.stats_interval = FINE;
    let (c, _carol_p) = h.join_rust("carol", carol, opts).await;
    h.log
        .wait_for("groupcall to create the call", T, |s| {
            s.iter().any(|e| {
                e.who == c && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
            })
        })
        .await;
    let t0 = h.log.mark();
    let dave = h.spawn_js("dave", "peer.mjs", &room, &["--media-interval", "100"]);
    let dave_dev = h.js_device(dave).await;
    let joined = h
        .log
        .wait_for("the reference to enter groupcall's call", T, |s| {
            js_saw(s, t0, dave, "joined", |v| v["created"] == false)
        })
        .await;
    let figures = pair_media_from(&mut h, t0, joined, (c, &carol_dev), (dave, &dave_dev)).await;
    eprintln!(
        "FIGURES groupcall creates, reference joins: reference start to joined {} ms; after it joined: {figures}",
        ms(t0, joined)
    );
    h.shutdown().await;
}

/// Who is who in a call: log index, groupcall (true) or reference, device.
type Member = (usize, bool, DeviceKey);

fn connected_to(s: &[Entry], since: Instant, at: &Member, to: &DeviceKey) -> bool {
    if at.1 {
        rust_connected(s, since, at.0, to)
    } else {
        js_connected_at(s, since, at.0, to).is_some()
    }
}

/// 2. A mixed mesh: 2 groupcall + 2 reference participants. The user ids
/// interleave (amy < ben < cat < dan), so invites go groupcall -> reference,
/// reference -> groupcall, groupcall -> groupcall and reference -> reference.
/// All 6 pairs carry audio and video both ways. On top, the calls start
/// with more than one stream and with a muted microphone:
/// - ben (reference) creates the call and enters sharing its screen: its
///   invites to cat and dan carry two streams (`sdp_stream_metadata` with
///   `m.usermedia` and `m.screenshare`), and so does its answer to amy;
/// - amy (groupcall) shares her screen as soon as she has joined (her
///   invites carry both streams, or she renegotiates, depending on timing);
/// - dan (reference) enters with its microphone muted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_mesh_of_four() {
    use groupcall::proto::Command;
    use groupcall::proto::events::FeedPurpose;
    let mut h = Harness::new().await;
    for n in ["amy", "ben", "cat", "dan"] {
        h.register(n).await;
    }
    let amy = h.login("amy").await;
    let cat = h.login("cat").await;
    let room = h.room(&amy).await;

    let ben = h.spawn_js(
        "ben",
        "peer.mjs",
        &room,
        &["--create-call", "--screenshare"],
    );
    let ben_dev = h.js_device(ben).await;
    let since = h.t_start;
    h.log
        .wait_for("ben to create the call", T, |s| {
            js_saw(s, since, ben, "joined", |v| v["created"] == true)
        })
        .await;
    let t0 = h.log.mark();
    let dan = h.spawn_js("dan", "peer.mjs", &room, &["--mute-audio"]);
    let amy_dev = DeviceKey::new(amy.user_id(), amy.device_id());
    let cat_dev = DeviceKey::new(cat.user_id(), cat.device_id());
    let (a, amy_p) = h
        .join_rust("amy", amy, JoinOptions::new(room.clone()))
        .await;
    amy_p.commander.send(Command::Screenshare(true));
    let (c, _cat_p) = h
        .join_rust("cat", cat, JoinOptions::new(room.clone()))
        .await;
    let dan_dev = h.js_device(dan).await;
    let members: Vec<Member> = vec![
        (a, true, amy_dev.clone()),
        (ben, false, ben_dev.clone()),
        (c, true, cat_dev.clone()),
        (dan, false, dan_dev.clone()),
    ];

    let t_mesh = h
        .log
        .wait_for("all 6 pairs connected (both ends)", T, |s| {
            members.iter().all(|x| {
                members
                    .iter()
                    .all(|y| x.0 == y.0 || connected_to(s, t0, x, &y.2))
            })
        })
        .await;
    // dan's muted microphone sends silence (few packets with DTX): count
    // only its video, and check the mute state instead.
    let t_media = h
        .log
        .wait_for("audio and video on all 12 directions", T, |s| {
            members.iter().all(|x| {
                members.iter().all(|y| {
                    x.0 == y.0
                        || if y.0 == dan {
                            media_ok(s, t0, (x.0, x.1), &y.2, 0, 20)
                                || (x.1
                                    && rust_frames(s, t0, x.0, &y.2, TrackKind::Video, None) > 20)
                                || (!x.1
                                    && js_frames(s, t0, x.0, &y.2, "video", "m.usermedia") > 20)
                        } else {
                            media_ok(s, t0, (x.0, x.1), &y.2, 50, 20)
                        }
                })
            })
        })
        .await;
    h.log
        .wait_for("dan's microphone muted at amy and cat from the start", T, |s| {
            [a, c].iter().all(|&at| {
                s.iter().any(|e| {
                    e.who == at
                        && matches!(e.call(), Some(CallEvent::FeedAdded { device, purpose: FeedPurpose::Usermedia, audio_muted: true, .. }) if *device == dan_dev)
                })
            })
        })
        .await;
    // Both screenshares reach everyone, with frames.
    let t_shares = h
        .log
        .wait_for(
            "ben's and amy's screenshares at everyone, with frames",
            T,
            |s| {
                members.iter().all(|x| {
                    [(ben, &ben_dev), (a, &amy_dev)]
                        .iter()
                        .all(|(sharer, dev)| {
                            x.0 == *sharer
                                || if x.1 {
                                    rust_feed_added(s, t0, x.0, dev, FeedPurpose::Screenshare)
                                        .is_some_and(|st| {
                                            rust_frames(
                                                s,
                                                t0,
                                                x.0,
                                                dev,
                                                TrackKind::Video,
                                                Some(&st),
                                            ) > 20
                                        })
                                } else {
                                    js_frames(s, t0, x.0, dev, "video", "m.screenshare") > 20
                                }
                        })
                })
            },
        )
        .await;
    // The references list both sharers as screensharing (from the
    // `m.screenshare` feed in their member events).
    h.log
        .wait_for("ben and dan to list amy and ben as screensharing", T, |s| {
            [ben, dan].iter().all(|&at| {
                s.iter()
                    .rev()
                    .find_map(|e| (e.who == at).then(|| e.js("participants")).flatten())
                    .is_some_and(|last| {
                        let sharing: Vec<&str> = last["participants"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|p| p["screensharing"] == true)
                            .filter_map(|p| p["user_id"].as_str())
                            .collect();
                        sharing.contains(&amy_dev.user_id.as_str())
                            && sharing.contains(&ben_dev.user_id.as_str())
                    })
            })
        })
        .await;
    let mut per_pair = Vec::new();
    for x in &members {
        for y in &members {
            if x.0 < y.0 {
                let s = &h.log.seen;
                let conn = |m: &Member, to: &DeviceKey| {
                    if m.1 {
                        rust_connected_at(s, t0, m.0, to)
                    } else {
                        js_connected_at(s, t0, m.0, to)
                    }
                };
                let both = conn(x, &y.2).max(conn(y, &x.2)).unwrap();
                per_pair.push(format!(
                    "{}-{} {} ms",
                    x.2.user_id,
                    y.2.user_id,
                    ms(t0, both)
                ));
            }
        }
    }
    eprintln!(
        "FIGURES mixed mesh of 4: every pair connected {} ms, media on all 12 directions {} ms, both screenshares everywhere {} ms after the last 3 started joining; pairs: {}",
        ms(t0, t_mesh),
        ms(t0, t_media),
        ms(t0, t_shares),
        per_pair.join(", ")
    );
    h.shutdown().await;
}

/// 3. Mute and screenshare, both directions: the reference's mute is seen
/// by groupcall (`FeedChanged`), its screenshare is an `m.screenshare` feed
/// with frames that goes away when stopped; and the same from groupcall to
/// the reference (`feed_muted`, `feed_added`/`media`/`feed_removed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mute_and_screenshare_both_ways() {
    let mut h = Harness::new().await;
    h.register("erin").await;
    h.register("fay").await;
    let erin = h.login("erin").await;
    let erin_dev = DeviceKey::new(erin.user_id(), erin.device_id());
    let room = h.room(&erin).await;
    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    let (e, erin_p) = h.join_rust("erin", erin, opts).await;
    let t0 = h.log.mark();
    let fay = h.spawn_js("fay", "peer.mjs", &room, &[]);
    let fay_dev = h.js_device(fay).await;
    pair_media(&mut h, t0, (e, &erin_dev), (fay, &fay_dev)).await;
    let mut figures = Vec::new();

    // The reference mutes and unmutes its microphone, then its camera.
    for (cmd, audio, video) in [
        ("mute audio", true, false),
        ("unmute audio", false, false),
        ("mute video", false, true),
        ("unmute video", false, false),
    ] {
        let t = h.log.mark();
        h.send(fay, cmd);
        let seen = h
            .log
            .wait_for(&format!("groupcall to see the reference {cmd}"), T, |s| {
                s.iter().any(|x| {
                    x.t >= t
                        && x.who == e
                        && matches!(x.call(), Some(CallEvent::FeedChanged { device, audio_muted, video_muted, .. })
                            if *device == fay_dev && *audio_muted == audio && *video_muted == video)
                })
            })
            .await;
        figures.push(format!("reference {cmd} seen {} ms", ms(t, seen)));
    }

    // The reference shares its screen.
    let t = h.log.mark();
    h.send(fay, "screenshare on");
    let mut share = String::new();
    let added = h
        .log
        .wait_for(
            "groupcall to see the reference's screenshare feed",
            T,
            |s| match rust_feed_added(
                s,
                t,
                e,
                &fay_dev,
                groupcall::proto::events::FeedPurpose::Screenshare,
            ) {
                Some(id) => {
                    share = id;
                    true
                }
                None => false,
            },
        )
        .await;
    let stream = share.clone();
    let frames = h
        .log
        .wait_for("screenshare frames at groupcall", T, |s| {
            rust_frames(s, t, e, &fay_dev, TrackKind::Video, Some(&stream)) > 20
        })
        .await;
    figures.push(format!(
        "reference screenshare: feed at groupcall {} ms, 20 frames {} ms",
        ms(t, added),
        ms(t, frames)
    ));
    let t = h.log.mark();
    h.send(fay, "screenshare off");
    let removed = h
        .log
        .wait_for("groupcall to see the screenshare removed", T, |s| {
            s.iter().any(|x| {
                x.t >= t
                    && x.who == e
                    && matches!(x.call(), Some(CallEvent::FeedRemoved { device, stream_id }) if *device == fay_dev && *stream_id == share)
            })
        })
        .await;
    figures.push(format!(
        "reference screenshare off seen {} ms",
        ms(t, removed)
    ));
    // Its camera and microphone still arrive.
    let t = h.log.mark();
    h.log
        .wait_for("the reference's user media after its screenshare", T, |s| {
            media_ok(s, t, (e, true), &fay_dev, 20, 10)
        })
        .await;

    // groupcall mutes and unmutes.
    use groupcall::proto::Command;
    for (cmd, audio, video) in [
        (Command::SetAudioMuted(true), true, false),
        (Command::SetAudioMuted(false), false, false),
        (Command::SetVideoMuted(true), false, true),
        (Command::SetVideoMuted(false), false, false),
    ] {
        let t = h.log.mark();
        let label = format!("{cmd:?}");
        erin_p.commander.send(cmd);
        let seen = h
            .log
            .wait_for(
                &format!("the reference to see groupcall's {label}"),
                T,
                |s| {
                    js_saw(s, t, fay, "feed_muted", |v| {
                        about(v, &erin_dev)
                            && v["purpose"] == "m.usermedia"
                            && v["audio_muted"] == audio
                            && v["video_muted"] == video
                    })
                },
            )
            .await;
        figures.push(format!("groupcall {label} seen {} ms", ms(t, seen)));
        if audio {
            // Muted for real: no sound reaches the reference any more (two
            // reports in a row without a new audible frame)...
            h.log
                .wait_for("groupcall's audio to go silent at the reference", T, |s| {
                    let audible: Vec<u64> = s
                        .iter()
                        .filter(|e| e.t >= seen && e.who == fay)
                        .filter_map(|e| e.js("media"))
                        .filter(|v| about(v, &erin_dev) && v["kind"] == "audio")
                        .filter_map(|v| v["audible"].as_u64())
                        .collect();
                    audible.windows(2).any(|w| w[0] == w[1])
                })
                .await;
        } else if !video {
            // ... and it comes back after unmuting.
            let t = h.log.mark();
            h.log
                .wait_for("groupcall's audio audible again at the reference", T, |s| {
                    js_frames(s, t, fay, &erin_dev, "audio", "m.usermedia") > 50
                })
                .await;
        }
    }

    // groupcall shares its screen.
    let t = h.log.mark();
    erin_p.commander.send(Command::Screenshare(true));
    let added = h
        .log
        .wait_for(
            "the reference to see groupcall's screenshare feed",
            T,
            |s| {
                js_saw(s, t, fay, "feed_added", |v| {
                    about(v, &erin_dev) && v["purpose"] == "m.screenshare"
                })
            },
        )
        .await;
    let frames = h
        .log
        .wait_for("screenshare frames at the reference", T, |s| {
            js_frames(s, t, fay, &erin_dev, "video", "m.screenshare") > 20
        })
        .await;
    figures.push(format!(
        "groupcall screenshare: feed at reference {} ms, 20 frames {} ms",
        ms(t, added),
        ms(t, frames)
    ));
    // Our member event lists the screenshare feed: the reference shows us
    // as screensharing.
    let sharing = |v: &serde_json::Value, on: bool| {
        v["participants"].as_array().is_some_and(|l| {
            l.iter()
                .any(|p| p["user_id"] == erin_dev.user_id.as_str() && p["screensharing"] == on)
        })
    };
    h.log
        .wait_for("the reference to list groupcall as screensharing", T, |s| {
            js_saw(s, t, fay, "participants", |v| sharing(v, true))
        })
        .await;
    let t = h.log.mark();
    erin_p.commander.send(Command::Screenshare(false));
    let removed = h
        .log
        .wait_for(
            "the reference to see groupcall's screenshare removed",
            T,
            |s| {
                js_saw(s, t, fay, "feed_removed", |v| {
                    about(v, &erin_dev) && v["purpose"] == "m.screenshare"
                })
            },
        )
        .await;
    figures.push(format!(
        "groupcall screenshare off seen {} ms",
        ms(t, removed)
    ));
    h.log
        .wait_for(
            "the reference to list groupcall as not screensharing",
            T,
            |s| js_saw(s, t, fay, "participants", |v| sharing(v, false)),
        )
        .await;
    let t = h.log.mark();
    h.log
        .wait_for(
            "groupcall's user media at the reference after its screenshare",
            T,
            |s| media_ok(s, t, (fay, false), &erin_dev, 20, 10),
        )
        .await;
    eprintln!("FIGURES mute and screenshare: {}", figures.join("; "));
    h.shutdown().await;
}

/// The `m.call.*` a groupcall participant received from `from`:
/// (type, encrypted, ignored).
fn rust_signalling(s: &[Entry], at: usize, from: &str) -> Vec<(String, bool, Option<String>)> {
    s.iter()
        .filter(|e| e.who == at)
        .filter_map(|e| match &e.ev {
            Ev::Rust(groupcall::client::ClientEvent::Signalling {
                sender,
                event_type,
                encrypted,
                ignored,
            }) if sender == from => Some((event_type.clone(), *encrypted, ignored.clone())),
            _ => None,
        })
        .collect()
}

/// The `signalling` lines of reference peer `at` in `direction` with
/// `other` (the sender for "in", the recipient for "out").
fn js_signalling<'a>(
    s: &'a [Entry],
    at: usize,
    direction: &str,
    other: &str,
) -> Vec<&'a serde_json::Value> {
    s.iter()
        .filter(|e| e.who == at)
        .filter_map(|e| e.js("signalling"))
        .filter(|v| v["direction"] == direction && (v["sender"] == other || v["to_user"] == other))
        .collect()
}

/// 4. Signalling plaintext and Olm-encrypted, in one call:
/// - gus (groupcall, sends Olm: the default),
/// - hal (reference, plaintext: its default),
/// - ivy (reference with `--encrypted`: Olm via the Rust crypto),
/// - jay (groupcall with `encrypt: false`: plaintext).
///
/// Every pair connects with media; each side reports how each message
/// arrived, and the decrypted contents carry MSC3401's group fields with
/// `seq` from 0 without gaps.
///
/// Trickle both ways: the homeserver's STUN server (a stub) answers 800 ms
/// late, after groupcall's 300 ms gathering wait, so gus and jay trickle
/// their server-reflexive candidates in `m.call.candidates`, and each
/// reference adds every one of them (`addIceCandidate` succeeds). hal's own
/// STUN server holds its answers until jay has hal's invite, so hal's
/// server-reflexive candidate comes after its SDP went out and before ICE
/// can connect: hal trickles it, and jay takes every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signalling_plaintext_and_olm() {
    let gc_stun = LateStun::start(std::time::Duration::from_millis(800));
    let mut h = Harness::with_stun(&gc_stun.uri).await;
    for n in ["gus", "hal", "ivy", "jay"] {
        h.register(n).await;
    }
    let gus = h.login("gus").await;
    let jay = h.login("jay").await;
    let gus_dev = DeviceKey::new(gus.user_id(), gus.device_id());
    let jay_dev = DeviceKey::new(jay.user_id(), jay.device_id());
    let room = h.room(&gus).await;
    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    let (g, _gus_p) = h.join_rust("gus", gus, opts).await;
    let t0 = h.log.mark();
    // hal's STUN server answers only once released (below), so hal
    // trickles m.call.candidates to jay (hal calls jay).
    let stun = LateStun::held(std::time::Duration::from_millis(400));
    let hal = h.spawn_js(
        "hal",
        "peer.mjs",
        &room,
        &["--log-signalling", "--ice-server", &stun.uri],
    );
    let ivy = h.spawn_js(
        "ivy",
        "peer.mjs",
        &room,
        &["--log-signalling", "--encrypted"],
    );
    let mut opts = JoinOptions::new(room.clone());
    opts.encrypt = false;
    let (j, _jay_p) = h.join_rust("jay", jay, opts).await;
    let hal_dev = h.js_device(hal).await;
    let ivy_dev = h.js_device(ivy).await;
    // Release hal's STUN answers once jay has hal's invite: hal's SDP went
    // out (and its send completed, so later candidates are batched with the
    // end-of-candidates marker), while jay answers only after its own 300 ms
    // gathering wait, so ICE cannot be up yet.
    let released = h
        .log
        .wait_for("jay to receive hal's invite", T, |s| {
            rust_signalling(s, j, &hal_dev.user_id)
                .iter()
                .any(|(t, _, _)| t == "m.call.invite")
        })
        .await;
    stun.release();
    let members: Vec<Member> = vec![
        (g, true, gus_dev.clone()),
        (hal, false, hal_dev.clone()),
        (ivy, false, ivy_dev.clone()),
        (j, true, jay_dev.clone()),
    ];
    h.log
        .wait_for("every pair connected with media both ways", T, |s| {
            members.iter().all(|x| {
                members.iter().all(|y| {
                    x.0 == y.0
                        || (connected_to(s, t0, x, &y.2)
                            && media_ok(s, t0, (x.0, x.1), &y.2, 20, 10))
                })
            })
        })
        .await;
    let s = &h.log.seen;
    let mut report = Vec::new();

    // At groupcall: hal's and jay's messages plaintext, ivy's and gus's Olm;
    // none refused.
    for (at, at_name) in [(g, "gus"), (j, "jay")] {
        for (from, encrypted) in [
            (&hal_dev, false),
            (&ivy_dev, true),
            (&gus_dev, true),
            (&jay_dev, false),
        ] {
            if (at == g && from == &gus_dev) || (at == j && from == &jay_dev) {
                continue;
            }
            let got = rust_signalling(s, at, &from.user_id);
            assert!(
                got.iter()
                    .any(|(t, _, _)| t == "m.call.invite" || t == "m.call.answer"),
                "{at_name} got no invite/answer from {}: {got:?}",
                from.user_id
            );
            assert!(
                got.iter()
                    .all(|(_, enc, ign)| *enc == encrypted && ign.is_none()),
                "{at_name} from {}: expected encrypted={encrypted}, none ignored: {got:?}",
                from.user_id
            );
            report.push(format!(
                "{at_name}<-{}: {} msgs encrypted={encrypted}",
                from.user_id,
                got.len()
            ));
        }
    }

    // At the reference: gus's messages arrive as Olm, jay's as plaintext;
    // what hal sends is plaintext, what ivy sends is Olm.
    for (at, at_dev, sends_encrypted) in [(hal, &hal_dev, false), (ivy, &ivy_dev, true)] {
        for (from, encrypted) in [(&gus_dev, true), (&jay_dev, false)] {
            let got = js_signalling(s, at, "in", &from.user_id);
            assert!(
                !got.is_empty() && got.iter().all(|v| v["encrypted"] == encrypted),
                "{} from {}: expected encrypted={encrypted}: {got:?}",
                at_dev.user_id,
                from.user_id
            );
            assert!(
                got.iter()
                    .all(|v| v["sender_device"] == from.device_id.as_str()),
                "{} from {}: wrong sender device: {got:?}",
                at_dev.user_id,
                from.user_id
            );
            // The group fields, decrypted: our call, their session, seq
            // counting from 0 per 1:1 call without gaps.
            let joined = s
                .iter()
                .find_map(|e| (e.who == at).then(|| e.js("joined")).flatten())
                .unwrap();
            let mut seqs: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
            for v in &got {
                let c = &v["content"];
                assert_eq!(c["conf_id"], joined["call_id"], "conf_id: {c}");
                assert_eq!(
                    c["dest_session_id"], joined["session_id"],
                    "dest_session_id: {c}"
                );
                assert_eq!(c["device_id"], from.device_id.as_str(), "device_id: {c}");
                assert_eq!(c["party_id"], from.device_id.as_str(), "party_id: {c}");
                assert_eq!(c["version"], "1", "version: {c}");
                seqs.entry(c["call_id"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(c["seq"].as_u64().unwrap());
            }
            // (To-device order is not guaranteed: compare as a set.)
            for (call_id, seq) in &mut seqs {
                seq.sort_unstable();
                let want: Vec<u64> = (0..seq.len() as u64).collect();
                assert_eq!(*seq, want, "seq of call {call_id} at {}", at_dev.user_id);
            }
            report.push(format!(
                "{}<-{}: {} msgs encrypted={encrypted}",
                at_dev.user_id,
                from.user_id,
                got.len()
            ));
        }
        for to in [&gus_dev, &jay_dev] {
            let sent = js_signalling(s, at, "out", &to.user_id);
            assert!(
                !sent.is_empty() && sent.iter().all(|v| v["encrypted"] == sends_encrypted),
                "{} to {}: expected encrypted={sends_encrypted}: {sent:?}",
                at_dev.user_id,
                to.user_id
            );
        }
    }
    // hal's late candidate reaches jay (hal is the caller: it trickles it
    // 2 s after its invite, with the end-of-candidates marker), and jay
    // takes every m.call.candidates. As gus's callee, hal trickles only when
    // its STUN answer comes between its answer and ICE connecting (libwebrtc
    // stops gathering once the connection is up): whatever it sent to gus,
    // gus took.
    let trickled = |s: &[Entry], at: usize, to: &DeviceKey| -> (usize, bool, usize) {
        let sent: Vec<_> = js_signalling(s, hal, "out", &to.user_id)
            .into_iter()
            .filter(|v| v["type"] == "m.call.candidates")
            .collect();
        let cands: Vec<String> = sent
            .iter()
            .flat_map(|v| {
                v["content"]["candidates"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|c| c["candidate"].as_str().map(str::to_owned))
            .collect();
        let complete = cands.iter().any(|c| !c.is_empty()) && cands.iter().any(|c| c.is_empty());
        let taken = rust_signalling(s, at, &hal_dev.user_id)
            .iter()
            .filter(|(t, _, ign)| t == "m.call.candidates" && ign.is_none())
            .count();
        (sent.len(), complete, taken)
    };
    let hal_trickled = h
        .log
        .wait_for("hal's trickled candidates taken by jay", T, |s| {
            let (sent, complete, taken) = trickled(s, j, &jay_dev);
            sent > 0 && complete && taken == sent
        })
        .await;
    h.log
        .wait_for("gus to take whatever candidates hal sent it", T, |s| {
            let (sent, _, taken) = trickled(s, g, &gus_dev);
            sent == taken
        })
        .await;
    // The other way: gus and jay trickle to both references (their STUN
    // answer comes after their SDP), and the references add every candidate
    // they got from us (`remote_candidate` lines: addIceCandidate's result).
    let ours = |s: &[Entry], at: usize, from: &DeviceKey| -> (usize, Vec<String>, usize) {
        let got: Vec<_> = js_signalling(s, at, "in", &from.user_id)
            .into_iter()
            .filter(|v| v["type"] == "m.call.candidates")
            .collect();
        let cands: Vec<String> = got
            .iter()
            .flat_map(|v| {
                v["content"]["candidates"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|c| c["candidate"].as_str().map(str::to_owned))
            .filter(|c| !c.is_empty())
            .collect();
        let added = cands
            .iter()
            .filter(|c| {
                s.iter().any(|e| {
                    e.who == at
                        && e.js("remote_candidate")
                            .is_some_and(|v| v["candidate"] == c.as_str() && v["ok"] == true)
                })
            })
            .count();
        (got.len(), cands, added)
    };
    h.log
        .wait_for(
            "hal and ivy to add every candidate gus and jay trickled",
            T,
            |s| {
                [hal, ivy].iter().all(|&at| {
                    [&gus_dev, &jay_dev].iter().all(|from| {
                        let (msgs, cands, added) = ours(s, at, from);
                        msgs > 0 && !cands.is_empty() && added == cands.len()
                    })
                })
            },
        )
        .await;
    let s = &h.log.seen;
    for at in [hal, ivy] {
        let refused: Vec<_> = s
            .iter()
            .filter(|e| e.who == at)
            .filter_map(|e| e.js("remote_candidate"))
            .filter(|v| v["ok"] != true && v["candidate"] != "")
            .collect();
        assert!(
            refused.is_empty(),
            "reference #{at} refused candidates: {refused:?}"
        );
    }
    let (to_gus, _, _) = trickled(s, g, &gus_dev);
    let (to_jay, _, _) = trickled(s, j, &jay_dev);
    report.push(format!(
        "hal->jay (hal calls): {to_jay} m.call.candidates ({} ms after its STUN answers were released); hal->gus (hal answers): {to_gus}",
        ms(released, hal_trickled)
    ));
    for (at, at_dev) in [(hal, &hal_dev), (ivy, &ivy_dev)] {
        for from in [&gus_dev, &jay_dev] {
            let (msgs, cands, added) = ours(s, at, from);
            report.push(format!(
                "{}->{}: {msgs} m.call.candidates, {added}/{} candidates added",
                from.user_id,
                at_dev.user_id,
                cands.len()
            ));
        }
    }
    drop(stun);
    drop(gc_stun);
    eprintln!("FIGURES signalling: {}", report.join(", "));
    h.shutdown().await;
}

/// 5. A headless Chromium participant (the reference in `browser.mjs`:
/// Chromium's own WebRTC, fake camera and microphone) in a call with two
/// groupcall participants: kim creates, lee (Chromium) and max join. kim
/// calls lee, lee calls max. Media flows both ways on every pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn headless_chromium_with_groupcall() {
    let mut h = Harness::new().await;
    ensure_chromium();
    for n in ["kim", "lee", "max"] {
        h.register(n).await;
    }
    let kim = h.login("kim").await;
    let max = h.login("max").await;
    let kim_dev = DeviceKey::new(kim.user_id(), kim.device_id());
    let max_dev = DeviceKey::new(max.user_id(), max.device_id());
    let room = h.room(&kim).await;
    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    let (k, kim_p) = h.join_rust("kim", kim, opts).await;
    let t0 = h.log.mark();
    let lee = h.spawn_js("lee", "browser.mjs", &room, &[]);
    let lee_dev = h.js_device(lee).await;
    let t_joined = h
        .log
        .wait_for("Chromium to enter the call", T, |s| {
            js_saw(s, t0, lee, "joined", |_| true)
        })
        .await;
    let (m, _max_p) = h
        .join_rust("max", max, JoinOptions::new(room.clone()))
        .await;
    let members: Vec<Member> = vec![
        (k, true, kim_dev.clone()),
        (lee, false, lee_dev.clone()),
        (m, true, max_dev.clone()),
    ];
    h.log
        .wait_for("every pair connected with media both ways", T, |s| {
            members.iter().all(|x| {
                members.iter().all(|y| {
                    x.0 == y.0
                        || (connected_to(s, t0, x, &y.2)
                            && media_ok(s, t0, (x.0, x.1), &y.2, 50, 20))
                })
            })
        })
        .await;
    let s = &h.log.seen;
    let f = |t: Option<Instant>| t.map(|t| ms(t_joined, t).to_string()).unwrap_or("-".into());
    let mut figures = format!(
        "start to joined {} ms; after it joined: kim-lee connected {} / {} ms, first video at lee {} ms, at kim {} ms",
        ms(t0, t_joined),
        f(rust_connected_at(s, t0, k, &lee_dev)),
        f(js_connected_at(s, t0, lee, &kim_dev)),
        f(first_frames_at(s, t0, lee, &kim_dev, TrackKind::Video)),
        f(first_frames_at(s, t0, k, &lee_dev, TrackKind::Video)),
    );

    // Chromium shares its screen (a canvas stream, renegotiated with both
    // groupcall peers) and mutes its microphone.
    use groupcall::proto::events::FeedPurpose;
    let t = h.log.mark();
    h.send(lee, "screenshare on");
    h.send(lee, "mute audio");
    let shared = h
        .log
        .wait_for("Chromium's screenshare frames and mute at kim and max", T, |s| {
            [k, m].iter().all(|&at| {
                rust_feed_added(s, t, at, &lee_dev, FeedPurpose::Screenshare).is_some_and(|st| {
                    rust_frames(s, t, at, &lee_dev, TrackKind::Video, Some(&st)) > 10
                }) && s.iter().any(|e| {
                    e.t >= t
                        && e.who == at
                        && matches!(e.call(), Some(CallEvent::FeedChanged { device, audio_muted: true, .. }) if *device == lee_dev)
                })
            })
        })
        .await;
    figures.push_str(&format!(
        "; Chromium screenshare with frames at groupcall {} ms",
        ms(t, shared)
    ));
    let t = h.log.mark();
    h.send(lee, "screenshare off");
    h.log
        .wait_for("Chromium's screenshare removed at kim and max", T, |s| {
            [k, m].iter().all(|&at| {
                s.iter().any(|e| {
                    e.t >= t
                        && e.who == at
                        && matches!(e.call(), Some(CallEvent::FeedRemoved { device, .. }) if *device == lee_dev)
                })
            })
        })
        .await;

    // kim shares her screen: Chromium decodes it.
    let t = h.log.mark();
    kim_p
        .commander
        .send(groupcall::proto::Command::Screenshare(true));
    let shared = h
        .log
        .wait_for("kim's screenshare decoded by Chromium", T, |s| {
            js_saw(s, t, lee, "feed_added", |v| {
                about(v, &kim_dev) && v["purpose"] == "m.screenshare"
            }) && js_frames(s, t, lee, &kim_dev, "video", "m.screenshare") > 10
        })
        .await;
    figures.push_str(&format!(
        "; groupcall screenshare decoded by Chromium {} ms",
        ms(t, shared)
    ));
    eprintln!("FIGURES headless Chromium: {figures}");
    h.shutdown().await;
}

/// 6. Leaving and restarting, with oli (reference) < pam (groupcall) <
/// quin (reference): oli calls pam, pam calls quin.
/// - oli leaves: pam sees it leave and the peer closed; oli enters again
///   (same session) and is connected with media again.
/// - pam leaves: the references see the call end and pam gone from the
///   participants; pam restarts (new login on the same device, new
///   session): oli hangs up and calls the new session, pam calls quin
///   again, media flows.
/// - oli restarts as a new device: pam sees the old device leave and the
///   new one join, and they connect with media.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leave_and_restart_both_sides() {
    use groupcall::proto::room::LeftReason;
    use groupcall::proto::{Command, PeerStatus};
    let mut h = Harness::new().await;
    for n in ["oli", "pam", "quin"] {
        h.register(n).await;
    }
    let pam = h.login("pam").await;
    let pam_dev = DeviceKey::new(pam.user_id(), pam.device_id());
    let room = h.room(&pam).await;
    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    let (p, pam_p) = h.join_rust("pam", pam, opts).await;
    let t0 = h.log.mark();
    let oli = h.spawn_js("oli", "peer.mjs", &room, &["--log-signalling"]);
    let quin = h.spawn_js("quin", "peer.mjs", &room, &["--log-signalling"]);
    let oli_dev = h.js_device(oli).await;
    let quin_dev = h.js_device(quin).await;
    pair_media(&mut h, t0, (p, &pam_dev), (oli, &oli_dev)).await;
    pair_media(&mut h, t0, (p, &pam_dev), (quin, &quin_dev)).await;
    let mut figures = Vec::new();

    // oli leaves the call (stays in the room and the process runs).
    let t = h.log.mark();
    h.send(oli, "leave");
    let gone = h
        .log
        .wait_for("pam to see oli leave", T, |s| {
            let left = s.iter().any(|e| {
                e.t >= t
                    && e.who == p
                    && matches!(e.call(), Some(CallEvent::ParticipantLeft { device, .. }) if *device == oli_dev)
            });
            let closed = s.iter().any(|e| {
                e.t >= t
                    && e.who == p
                    && matches!(e.call(), Some(CallEvent::PeerState { device, status: PeerStatus::Closed(_), .. }) if *device == oli_dev)
            });
            left && closed && js_saw(s, t, oli, "left", |_| true)
        })
        .await;
    figures.push(format!(
        "reference leave seen by groupcall {} ms",
        ms(t, gone)
    ));
    let t = h.log.mark();
    h.send(oli, "enter");
    let back = h
        .log
        .wait_for("oli back, connected to pam", T, |s| {
            s.iter().any(|e| {
                e.t >= t
                    && e.who == p
                    && matches!(e.call(), Some(CallEvent::ParticipantJoined { device, .. }) if *device == oli_dev)
            }) && rust_connected(s, t, p, &oli_dev)
                && js_connected_at(s, t, oli, &pam_dev).is_some()
        })
        .await;
    h.log
        .wait_for("media both ways after oli re-entered", T, |s| {
            media_ok(s, t, (p, true), &oli_dev, 50, 20)
                && media_ok(s, t, (oli, false), &pam_dev, 50, 20)
        })
        .await;
    figures.push(format!(
        "reference re-enter to connected {} ms",
        ms(t, back)
    ));

    // pam leaves: both references notice.
    let t = h.log.mark();
    let pam_session = h
        .log
        .seen
        .iter()
        .find_map(|e| match e.call() {
            Some(CallEvent::Joined { session_id, .. }) if e.who == p => Some(session_id.clone()),
            _ => None,
        })
        .unwrap();
    pam_p.commander.send(Command::Leave);
    pam_p.done.await.unwrap();
    let noticed = h
        .log
        .wait_for("oli and quin to see pam leave", T, |s| {
            [oli, quin].iter().all(|&at| {
                js_saw(s, t, at, "call_state", |v| {
                    about(v, &pam_dev) && v["state"] == "ended"
                }) && js_saw(s, t, at, "participants", |v| {
                    v["participants"]
                        .as_array()
                        .is_some_and(|l| l.iter().all(|x| x["user_id"] != pam_dev.user_id.as_str()))
                })
            })
        })
        .await;
    figures.push(format!(
        "groupcall leave seen by the references {} ms",
        ms(t, noticed)
    ));

    // pam restarts: same device (its stored session), new session.
    let t = h.log.mark();
    let pam2 = h.login("pam").await;
    assert_eq!(
        pam2.device_id(),
        pam_dev.device_id,
        "same device after re-login"
    );
    assert!(
        pam2.from_stored_session(),
        "the re-login should reuse the stored session (its access token), not log in again"
    );
    figures.push(format!(
        "re-login from the stored session {} ms",
        ms(t, Instant::now())
    ));
    let (p2, _pam2_p) = h
        .join_rust("pam", pam2, JoinOptions::new(room.clone()))
        .await;
    let new_session = h
        .log
        .seen
        .iter()
        .chain(std::iter::empty())
        .find_map(|e| match e.call() {
            Some(CallEvent::Joined { session_id, .. }) if e.who == p2 => Some(session_id.clone()),
            _ => None,
        });
    let back = h
        .log
        .wait_for("pam's new session connected to oli and quin", T, |s| {
            [oli, quin].iter().all(|&at| {
                js_saw(s, t, at, "participants", |v| {
                    v["participants"].as_array().is_some_and(|l| {
                        l.iter().any(|x| {
                            x["user_id"] == pam_dev.user_id.as_str()
                                && x["session_id"] != pam_session.as_str()
                        })
                    })
                })
            }) && rust_connected(s, t, p2, &oli_dev)
                && rust_connected(s, t, p2, &quin_dev)
                && js_connected_at(s, t, oli, &pam_dev).is_some()
                && js_connected_at(s, t, quin, &pam_dev).is_some()
        })
        .await;
    h.log
        .wait_for("media both ways with pam's new session", T, |s| {
            [(oli, &oli_dev), (quin, &quin_dev)].iter().all(|(j, d)| {
                media_ok(s, t, (p2, true), d, 50, 20)
                    && media_ok(s, t, (*j, false), &pam_dev, 50, 20)
            })
        })
        .await;
    figures.push(format!(
        "groupcall restart to connected with both {} ms",
        ms(t, back)
    ));
    let _ = new_session;

    // oli calls pam's new session: it hung up its old call and invited again.
    let invites_after: Vec<_> = h
        .log
        .seen
        .iter()
        .filter(|e| e.t >= t && e.who == oli)
        .filter_map(|e| e.js("signalling"))
        .filter(|v| v["direction"] == "out" && v["to_user"] == pam_dev.user_id.as_str())
        .map(|v| v["type"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        invites_after.iter().any(|t| t == "m.call.invite"),
        "oli should have invited pam's new session: {invites_after:?}"
    );

    // oli restarts as a new device.
    let t = h.log.mark();
    h.quit_js(oli).await;
    let oli2 = h.spawn_js("oli", "peer.mjs", &room, &[]);
    let oli2_dev = h.js_device(oli2).await;
    assert_ne!(oli2_dev.device_id, oli_dev.device_id);
    let back = h
        .log
        .wait_for("pam to see oli's old device leave and the new one connect", T, |s| {
            s.iter().any(|e| {
                e.t >= t
                    && e.who == p2
                    && matches!(e.call(), Some(CallEvent::ParticipantLeft { device, reason: LeftReason::Removed, .. }) if *device == oli_dev)
            }) && rust_connected(s, t, p2, &oli2_dev)
                && js_connected_at(s, t, oli2, &pam_dev).is_some()
        })
        .await;
    h.log
        .wait_for("media both ways with oli's new device", T, |s| {
            media_ok(s, t, (p2, true), &oli2_dev, 50, 20)
                && media_ok(s, t, (oli2, false), &pam_dev, 50, 20)
        })
        .await;
    figures.push(format!(
        "reference restart (quit, new device) to connected {} ms",
        ms(t, back)
    ));

    // oli ends the call for everyone: pam sees it ended and stops.
    let t = h.log.mark();
    h.send(oli2, "terminate");
    let ended = h
        .log
        .wait_for("pam and quin to see the call terminated", T, |s| {
            s.iter().any(|e| {
                e.t >= t && e.who == p2 && matches!(e.call(), Some(CallEvent::CallEnded { .. }))
            }) && js_saw(s, t, quin, "state", |v| {
                v["type"] == "org.matrix.msc3401.call" && v["content"]["m.terminated"].is_string()
            })
        })
        .await;
    figures.push(format!(
        "reference terminate seen by groupcall {} ms",
        ms(t, ended)
    ));
    timeout(std::time::Duration::from_secs(T), _pam2_p.done)
        .await
        .expect("pam's call task should end when the call is terminated")
        .unwrap();
    eprintln!("FIGURES leave and restart: {}", figures.join("; "));
    h.shutdown().await;
}

/// Extra: a voice call. The reference creates an `m.voice` call and sends
/// audio only; groupcall joins without a camera. Audio flows both ways and
/// neither side invents a video feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn voice_call_audio_only() {
    use groupcall::client::VideoSource;
    let mut h = Harness::new().await;
    h.register("rae").await;
    h.register("sid").await;
    let sid = h.login("sid").await;
    let sid_dev = DeviceKey::new(sid.user_id(), sid.device_id());
    let room = h.room(&sid).await;
    let rae = h.spawn_js("rae", "peer.mjs", &room, &["--create-call", "--voice"]);
    let rae_dev = h.js_device(rae).await;
    let since = h.t_start;
    h.log
        .wait_for("the reference to create a voice call", T, |s| {
            js_saw(s, since, rae, "joined", |v| v["type"] == "m.voice")
        })
        .await;
    let t0 = h.log.mark();
    let mut opts = JoinOptions::new(room.clone());
    opts.video = VideoSource::None;
    let (s_idx, sid_p) = h.join_rust("sid", sid, opts).await;
    h.log
        .wait_for("connected with audio both ways", T, |s| {
            rust_connected(s, t0, s_idx, &rae_dev)
                && js_connected_at(s, t0, rae, &sid_dev).is_some()
                && rust_frames(s, t0, s_idx, &rae_dev, TrackKind::Audio, None) > 50
                && js_frames(s, t0, rae, &sid_dev, "audio", "m.usermedia") > 100
        })
        .await;
    let s = &h.log.seen;
    assert_eq!(
        rust_frames(s, t0, s_idx, &rae_dev, TrackKind::Video, None),
        0,
        "no video from an audio-only reference"
    );
    assert_eq!(
        js_frames(s, t0, rae, &sid_dev, "video", "m.usermedia"),
        0,
        "no video from an audio-only groupcall participant"
    );
    let figures = format!(
        "connected {} ms, first audio at groupcall {} ms, at reference {} ms",
        ms(t0, rust_connected_at(s, t0, s_idx, &rae_dev).unwrap()),
        ms(
            t0,
            first_frames_at(s, t0, s_idx, &rae_dev, TrackKind::Audio).unwrap()
        ),
        ms(
            t0,
            first_frames_at(s, t0, rae, &sid_dev, TrackKind::Audio).unwrap()
        ),
    );

    // groupcall ends the call for everyone: the reference hangs up and
    // drops every participant.
    let t = h.log.mark();
    sid_p.commander.send(groupcall::proto::Command::Terminate);
    let ended = h
        .log
        .wait_for("the reference to see the call terminated", T, |s| {
            js_saw(s, t, rae, "call_state", |v| {
                about(v, &sid_dev) && v["state"] == "ended"
            }) && js_saw(s, t, rae, "participants", |v| {
                v["participants"].as_array().is_some_and(|l| l.is_empty())
            })
        })
        .await;
    timeout(std::time::Duration::from_secs(T), sid_p.done)
        .await
        .expect("groupcall's call task should end after Terminate")
        .unwrap();
    eprintln!(
        "FIGURES voice call: {figures}; groupcall terminate seen by the reference {} ms",
        ms(t, ended)
    );
    h.shutdown().await;
}

/// Extra: a groupcall participant crashes (its task is aborted: no
/// hangup, no member state update). Its MSC4140 delayed leave, scheduled on
/// the homeserver and no longer kept alive, removes its device from the
/// member state a few seconds later, and the reference drops it from its
/// participants. (The reference's 1:1 call with it stays: when ICE fails it
/// sends an ICE-restart offer to the dead device and waits for ever; it does
/// not hang up calls with devices that leave the member state.) The crashed
/// participant restarts (same device, new session) and calls again: the
/// reference replaces the stale call and media flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groupcall_crash_is_cleaned_up_for_the_reference() {
    let mut h = Harness::new().await;
    h.register("una").await;
    h.register("vic").await;
    let una = h.login("una").await;
    let una_dev = DeviceKey::new(una.user_id(), una.device_id());
    let room = h.room(&una).await;
    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    let (u, una_p) = h.join_rust("una", una, opts).await;
    let t0 = h.log.mark();
    let vic = h.spawn_js("vic", "peer.mjs", &room, &["--log-signalling"]);
    let vic_dev = h.js_device(vic).await;
    pair_media(&mut h, t0, (u, &una_dev), (vic, &vic_dev)).await;

    let t = h.log.mark();
    una_p.crash().await;
    let removed = h
        .log
        .wait_for(
            "the homeserver to remove the crashed device from the member state",
            T,
            |s| {
                js_saw(s, t, vic, "state", |v| {
                    v["state_key"] == una_dev.user_id.as_str()
                        && v["type"] == "org.matrix.msc3401.call.member"
                        && !v["content"].to_string().contains(&una_dev.device_id)
                })
            },
        )
        .await;
    let dropped = h
        .log
        .wait_for("the reference to drop the crashed participant", T, |s| {
            js_saw(s, t, vic, "participants", |v| {
                v["participants"]
                    .as_array()
                    .is_some_and(|l| l.iter().all(|p| p["user_id"] != una_dev.user_id.as_str()))
            })
        })
        .await;
    // Restart: same device, new session; una calls vic again.
    let t_back = h.log.mark();
    let una2 = h.login("una").await;
    assert_eq!(una2.device_id(), una_dev.device_id);
    assert!(
        una2.from_stored_session(),
        "restart reuses the stored session"
    );
    let (u2, _una2_p) = h
        .join_rust("una", una2, JoinOptions::new(room.clone()))
        .await;
    let back = h
        .log
        .wait_for(
            "the restarted participant connected to the reference",
            T,
            |s| {
                rust_connected(s, t_back, u2, &vic_dev)
                    && js_connected_at(s, t_back, vic, &una_dev).is_some()
            },
        )
        .await;
    h.log
        .wait_for("media both ways after the restart", T, |s| {
            media_ok(s, t_back, (u2, true), &vic_dev, 50, 20)
                && media_ok(s, t_back, (vic, false), &una_dev, 50, 20)
        })
        .await;
    // The stale call is the one replaced; the reference's hangup of it is
    // addressed to the crashed session, so the new one ignores it.
    h.allow_anomaly("\"hangup_reason\":\"replaced\"");
    h.allow_anomaly("ignored m.call.hangup from @vic:localhost: for another session");
    eprintln!(
        "FIGURES groupcall crash: abort -> member entry removed by the delayed leave {} ms, reference dropped the participant {} ms; restart -> connected again {} ms",
        ms(t, removed),
        ms(t, dropped),
        ms(t_back, back)
    );
    h.shutdown().await;
}
