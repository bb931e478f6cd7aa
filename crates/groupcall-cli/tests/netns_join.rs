//! Default media addresses beyond loopback: two `groupcall join` processes
//! with default flags (no `--bind`), each in its own network namespace,
//! reach each other and the homeserver only through a routed link (the
//! userspace router of the test kit's `netns`; no shared loopback).
//! Synapse listens on the namespaces' gateway address, so the homeserver is
//! not on loopback and each process binds its namespace's interface address.
//!
//! Needs root and `ip netns` (the session and CI run as root); without them
//! the test fails and says why.
//!
//! Run: `cargo test -p groupcall-cli --test netns_join -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The reliability tests' namespaces and router, shared rather than copied.
use groupcall_testkit::{Proc, netns};

use std::process::Stdio;
use std::time::{Duration, Instant};

use groupcall_testkit::synapse::{Synapse, SynapseOptions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

mod common;
use common::{PW, create_call_room, frames_from, in_ns, join_args};

/// A `groupcall join --json` process in a namespace.
fn spawn_in(name: &str, ns: &str, args: &[String]) -> Proc {
    Proc::spawn_cmd(name, in_ns(ns, args), Stdio::null())
}

fn connected_to(p: &Proc, user: &str) -> bool {
    p.seen
        .iter()
        .any(|v| v["event"] == "peer_state" && v["user_id"] == user && v["state"] == "connected")
}

/// The `addrs=[...]` of every "media host bound" log line of `p` (one per
/// participant: its peers share the host's sockets).
fn bound_logs(p: &Proc) -> Vec<String> {
    p.stderr
        .lock()
        .unwrap()
        .lines()
        .filter(|l| l.contains("media host bound"))
        .filter_map(|l| l.split_once("addrs=").map(|(_, a)| a.trim().to_owned()))
        .collect()
}

/// IPv4 only, then IPv4 and IPv6 in every namespace (one after the other:
/// the namespaces' names come from the process id).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn default_flags_connect_across_namespaces_without_loopback() {
    call_across_namespaces(false).await;
    call_across_namespaces(true).await;
}

async fn call_across_namespaces(dual_stack: bool) {
    let created = if dual_stack {
        netns::Net::create_dual_stack(2).await
    } else {
        netns::Net::create(2).await
    };
    let net = created.unwrap_or_else(|e| {
        panic!(
            "this test needs root, `ip netns` and /dev/net/tun (the session and CI have them): \
             cannot create network namespaces here: {e}"
        )
    });
    let stack = if dual_stack { "IPv4+IPv6" } else { "IPv4" };
    let synapse = Synapse::start(SynapseOptions {
        bind_address: net.gateway().into(),
        ..SynapseOptions::default()
    })
    .await
    .expect("Synapse on the namespaces' gateway address");
    let hs = synapse.base_url();
    assert!(
        hs.contains(&net.gateway().to_string()),
        "homeserver {hs} is on the gateway"
    );
    let alice = synapse.register_user("alice", PW).await.unwrap();
    let bob = synapse.register_user("bob", PW).await.unwrap();

    let room = create_call_room(&hs, &alice.access_token, "beyond loopback", &[]).await;

    let dirs = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut a = spawn_in(
        "alice",
        &net.ns(0),
        &join_args(
            &hs,
            "alice",
            &room,
            &dirs.path().join("alice"),
            &["--create-call"],
        ),
    );
    let joined_a = a
        .wait_for(Duration::from_secs(90), |v| v["event"] == "joined")
        .await;
    let mut b = spawn_in(
        "bob",
        &net.ns(1),
        &join_args(&hs, "bob", &room, &dirs.path().join("bob"), &[]),
    );
    let joined_b = b
        .wait_for(Duration::from_secs(90), |v| v["event"] == "joined")
        .await;
    assert_eq!(joined_a["call_id"], joined_b["call_id"]);

    // Default flags, homeserver not on loopback: media is bound to the
    // namespace's interface addresses (IPv4, and IPv6 if it has one) alone
    // (loopback and the link-local IPv6 address of eth0 are skipped).
    for (p, joined, i) in [(&a, &joined_a, 0), (&b, &joined_b, 1)] {
        let mut got: Vec<String> = joined["media_addrs"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no media_addrs in {joined}", p.name))
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect();
        got.sort();
        let mut want = vec![net.addr(i).to_string()];
        if dual_stack {
            want.push(net.addr6(i).to_string());
        }
        want.sort();
        assert_eq!(got, want, "{}: {joined}", p.name);
    }

    // Connected with audio and video frames both ways.
    let deadline = started + Duration::from_secs(120);
    let (ua, ub) = (alice.user_id.as_str(), bob.user_id.as_str());
    loop {
        a.poll();
        b.poll();
        let up = |p: &Proc, other: &str| {
            connected_to(p, other)
                && frames_from(p, other, "audio") >= 50
                && frames_from(p, other, "video") >= 15
        };
        if up(&a, ub) && up(&b, ua) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no call with media both ways within 120 s.\n--- alice: {}\n--- bob: {}",
            a.report(),
            b.report()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts = *net.counts.lock().unwrap();
    println!(
        "FIGURE {stack}: connected with media both ways {:.1} s after alice started; \
         alice got {} audio / {} video frames from bob, bob {} / {} from alice; \
         router forwarded {} packets ({} IPv6)",
        started.elapsed().as_secs_f64(),
        frames_from(&a, ub, "audio"),
        frames_from(&a, ub, "video"),
        frames_from(&b, ua, "audio"),
        frames_from(&b, ua, "video"),
        counts.forwarded,
        counts.forwarded_v6
    );
    // Media between the namespaces went through the router (the only path).
    assert!(
        counts.forwarded > 200,
        "router forwarded only {} packets",
        counts.forwarded
    );

    // The IPv6 host candidates were offered and used: ICE prefers IPv6
    // host pairs (str0m's local preference), so media between the IPv6
    // addresses crossed the router (more packets than connectivity checks).
    if dual_stack {
        assert!(
            counts.forwarded_v6 > 100,
            "only {} IPv6 packets between the namespaces",
            counts.forwarded_v6
        );
    }

    // The participant's sockets (one host candidate each, shared by its
    // peers) are on the namespace's addresses, none on loopback.
    for (p, i) in [(&a, 0), (&b, 1)] {
        let bound = bound_logs(p);
        assert!(
            !bound.is_empty(),
            "{}: no `media host bound` log line",
            p.name
        );
        let own4 = format!("{}:", net.addr(i));
        let own6 = format!("[{}]:", net.addr6(i));
        for addrs in &bound {
            assert!(
                addrs.contains(&own4)
                    && (addrs.contains(&own6) || !dual_stack)
                    && !addrs.contains("127.0.0.1")
                    && !addrs.contains("[::1]"),
                "{}: media host bound {addrs}, expected {own4}* and {own6}* only",
                p.name
            );
            let sockets = 1 + usize::from(dual_stack);
            assert_eq!(addrs.matches(", ").count() + 1, sockets, "{addrs}");
        }
        println!("{stack}: {} bound {}", p.name, bound.join(" "));
    }

    // Both leave cleanly on SIGTERM.
    for p in [&mut a, &mut b] {
        if let Some(pid) = p.child.id() {
            kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
        }
    }
    for p in [&mut a, &mut b] {
        p.wait_for(Duration::from_secs(30), |v| v["event"] == "left")
            .await;
    }
    drop(synapse);
    drop(net);
}
