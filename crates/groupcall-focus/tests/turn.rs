//! How clients reach the focus, with a real Synapse:
//! - only through TURN (`[turn]` with `relay_only = true` in focus.toml),
//!   with a real coturn: the focus allocates one relay (shared by its
//!   clients' peers), offers only relayed candidates, and the call's media
//!   flows through it;
//! - a focus bound to every address (`0.0.0.0`) offers the address named
//!   in `[media] advertise` (as behind a NAT that maps the same port);
//! - a focus bound to two addresses (IPv4 and IPv6 loopback) serves a
//!   client that has only IPv4 and one that has only IPv6, each on the
//!   socket of its family.
//!
//! Run with `cargo test -p groupcall-focus --test turn -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

use std::time::Duration;

use groupcall_testkit::*;
use tokio::time::Instant;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_only_focus_serves_its_clients_through_turn() {
    let turn = coturn().await;
    let mut h = Harness::new().await;
    for name in ["p0", "p1"] {
        h.register(name).await;
    }
    let s0 = h.login("p0").await;
    let (username, password) = turn.credentials("focus", Duration::from_secs(3600));
    // The focus's configuration directory (common::focus_config_with).
    let dir = h.tmp.path().join("focus-conf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("turn-password"), format!("{password}\n")).unwrap();
    let extra = format!(
        "[turn]\nuris = [\"{}\"]\nusername = \"{username}\"\npassword_file = \"turn-password\"\nrelay_only = true\n",
        turn.turn_url()
    );
    let focus = RunningFocus::start_with(&h, &s0, &extra).await;
    let s1 = h.login("p1").await;
    let t0 = Instant::now();
    let (members, parts) =
        join_through_focus(&mut h, &focus, vec![("p0", s0), ("p1", s1)], |_| None).await;
    wait_media(&mut h, t0, &members, 50, 20, 90).await;
    h.log.pump();
    assert_only_through(&h.log.seen, t0, &members, &focus.device);
    eprintln!(
        "FIGURE turn: a relay-only focus; media both ways through it and coturn {:.1} s after the first join",
        t0.elapsed().as_secs_f64()
    );
    // A few more seconds of the call, all of it through the relay.
    h.log.run_for(Duration::from_secs(3)).await;
    leave_all(parts).await;
    focus.stop().await;
    // One allocation for the focus, whatever the number of clients, and
    // media through it both ways.
    let deadline = Instant::now() + Duration::from_secs(10);
    let usage = loop {
        let u: Vec<_> = turn
            .usage()
            .into_iter()
            .filter(|u| u.username == username)
            .collect();
        if !u.is_empty() {
            break u;
        }
        assert!(
            Instant::now() < deadline,
            "no usage for the focus's allocation:\n{}",
            turn.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(turn.allocations(&username), 1, "{}", turn.log_tail(40));
    // (A usage line can be in both of coturn's outputs: the largest.)
    let sent: u64 = usage.iter().map(|u| u.sent_packets).max().unwrap_or(0);
    let received: u64 = usage.iter().map(|u| u.received_packets).max().unwrap_or(0);
    eprintln!(
        "FIGURE turn: the focus's one allocation relayed {received} packets in and {sent} out"
    );
    assert!(sent > 500 && received > 500, "{usage:?}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_focus_bound_to_every_address_offers_the_advertised_one() {
    let mut h = Harness::new().await;
    for name in ["p0", "p1"] {
        h.register(name).await;
    }
    let s0 = h.login("p0").await;
    let focus = RunningFocus::start_with(
        &h,
        &s0,
        "[media]\nbind = [\"0.0.0.0:0\"]\nadvertise = [\"127.0.0.1\"]\n",
    )
    .await;
    let s1 = h.login("p1").await;
    let t0 = Instant::now();
    let (members, parts) =
        join_through_focus(&mut h, &focus, vec![("p0", s0), ("p1", s1)], |_| None).await;
    wait_media(&mut h, t0, &members, 50, 20, 90).await;
    h.log.pump();
    assert_only_through(&h.log.seen, t0, &members, &focus.device);
    // What the focus offered: the advertised address, the bound port.
    let f = focus.figures.borrow().clone();
    let offered = f.local_addr.expect("the address offered");
    assert_eq!(offered.ip().to_string(), "127.0.0.1", "{f:?}");
    assert_ne!(offered.port(), 0);
    eprintln!(
        "FIGURE turn: a focus bound to 0.0.0.0 offering the advertised 127.0.0.1:{}: media both ways {:.1} s after the first join",
        offered.port(),
        t0.elapsed().as_secs_f64()
    );
    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_focus_bound_to_two_addresses_serves_each_client_on_its_own() {
    let mut h = Harness::new().await;
    for name in ["p0", "p1"] {
        h.register(name).await;
    }
    let s0 = h.login("p0").await;
    let focus =
        RunningFocus::start_with(&h, &s0, "[media]\nbind = [\"127.0.0.1:0\", \"[::1]:0\"]\n").await;
    let s1 = h.login("p1").await;
    let t0 = Instant::now();
    // p0 has IPv4 only, p1 IPv6 only (for media; both reach Synapse over
    // IPv4): neither can reach the focus's other socket.
    let families: [std::net::IpAddr; 2] = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    let (members, parts) = join_through_focus_with(
        &mut h,
        &focus,
        vec![("p0", s0), ("p1", s1)],
        |_| None,
        |i, o| o.bind_addrs = vec![families[i]],
    )
    .await;
    wait_media(&mut h, t0, &members, 50, 20, 90).await;
    h.log.pump();
    assert_only_through(&h.log.seen, t0, &members, &focus.device);
    let f = focus.figures.borrow().clone();
    assert_eq!(f.sockets.len(), 2, "{:?}", f.sockets);
    for (s, family) in f.sockets.iter().zip(families) {
        assert_eq!(s.bound.ip(), family, "{:?}", f.sockets);
        assert_eq!(s.offered, vec![s.bound], "{:?}", f.sockets);
        assert!(s.datagrams_in > 100, "{:?}", f.sockets);
    }
    eprintln!(
        "FIGURE turn: a focus bound to {} and {}: an IPv4-only and an IPv6-only client, media both ways {:.1} s after the first join; datagrams in per socket: {} and {}",
        f.sockets[0].bound,
        f.sockets[1].bound,
        t0.elapsed().as_secs_f64(),
        f.sockets[0].datagrams_in,
        f.sockets[1].datagrams_in
    );
    leave_all(parts).await;
    focus.stop().await;
    h.shutdown().await;
}
