//! Integration tests of the local test federation: real Synapse processes
//! federating on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use groupcall_synapse::{Federation, FederationOptions, RegisteredUser, SynapseError};
use serde_json::{Value, json};

/// The tests start 2-3 Synapses each on a 2-core machine: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "groupcall_synapse=info".into()),
        )
        .with_test_writer()
        .try_init();
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn call(
    method: reqwest::Method,
    user: &RegisteredUser,
    path: &str,
    body: Option<Value>,
) -> Value {
    let url = format!("{}/_matrix/client/v3/{path}", user.homeserver_url);
    let mut req = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(&user.access_token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{url}: {status} {v}");
    v
}

/// A user's sync position.
struct Syncer {
    user: RegisteredUser,
    since: Option<String>,
}

impl Syncer {
    async fn new(user: &RegisteredUser) -> Syncer {
        let mut s = Syncer {
            user: user.clone(),
            since: None,
        };
        s.sync(0).await;
        s
    }

    async fn sync(&mut self, timeout_ms: u64) -> Value {
        let mut path = format!("sync?timeout={timeout_ms}");
        if let Some(since) = &self.since {
            path.push_str(&format!("&since={}", enc(since)));
        }
        let v = call(reqwest::Method::GET, &self.user, &path, None).await;
        self.since = v["next_batch"].as_str().map(str::to_owned);
        v
    }

    /// Syncs until `found` picks something out of a response; the time it
    /// took.
    async fn until(&mut self, what: &str, found: impl Fn(&Value) -> bool) -> Duration {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            let v = self.sync(2000).await;
            if found(&v) {
                return t0.elapsed();
            }
        }
        panic!("{} did not receive {what} within 30 s", self.user.user_id);
    }
}

fn has_message(v: &Value, room: &str, body: &str) -> bool {
    v["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .is_some_and(|evs| {
            evs.iter()
                .any(|e| e["type"] == "m.room.message" && e["content"]["body"] == body)
        })
}

fn has_to_device(v: &Value, sender: &str, nonce: &str) -> bool {
    v["to_device"]["events"].as_array().is_some_and(|evs| {
        evs.iter().any(|e| {
            e["type"] == "org.groupcall.test"
                && e["sender"] == sender
                && e["content"]["nonce"] == nonce
        })
    })
}

async fn send_message(from: &RegisteredUser, room: &str, body: &str) {
    call(
        reqwest::Method::PUT,
        from,
        &format!("rooms/{}/send/m.room.message/{}", enc(room), enc(body)),
        Some(json!({ "msgtype": "m.text", "body": body })),
    )
    .await;
}

async fn send_to_device(from: &RegisteredUser, to: &RegisteredUser, nonce: &str) {
    call(
        reqwest::Method::PUT,
        from,
        &format!("sendToDevice/org.groupcall.test/{}", enc(nonce)),
        Some(json!({ "messages": { &to.user_id: { &to.device_id: { "nonce": nonce } } } })),
    )
    .await;
}

