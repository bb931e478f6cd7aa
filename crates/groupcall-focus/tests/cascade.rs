//! Cascaded foci over real federation (issue 14): Synapse homeservers on
//! loopback federating with each other, each with its own focus
//! (in-process, `cascade = true`) and its own groupcall clients, all in one
//! call. Each client publishes to its homeserver's focus; the foci link
//! (docs/protocol.md, "Cascading foci") and forward across a link only what
//! the other side's clients asked for, each stream once, from its origin
//! focus only.
//!
//! Run with `cargo test -p groupcall-focus --test cascade -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::time::Duration;

use groupcall::client::JoinOptions;
use groupcall::matrix::CreateRoomOptions;
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, Command, CreateOptions, DeviceKey};
use groupcall_focus::engine::EngineFigures;
use groupcall_testkit::synapse::{Federation, FederationOptions};
use groupcall_testkit::*;
use tokio::time::Instant;

mod common;
use common::{RunningFocus, focus_config_at, http_get};

/// A call across `servers` homeservers, each with a focus and
/// `per_server` groupcall clients publishing to it.
struct Cascade {
    fed: Federation,
    tmp: tempfile::TempDir,
    per_server: usize,
    names: Vec<String>,
    devices: Vec<DeviceKey>,
    foci: Vec<RunningFocus>,
    log: Log,
    parts: Vec<Participant>,
    /// A reference matrix-js-sdk peer (mesh only) of server 0, if any: its
    /// process, log index and device.
    reference: Option<(RefPeer, usize, DeviceKey)>,
    /// The first join.
    t0: Instant,
}

impl Cascade {
    async fn start(servers: usize, per_server: usize) -> Cascade {
        Self::start_with(servers, per_server, false).await
    }

