//! Interop with the reference implementation: groupcall participants and
//! matrix-js-sdk's `GroupCall` (the `interop/` peer, in Node with wrtc or in
//! headless Chromium) in the same MSC3401 call on a real Synapse, with real
//! WebRTC over UDP. Every test asserts on both sides' reports.
//!
//! `cargo test -p groupcall --test interop`. It installs nothing: it needs
//! `interop/node_modules` (`scripts/setup-node`) and Chromium
//! (`scripts/setup-system`), and fails naming the script when one is
//! missing. Figures are printed with `--nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use groupcall::client::JoinOptions;
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, CreateOptions, DeviceKey};
use groupcall_testkit::*;
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
    opts.record_dir = Some(h.tmp.path().join("rec-carol"));
    let (c, carol_p) = h.join_rust("carol", carol, opts).await;
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
    // Carol leaves: her recordings of the reference's audio and video
    // decode without errors (ffmpeg), with at least the frames waited for
    // above. (Recording starts at a key frame after the track appeared: a
    // little more media first, so that the files hold that many.)
    h.log
        .wait_for("more media at carol for her recordings", T, |s| {
            media_ok(s, t0, (c, true), &dave_dev, 100, 40)
        })
        .await;
    carol_p.commander.send(groupcall::proto::Command::Leave);
    carol_p.done.await.unwrap();
    h.log.pump();
    let recorded: Vec<std::path::PathBuf> = h
        .log
        .seen
        .iter()
        .filter_map(|e| match &e.ev {
            Ev::Rust(groupcall::client::ClientEvent::Recorded { path }) if e.who == c => {
                Some(path.clone())
            }
            _ => None,
        })
        .collect();
    for (ext, min) in [("ivf", 21), ("ogg", 51)] {
        let files: Vec<_> = recorded
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect();
        assert_eq!(files.len(), 1, "carol's .{ext} recordings: {recorded:?}");
        let frames = assert_decodes(files[0], min);
        eprintln!(
            "FIGURES groupcall creates, reference joins: carol's .{ext} recording decodes to {frames} frames"
        );
    }
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
    // groupcall's STUN answers are held until gus and jay have sent their
    // SDPs to both references (released below): a participant gathers once
    // for all its peers, so only peers whose SDP went out before the answer
    // trickle; gus and jay wait for STUN up to 60 s (`stun_timeout`).
    let gc_stun = LateStun::held(std::time::Duration::from_millis(100));
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
    opts.stun_timeout = std::time::Duration::from_secs(60);
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
    opts.stun_timeout = std::time::Duration::from_secs(60);
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
    // Release groupcall's STUN answers once both references have gus's and
    // jay's invite or answer: every one of those SDPs went out before the
    // server-reflexive candidate, which each of them must then trickle.
    h.log
        .wait_for("hal and ivy to have gus's and jay's SDPs", T, |s| {
            [hal, ivy].iter().all(|&at| {
                [&gus_dev, &jay_dev].iter().all(|from| {
                    js_signalling(s, at, "in", &from.user_id)
                        .iter()
                        .any(|v| v["type"] == "m.call.invite" || v["type"] == "m.call.answer")
                })
            })
        })
        .await;
    gc_stun.release();
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
    // answer comes after their SDPs to them), and the references add every
    // candidate they got from us (`remote_candidate` lines:
    // addIceCandidate's result).
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
    require_chromium();
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

