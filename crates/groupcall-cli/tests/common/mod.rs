//! What the tests that run `groupcall` processes in network namespaces
//! share (`netns_join.rs`, `simulcast_netns.rs`, `cascade_netns.rs`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use groupcall_testkit::{Proc, netns};
use serde_json::Value;
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

/// The foci's HTTP port in their namespaces (fresh namespaces: free).
pub const FOCUS_HTTP_PORT: u16 = 18_080;

/// What a test focus.toml says besides its addresses.
#[derive(Clone, Copy)]
pub struct FocusSpec<'a> {
    /// The homeserver, as the focus reaches it.
    pub hs: &'a str,
    /// Its account (password from `FOCUS_TEST_PASSWORD`).
    pub user: &'a str,
    /// Whose invites it accepts.
    pub allow: &'a str,
    /// Further top-level keys (e.g. `cascade = true`).
    pub top: &'a str,
    /// Further `[media]` keys.
    pub media: &'a str,
    /// The drain's grace period (e.g. `1s`).
    pub grace: &'a str,
}

/// A focus.toml in `dir` for `spec`, HTTP on `http`, media on `media_ip`.
pub fn write_focus_config(dir: &Path, spec: FocusSpec, http: &str, media_ip: &str) -> PathBuf {
    let FocusSpec {
        hs,
        user,
        allow,
        top,
        media,
        grace,
    } = spec;
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("focus.toml");
    std::fs::write(
        &config,
        format!(
            r#"homeserver = "{hs}"
user = "{user}"
password_env = "FOCUS_TEST_PASSWORD"
data_dir = "{}"
allow = ["{allow}"]
http_listen = "{http}"
{top}
[media]
bind = ["{media_ip}:0"]
{media}
[drain]
grace_period = "{grace}"
"#,
            dir.join("data").display(),
        ),
    )
    .unwrap();
    config
}

/// GET `url` as text (None on any failure).
pub async fn http_text(url: &str) -> Option<String> {
    let http = reqwest::Client::builder().no_proxy().build().ok()?;
    let r = http
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

/// GET `url` as JSON (None on any failure).
pub async fn http_json(url: &str) -> Option<Value> {
    serde_json::from_str(&http_text(url).await?).ok()
}

/// A `groupcall focus` process in a namespace.
pub struct NsFocus {
    pub proc: Proc,
    /// Its HTTP address (`ADDR:PORT`, reachable from the root namespace).
    pub http: String,
    /// `@user:server/DEVICE`, for `--focus`.
    pub focus_ref: String,
}

impl NsFocus {
    /// `groupcall focus` in namespace `i` of `net` (HTTP on
    /// [`FOCUS_HTTP_PORT`], media on the namespace's address) for `spec`
    /// ([`write_focus_config`], in `dir`); waits until it has joined a
    /// room.
    pub async fn start(net: &netns::Net, i: usize, dir: &Path, spec: FocusSpec<'_>) -> NsFocus {
        let http = format!("{}:{FOCUS_HTTP_PORT}", net.addr(i));
        let addr = net.addr(i).to_string();
        let config = write_focus_config(dir, spec, &http, &addr);
        let mut cmd = in_ns(
            &net.ns(i),
            &[
                "focus".into(),
                "--config".into(),
                config.display().to_string(),
            ],
        );
        cmd.env("FOCUS_TEST_PASSWORD", PW);
        // A debugging knob: the focus's own log filter.
        if let Ok(filter) = std::env::var("GROUPCALL_TEST_FOCUS_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        let mut proc = Proc::spawn_cmd(&format!("focus{i}"), cmd, Stdio::null());
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(h) = http_json(&format!("http://{http}/health")).await
                && h["state"] == "running"
                && h["rooms"].as_u64() >= Some(1)
            {
                let focus_ref = format!(
                    "{}/{}",
                    h["user_id"].as_str().unwrap(),
                    h["device_id"].as_str().unwrap()
                );
                return NsFocus {
                    proc,
                    http,
                    focus_ref,
                };
            }
            proc.poll();
            assert!(
                Instant::now() < deadline,
                "the focus in {} never joined the room: {}",
                net.ns(i),
                proc.report()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
