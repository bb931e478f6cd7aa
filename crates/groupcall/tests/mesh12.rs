//! Twelve groupcall participants in one process, in one call on a real
//! Synapse: a full mesh (66 pairs) with audio and video both ways on every
//! pair, recordings that ffmpeg decodes, and one UDP socket per participant
//! and bound address (on loopback: 12 sockets in all, whatever the number of
//! peers).
//!
//! EXPECTED TO FAIL until the shared-socket peer set of issue 10 item 1 is
//! merged: today every media peer owns its own socket, so the process holds
//! 12 x 11 = 132 UDP sockets and the socket assertion (the last media check)
//! fails. Everything before it (mesh, media, decoding) is asserted first and
//! reported on stderr as `FIGURE mesh12 ...` lines. With today's driver
//! (it awaits each media operation inline: 11 peers' ICE gathering in a
//! row per participant) the mesh is slow to form on this 2-core machine
//! shared with five builds: every pair connected 179 s after the last join
//! in one run (then media and decoding passed; 132 sockets), not within
//! 180 s in two others (114 and 121 of 132 directions; peers failing
//! ICE/DTLS under starvation and being called again). Hence the 300 s
//! wait; the non-blocking driver of the same issue should shorten it.
//!
//! Run: `cargo test -p groupcall --test mesh12 -- --nocapture`.
//! Timers are scaled for two shared cores in a debug build: media liveness
//! (Disconnected 10 s, Failed 30 s), the delayed leave (20 s, restarted
//! every 4 s) and the core's connect timeout (45 s) are longer than the
//! product's defaults; nothing else is.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use groupcall::LivenessOptions;
use groupcall::client::{ClientEvent, JoinOptions};
use groupcall::matrix::MatrixSession;
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, Command, CreateOptions, DeviceKey};
use groupcall_testkit::*;
use tokio::time::Instant;

/// Participants.
const N: usize = 12;

/// The pairs `(a, b)`, `a < b`.
fn pairs() -> Vec<(usize, usize)> {
    (0..N)
        .flat_map(|a| (a + 1..N).map(move |b| (a, b)))
        .collect()
}

/// Directions `at <- from` (of the ordered pairs) for which `ok` is false,
/// as `"at<-from"`.
fn missing(names: &[String], mut ok: impl FnMut(usize, usize) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    for at in 0..N {
        for from in 0..N {
            if at != from && !ok(at, from) {
                out.push(format!("{}<-{}", names[at], names[from]));
            }
        }
    }
    out
}

/// Polls the log until `ok` holds for every direction, at most `secs`;
/// panics naming the directions still missing.
async fn wait_all(
    h: &mut Harness,
    what: &str,
    secs: u64,
    names: &[String],
    mut ok: impl FnMut(&[Entry], usize, usize) -> bool,
) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        h.log.pump();
        let seen = &h.log.seen;
        let left = missing(names, |at, from| ok(seen, at, from));
        if left.is_empty() {
            return Instant::now();
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {secs} s waiting for {what}: {} of {} directions missing: {}\nrecent events:\n{}",
                left.len(),
                N * (N - 1),
                left.join(" "),
                h.log.dump(60)
            );
        }
        h.log.run_for(Duration::from_millis(250)).await;
    }
}

/// The recordings a participant reported when it left.
fn recordings(seen: &[Entry], at: usize) -> Vec<PathBuf> {
    seen.iter()
        .filter_map(|e| match &e.ev {
            Ev::Rust(ClientEvent::Recorded { path }) if e.who == at => Some(path.clone()),
            _ => None,
        })
        .collect()
}