/// Message and to-device event from `a` to `b` and back; the four
/// delivery times.
async fn both_ways(
    room: &str,
    a: &RegisteredUser,
    sa: &mut Syncer,
    b: &RegisteredUser,
    sb: &mut Syncer,
    tag: &str,
) -> [Duration; 4] {
    let m1 = format!("{tag} from a");
    send_message(a, room, &m1).await;
    let d1 = sb.until(&m1, |v| has_message(v, room, &m1)).await;
    let m2 = format!("{tag} from b");
    send_message(b, room, &m2).await;
    let d2 = sa.until(&m2, |v| has_message(v, room, &m2)).await;
    let n1 = format!("{tag}-td-a");
    send_to_device(a, b, &n1).await;
    let d3 = sb.until(&n1, |v| has_to_device(v, &a.user_id, &n1)).await;
    let n2 = format!("{tag}-td-b");
    send_to_device(b, a, &n2).await;
    let d4 = sa.until(&n2, |v| has_to_device(v, &b.user_id, &n2)).await;
    [d1, d2, d3, d4]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_federate_messages_and_to_device_both_ways_restart_and_shutdown() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let t0 = Instant::now();
    let mut fed = Federation::start(FederationOptions::default())
        .await
        .unwrap();
    eprintln!("FIGURE federation: 2 homeservers up in {:?}", t0.elapsed());
    assert_eq!(fed.len(), 2);
    let names: Vec<String> = fed
        .servers()
        .iter()
        .map(|s| s.server_name().to_owned())
        .collect();
    assert_ne!(names[0], names[1]);
    for (s, n) in fed.servers().iter().zip(&names) {
        assert_eq!(
            n,
            &format!("127.0.0.1:{}", s.federation().unwrap().port),
            "server name is the federation address"
        );
    }
    let alice = fed.server(0).register_user("alice", "pw").await.unwrap();
    let bob = fed.server(1).register_user("bob", "pw").await.unwrap();
    assert_eq!(alice.user_id, format!("@alice:{}", names[0]));
    assert_eq!(bob.user_id, format!("@bob:{}", names[1]));

    let t1 = Instant::now();
    let room = fed
        .shared_room(&alice, std::slice::from_ref(&bob), serde_json::Map::new())
        .await
        .unwrap();
    eprintln!(
        "FIGURE federation: room shared (create, invite, remote join) in {:?}",
        t1.elapsed()
    );

    let mut sa = Syncer::new(&alice).await;
    let mut sb = Syncer::new(&bob).await;
    let d = both_ways(&room, &alice, &mut sa, &bob, &mut sb, "hello").await;
    eprintln!(
        "FIGURE federation: message 0->1 {:?}, 1->0 {:?}; to-device 0->1 {:?}, 1->0 {:?}",
        d[0], d[1], d[2], d[3]
    );

    // An outage of server 1 and its return: with the short retry settings
    // both directions work again promptly.
    let old_pid = fed.server(1).pid().unwrap();
    fed.stop_server(1).await.unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{old_pid}")).exists());
    // Server 0 tries to reach it while it is down (backs off).
    send_message(&alice, &room, "while down").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t2 = Instant::now();
    fed.restart_server(1).await.unwrap();
    eprintln!(
        "FIGURE federation: server 1 restarted in {:?}",
        t2.elapsed()
    );
    assert_eq!(fed.server(1).server_name(), names[1]);
    let t3 = Instant::now();
    sb.until("the message sent while it was down", |v| {
        has_message(v, &room, "while down")
    })
    .await;
    let d = both_ways(&room, &alice, &mut sa, &bob, &mut sb, "again").await;
    eprintln!(
        "FIGURE federation: after the restart, the held message in {:?}; then message 0->1 {:?}, 1->0 {:?}; to-device 0->1 {:?}, 1->0 {:?}",
        t3.elapsed(),
        d[0],
        d[1],
        d[2],
        d[3]
    );

    // Bad indices are errors, not panics.
    assert!(matches!(
        fed.stop_server(7).await,
        Err(SynapseError::InvalidOption(_))
    ));

    let pids = fed.pids();
    assert_eq!(pids.len(), 2);
    drop(fed);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left running"
        );
    }
}

#[tokio::test]
async fn bad_options_are_clear_errors() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let err = Federation::start(FederationOptions {
        servers: 0,
        ..FederationOptions::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("servers = 0"), "{err}");
    let mut o = FederationOptions::default();
    o.retry.max_interval = Duration::from_millis(1);
    let err = Federation::start(o).await.unwrap_err();
    assert!(err.to_string().contains("min_interval"), "{err}");

    // A server that cannot start: the error says why, with its log tail.
    let mut o = FederationOptions::default();
    o.base.extra_config.insert(
        "federation".into(),
        json!({ "client_timeout": "not a duration" }),
    );
    let err = Federation::start(o).await.unwrap_err();
    match &err {
        SynapseError::Exited { log_tail, .. } => {
            assert!(log_tail.contains("client_timeout"), "{log_tail}")
        }
        other => panic!("expected Exited with a log tail, got {other:?}"),
    }
    eprintln!("a failing server is reported as: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_one_room() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let t0 = Instant::now();
    let fed = Federation::start(FederationOptions {
        servers: 3,
        ..FederationOptions::default()
    })
    .await
    .unwrap();
    eprintln!("FIGURE federation: 3 homeservers up in {:?}", t0.elapsed());
    let mut users = Vec::new();
    for (i, n) in ["ann", "ben", "cid"].iter().enumerate() {
        users.push(fed.server(i).register_user(n, "pw").await.unwrap());
    }
    let t1 = Instant::now();
    let room = fed
        .shared_room(&users[0], &users[1..], serde_json::Map::new())
        .await
        .unwrap();
    eprintln!(
        "FIGURE federation: room shared by 3 servers in {:?}",
        t1.elapsed()
    );
    let mut syncers = Vec::new();
    for u in &users {
        syncers.push(Syncer::new(u).await);
    }
    // A message from the third server reaches both others; a to-device
    // event goes from the first to the third and back.
    send_message(&users[2], &room, "from cid").await;
    for s in &mut syncers[..2] {
        let d = s
            .until("cid's message", |v| has_message(v, &room, "from cid"))
            .await;
        eprintln!(
            "FIGURE federation: server 2 -> {} message {d:?}",
            s.user.user_id
        );
    }
    let (first, rest) = syncers.split_at_mut(1);
    let d = both_ways(
        &room,
        &users[0],
        &mut first[0],
        &users[2],
        &mut rest[1],
        "ac",
    )
    .await;
    eprintln!(
        "FIGURE federation: servers 0<->2: message {:?} / {:?}, to-device {:?} / {:?}",
        d[0], d[1], d[2], d[3]
    );
    let pids = fed.pids();
    assert_eq!(pids.len(), 3);
    drop(fed);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left running"
        );
    }
}