/// A callee asleep while groupcall calls it (the reference peer frozen with
/// SIGSTOP, as a phone in the background): groupcall (the smaller user id,
/// so the caller) keeps an invite open for it, and media flows both ways
/// within 10 s of its waking. `scale` divides groupcall's call timers (invite
/// lifetime, retry interval, longest backoff) for the long pauses; the
/// pause is divided by the same factor, so the test covers the same phase
/// of the backoff as the full-length run.
async fn sleeping_callee(
    name: &str,
    pause: std::time::Duration,
    scale: u64,
    calls_expected: usize,
) {
    let mut h = Harness::new().await;
    h.register("anna").await;
    h.register("zoe").await;
    let anna = h.login("anna").await;
    let anna_dev = DeviceKey::new(anna.user_id(), anna.device_id());
    let room = h.room(&anna).await;
    let zoe = h.spawn_js(
        "zoe",
        "peer.mjs",
        &room,
        &["--create-call", "--media-interval", "100"],
    );
    let zoe_dev = h.js_device(zoe).await;
    let since = h.t_start;
    h.log
        .wait_for("the reference to create and enter the call", T, |s| {
            js_saw(s, since, zoe, "joined", |v| v["created"] == true)
        })
        .await;
    // Its member entry must be in the room state before it falls asleep
    // (the reference reports `joined` before its state event is sent).
    let deadline = Instant::now() + std::time::Duration::from_secs(T);
    loop {
        let state = anna
            .fetch_room_state(&room, "org.matrix.msc3401.call.member")
            .await
            .unwrap();
        let listed = state.iter().any(|ev| {
            ev["state_key"] == zoe_dev.user_id.as_str()
                && ev["content"]["m.calls"].as_array().is_some_and(|calls| {
                    calls.iter().any(|c| {
                        c["m.devices"].as_array().is_some_and(|d| {
                            d.iter()
                                .any(|d| d["device_id"] == zoe_dev.device_id.as_str())
                        })
                    })
                })
        });
        if listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reference's member event never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // It falls asleep; then we join and call it.
    h.signal_js(zoe, "STOP");
    let t_stop = Instant::now();
    let mut opts = JoinOptions::new(room.clone());
    opts.stats_interval = FINE;
    let mut core = groupcall::proto::Config::new("", "");
    core.invite_lifetime_ms /= scale;
    core.retry_interval_ms /= scale;
    core.max_backoff_ms /= scale;
    opts.core = Some(core);
    let (a, _anna_p) = h.join_rust("anna", anna, opts).await;
    let pause = pause / scale as u32;
    tokio::time::sleep_until(t_stop + pause).await;
    let t_wake = h.log.mark();
    h.signal_js(zoe, "CONT");
    let invites = h
        .log
        .seen
        .iter()
        .filter(|e| {
            e.who == a
                && matches!(
                    e.call(),
                    Some(CallEvent::PeerState {
                        status: groupcall::proto::PeerStatus::Connecting,
                        ..
                    })
                )
        })
        .count();
    h.log
        .wait_for("media both ways within 10 s of waking", 10, |s| {
            rust_connected(s, t_wake, a, &zoe_dev)
                && js_connected_at(s, t_wake, zoe, &anna_dev).is_some()
                && media_ok(s, t_wake, (a, true), &zoe_dev, 10, 5)
                && media_ok(s, t_wake, (zoe, false), &anna_dev, 10, 5)
        })
        .await;
    let woke = h.log.mark();
    assert_eq!(
        invites, calls_expected,
        "calls placed to the sleeping device (one at a time, each open for its lifetime)"
    );
    let unanswered = h
        .log
        .seen
        .iter()
        .any(|e| e.who == a && matches!(e.call(), Some(CallEvent::Unanswered { .. })));
    assert_eq!(
        unanswered,
        calls_expected > 4,
        "Unanswered is reported once the MSC's 3 retries went unanswered"
    );
    eprintln!(
        "FIGURES {name}: asleep {} ms (timers / {scale}); calls placed while asleep: {invites}; unanswered reported: {unanswered}; media both ways {} ms after waking",
        pause.as_millis(),
        ms(t_wake, woke)
    );
    // Calls that expired while it slept end in an invite timeout on our side
    // and a hangup the reference sees on waking: expected here.
    h.allow_anomaly("invite_timeout");
    h.allow_anomaly("Unanswered");
    h.allow_anomaly("ignored m.call.answer");
    h.allow_anomaly("ignored m.call.hangup");
    h.allow_anomaly("ignored m.call.candidates");
    h.allow_anomaly("ignored m.call.select_answer");
    h.shutdown().await;
}

/// The divisor of timers and pause in the suite (`scale`), 1 with
/// `GROUPCALL_FULL_LENGTH=1` (the full-length figures are in
/// docs/interop.md).
fn sleep_scale(suite: u64) -> u64 {
    if std::env::var_os("GROUPCALL_FULL_LENGTH").is_some() {
        1
    } else {
        suite
    }
}

/// 25 s asleep: within the first invite's lifetime. Timers and pause / 5
/// in the suite (5 s asleep, the invite open 12 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_callee_asleep_for_25_s_gets_media_within_10_s_of_waking() {
    let scale = sleep_scale(5);
    sleeping_callee("asleep 25 s", std::time::Duration::from_secs(25), scale, 1).await;
}

