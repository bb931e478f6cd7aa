//! Cascaded foci over real federation (issue 14): two Synapse homeservers
//! on loopback federating with each other, each with its own focus
//! (in-process, `cascade = true`) and its own groupcall clients, all in one
//! call. Each client publishes to its homeserver's focus; the foci link
//! (docs/protocol.md, "Cascading foci") and forward across the link only
//! what the other side's clients asked for, each stream once.
//!
//! Run with `cargo test -p groupcall-focus --test cascade -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::time::Duration;

use groupcall::client::JoinOptions;
use groupcall::matrix::CreateRoomOptions;
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, Command, CreateOptions, DeviceKey};
use groupcall_focus::engine::{EngineFigures, LinkFigures};
use groupcall_testkit::synapse::{Federation, FederationOptions};
use groupcall_testkit::*;
use tokio::time::Instant;

mod common;
use common::{RunningFocus, focus_config_at, http_get};

/// groupcall clients per homeserver.
const PER_SERVER: usize = 3;

/// The one link of a focus, once it has one.
fn link(f: &tokio::sync::watch::Receiver<EngineFigures>) -> Option<LinkFigures> {
    f.borrow().links.first().cloned()
}

/// Waits until `cond` holds on a focus's figures.
async fn wait_figures(
    what: &str,
    f: &mut tokio::sync::watch::Receiver<EngineFigures>,
    secs: u64,
    cond: impl Fn(&EngineFigures) -> bool,
) -> EngineFigures {
    let r = tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            if cond(&f.borrow()) {
                return f.borrow().clone();
            }
            f.changed().await.unwrap();
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", f.borrow().links))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_homeservers_each_with_a_focus_and_three_clients() {
    let _serial = serial().await;
    init_tracing("warn,matrix_sdk_crypto=error,groupcall=info,groupcall_focus=info");
    let fed = Federation::start(FederationOptions {
        servers: 2,
        ..FederationOptions::default()
    })
    .await
    .expect("test federation");
    let tmp = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..2 * PER_SERVER).map(|i| format!("user{i}")).collect();
    let server_of = |i: usize| i / PER_SERVER;

    // The clients, and one focus account per homeserver.
    let sessions = federation_sessions(&fed, &names, server_of, tmp.path()).await;
    let devices: Vec<DeviceKey> = sessions
        .iter()
        .map(|s| DeviceKey::new(s.user_id(), s.device_id()))
        .collect();
    let creator = sessions[0].user_id().to_owned();
    let mut foci = Vec::new();
    for s in 0..2 {
        let hs = fed.server(s);
        let name = format!("focus{s}");
        let user = hs.register_user(&name, PASSWORD).await.unwrap().user_id;
        let config = focus_config_at(
            tmp.path(),
            &hs.base_url(),
            &user,
            &creator,
            "cascade = true",
            "",
        );
        foci.push(RunningFocus::launch(config).await);
    }
    eprintln!(
        "foci: {} and {}",
        foci[0].focus_ref.user_id, foci[1].focus_ref.user_id
    );

    // One private call room on server 0; everyone else invited, the foci
    // and the clients of server 1 across the federation.
    let room = sessions[0]
        .create_call_room(CreateRoomOptions {
            name: Some("cascaded call".into()),
            invite: sessions[1..]
                .iter()
                .map(|s| s.user_id().to_owned())
                .chain(foci.iter().map(|f| f.focus_ref.user_id.clone()))
                .collect(),
            encrypted: false,
            public: false,
        })
        .await
        .unwrap();
    for f in &foci {
        f.joined_rooms(1, 60).await;
    }

    // Each client joins with its homeserver's focus.
    let mut log = Log::new();
    let mut parts = Vec::new();
    let t0 = Instant::now();
    for (i, s) in sessions.iter().enumerate() {
        let mut o = JoinOptions::new(room.clone());
        o.create = (i == 0).then(CreateOptions::default);
        o.focus = Some(foci[server_of(i)].focus_ref.clone());
        o.require_encrypted = true;
        o.record_dir = Some(tmp.path().join(format!("rec-{}", names[i])));
        let idx = log.name_next(&names[i]);
        parts.push(spawn_participant(log.sender(), idx, s.clone(), o).await);
        if i == 0 {
            log.wait_for("the creator to join", 30, |s| {
                s.iter().any(|e| {
                    e.who == 0 && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
                })
            })
            .await;
        }
    }
    let n = names.len();
    let directions: Vec<(usize, usize)> = (0..n)
        .flat_map(|a| (0..n).filter(move |b| *b != a).map(move |b| (a, b)))
        .collect();

    // 1. Every client receives audio and video from all the others.
    let all_media = |s: &[Entry], since: Instant| {
        directions.iter().all(|&(at, from)| {
            rust_frames(s, since, at, &devices[from], TrackKind::Audio, None) > 50
                && rust_frames(s, since, at, &devices[from], TrackKind::Video, None) > 10
        })
    };
    let t_media = log
        .wait_for("audio and video on every direction", 180, |s| {
            all_media(s, t0)
        })
        .await;
    eprintln!(
        "FIGURE cascade: 2 homeservers x (1 focus + {PER_SERVER} clients): audio and video on all {} directions {} ms after the first join",
        directions.len(),
        ms(t0, t_media)
    );

    // 2. The link carries each stream once: each focus forwards the other
    //    its own clients' audio and video (2 tracks each), whatever the
    //    number of subscribers on the other side, and receives the same
    //    number (counted at both foci).
    let own = 2 * PER_SERVER;
    let mut fig = Vec::new();
    for f in foci.iter_mut() {
        fig.push(
            wait_figures("the link to carry every stream", &mut f.figures, 60, |x| {
                x.links
                    .first()
                    .is_some_and(|l| l.streams_out == own && l.streams_in == own)
            })
            .await,
        );
    }
    let (l0, l1) = (
        link(&foci[0].figures).unwrap(),
        link(&foci[1].figures).unwrap(),
    );
    eprintln!("FIGURE cascade: link at focus0 {l0:?}; at focus1 {l1:?}");
    assert!(l0.outgoing != l1.outgoing, "one side places the link");
    assert_eq!(l0.device, foci[1].device.to_string());
    assert!(l0.packets_out > 0 && l0.packets_in > 0);
    // The same on each focus's /metrics.
    for (i, f) in foci.iter().enumerate() {
        let other = &foci[1 - i].device;
        let addr = f.handle.http_addr().expect("the focus's HTTP endpoint");
        let m = http_get(addr, "/metrics").await;
        for family in ["link_streams_out", "link_streams_in"] {
            let line = format!("groupcall_focus_{family}{{focus=\"{other}\"}} {own}");
            assert!(
                m.lines().any(|l| l == line),
                "focus{i}: no `{line}` in\n{m}"
            );
        }
        assert!(
            m.lines()
                .any(|l| l == "groupcall_focus_looped_packets_total 0")
        );
    }
    for (i, f) in fig.iter().enumerate() {
        assert_eq!(f.links.len(), 1, "focus{i}: one link");
        assert_eq!(f.looped_packets, 0, "focus{i}: nothing came back");
        let participants: usize = f.calls.iter().map(|c| c.participants).sum();
        assert_eq!(participants, PER_SERVER, "focus{i} serves its own clients");
    }

    // 3. The media keeps flowing once any mesh call of the first seconds
    //    is over: a fresh 3 s window on every direction.
    log.run_for(Duration::from_secs(3)).await;
    let since = Instant::now();
    log.wait_for("media on every direction after the links formed", 30, |s| {
        all_media(s, since)
    })
    .await;

    // 4. Subscriptions on one side change what crosses the link: server
    //    1's clients take only user1's media through their focus, so focus0
    //    forwards user1's two tracks only; back to everyone, all again.
    let only = vec![devices[1].clone()];
    for p in &parts[PER_SERVER..] {
        p.commander
            .send(Command::FocusSubscriptions(Some(only.clone())));
    }
    let t_sub = Instant::now();
    let f0 = wait_figures(
        "the link to carry user1's streams only",
        &mut foci[0].figures,
        20,
        |x| x.links.first().is_some_and(|l| l.streams_out == 2),
    )
    .await;
    eprintln!(
        "FIGURE cascade: unsubscribing on server 1 narrowed the link from focus0 to {} streams in {} ms",
        f0.links[0].streams_out,
        t_sub.elapsed().as_millis()
    );
    for p in &parts[PER_SERVER..] {
        p.commander.send(Command::FocusSubscriptions(None));
    }
    wait_figures(
        "the link to carry every stream again",
        &mut foci[0].figures,
        20,
        |x| x.links.first().is_some_and(|l| l.streams_out == own),
    )
    .await;
    let since = Instant::now();
    log.wait_for("media on every direction again", 30, |s| {
        all_media(s, since)
    })
    .await;

    // Clients of different homeservers met through the foci; any mesh
    // call between them was only while the link formed.
    let meshed = directions
        .iter()
        .filter(|&&(at, from)| rust_connected_at(&log.seen, t0, at, &devices[from]).is_some())
        .count();
    eprintln!(
        "FIGURE cascade: {meshed} of {} directions had a direct (mesh) connection at some point",
        directions.len()
    );

    for p in &parts {
        p.commander.send(Command::Leave);
    }
    for p in parts {
        let _ = tokio::time::timeout(Duration::from_secs(20), p.done).await;
    }
    log.run_for(Duration::from_millis(500)).await;

    // 5. Every client's recordings of every client of the other homeserver
    //    (audio and video, through both foci and the link) decode.
    let mut decoded = (0, 0);
    for at in 0..n {
        let files: Vec<std::path::PathBuf> = log
            .seen
            .iter()
            .filter_map(|e| match &e.ev {
                Ev::Rust(groupcall::client::ClientEvent::Recorded { path }) if e.who == at => {
                    Some(path.clone())
                }
                _ => None,
            })
            .collect();
        for from in (0..n).filter(|f| server_of(*f) != server_of(at)) {
            let (v, a) =
                assert_recordings_of(&files, &names[at], &names[from], &devices[from].device_id);
            decoded.0 += v;
            decoded.1 += a;
        }
    }
    eprintln!(
        "FIGURE cascade: recordings across homeservers decode: {} video and {} audio frames",
        decoded.0, decoded.1
    );

    for f in foci {
        f.stop().await;
    }
    drop(fed);
}
