//! A cascade link cut and restored (issue 14): two homeservers of a local
//! test federation, each with its own focus (`groupcall focus`,
//! `cascade = true`) and one groupcall client (`groupcall join --focus`),
//! every process in its own network namespace, so that every packet
//! between two of them goes through the test kit's impairment router
//! (`groupcall_testkit::netns`):
//!
//! ```text
//!   site 0                                   site 1
//!  ns0: focus0 (hs0) <====== link ======>  ns1: focus1 (hs1)
//!        ^                                       ^
//!  ns2: alice (hs0)     (mesh, unused) ---- ns3: bob (hs1)
//!
//!  root: hs0 and hs1 federate on loopback; their client APIs also listen
//!        on the namespaces' gateway address, where everyone reaches them
//! ```
//!
//! The cut is a partition of the router (`Impairment::partition`):
//! {ns0, ns2} lose {ns1, ns3}, as two sites that lose each other. Each
//! client keeps its own focus; nothing crosses between the sites (a client
//! that loses the link tries the mesh with the other site's members, and
//! that path is cut too). The cut lasts longer than the focus's failed
//! timeout (15 s without a packet), so the link does not just resume: it
//! is placed again. After the restore the streams must cross the link
//! again (packets in at both foci, frames at both clients) within 10 s.
//!
//! Needs root, `ip netns` and /dev/net/tun (the session and CI have them).
//!
//! Run: `cargo test -p groupcall-cli --test cascade_netns -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use groupcall_testkit::synapse::{Federation, FederationOptions, SynapseOptions};
use groupcall_testkit::{Proc, netns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

mod common;
use common::{FocusSpec, NsFocus, PW, http_text, in_ns, join_args};

/// How long the link stays cut: longer than the focus's failed timeout
/// (`PeerConfig::failed_timeout`, 15 s), so that the link breaks.
const CUT: Duration = Duration::from_secs(22);
/// The issue's bound: streams across the link again this soon after the
/// restore.
const RESUME_BOUND: Duration = Duration::from_secs(10);

/// The sum of a Prometheus metric's series (`groupcall_focus_NAME`).
async fn metric(http: &str, name: &str) -> f64 {
    let Some(text) = http_text(&format!("http://{http}/metrics")).await else {
        return 0.0;
    };
    let full = format!("groupcall_focus_{name}");
    text.lines()
        .filter(|l| {
            l.strip_prefix(&full)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Frames of `kind` that `p` received from `user` in its `media` events
/// from index `from` on: the sum of the counters' increases, per stream
/// and m-line (a stream forwarded again after the link came back arrives
/// on a new m-line and counts from 0; the old one still reports its
/// stalled total).
fn frames_since(p: &Proc, from: usize, user: &str, kind: &str) -> u64 {
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0;
    for v in p.seen.iter().skip(from) {
        if v["event"] != "media" || v["user_id"] != user || v["kind"] != kind {
            continue;
        }
        let (Some(stream), Some(mid), Some(frames)) = (
            v["stream_id"].as_str(),
            v["mid"].as_str(),
            v["frames"].as_u64(),
        ) else {
            continue;
        };
        if let Some(prev) = last.insert(format!("{stream} {mid}"), frames) {
            total += frames.saturating_sub(prev);
        }
    }
    total
}

fn poll_all(procs: &mut [&mut Proc]) {
    for p in procs.iter_mut() {
        p.poll();
    }
}

/// Polls `procs` until `done` holds (Some: how long it took) or `limit`
/// has passed (None).
async fn until(
    procs: &mut [&mut Proc],
    limit: Duration,
    mut done: impl FnMut(&[&mut Proc]) -> bool,
) -> Option<Duration> {
    let t = Instant::now();
    loop {
        poll_all(procs);
        if done(procs) {
            return Some(t.elapsed());
        }
        if t.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_cascade_link_is_placed_again_and_streams_resume() {
    let net = netns::Net::create(4).await.unwrap_or_else(|e| {
        panic!(
            "this test needs root, `ip netns` and /dev/net/tun (the session and CI have them): \
             cannot create network namespaces here: {e}"
        )
    });
    let gateway: IpAddr = net.gateway().into();
    let mut fed = Federation::start(FederationOptions {
        servers: 2,
        base: SynapseOptions {
            extra_client_addresses: vec![gateway],
            ..SynapseOptions::default()
        },
        ..FederationOptions::default()
    })
    .await
    .expect("a test federation of 2 homeservers");
    let alice = fed.server(0).register_user("alice", PW).await.unwrap();
    let focus0 = fed.server(0).register_user("focus0", PW).await.unwrap();
    let bob = fed.server(1).register_user("bob", PW).await.unwrap();
    let focus1 = fed.server(1).register_user("focus1", PW).await.unwrap();
    let mut extra = serde_json::Map::new();
    extra.insert(
        "invite".into(),
        json!([bob.user_id, focus0.user_id, focus1.user_id]),
    );
    extra.insert(
        "power_level_content_override".into(),
        json!({ "events": {
            "org.matrix.msc3401.call": 0,
            "org.matrix.msc3401.call.member": 0,
        } }),
    );
    let room = fed
        .shared_room(&alice, std::slice::from_ref(&bob), extra)
        .await
        .expect("a room of alice (hs0) and bob (hs1)");

    let dirs = tempfile::tempdir().unwrap();
    let mut f0 = NsFocus::start(
        &net,
        0,
        &dirs.path().join("focus0"),
        FocusSpec {
            hs: &fed.server(0).base_url_on(gateway),
            user: &focus0.user_id,
            allow: &alice.user_id,
            top: "cascade = true",
            media: "",
            grace: "1s",
        },
    )
    .await;
    let mut f1 = NsFocus::start(
        &net,
        1,
        &dirs.path().join("focus1"),
        FocusSpec {
            hs: &fed.server(1).base_url_on(gateway),
            user: &focus1.user_id,
            allow: &alice.user_id,
            top: "cascade = true",
            media: "",
            grace: "1s",
        },
    )
    .await;

    // The clients, in their namespaces.
    let client = |name: &str, i: usize, hs: &str, focus: &str, create: bool| {
        let addr = net.addr(i).to_string();
        let mut extra = vec!["--focus", focus, "--bind", &addr];
        if create {
            extra.push("--create-call");
        }
        let args = join_args(hs, name, &room, &dirs.path().join(name), &extra);
        Proc::spawn_cmd(name, in_ns(&net.ns(i), &args), Stdio::null())
    };
    let t_start = Instant::now();
    let mut a = client(
        "alice",
        2,
        &fed.server(0).base_url_on(gateway),
        &f0.focus_ref,
        true,
    );
    a.wait_for(Duration::from_secs(90), |v| v["event"] == "joined")
        .await;
    let mut b = client(
        "bob",
        3,
        &fed.server(1).base_url_on(gateway),
        &f1.focus_ref,
        false,
    );
    b.wait_for(Duration::from_secs(90), |v| v["event"] == "joined")
        .await;
    let (ua, ub) = (alice.user_id.clone(), bob.user_id.clone());

    // Both ways through the link.
    let both_ways = |p: &[&mut Proc], from: (usize, usize), video: u64| {
        frames_since(p[0], from.0, &ub, "video") >= video
            && frames_since(p[0], from.0, &ub, "audio") >= video * 5 / 3
            && frames_since(p[1], from.1, &ua, "video") >= video
            && frames_since(p[1], from.1, &ua, "audio") >= video * 5 / 3
    };
    let setup = until(
        &mut [&mut a, &mut b, &mut f0.proc, &mut f1.proc],
        Duration::from_secs(120),
        |p| both_ways(p, (0, 0), 30),
    )
    .await;
    assert!(
        setup.is_some(),
        "alice and bob never got each other's media over the link\n--- alice: {}\n--- bob: {}\n--- focus0: {}\n--- focus1: {}",
        a.report(),
        b.report(),
        f0.proc.report(),
        f1.proc.report()
    );
    let links_before = (
        metric(&f0.http, "link_streams_out").await,
        metric(&f1.http, "link_streams_out").await,
    );
    println!(
        "FIGURE cascade_netns: alice (hs0, focus0) and bob (hs1, focus1) get each other's audio and video over the link {:.1} s after alice started; streams out over the link: focus0 {}, focus1 {}",
        t_start.elapsed().as_secs_f64(),
        links_before.0,
        links_before.1
    );
    assert!(
        links_before.0 >= 2.0 && links_before.1 >= 2.0,
        "each focus forwards its client's audio and video over the link: {links_before:?}"
    );

    // The cut: site 0 ({ns0, ns2}) loses site 1 ({ns1, ns3}).
    let t_cut = Instant::now();
    net.set(|i| i.partition = 0b0101);
    until(
        &mut [&mut a, &mut b, &mut f0.proc, &mut f1.proc],
        Duration::from_secs(3),
        |_| false,
    )
    .await;
    let mark = (a.seen.len(), b.seen.len());
    until(
        &mut [&mut a, &mut b, &mut f0.proc, &mut f1.proc],
        CUT.saturating_sub(t_cut.elapsed()),
        |_| false,
    )
    .await;
    let through_cut = (
        frames_since(&a, mark.0, &ub, "video"),
        frames_since(&b, mark.1, &ua, "video"),
    );
    let dropped = net.counts.lock().unwrap().dropped;
    println!(
        "FIGURE cascade_netns: link cut for {:.0} s: video frames across it from 3 s after the cut to its end: to alice {}, to bob {}; router dropped {dropped} packets",
        CUT.as_secs_f64(),
        through_cut.0,
        through_cut.1
    );
    assert!(
        through_cut.0 < 5 && through_cut.1 < 5,
        "the cut stops the media across the link: {through_cut:?}; alice's media events from bob since 3 s into the cut: {:?}",
        a.seen
            .iter()
            .skip(mark.0)
            .filter(|v| v["event"] == "media" && v["user_id"] == ub.as_str())
            .collect::<Vec<_>>()
    );

    // The restore: the streams are back when both clients get frames from
    // the other again and both foci get packets over the link.
    net.set(|i| i.partition = 0);
    let mark = (a.seen.len(), b.seen.len());
    // A link placed again counts from 0 (the series of the broken one may
    // be gone): the increase is over the lowest figure since the restore.
    let mut link_low = [f64::MAX; 2];
    let t_restore = Instant::now();
    let mut link_back = None;
    let resumed = loop {
        poll_all(&mut [&mut a, &mut b, &mut f0.proc, &mut f1.proc]);
        if link_back.is_none() {
            let mut up = true;
            for (low, f) in link_low.iter_mut().zip([&f0, &f1]) {
                let now = metric(&f.http, "link_packets_in_total").await;
                *low = low.min(now);
                up &= now >= *low + 100.0;
            }
            if up {
                link_back = Some(t_restore.elapsed());
            }
        }
        if link_back.is_some() && both_ways(&[&mut a, &mut b], mark, 15) {
            break Some(t_restore.elapsed());
        }
        if t_restore.elapsed() > Duration::from_secs(60) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let links_after = (
        metric(&f0.http, "link_streams_out").await,
        metric(&f1.http, "link_streams_out").await,
    );
    println!(
        "FIGURE cascade_netns: after the restore: 100 packets in over the link at both foci within {:?}, and 15 video frames and 25 audio frames each way within {:?} (media events every 1 s: up to 1 s late); streams out over the link: focus0 {}, focus1 {}",
        link_back.map(|d| format!("{:.1} s", d.as_secs_f64())),
        resumed.map(|d| format!("{:.1} s", d.as_secs_f64())),
        links_after.0,
        links_after.1
    );
    let resumed = resumed.unwrap_or_else(|| {
        panic!(
            "the streams never came back across the link\n--- alice: {}\n--- bob: {}\n--- focus0: {}\n--- focus1: {}",
            a.report(),
            b.report(),
            f0.proc.report(),
            f1.proc.report()
        )
    });
    assert!(
        resumed <= RESUME_BOUND,
        "streams back {resumed:?} after the restore (bound {RESUME_BOUND:?})"
    );
    // The link broke and was placed again (not just resumed).
    let placed: usize = [&f0, &f1]
        .iter()
        .map(|f| {
            f.proc
                .stderr
                .lock()
                .unwrap()
                .matches("placing a cascade link")
                .count()
        })
        .sum();
    println!("FIGURE cascade_netns: links placed in all: {placed}");
    assert!(
        placed >= 2,
        "the link was placed again after the cut: {placed} placements\n--- focus0: {}\n--- focus1: {}",
        f0.proc.report(),
        f1.proc.report()
    );
    assert!(
        links_after.0 >= 2.0 && links_after.1 >= 2.0,
        "each focus forwards its client's audio and video over the link again: {links_after:?}"
    );

    // Everyone leaves; the foci drain.
    for p in [&a, &b, &f0.proc, &f1.proc] {
        if let Some(pid) = p.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for p in [&mut a, &mut b] {
        p.wait_for(Duration::from_secs(30), |v| v["event"] == "left")
            .await;
    }
    assert_eq!(f0.proc.finish(Duration::from_secs(30)).await, Some(0));
    assert_eq!(f1.proc.finish(Duration::from_secs(30)).await, Some(0));
    fed.stop().await.unwrap();
    drop(net);
}