/// 90 s asleep: the first invite expires (60 s) and the next is placed at
/// once. Timers and pause / 5 in the suite (18 s asleep, invites open
/// 12 s: it wakes halfway through the second, as at full length).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_callee_asleep_for_90_s_gets_media_within_10_s_of_waking() {
    let scale = sleep_scale(5);
    sleeping_callee("asleep 90 s", std::time::Duration::from_secs(90), scale, 2).await;
}

/// Five minutes asleep: past the MSC's retries, into the backed-off calls.
/// Timers and pause / 15 in the suite (20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_callee_asleep_for_5_min_gets_media_within_10_s_of_waking() {
    let scale = sleep_scale(15);
    // Calls at 0, 1, 2, 3 and 4 min (scaled: 0, 4, 8, 12, 16 s), the last
    // open 2 min (8 s): it wakes halfway through it, as at full length.
    sleeping_callee(
        "asleep 5 min",
        std::time::Duration::from_secs(300),
        scale,
        5,
    )
    .await;
}

/// Another client (Hydrogen) ends the call by writing `"m.terminated": true`,
/// a boolean, into the `m.call` event; matrix-js-sdk treats any truthy value
/// as ended. Every groupcall participant leaves within 2 s: `CallEnded`,
/// `Left`, its member entry removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_boolean_m_terminated_from_another_client_ends_the_call_for_everyone() {
    let mut h = Harness::new().await;
    for n in ["hana", "ivo", "hydro"] {
        h.register(n).await;
    }
    let hana = h.login("hana").await;
    let ivo = h.login("ivo").await;
    let hydro = h.login("hydro").await;
    let room = h.room(&hana).await;
    hydro.join_room(&room).await.unwrap();
    let devs = [
        DeviceKey::new(hana.user_id(), hana.device_id()),
        DeviceKey::new(ivo.user_id(), ivo.device_id()),
    ];
    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    let (a, _pa) = h.join_rust("hana", hana, opts).await;
    let (b, _pb) = h
        .join_rust("ivo", ivo, JoinOptions::new(room.clone()))
        .await;
    let t0 = h.t_start;
    h.log
        .wait_for("both connected", T, |s| {
            rust_connected(s, t0, a, &devs[1]) && rust_connected(s, t0, b, &devs[0])
        })
        .await;
    let call_id = h
        .log
        .seen
        .iter()
        .find_map(|e| match e.call() {
            Some(CallEvent::Joined { call_id, .. }) if e.who == a => Some(call_id.clone()),
            _ => None,
        })
        .unwrap();
    // Written raw, as Hydrogen does: the call's content plus a boolean.
    let t_end = h.log.mark();
    hydro
        .send_state(
            &room,
            "org.matrix.msc3401.call",
            &call_id,
            serde_json::json!({"m.intent": "m.prompt", "m.type": "m.video", "m.terminated": true}),
        )
        .await
        .unwrap();
    h.log
        .wait_for("every participant ended the call and left", 2, |s| {
            [a, b].iter().all(|&i| {
                s.iter().any(|e| {
                    e.who == i
                        && e.t >= t_end
                        && matches!(e.call(), Some(CallEvent::CallEnded { call_id: c, reason }) if *c == call_id && reason == "call_ended")
                }) && s
                    .iter()
                    .any(|e| e.who == i && e.t >= t_end && matches!(e.call(), Some(CallEvent::Left)))
            })
        })
        .await;
    let left = h.log.mark();
    // Their member entries leave the room state (the PUT follows `Left`).
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let state = hydro
            .fetch_room_state(&room, "org.matrix.msc3401.call.member")
            .await
            .unwrap();
        let left_behind: Vec<_> = state
            .iter()
            .filter(|ev| {
                ev["content"]["m.calls"]
                    .as_array()
                    .is_some_and(|calls| calls.iter().any(|c| c["m.call_id"] == call_id.as_str()))
            })
            .collect();
        if left_behind.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "member entries left behind: {left_behind:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!(
        "FIGURES boolean m.terminated: every participant left {} ms after the state event was sent",
        ms(t_end, left)
    );
    h.shutdown().await;
}