fn has_ext(p: &Path, ext: &str) -> bool {
    p.extension().is_some_and(|e| e == ext)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twelve_participants_full_mesh_with_media_on_one_socket_each() {
    let mut h = Harness::new().await;
    let t_setup = Instant::now();
    let names: Vec<String> = (0..N).map(|i| format!("m{i:02}")).collect();
    for n in &names {
        h.register(n).await;
    }
    // Log in concurrently (Olm keys are uploaded at login).
    let mut logins = tokio::task::JoinSet::new();
    for (i, n) in names.iter().enumerate() {
        let (hs, n, dir) = (h.hs.clone(), n.clone(), h.tmp.path().join(n));
        logins.spawn(async move { (i, MatrixSession::login(&hs, &n, PASSWORD, dir).await) });
    }
    let mut sessions: Vec<Option<MatrixSession>> = vec![None; N];
    while let Some(r) = logins.join_next().await {
        let (i, s) = r.unwrap();
        sessions[i] = Some(s.unwrap());
    }
    let sessions: Vec<MatrixSession> = sessions.into_iter().map(Option::unwrap).collect();
    let devices: Vec<DeviceKey> = sessions
        .iter()
        .map(|s| DeviceKey::new(s.user_id(), s.device_id()))
        .collect();
    let room = h.room(&sessions[0]).await;
    let udp_before = udp_sockets();
    eprintln!(
        "FIGURE mesh12: {N} users registered and logged in in {:.1} s; UDP sockets before the call: {}",
        t_setup.elapsed().as_secs_f64(),
        udp_before.len()
    );

    let opts = |i: usize| {
        let mut o = JoinOptions::new(room.clone());
        o.create = (i == 0).then(CreateOptions::default);
        o.record_dir = Some(h.tmp.path().join(format!("rec-{}", names[i])));
        // Scaled for 12 participants on two shared cores (debug build).
        o.liveness = LivenessOptions {
            leave_delay: Duration::from_secs(20),
            heartbeat: Duration::from_secs(4),
            media_disconnect_timeout: Duration::from_secs(10),
            media_failed_timeout: Duration::from_secs(30),
            ..LivenessOptions::default()
        };
        // Media may take longer than the core's 15 s to connect when 132
        // peers start at once on two busy cores.
        let mut core = groupcall::proto::Config::new("", "");
        core.connect_timeout_ms *= 3;
        o.core = Some(core);
        o
    };
    let all_opts: Vec<JoinOptions> = (0..N).map(opts).collect();
    let mut all_opts = all_opts.into_iter();
    let mut sessions = sessions.into_iter();

    // The first creates the call; then the others join, one right after
    // the other.
    let t0 = Instant::now();
    let (_, first) = h
        .join_rust(
            &names[0],
            sessions.next().unwrap(),
            all_opts.next().unwrap(),
        )
        .await;
    let mut parts = vec![first];
    h.log
        .wait_for("the creator to join", 30, |s| {
            s.iter().any(|e| {
                e.who == 0 && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
            })
        })
        .await;
    for (i, (s, o)) in sessions.zip(all_opts).enumerate() {
        let (idx, p) = h.join_rust(&names[i + 1], s, o).await;
        assert_eq!(idx, i + 1);
        parts.push(p);
    }
    let t_joined = Instant::now();

    // 1. Every ordered pair connected.
    let connected = wait_all(
        &mut h,
        "every pair connected",
        // Today's driver took 179 s here on two shared cores (see above).
        300,
        &names,
        |s, at, from| rust_connected(s, t0, at, &devices[from]),
    )
    .await;
    // 2. Audio and video both ways on every pair (as the call test asks of
    //    three participants).
    let media = wait_all(
        &mut h,
        "audio and video both ways on every pair",
        180,
        &names,
        |s, at, from| {
            rust_frames(s, t0, at, &devices[from], TrackKind::Audio, None) > 50
                && rust_frames(s, t0, at, &devices[from], TrackKind::Video, None) > 10
        },
    )
    .await;
    eprintln!(
        "FIGURE mesh12: {} pairs; all joined {:.1} s after the first join; every pair connected {:.1} s and with audio+video both ways {:.1} s after the last join",
        pairs().len(),
        t_joined.saturating_duration_since(t0).as_secs_f64(),
        connected.saturating_duration_since(t_joined).as_secs_f64(),
        media.saturating_duration_since(t_joined).as_secs_f64(),
    );

    // 3. Media keeps flowing on every direction: counted over 5 s.
    let mark = h.log.mark();
    h.log.run_for(Duration::from_secs(5)).await;
    let seen = &h.log.seen;
    let mut flow: BTreeMap<(usize, usize), (u64, u64)> = BTreeMap::new();
    for at in 0..N {
        for (from, dev) in devices.iter().enumerate() {
            if at != from {
                let a = rust_frames(seen, mark, at, dev, TrackKind::Audio, None);
                let v = rust_frames(seen, mark, at, dev, TrackKind::Video, None);
                flow.insert((at, from), (a, v));
            }
        }
    }
    let min_audio = flow.values().map(|f| f.0).min().unwrap_or(0);
    let min_video = flow.values().map(|f| f.1).min().unwrap_or(0);
    eprintln!(
        "FIGURE mesh12: in 5 s of media, every one of {} directions received at least {min_audio} audio and {min_video} video frames",
        flow.len()
    );
    let stalled = missing(&names, |at, from| {
        let (a, v) = flow[&(at, from)];
        a >= 50 && v >= 10
    });
    assert!(
        stalled.is_empty(),
        "media stalled in 5 s (fewer than 50 audio or 10 video frames) on {}: {}",
        stalled.len(),
        stalled.join(" ")
    );

    // 4. One UDP socket per participant and bound address: 12 on loopback.
    //    (Fails until the shared-socket peer set lands: today 12 x 11.)
    let udp = udp_sockets();
    let new: Vec<_> = udp.iter().filter(|a| !udp_before.contains(a)).collect();
    eprintln!(
        "FIGURE mesh12: UDP sockets of the process with the mesh up: {} ({} opened by the call; expected {N}: one per participant on 127.0.0.1)",
        udp.len(),
        new.len()
    );
    let sockets_ok = udp.len() == N && udp.iter().all(|a| a.ip().is_loopback());

    // 5. Everyone leaves; every participant's recordings (one audio and one
    //    video file per remote participant) decode with ffmpeg.
    for p in &parts {
        p.commander.send(Command::Leave);
    }
    for p in parts {
        p.done.await.unwrap();
    }
    h.log.pump();
    let mut files = Vec::new();
    for at in 0..N {
        let rec = recordings(&h.log.seen, at);
        for from in (0..N).filter(|f| *f != at) {
            let tag = format!("_{}_", names[from]);
            let of = |ext: &str| {
                rec.iter()
                    .filter(|p| {
                        has_ext(p, ext)
                            && p.file_name()
                                .is_some_and(|f| f.to_string_lossy().contains(&tag))
                    })
                    .cloned()
                    .collect::<Vec<_>>()
            };
            let (ogg, ivf) = (of("ogg"), of("ivf"));
            assert!(
                !ogg.is_empty() && !ivf.is_empty(),
                "{} has no audio or video recording of {}: {rec:?}",
                names[at],
                names[from]
            );
            files.extend(ogg.into_iter().map(|p| (p, 51)));
            files.extend(ivf.into_iter().map(|p| (p, 11)));
        }
    }
    let t_decode = Instant::now();
    let decoded: Vec<u64> = std::thread::scope(|s| {
        let chunks: Vec<_> = files.chunks(files.len().div_ceil(2)).collect();
        let workers: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|(p, min)| assert_decodes(p, *min))
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    eprintln!(
        "FIGURE mesh12: {} recordings ({} per participant) decode with ffmpeg without an error, {} frames in all, fewest {} ({:.1} s to decode)",
        decoded.len(),
        decoded.len() / N,
        decoded.iter().sum::<u64>(),
        decoded.iter().min().copied().unwrap_or(0),
        t_decode.elapsed().as_secs_f64()
    );

    // Peers that failed on the way (and were called again) are reported,
    // not failed on: on two shared cores a starved process loses ICE checks.
    let anomalies = h.anomalies();
    eprintln!(
        "FIGURE mesh12: {} anomalies on the way (failed peers, warnings, refused signalling){}{}",
        anomalies.len(),
        if anomalies.is_empty() { "" } else { ":\n" },
        anomalies.join("\n")
    );
    // The socket count, asserted after the media checks so that a run
    // before the shared-socket peer set still shows everything else.
    assert!(
        sockets_ok,
        "expected {N} UDP sockets (one per participant, on loopback), the process held {}: {udp:?}",
        udp.len()
    );
}
