//! `groupcall focus`: a bad configuration is one clear error line (exit 1);
//! against a real Synapse, the binary serves /health and drains on SIGTERM,
//! exiting 0 after the grace period.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use groupcall_testkit::synapse::{Synapse, SynapseOptions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_groupcall");

/// Runs `groupcall focus --config PATH` to its end: exit code and stderr.
async fn run_focus(config: &std::path::Path) -> (Option<i32>, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(BIN)
            .args(["focus", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .output(),
    )
    .await
    .expect("exits within 30 s")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("error:")).collect()
}

#[tokio::test]
async fn bad_configuration_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let (code, stderr) = run_focus(&missing).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        error_lines(&stderr),
        [format!(
            "error: {}: cannot read the configuration: No such file or directory (os error 2)",
            missing.display()
        )],
        "{stderr}"
    );

    let bad = dir.path().join("focus.toml");
    std::fs::write(
        &bad,
        "homeserver = \"http://127.0.0.1:1\"\nuser = \"focus\"\npassword = \"x\"\n",
    )
    .unwrap();
    let (code, stderr) = run_focus(&bad).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        error_lines(&stderr),
        [format!(
            "error: {}: password: passwords do not go into the configuration: use password_file \
             or password_env",
            bad.display()
        )],
        "{stderr}"
    );

    std::fs::write(&bad, "homeserver = \n").unwrap();
    let (code, stderr) = run_focus(&bad).await;
    assert_eq!(code, Some(1), "{stderr}");
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with(&format!("error: {}: line 1: not valid TOML", bad.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()))
}

#[tokio::test]
async fn the_binary_drains_on_sigterm_and_exits_0() {
    let _serial = groupcall_testkit::serial().await;
    let synapse = Synapse::start(SynapseOptions::default())
        .await
        .expect("synapse");
    let user = synapse.register_user("focus", "focus-pw").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("focus.toml");
    std::fs::write(
        &config,
        format!(
            r#"homeserver = "{hs}"
user = "{user}"
password_env = "FOCUS_TEST_PASSWORD"
data_dir = "data"
allow = ["localhost"]
http_listen = "{addr}"
[media]
bind = ["127.0.0.1:0"]
[drain]
grace_period = "1500ms"
"#,
            hs = synapse.base_url(),
            user = user.user_id,
        ),
    )
    .unwrap();
    let (mut child, log) = start_healthy(&config, &addr).await;
    let pid = Pid::from_raw(child.id().unwrap() as i32);
    let sent = Instant::now();
    kill(pid, Signal::SIGTERM).unwrap();
    let (status, body) = loop {
        if let Some((status, body)) = get(&addr, "/health").await
            && body.contains("draining")
        {
            break (status, body);
        }
        assert!(sent.elapsed() < Duration::from_secs(1), "never draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200, "{body}");
    let metrics = get(&addr, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains("\ngroupcall_focus_draining 1\n"),
        "{metrics}"
    );

    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits within 15 s")
        .unwrap();
    let took = sent.elapsed();
    let log = log.await.unwrap();
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(6),
        "exited {took:?} after SIGTERM (grace 1.5 s)\n{log}"
    );
    for step in [
        "focus: started",
        "focus: synced with the homeserver",
        "draining",
        "focus: grace period over",
        "focus: stopped",
    ] {
        assert!(log.contains(step), "`{step}` not logged:\n{log}");
    }
    assert!(error_lines(&log).is_empty(), "{log}");

    // Again (the stored device), and a second signal during the drain
    // stops it at once with exit code 1.
    let (mut child, log) = start_healthy(&config, &addr).await;
    let pid = Pid::from_raw(child.id().unwrap() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    let sent = Instant::now();
    while !get(&addr, "/health")
        .await
        .is_some_and(|(_, body)| body.contains("draining"))
    {
        assert!(sent.elapsed() < Duration::from_secs(1), "never draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(pid, Signal::SIGINT).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits at once")
        .unwrap();
    let took = sent.elapsed();
    let log = log.await.unwrap();
    assert_eq!(exit.code(), Some(1), "{log}");
    assert!(took < Duration::from_millis(1400), "took {took:?}\n{log}");
    assert!(log.contains("reused_device=true"), "{log}");
    assert_eq!(
        error_lines(&log),
        ["error: stopped by a second SIGINT during the drain"],
        "{log}"
    );
}

/// Starts `groupcall focus` and waits until /health says running and
/// synced; returns the child and its stderr (complete once it exits).
async fn start_healthy(
    config: &std::path::Path,
    addr: &str,
) -> (tokio::process::Child, tokio::task::JoinHandle<String>) {
    let mut child = Command::new(BIN)
        .args(["focus", "--config"])
        .arg(config)
        .env("FOCUS_TEST_PASSWORD", "focus-pw")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, body)) = get(addr, "/health").await
            && body.contains("\"state\":\"running\"")
            && body.contains("\"sync_ok\":true")
        {
            return (child, log);
        }
        assert!(Instant::now() < deadline, "the focus never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