/// What groupcall participant `at` reported about how it sends to `to`
/// (`ClientEvent::SignallingTo`): (encrypted, refused, reason).
fn rust_sends_to(s: &[Entry], at: usize, to: &DeviceKey) -> Vec<(bool, bool, Option<String>)> {
    s.iter()
        .filter(|e| e.who == at)
        .filter_map(|e| match &e.ev {
            Ev::Rust(groupcall::client::ClientEvent::SignallingTo {
                device,
                encrypted,
                refused,
                reason,
            }) if device == to => Some((*encrypted, *refused, reason.clone())),
            _ => None,
        })
        .collect()
}

/// Keyless devices (issue 9 item 3): a reference peer without crypto
/// (`--no-crypto`: no device keys published, plaintext signalling) in a call
/// with two groupcall participants. ann (groupcall) < bea (reference) < cyd
/// (groupcall): ann invites bea (our plaintext fallback as the caller), bea
/// invites cyd (our plaintext answer as the callee), ann invites cyd (Olm).
/// Every pair connects with media both ways; ann and cyd report
/// `SignallingTo { encrypted: false }` for bea with the reason and never
/// `true`, and `encrypted: true` for each other; bea receives only plaintext
/// from both (nothing it cannot decrypt) and sends plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_without_crypto_gets_plaintext() {
    let mut h = Harness::new().await;
    for n in ["ann", "bea", "cyd"] {
        h.register(n).await;
    }
    let ann = h.login("ann").await;
    let cyd = h.login("cyd").await;
    let ann_dev = DeviceKey::new(ann.user_id(), ann.device_id());
    let cyd_dev = DeviceKey::new(cyd.user_id(), cyd.device_id());
    let room = h.room(&ann).await;
    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    let (a, _ann_p) = h.join_rust("ann", ann, opts).await;
    let t0 = h.log.mark();
    let bea = h.spawn_js(
        "bea",
        "peer.mjs",
        &room,
        &["--no-crypto", "--log-signalling"],
    );
    let bea_dev = h.js_device(bea).await;
    let (c, _cyd_p) = h
        .join_rust("cyd", cyd, JoinOptions::new(room.clone()))
        .await;
    let s = &h.log.seen;
    assert!(
        js_saw(s, t0, bea, "ready", |v| v["crypto"] == false),
        "the reference should run without crypto"
    );
    let members: Vec<Member> = vec![
        (a, true, ann_dev.clone()),
        (bea, false, bea_dev.clone()),
        (c, true, cyd_dev.clone()),
    ];
    let t_media = h
        .log
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
    let mut report = Vec::new();
    for (at, name, other) in [(a, "ann", &cyd_dev), (c, "cyd", &ann_dev)] {
        // To the keyless reference: plaintext, reported with the reason.
        let to_ref = rust_sends_to(s, at, &bea_dev);
        assert!(
            !to_ref.is_empty()
                && to_ref.iter().all(|(enc, refused, reason)| {
                    !enc && !refused
                        && reason
                            .as_deref()
                            .is_some_and(|r| r.contains("no keys") && r.contains("plaintext"))
                }),
            "{name} to bea: expected encrypted=false with a reason: {to_ref:?}"
        );
        // To the other groupcall participant: Olm.
        let to_other = rust_sends_to(s, at, other);
        assert!(
            !to_other.is_empty()
                && to_other
                    .iter()
                    .all(|(enc, refused, r)| *enc && !refused && r.is_none()),
            "{name} to {}: expected encrypted=true: {to_other:?}",
            other.user_id
        );
        // What arrived: plaintext from bea, Olm from the other, none refused.
        for (from, encrypted) in [(&bea_dev, false), (other, true)] {
            let got = rust_signalling(s, at, &from.user_id);
            assert!(
                got.iter()
                    .any(|(t, _, _)| t == "m.call.invite" || t == "m.call.answer")
                    && got
                        .iter()
                        .all(|(_, enc, ign)| *enc == encrypted && ign.is_none()),
                "{name} from {}: expected encrypted={encrypted}, none ignored: {got:?}",
                from.user_id
            );
        }
        report.push(format!(
            "{name}: to bea {:?}, to {} encrypted={}",
            to_ref[0].2.as_deref().unwrap_or(""),
            other.user_id,
            to_other[0].0
        ));
    }
    // At the reference: everything from ann and cyd arrived plaintext (no
    // undecryptable m.room.encrypted), and it sent plaintext.
    for from in [&ann_dev, &cyd_dev] {
        let got = js_signalling(s, bea, "in", &from.user_id);
        assert!(
            got.iter()
                .any(|v| v["type"] == "m.call.invite" || v["type"] == "m.call.answer")
                && got
                    .iter()
                    .all(|v| v["encrypted"] == false && v["type"] != "m.room.encrypted"),
            "bea from {}: expected plaintext m.call.* only: {got:?}",
            from.user_id
        );
        let sent = js_signalling(s, bea, "out", &from.user_id);
        assert!(
            !sent.is_empty() && sent.iter().all(|v| v["encrypted"] == false),
            "bea to {}: expected plaintext: {sent:?}",
            from.user_id
        );
        report.push(format!(
            "bea<-{}: {} plaintext msgs, bea->{}: {}",
            from.user_id,
            got.len(),
            from.user_id,
            sent.len()
        ));
    }
    eprintln!(
        "FIGURES keyless reference: every pair connected with media both ways {} ms after the reference started; {}",
        ms(t0, t_media),
        report.join("; ")
    );
    h.shutdown().await;
}