    /// [`Cascade::start`], with a reference peer of server 0 in the call
    /// (`reference`), which has no focus mode: everyone meets it in the
    /// mesh.
    async fn start_with(servers: usize, per_server: usize, reference: bool) -> Cascade {
        init_tracing("warn,matrix_sdk_crypto=error,groupcall=info,groupcall_focus=info");
        let fed = Federation::start(FederationOptions {
            servers,
            ..FederationOptions::default()
        })
        .await
        .expect("test federation");
        let tmp = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..servers * per_server)
            .map(|i| format!("user{i}"))
            .collect();
        let sessions = federation_sessions(&fed, &names, |i| i / per_server, tmp.path()).await;
        let devices: Vec<DeviceKey> = sessions
            .iter()
            .map(|s| DeviceKey::new(s.user_id(), s.device_id()))
            .collect();
        let creator = sessions[0].user_id().to_owned();
        let ref_user = if reference {
            let r = fed.server(0).register_user("reference", PASSWORD).await;
            Some(r.unwrap().user_id)
        } else {
            None
        };
        let mut foci = Vec::new();
        for s in 0..servers {
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
        // One private call room on server 0; everyone else invited, the
        // foci and the other servers' clients across the federation.
        let room = sessions[0]
            .create_call_room(CreateRoomOptions {
                name: Some("cascaded call".into()),
                invite: sessions[1..]
                    .iter()
                    .map(|s| s.user_id().to_owned())
                    .chain(foci.iter().map(|f| f.focus_ref.user_id.clone()))
                    .chain(ref_user.clone())
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
            o.focus = Some(foci[i / per_server].focus_ref.clone());
            // The reference sends its signalling in plaintext in an
            // unencrypted room (matrix-js-sdk encrypts to-device call
            // signalling only in encrypted rooms); without it, Olm only.
            o.require_encrypted = !reference;
            o.record_dir = Some(tmp.path().join(format!("rec-{}", names[i])));
            let idx = log.name_next(&names[i]);
            parts.push(spawn_participant(log.sender(), idx, s.clone(), o).await);
            if i == 0 {
                log.wait_for("the creator to join", 30, |s| {
                    s.iter().any(|e| {
                        e.who == 0
                            && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
                    })
                })
                .await;
            }
        }
        let reference = match ref_user {
            Some(_) => {
                let p = spawn_reference(
                    &log,
                    &fed.server(0).base_url(),
                    "reference",
                    "peer.mjs",
                    &room,
                    &["--media-interval", "200"],
                    tmp.path(),
                );
                let idx = p.idx;
                let dev = log.js_device(idx).await;
                Some((p, idx, dev))
            }
            None => None,
        };
        Cascade {
            fed,
            tmp,
            per_server,
            names,
            devices,
            foci,
            log,
            parts,
            reference,
            t0,
        }
    }

    fn server_of(&self, i: usize) -> usize {
        i / self.per_server
    }

    /// Every (receiver, sender) pair of clients.
    fn directions(&self) -> Vec<(usize, usize)> {
        let n = self.names.len();
        (0..n)
            .flat_map(|a| (0..n).filter(move |b| *b != a).map(move |b| (a, b)))
            .collect()
    }

    /// Waits until every participant (the reference peer too) has
    /// received audio and video from every other since `since`.
    async fn wait_media(&mut self, what: &str, since: Instant, secs: u64) -> Instant {
        // (log index, device, a groupcall client)
        let mut members: Vec<(usize, DeviceKey, bool)> = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| (i, d.clone(), true))
            .collect();
        if let Some((_, idx, dev)) = &self.reference {
            members.push((*idx, dev.clone(), false));
        }
        let names = self.log.names();
        let missing = |s: &[Entry]| -> Vec<String> {
            let mut out = Vec::new();
            for (at, _, rust) in &members {
                for (f, from, _) in members.iter().filter(|(f, _, _)| f != at) {
                    let (audio, video) = if *rust {
                        (
                            rust_frames(s, since, *at, from, TrackKind::Audio, None),
                            rust_frames(s, since, *at, from, TrackKind::Video, None),
                        )
                    } else {
                        // Audible 10 ms frames, decoded video frames.
                        (
                            js_frames(s, since, *at, from, "audio", "m.usermedia") / 2,
                            js_frames(s, since, *at, from, "video", "m.usermedia"),
                        )
                    };
                    if audio <= 50 || video <= 10 {
                        out.push(format!(
                            "{}<-{} (audio {audio}, video {video})",
                            names[*at], names[*f]
                        ));
                    }
                }
            }
            out
        };
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            self.log.run_for(Duration::from_millis(200)).await;
            let m = missing(&self.log.seen);
            if m.is_empty() {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {secs} s waiting for {what}: missing {m:?}"
            );
        }
    }

    /// Waits until `cond` holds on focus `i`'s figures.
    async fn wait_focus(
        &mut self,
        i: usize,
        what: &str,
        secs: u64,
        cond: impl Fn(&EngineFigures) -> bool,
    ) -> EngineFigures {
        let f = &mut self.foci[i].figures;
        let r = tokio::time::timeout(Duration::from_secs(secs), async {
            loop {
                if cond(&f.borrow()) {
                    return f.borrow().clone();
                }
                f.changed().await.unwrap();
            }
        })
        .await;
        r.unwrap_or_else(|_| {
            panic!(
                "focus{i}: timed out waiting for {what}: {:?}",
                f.borrow().links
            )
        })
    }

    /// Waits for audio and video on every direction, checks the links,
    /// and that the media keeps flowing once any mesh call of the first
    /// seconds is over.
    async fn established(&mut self) {
        let t0 = self.t0;
        let t = self
            .wait_media("audio and video on every direction", t0, 180)
            .await;
        eprintln!(
            "FIGURE cascade: {} homeservers x (1 focus + {} clients){}: audio and video on all {} directions {} ms after the first join",
            self.foci.len(),
            self.per_server,
            if self.reference.is_some() {
                " + 1 reference peer (mesh)"
            } else {
                ""
            },
            {
                let n = self.names.len() + usize::from(self.reference.is_some());
                n * (n - 1)
            },
            ms(t0, t)
        );
        self.assert_links().await;
        self.log.run_for(Duration::from_secs(3)).await;
        self.wait_media(
            "media on every direction after the links formed",
            Instant::now(),
            30,
        )
        .await;
    }

    /// Every focus links with every other, each link carrying each of its
    /// focus's clients' audio and video once each way (counted at both
    /// ends and on `/metrics`), and nothing comes back to its origin.
    async fn assert_links(&mut self) {
        let servers = self.foci.len();
        let own = 2 * self.per_server;
        for i in 0..servers {
            let f = self
                .wait_focus(i, "every link to carry every stream", 60, |x| {
                    x.links.len() == servers - 1
                        && x.links.iter().all(|l| {
                            l.streams_out == own
                                && l.streams_in == own
                                && l.packets_in > 0
                                && l.packets_out > 0
                        })
                })
                .await;
            assert_eq!(f.looped_packets, 0, "focus{i}: nothing came back");
            let participants: usize = f.calls.iter().map(|c| c.participants).sum();
            assert_eq!(participants, self.per_server, "focus{i} serves its own");
            eprintln!("FIGURE cascade: focus{i} links {:?}", f.links);
            let addr = self.foci[i].handle.http_addr().expect("HTTP endpoint");
            let m = http_get(addr, "/metrics").await;
            for (j, other) in self.foci.iter().enumerate().filter(|(j, _)| *j != i) {
                for family in ["link_streams_out", "link_streams_in"] {
                    let line = format!(
                        "groupcall_focus_{family}{{focus=\"{}\"}} {own}",
                        other.device
                    );
                    assert!(
                        m.lines().any(|l| l == line),
                        "focus{i} -> {j}: no `{line}`\n{m}"
                    );
                }
            }
            assert!(
                m.lines()
                    .any(|l| l == "groupcall_focus_looped_packets_total 0")
            );
        }
        // One side placed each link.
        for i in 0..servers {
            for j in (i + 1)..servers {
                let (a, b) = (&self.foci[i], &self.foci[j]);
                let out = |f: &RunningFocus, other: &RunningFocus| {
                    f.figures
                        .borrow()
                        .links
                        .iter()
                        .find(|l| l.device == other.device.to_string())
                        .map(|l| l.outgoing)
                };
                assert_ne!(
                    out(a, b),
                    out(b, a),
                    "focus{i}-focus{j}: one side places it"
                );
            }
        }
    }

    /// Ends the call; every client's recordings of every client of another
    /// homeserver (through two foci and a link) decode.
    async fn finish(mut self) {
        let directions = self.directions();
        let meshed = directions
            .iter()
            .filter(|&&(at, from)| {
                rust_connected_at(&self.log.seen, self.t0, at, &self.devices[from]).is_some()
            })
            .count();
        eprintln!(
            "FIGURE cascade: {meshed} of {} directions had a direct (mesh) connection at some point",
            directions.len()
        );
        for p in &self.parts {
            p.commander.send(Command::Leave);
        }
        for p in std::mem::take(&mut self.parts) {
            let _ = tokio::time::timeout(Duration::from_secs(20), p.done).await;
        }
        self.log.run_for(Duration::from_millis(500)).await;
        let mut decoded = (0, 0);
        for (at, from) in directions {
            if self.server_of(at) == self.server_of(from) {
                continue;
            }
            let files = self.log.recorded(at);
            let (v, a) = assert_recordings_of(
                &files,
                &self.names[at],
                &self.names[from],
                &self.devices[from].device_id,
            );
            decoded.0 += v;
            decoded.1 += a;
        }
        eprintln!(
            "FIGURE cascade: recordings across homeservers decode: {} video and {} audio frames",
            decoded.0, decoded.1
        );
        drop(self.reference.take());
        for f in self.foci {
            f.stop().await;
        }
        drop(self.tmp);
        drop(self.fed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_homeservers_each_with_a_focus_and_three_clients() {
    let _serial = serial().await;
    let mut c = Cascade::start(2, 3).await;
    c.established().await;

    // Subscriptions on one side change what crosses the link: server 1's
    // clients take only user1's media through their focus, so focus0
    // forwards user1's two tracks only; back to everyone, all again.
    let only = vec![c.devices[1].clone()];
    for p in &c.parts[3..] {
        p.commander
            .send(Command::FocusSubscriptions(Some(only.clone())));
    }
    let t_sub = Instant::now();
    let f0 = c
        .wait_focus(0, "the link to carry user1's streams only", 20, |x| {
            x.links.first().is_some_and(|l| l.streams_out == 2)
        })
        .await;
    eprintln!(
        "FIGURE cascade: unsubscribing on server 1 narrowed the link from focus0 to {} streams in {} ms",
        f0.links[0].streams_out,
        t_sub.elapsed().as_millis()
    );
    for p in &c.parts[3..] {
        p.commander.send(Command::FocusSubscriptions(None));
    }
    c.wait_focus(0, "the link to carry every stream again", 20, |x| {
        x.links.first().is_some_and(|l| l.streams_out == 6)
    })
    .await;
    c.wait_media("media on every direction again", Instant::now(), 30)
        .await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_homeservers_each_with_a_focus_and_two_clients_without_loops() {
    let _serial = serial().await;
    let mut c = Cascade::start(3, 2).await;
    // Three foci, three links (each focus has two), each stream once per
    // link, and no packet back at its origin focus.
    c.established().await;
    for i in 0..3 {
        assert_eq!(c.foci[i].figures.borrow().looped_packets, 0, "focus{i}");
    }
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_homeserver_that_stops_mid_call_and_returns() {
    let _serial = serial().await;
    let mut c = Cascade::start(2, 2).await;
    c.established().await;

    // Server 1's Synapse stops: its focus and clients keep running, and
    // the media (foci, link, clients: none of it goes through a
    // homeserver) goes on, everyone with everyone.
    c.fed.stop_server(1).await.unwrap();
    let t_stop = Instant::now();
    c.log.run_for(Duration::from_secs(2)).await;
    c.wait_media(
        "media on every direction with server 1 down",
        Instant::now(),
        20,
    )
    .await;
    c.log.run_for(Duration::from_secs(8)).await;
    let since = Instant::now();
    let t = c
        .wait_media(
            "media on every direction after 10 s without server 1",
            since,
            20,
        )
        .await;
    eprintln!(
        "FIGURE cascade: server 1 down: media on all directions still, {} ms after the stop",
        ms(t_stop, t)
    );

    // It returns. Its clients' delayed leave events, overdue while it was
    // down, fire as it starts: their member entries go, the foci drop
    // them and the link, and the clients publish their entries again. Ten
    // seconds after the restart everyone is in the call with everyone
    // again, all within 30 s.
    c.fed.restart_server(1).await.unwrap();
    let t_back = Instant::now();
    c.log.run_for(Duration::from_secs(10)).await;
    let t = c
        .wait_media(
            "media on every direction after server 1 returned",
            Instant::now(),
            20,
        )
        .await;
    let left = c
        .log
        .seen
        .iter()
        .filter(|e| e.t > t_back && matches!(e.call(), Some(CallEvent::ParticipantLeft { .. })))
        .count();
    eprintln!(
        "FIGURE cascade: server 1 back: {left} participant-left events seen after its restart (delayed leaves that fired), then media on all directions again {} ms after the restart",
        ms(t_back, t)
    );
    assert!(ms(t_back, t) < 30_000);
    c.assert_links().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reference_peer_sees_and_hears_everyone_and_a_dead_focus_leaves_its_clients_in_the_mesh()
{
    let _serial = serial().await;
    let mut c = Cascade::start_with(2, 2, true).await;
    // Everyone, the reference included, with everyone.
    c.established().await;
    // The reference (matrix-js-sdk, no focus mode) meets all four groupcall
    // clients in the mesh, across the federation too; they meet each other
    // at their foci.
    let (r, rdev) = c
        .reference
        .as_ref()
        .map(|(_, i, d)| (*i, d.clone()))
        .unwrap();
    for (i, d) in c.devices.iter().enumerate() {
        assert!(
            js_connected_at(&c.log.seen, c.t0, r, d).is_some(),
            "the reference is not connected to user{i}"
        );
        assert!(rust_connected_at(&c.log.seen, c.t0, i, &rdev).is_some());
    }

    // focus1 dies without a word (aborted in-process: no hangups, its
    // socket closed). Its clients give it up and fall back to the mesh,
    // with everyone: their entries no longer name a focus, so server 0's
    // clients call them (or answer them) directly, and focus0, which no
    // participant names it any more, drops the link.
    c.foci[1].handle.abort();
    let t_kill = Instant::now();
    let t = c
        .wait_media("media on every direction after focus1 died", t_kill, 60)
        .await;
    eprintln!(
        "FIGURE cascade: focus1 killed: media on all 20 directions (the reference's included) again {} ms later",
        ms(t_kill, t)
    );
    c.wait_focus(0, "focus0 to drop its link", 30, |x| x.links.is_empty())
        .await;
    // Server 1's clients now reach everyone directly; server 0's clients
    // still meet each other at focus0.
    let direct =
        |s: &[Entry], at: usize, from: usize| rust_connected(s, t_kill, at, &c.devices[from]);
    for at in 2..4 {
        for from in (0..4).filter(|f| *f != at) {
            assert!(
                direct(&c.log.seen, at, from),
                "user{at} -> user{from}: not in the mesh"
            );
        }
    }
    assert!(!direct(&c.log.seen, 0, 1), "user0 and user1 stay at focus0");
    c.wait_media("media on every direction in the mesh", Instant::now(), 30)
        .await;
    // The dead focus is not stopped again at the end.
    drop(c.foci.remove(1));
    c.finish().await;
}
