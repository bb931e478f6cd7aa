//! `groupcall bench focus` at a low rate, both systems in one run: the load
//! generator (a separate process of real DTLS-SRTP peers) publishes through
//! groupcall's focus (a `groupcall focus` process on a local Synapse, the
//! load peers Matrix devices calling it) and through Janus VideoRoom to
//! subscribers; every packet sent reaches every subscriber (no loss below
//! capacity), the egress rate is publishers x subscribers x the packet
//! rate, latency is measured, the ratio is printed, and nothing is left
//! running. Two scenarios: 2 publishers x 3 subscribers, and 3 participants
//! all to all (audio, one with video).
//!
//! Needs Debian's `janus` (`scripts/setup-system` installs it).
//!
//! Run: `cargo test -p groupcall-cli --test bench_focus -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_groupcall");

/// Processes whose command line contains `needle`.
fn running(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(cmd);
            }
        }
    }
    found
}

#[test]
fn both_systems_forward_every_packet_at_a_low_rate_and_are_stopped() {
    assert!(
        std::path::Path::new("/usr/bin/janus").exists(),
        "this test needs Debian's janus (scripts/setup-system installs it)"
    );
    let out = Command::new(BIN)
        .args([
            "bench",
            "focus",
            "--scenarios",
            "2x3,3a1v",
            "--window",
            "3",
            "--start-pps",
            "100",
            "--max-pps",
            "100",
            "--json",
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}{stdout}");
    assert!(out.status.success(), "bench focus failed:\n{stderr}");
    let objects: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    // 2 publishers x 3 subscribers: 6 x (100 video + 50 audio) packets/s;
    // 3 all to all, one with video: 3 x 2 x 50 audio + 1 x 2 x 100 video.
    for (scenario, expected) in [("2x3", 900.0), ("3a1v", 500.0)] {
        let json = objects
            .iter()
            .find(|o| o["scenario"] == scenario)
            .unwrap_or_else(|| panic!("no JSON object for {scenario} in:\n{stdout}"));
        for system in ["groupcall", "janus"] {
            let steps = json[format!("{system}_steps")].as_array().unwrap();
            // The ramp's one step.
            assert_eq!(steps.len(), 1, "{json}");
            let s = &steps[0];
            let egress = s["egress_pps"].as_f64().unwrap();
            assert!(
                (egress - expected).abs() / expected < 0.1,
                "{scenario} {system}: egress {egress} packets/s, expected about {expected}"
            );
            assert_eq!(s["loss"].as_f64(), Some(0.0), "{scenario} {system}: {s}");
            let p50 = s["p50_us"].as_u64().unwrap();
            assert!(p50 > 0 && p50 < 50_000, "{scenario} {system}: p50 {p50} µs");
            println!(
                "FIGURE bench_focus: {system} {scenario} at 100 video packets/s per publisher: egress {egress:.0} packets/s (expected {expected}), loss 0, latency p50 {p50} µs p99 {} µs",
                s["p99_us"]
            );
        }
        assert!(json["ratio"].as_f64().is_some_and(|r| r > 0.0), "{json}");
    }
    // Janus, the focus and the load generator are gone.
    let left: Vec<String> = running("groupcall-janus-")
        .into_iter()
        .chain(running("bench loadgen"))
        .chain(running("groupcall-bench-focus-"))
        .collect();
    assert!(left.is_empty(), "still running: {left:?}");
}