/// Keyless devices with encryption required: the same call as
/// [`reference_without_crypto_gets_plaintext`] but ann and cyd set
/// `require_encrypted` (`--require-encrypted`). ann refuses to send to bea
/// (`SignallingTo { refused: true }` with the reason; nothing reaches bea),
/// cyd refuses bea's plaintext invite
/// (`Signalling { ignored: "plaintext signalling refused ..." }`), no peer
/// with bea is ever connected; ann and cyd connect with media (Olm).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_without_crypto_refused_when_encryption_required() {
    let mut h = Harness::new().await;
    for n in ["ann", "bea", "cyd"] {
        h.register(n).await;
    }
    let ann = h.login("ann").await;
    let cyd = h.login("cyd").await;
    let ann_dev = DeviceKey::new(ann.user_id(), ann.device_id());
    let cyd_dev = DeviceKey::new(cyd.user_id(), cyd.device_id());
    let room = h.room(&ann).await;
    let mut opts = JoinOptions::new(room.clone());
    opts.create = Some(CreateOptions::default());
    opts.require_encrypted = true;
    let (a, _ann_p) = h.join_rust("ann", ann, opts).await;
    let t0 = h.log.mark();
    let bea = h.spawn_js(
        "bea",
        "peer.mjs",
        &room,
        &["--no-crypto", "--log-signalling"],
    );
    let bea_dev = h.js_device(bea).await;
    let mut opts = JoinOptions::new(room.clone());
    opts.require_encrypted = true;
    let (c, _cyd_p) = h.join_rust("cyd", cyd, opts).await;

    let t_media = h
        .log
        .wait_for("ann and cyd connected with media both ways", T, |s| {
            rust_connected(s, t0, a, &cyd_dev)
                && rust_connected(s, t0, c, &ann_dev)
                && media_ok(s, t0, (a, true), &cyd_dev, 50, 20)
                && media_ok(s, t0, (c, true), &ann_dev, 50, 20)
        })
        .await;
    h.log
        .wait_for("ann to refuse sending to bea", T, |s| {
            rust_sends_to(s, a, &bea_dev)
                .iter()
                .any(|(enc, refused, reason)| {
                    !enc && *refused
                        && reason.as_deref().is_some_and(|r| {
                            r.contains("no keys") && r.contains("encryption is required")
                        })
                })
        })
        .await;
    h.log
        .wait_for("cyd to refuse bea's plaintext invite", T, |s| {
            rust_signalling(s, c, &bea_dev.user_id)
                .iter()
                .any(|(t, enc, ign)| {
                    t == "m.call.invite"
                        && !enc
                        && ign
                            .as_deref()
                            .is_some_and(|r| r.contains("plaintext signalling refused"))
                })
        })
        .await;
    let s = &h.log.seen;
    let first = |at: usize, f: &dyn Fn(&groupcall::client::ClientEvent) -> bool| {
        s.iter()
            .find(|e| e.who == at && matches!(&e.ev, Ev::Rust(ev) if f(ev)))
            .map(|e| ms(t0, e.t))
            .unwrap()
    };
    let refused_ann = first(
        a,
        &|ev| matches!(ev, groupcall::client::ClientEvent::SignallingTo { device, refused: true, .. } if *device == bea_dev),
    );
    let refused_cyd = first(
        c,
        &|ev| matches!(ev, groupcall::client::ClientEvent::Signalling { sender, ignored: Some(_), .. } if *sender == bea_dev.user_id),
    );
    let to_bea = rust_sends_to(s, a, &bea_dev);
    assert!(
        to_bea.iter().all(|(enc, refused, _)| !enc && *refused),
        "ann must never send to bea: {to_bea:?}"
    );
    assert!(
        rust_sends_to(s, c, &bea_dev)
            .iter()
            .all(|(enc, refused, _)| !enc && *refused),
        "cyd must never send to bea"
    );
    assert!(
        rust_sends_to(s, a, &cyd_dev).iter().all(|(enc, _, _)| *enc)
            && rust_sends_to(s, c, &ann_dev).iter().all(|(enc, _, _)| *enc),
        "ann and cyd send each other Olm only"
    );
    for from in [&ann_dev, &cyd_dev] {
        let got = js_signalling(s, bea, "in", &from.user_id);
        assert!(
            got.is_empty(),
            "bea must get nothing from {} (neither plaintext nor Olm): {got:?}",
            from.user_id
        );
    }
    let from_bea = rust_signalling(s, c, &bea_dev.user_id);
    assert!(
        from_bea.iter().all(|(_, enc, ign)| !enc && ign.is_some()),
        "cyd must act on nothing from bea: {from_bea:?}"
    );
    for (at, to) in [(a, &bea_dev), (c, &bea_dev)] {
        assert!(!rust_connected(s, t0, at, to), "no peer with bea");
    }
    for to in [&ann_dev, &cyd_dev] {
        assert!(
            js_connected_at(s, t0, bea, to).is_none(),
            "bea connected to nobody"
        );
    }
    eprintln!(
        "FIGURES keyless reference, encryption required: ann-cyd media both ways {} ms, ann refused sending to bea {} ms, cyd refused bea's invite {} ms after the reference started; bea received 0 messages; cyd ignored {} plaintext messages from bea",
        ms(t0, t_media),
        refused_ann,
        refused_cyd,
        from_bea.len()
    );
    // Expected here: cyd's refusals of bea's plaintext, ann reporting bea
    // unanswered (should the test run that long), and bea's invite to cyd
    // timing out unanswered.
    h.allow_anomaly("plaintext signalling refused (encryption required)");
    h.allow_anomaly(&format!("Unanswered {{ device: {bea_dev:?}"));
    h.allow_anomaly("\"hangup_reason\":\"invite_timeout\"");
    h.shutdown().await;
}

