//! Integration tests: these start real Synapse processes (installing
//! Synapse into the cache on first use).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use groupcall_synapse::{InstallPolicy, Synapse, SynapseError, SynapseOptions};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "groupcall_synapse=info".into()),
        )
        .with_test_writer()
        .try_init();
}

async fn get_json(url: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let client = reqwest::Client::new();
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn start_register_two_users_stop() {
    init_tracing();
    let t0 = Instant::now();
    let mut hs = Synapse::start(SynapseOptions::default()).await.unwrap();
    eprintln!("started in {:?} at {}", t0.elapsed(), hs.base_url());
    assert!(hs.is_running());

    let (status, versions) =
        get_json(&format!("{}/_matrix/client/versions", hs.base_url()), None).await;
    assert_eq!(status, 200);
    assert_eq!(versions["unstable_features"]["org.matrix.msc4140"], true);

    let alice = hs.register_user("alice", "alice-pw").await.unwrap();
    let bob = hs.register_user("bob", "bob-pw").await.unwrap();
    assert_eq!(alice.user_id, "@alice:localhost");
    assert_eq!(bob.user_id, "@bob:localhost");
    assert_ne!(alice.access_token, bob.access_token);
    assert_eq!(alice.homeserver_url, hs.base_url());

    // Registering the same name twice is a clear error.
    match hs.register_user("alice", "x").await {
        Err(SynapseError::Register { status, body, .. }) => {
            assert_eq!(status, 400);
            assert!(body.contains("M_USER_IN_USE"), "{body}");
        }
        other => panic!("expected Register error, got {other:?}"),
    }

    let pid = hs.pid().unwrap();
    let t1 = Instant::now();
    hs.stop().await.unwrap();
    eprintln!("stopped in {:?}", t1.elapsed());
    assert!(!hs.is_running());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    // Stopping twice is fine.
    hs.stop().await.unwrap();
}

#[tokio::test]
async fn restart_keeps_data_and_port() {
    init_tracing();
    let mut hs = Synapse::start(SynapseOptions::default()).await.unwrap();
    let port = hs.port();
    let alice = hs.register_user("carol", "carol-pw").await.unwrap();

    let t0 = Instant::now();
    hs.restart().await.unwrap();
    eprintln!("restarted in {:?}", t0.elapsed());
    assert_eq!(hs.port(), port);

    // The old access token still works: same database.
    let (status, whoami) = get_json(
        &format!("{}/_matrix/client/v3/account/whoami", hs.base_url()),
        Some(&alice.access_token),
    )
    .await;
    assert_eq!(status, 200, "{whoami}");
    assert_eq!(whoami["user_id"], "@carol:localhost");
    hs.register_user("dave", "dave-pw").await.unwrap();

    // Restart from a stopped state works too (homeserver outage tests).
    hs.stop().await.unwrap();
    let down = reqwest::Client::new()
        .get(format!("{}/_matrix/client/versions", hs.base_url()))
        .send()
        .await;
    assert!(down.is_err(), "server should be down");
    hs.restart().await.unwrap();
    hs.register_user("erin", "erin-pw").await.unwrap();
}

#[tokio::test]
async fn busy_fixed_port_is_reported() {
    init_tracing();
    let blocker = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = blocker.local_addr().unwrap().port();
    let err = Synapse::start(SynapseOptions {
        port: Some(port),
        ..SynapseOptions::default()
    })
    .await
    .unwrap_err();
    match err {
        SynapseError::PortBusy { port: p } => assert_eq!(p, port),
        other => panic!("expected PortBusy, got {other:?}"),
    }
    assert!(err_text(port).contains("busy"));
}

fn err_text(port: u16) -> String {
    SynapseError::PortBusy { port }.to_string()
}

#[tokio::test]
async fn fixed_free_port_is_used() {
    init_tracing();
    let port = {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let hs = Synapse::start(SynapseOptions {
        port: Some(port),
        ..SynapseOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(hs.base_url(), format!("http://127.0.0.1:{port}"));
    let data = hs.data_dir().to_owned();
    let pid = hs.pid().unwrap();
    drop(hs);
    // Drop kills the process and removes the temporary data directory.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!data.exists());
}

#[tokio::test]
async fn offline_without_install_is_a_clear_error() {
    init_tracing();
    let empty = tempfile::tempdir().unwrap();
    let err = Synapse::start(SynapseOptions {
        cache_dir: Some(empty.path().to_owned()),
        install: InstallPolicy::Refuse,
        ..SynapseOptions::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, SynapseError::NotInstalled { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("not installed"), "{text}");
}

#[tokio::test]
async fn missing_python_is_a_clear_error() {
    init_tracing();
    let empty = tempfile::tempdir().unwrap();
    let err = Synapse::start(SynapseOptions {
        cache_dir: Some(empty.path().to_owned()),
        install: InstallPolicy::Allow,
        python: Some("/nonexistent/python3".to_owned()),
        ..SynapseOptions::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, SynapseError::PythonMissing { .. }), "{err:?}");
}
