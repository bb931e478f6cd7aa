//! Seeded simulations of 2 to 8 participants over an in-memory homeserver
//! with reordered, duplicated and delayed to-device messages.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod sim;

use groupcall_proto::ids::IdGen;
use groupcall_proto::*;
use sim::{Faults, T0, World};

fn users_for(seed: u64, n: usize) -> Vec<String> {
    // Some users have two devices, to exercise the device-id rule.
    let mut rng = IdGen::new(seed);
    (0..n)
        .map(|i| {
            if i > 0 && rng.next_u64().is_multiple_of(4) {
                format!("@user{}:sim", i - 1)
            } else {
                format!("@user{i}:sim")
            }
        })
        .collect()
}

fn join_all(w: &mut World, seed: u64) {
    let mut rng = IdGen::new(seed ^ 77);
    let create = Command::Join {
        create: Some(CreateOptions::default()),
        audio: true,
        video: true,
    };
    w.command_at(T0 + 10, 0, create);
    for i in 1..w.nodes.len() {
        let at = T0 + 500 + rng.next_u64() % 2000;
        w.command_at(
            at,
            i,
            Command::Join {
                create: None,
                audio: true,
                video: true,
            },
        );
    }
}

fn check_invites(w: &World) {
    for inv in &w.invites {
        assert!(
            should_call(&inv.from, &inv.to),
            "{} called {} but should not have",
            inv.from,
            inv.to
        );
    }
}

#[test]
fn full_mesh_forms_under_reordering_and_duplication() {
    for seed in 0..300u64 {
        let n = 2 + (seed % 7) as usize;
        let users = users_for(seed, n);
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let mut w = World::new(seed, &users, Faults::default());
        join_all(&mut w, seed);
        w.run_until(T0 + 30_000);
        if let Err(e) = w.check_full_mesh() {
            panic!("seed {seed}, n {n}: {e}\n{}", w.log.join("\n"));
        }
        check_invites(&w);
        // One invite per pair: nobody needed a retry.
        let pairs = n * (n - 1) / 2;
        assert_eq!(w.invites.len(), pairs, "seed {seed}: invites");
        // Setup costs exactly invite + answer + select_answer per pair.
        let total: u64 = w.sent.values().sum();
        assert_eq!(
            total,
            3 * pairs as u64,
            "seed {seed}: to-device messages {:?}",
            w.sent
        );
    }
}

#[test]
fn a_rejoin_is_called_again() {
    for seed in 0..150u64 {
        let n = 2 + (seed % 7) as usize;
        let users = users_for(seed, n);
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let mut w = World::new(seed, &users, Faults::default());
        join_all(&mut w, seed);
        w.run_until(T0 + 20_000);
        w.check_full_mesh()
            .unwrap_or_else(|e| panic!("seed {seed} before: {e}"));
        let who = (seed as usize * 7 + 1) % n;
        let old_session = w.nodes[who].call.session_id().map(str::to_owned);
        w.command_at(T0 + 20_100, who, Command::Leave);
        w.command_at(
            T0 + 21_000,
            who,
            Command::Join {
                create: None,
                audio: true,
                video: true,
            },
        );
        w.run_until(T0 + 45_000);
        // One session per process run (MSC3401: per client load), kept
        // across a leave and a rejoin.
        assert_eq!(
            w.nodes[who].call.session_id().map(str::to_owned),
            old_session
        );
        if let Err(e) = w.check_full_mesh() {
            panic!(
                "seed {seed}, n {n}, rejoined node{who}: {e}\n{}",
                w.log.join("\n")
            );
        }
        check_invites(&w);
        // Every designated caller of `who` called its new session.
        let key = w.nodes[who].key.clone();
        for (i, node) in w.nodes.iter().enumerate() {
            if i != who && should_call(&node.key, &key) {
                assert!(
                    w.invites
                        .iter()
                        .any(|inv| inv.from == node.key && inv.to == key && inv.at >= T0 + 21_000),
                    "seed {seed}: node{i} did not re-call node{who}"
                );
            }
        }
    }
}