/// A matrix-sdk client on a device made by registration (so far without
/// keys): its first sync uploads the device keys. Returns the client, the
/// to-device events of that sync and its sync token.
async fn publish_keys(
    hs: &str,
    u: &groupcall_testkit::synapse::RegisteredUser,
) -> (
    matrix_sdk::Client,
    Vec<matrix_sdk::deserialized_responses::ProcessedToDeviceEvent>,
    String,
) {
    use matrix_sdk::authentication::matrix::MatrixSession as SdkSession;
    use matrix_sdk::config::SyncSettings;
    use matrix_sdk::{SessionMeta, SessionTokens};
    let client = matrix_sdk::Client::builder()
        .homeserver_url(hs)
        .build()
        .await
        .unwrap();
    client
        .restore_session(SdkSession {
            meta: SessionMeta {
                user_id: u.user_id.parse().unwrap(),
                device_id: u.device_id.as_str().into(),
            },
            tokens: SessionTokens {
                access_token: u.access_token.clone(),
                refresh_token: None,
            },
        })
        .await
        .unwrap();
    let r = client.sync_once(SyncSettings::default()).await.unwrap();
    (client, r.to_device, r.next_batch)
}

/// The `(type, encrypted)` of to-device events as a matrix-sdk client got
/// them.
fn to_device_seen(
    evs: &[matrix_sdk::deserialized_responses::ProcessedToDeviceEvent],
) -> Vec<(String, bool)> {
    use matrix_sdk::deserialized_responses::ProcessedToDeviceEvent as P;
    evs.iter()
        .filter_map(|e| {
            let enc = match e {
                P::Decrypted { .. } => true,
                P::PlainText(_) => false,
                _ => return Some(("undecryptable or invalid".to_owned(), true)),
            };
            let ty = e.to_raw().get_field::<String>("type").ok().flatten()?;
            ty.starts_with("m.call.").then_some((ty, enc))
        })
        .collect()
}

