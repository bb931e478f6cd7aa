//! What the tests that run `groupcall` processes in network namespaces
//! share (`netns_join.rs`, `simulcast_netns.rs`).

#![allow(dead_code)]

use std::path::Path;

use groupcall_testkit::Proc;
use tokio::process::Command;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_groupcall");
/// Every test account's password.
pub const PW: &str = "secret-pw";

/// `groupcall ARGS` in namespace `ns`, with default logging (`info` for
/// groupcall's crates) whatever the test's environment says.
pub fn in_ns(ns: &str, args: &[String]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, BIN])
        .args(args)
        .env_remove("RUST_LOG");
    cmd
}

/// Most frames of `kind` that `p` reported received from `user`.
pub fn frames_from(p: &Proc, user: &str, kind: &str) -> u64 {
    p.seen
        .iter()
        .filter(|v| v["event"] == "media" && v["user_id"] == user && v["kind"] == kind)
        .filter_map(|v| v["frames"].as_u64())
        .max()
        .unwrap_or(0)
}

/// `join --json` arguments for `user` in `room` on `hs`, data in `dir`,
/// then `extra`.
pub fn join_args(hs: &str, user: &str, room: &str, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "join",
        "--homeserver",
        hs,
        "--user",
        user,
        "--password",
        PW,
        "--room",
        room,
        "--json",
        "--data-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(dir.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Creates a public room named `name` (as the owner of `token`) where
/// everyone may send call state, inviting `invite`; its room id.
pub async fn create_call_room(hs: &str, token: &str, name: &str, invite: &[&str]) -> String {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = http
        .post(format!("{hs}/_matrix/client/v3/createRoom"))
        .bearer_auth(token)
        .json(&serde_json::json!({
            "preset": "public_chat",
            "name": name,
            "invite": invite,
            "power_level_content_override": { "events": {
                "org.matrix.msc3401.call": 0,
                "org.matrix.msc3401.call.member": 0,
            } },
        }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    resp.json::<serde_json::Value>().await.unwrap()["room_id"]
        .as_str()
        .unwrap()
        .to_owned()
}