#[test]
fn session_change_without_leaving_is_called_again() {
    // A crash and restart: the member event is overwritten with a new
    // session without a leave in between, and no hangup is sent.
    for seed in 0..100u64 {
        let n = 2 + (seed % 5) as usize;
        let users = users_for(seed, n);
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let mut w = World::new(seed, &users, Faults::default());
        join_all(&mut w, seed);
        w.run_until(T0 + 20_000);
        let who = n - 1;
        // Replace the node by a fresh instance of the same device.
        w.restart_node(who);
        w.command_at(
            T0 + 20_500,
            who,
            Command::Join {
                create: None,
                audio: true,
                video: true,
            },
        );
        w.run_until(T0 + 50_000);
        if let Err(e) = w.check_full_mesh() {
            panic!(
                "seed {seed}, n {n}, restarted node{who}: {e}\n{}",
                w.log.join("\n")
            );
        }
        check_invites(&w);
    }
}

#[test]
fn mesh_forms_with_lost_messages() {
    // Drops are not part of the core's contract (the driver retries sends),
    // but the retry and gap rules must still converge.
    let mut ok = 0;
    for seed in 0..100u64 {
        let n = 2 + (seed % 4) as usize;
        let users = users_for(seed, n);
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let faults = Faults {
            max_delay: 300,
            dup_percent: 5,
            drop_percent: 5,
        };
        let mut w = World::new(seed, &users, faults);
        join_all(&mut w, seed);
        w.run_until(T0 + 90_000);
        check_invites(&w);
        if w.check_full_mesh().is_ok() {
            ok += 1;
        }
    }
    assert!(ok >= 97, "only {ok}/100 meshes formed with 5% loss");
}

/// Setup time of a mesh of 4 under heavy loss (36 % of to-device messages
/// dropped, about 20 % on each of the sender's and receiver's side), 15 %
/// duplicated, delays up to 1.5 s: time from the first join until every
/// pair is connected, over 200 seeds. Prints the distribution; every seed
/// must converge. `max_retries` is the MSC's retry count to use.
fn setup_times_under_heavy_loss(max_retries: u32) -> Vec<u64> {
    let users = ["@a:sim", "@b:sim", "@c:sim", "@d:sim"];
    let faults = || Faults {
        max_delay: 1500,
        dup_percent: 15,
        drop_percent: 36,
    };
    let mut times = Vec::new();
    for seed in 0..200u64 {
        let mut w = World::with_config(seed, &users, faults(), |c| c.max_retries = max_retries);
        join_all(&mut w, seed);
        let mut t = T0 + 2_600;
        loop {
            w.run_until(t);
            if w.check_full_mesh().is_ok() {
                times.push(t - T0);
                break;
            }
            assert!(t < T0 + 600_000, "seed {seed}: no full mesh in 10 min");
            t += 100;
        }
    }
    times.sort_unstable();
    let pct = |p: usize| times[(times.len() - 1) * p / 100];
    eprintln!(
        "FIGURE heavy loss, mesh of 4, 200 seeds (max_retries {max_retries}): full mesh after p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        pct(50),
        pct(90),
        pct(99),
        times[times.len() - 1]
    );
    times
}

/// Sending the same invite again (same seq) recovers a lost message about
/// as fast as placing a new call every 5 s did. The core before this change
/// (new call after 5 s without an answer, retries unbounded for the
/// comparison) measured p50 22.6 s, p90 39.8 s, p99 58.2 s, max 74.4 s on
/// these seeds; with the default 3 retries it gave up on some pairs for good.
/// The bounds allow 10 % over those figures.
#[test]
fn a_mesh_forms_under_heavy_loss_about_as_fast_as_with_new_calls() {
    let times = setup_times_under_heavy_loss(3);
    let pct = |p: usize| times[(times.len() - 1) * p / 100];
    assert!(pct(50) <= 25_000, "p50 {} ms", pct(50));
    assert!(pct(90) <= 44_000, "p90 {} ms", pct(90));
}