/// Keyless devices that publish keys later get Olm from then on. bo and cy
/// are devices made by registration (no keys). amos (a groupcall session)
/// sends each an invite: plaintext (`plaintext_no_keys`). Both then publish
/// keys. The "no keys" answer is trusted for 15 s (one `/keys/query` per
/// keyless device per 15 s, not per message): a candidates message to bo
/// right away is still plaintext, but the next invite re-queries and goes
/// Olm. cy gets a candidates message 16 s after its last query: Olm, without
/// an invite. Each device receives exactly that (plaintext / decrypted).
/// Also `require_encrypted`'s mode: refused, nothing sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyless_device_gets_olm_after_publishing_keys() {
    use groupcall::matrix::KeylessDevices;
    use matrix_sdk::config::SyncSettings;
    let h = Harness::new().await;
    h.register("amos").await;
    let amos = h.login("amos").await;
    let bo = h.synapse.register_user("bo", PASSWORD).await.unwrap();
    let cy = h.synapse.register_user("cy", PASSWORD).await.unwrap();
    let id =
        |u: &groupcall_testkit::synapse::RegisteredUser| (u.user_id.clone(), u.device_id.clone());
    let send = |u: &groupcall_testkit::synapse::RegisteredUser, ty: &'static str, keyless| {
        let amos = amos.clone();
        let (user, device) = id(u);
        async move {
            let msg = serde_json::json!({ "call_id": "c1", "seq": 0 });
            let r = amos
                .send_signalling(ty, vec![(user, device, msg)], true, keyless)
                .await;
            assert!(r.error.is_none(), "{ty}: {:?}", r.error);
            r
        }
    };

    // Encryption required: nothing is sent to a keyless device.
    let r = send(&bo, "m.call.invite", KeylessDevices::Refuse).await;
    assert_eq!(r.refused_no_keys, vec![id(&bo)]);
    assert!(r.encrypted.is_empty() && r.plaintext_no_keys.is_empty());
    // Otherwise plaintext.
    let t_cy = Instant::now();
    for u in [&cy, &bo] {
        let r = send(u, "m.call.invite", KeylessDevices::Plaintext).await;
        assert_eq!(r.plaintext_no_keys, vec![id(u)]);
        assert!(r.encrypted.is_empty() && r.refused_no_keys.is_empty());
    }
    let (bo_c, mut bo_seen, bo_token) = publish_keys(&h.hs, &bo).await;
    let (cy_c, mut cy_seen, cy_token) = publish_keys(&h.hs, &cy).await;

    let r = send(&bo, "m.call.candidates", KeylessDevices::Plaintext).await;
    assert_eq!(r.plaintext_no_keys, vec![id(&bo)], "cached for 15 s");
    let r = send(&bo, "m.call.invite", KeylessDevices::Plaintext).await;
    assert_eq!(r.encrypted, vec![id(&bo)], "an invite queries again");
    assert!(r.plaintext_no_keys.is_empty());
    let t_bo_olm = Instant::now();

    tokio::time::sleep_until(t_cy + std::time::Duration::from_secs(16)).await;
    let r = send(&cy, "m.call.candidates", KeylessDevices::Plaintext).await;
    assert_eq!(r.encrypted, vec![id(&cy)], "queried again after 15 s");
    let t_cy_olm = Instant::now();

    // What the devices received, in order of sending.
    for (c, seen, token, want) in [
        (
            &bo_c,
            &mut bo_seen,
            bo_token,
            vec![
                ("m.call.invite", false),
                ("m.call.candidates", false),
                ("m.call.invite", true),
            ],
        ),
        (
            &cy_c,
            &mut cy_seen,
            cy_token,
            vec![("m.call.invite", false), ("m.call.candidates", true)],
        ),
    ] {
        let mut token = token;
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while to_device_seen(seen).len() < want.len() && Instant::now() < deadline {
            let r = c
                .sync_once(
                    SyncSettings::default()
                        .token(token.clone())
                        .timeout(std::time::Duration::from_secs(2)),
                )
                .await
                .unwrap();
            seen.extend(r.to_device);
            token = r.next_batch;
        }
        let got = to_device_seen(seen);
        let want: Vec<(String, bool)> = want.iter().map(|(t, e)| (t.to_string(), *e)).collect();
        let mut got_sorted = got.clone();
        got_sorted.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        // (To-device order is not guaranteed: compare as multisets.)
        assert_eq!(got_sorted, want_sorted, "received by {:?}", c.user_id());
    }
    eprintln!(
        "FIGURES keyless device publishes keys: bo got Olm from its next invite ({} ms after the first plaintext), cy from the 15 s re-check ({} ms after the first plaintext)",
        ms(t_cy, t_bo_olm),
        ms(t_cy, t_cy_olm)
    );
    h.shutdown().await;
}
