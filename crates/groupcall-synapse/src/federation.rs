//! A local test federation: several [`Synapse`] homeservers on loopback
//! that federate with each other.
//!
//! Each server is named by its IP literal and federation port
//! (`127.0.0.1:41234`, so user ids are `@alice:127.0.0.1:41234`: no DNS, no
//! `.well-known`), serves the client API on plain HTTP on another port and
//! the federation and key APIs over TLS on its federation port, with one
//! throwaway self-signed certificate made by `openssl` for the federation.
//! The settings that differ from a production server, for this test
//! federation only:
//! - `federation_verify_certificates: false` (the certificate is
//!   self-signed) and `trusted_key_servers: []` (servers fetch each other's
//!   signing keys directly);
//! - `ip_range_blacklist`: Synapse's default list without the loopback
//!   ranges (`127.0.0.0/8`, `::1/128`), which also go into
//!   `ip_range_whitelist`: outbound federation requests to loopback are
//!   allowed (Synapse blocks private ranges by default, and checks
//!   IP-literal server names against the block list alone); every other
//!   private range stays blocked. The servers bind loopback only;
//! - `federation_domain_whitelist`: exactly the servers of the federation
//!   (with their ports), so they talk to no one else;
//! - `federation` retry intervals short ([`FederationRetry`]), so that a
//!   server that was stopped and restarted is retried within seconds
//!   instead of Synapse's default 10 minutes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), groupcall_synapse::SynapseError> {
//! use groupcall_synapse::{Federation, FederationOptions};
//! let mut fed = Federation::start(FederationOptions::default()).await?;
//! let alice = fed.server(0).register_user("alice", "pw").await?;
//! let bob = fed.server(1).register_user("bob", "pw").await?;
//! let room = fed.shared_room(&alice, &[bob], serde_json::Map::new()).await?;
//! println!("{room}: {} and {}", fed.server(0).server_name(), fed.server(1).server_name());
//! fed.stop_server(1).await?; // an outage ...
//! fed.restart_server(1).await?; // ... and the return
//! fed.stop().await?;
//! # Ok(()) }
//! ```

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::{RegisteredUser, Synapse, SynapseError, SynapseOptions};

/// The address ranges a test federation may reach: loopback.
const LOOPBACK_RANGES: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// Synapse's default `ip_range_blacklist` (synapse/config/server.py,
/// `DEFAULT_IP_RANGE_BLOCKLIST`, 1.163): a test federation keeps all of it
/// but [`LOOPBACK_RANGES`].
const DEFAULT_IP_RANGE_BLOCKLIST: [&str; 21] = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
    "0.0.0.0/32",
    "::/128",
];

/// The most servers [`Federation::start`] starts (each is a Python process
/// of about 100 MB).
pub const MAX_SERVERS: usize = 6;

/// Synapse's federation retry settings (its `federation:` config section).
///
/// Synapse backs off from a destination that failed: first for
/// `min_interval`, multiplied by `multiplier` on each further failure, at
/// most `max_interval`. Its defaults (10 min, x2, 7 days) would keep a
/// restarted test server cut off for the rest of a test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FederationRetry {
    /// `destination_min_retry_interval`.
    pub min_interval: Duration,
    /// `destination_max_retry_interval`; also `max_long_retry_delay`, the
    /// longest wait between retries of one request.
    pub max_interval: Duration,
    /// `destination_retry_multiplier`.
    pub multiplier: u32,
    /// `client_timeout`: how long one outbound federation request may take.
    pub request_timeout: Duration,
}

impl Default for FederationRetry {
    /// 500 ms, x2, at most 2 s; requests time out after 10 s.
    fn default() -> Self {
        FederationRetry {
            min_interval: Duration::from_millis(500),
            max_interval: Duration::from_secs(2),
            multiplier: 2,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The federation side of one server of a test federation (see
/// [`SynapseOptions::federation`]).
#[derive(Debug, Clone)]
pub struct FederationListener {
    /// The federation (and key) listener's port: TLS, on the bind address.
    pub port: u16,
    /// PEM certificate of the federation listener.
    pub tls_certificate: PathBuf,
    /// PEM private key of the federation listener.
    pub tls_private_key: PathBuf,
    /// Server names this server may federate with (its own included).
    pub peers: Vec<String>,
    /// Retry settings.
    pub retry: FederationRetry,
}

/// How to start a [`Federation`].
#[derive(Debug, Clone)]
pub struct FederationOptions {
    /// Number of homeservers (1 to [`MAX_SERVERS`]; default 2).
    pub servers: usize,
    /// Template for every server: cache, install policy, Python, timeouts,
    /// bind address and extra config are used; `port`, `server_name`,
    /// `data_dir` and `federation` are set per server (fresh temporary data
    /// directories; `GROUPCALL_SYNAPSE_KEEP=1` keeps them).
    pub base: SynapseOptions,
    /// Federation retry settings of every server.
    pub retry: FederationRetry,
}

impl Default for FederationOptions {
    fn default() -> Self {
        FederationOptions {
            servers: 2,
            base: SynapseOptions::default(),
            retry: FederationRetry::default(),
        }
    }
}

/// Homeservers on loopback federating with each other. Dropping it kills
/// every server and removes their data (and the certificate).
pub struct Federation {
    // Field order matters for Drop: servers die before the certificate
    // directory goes.
    servers: Vec<Synapse>,
    tls: tempfile::TempDir,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("servers", &self.servers)
            .field("tls", &self.tls.path())
            .finish()
    }
}

impl Federation {
    /// Makes the certificate, picks ports and starts every server (at the
    /// same time), returning once all answer. A server that fails to start
    /// stops the others and its error carries its log tail.
    pub async fn start(options: FederationOptions) -> Result<Federation, SynapseError> {
        if options.servers == 0 || options.servers > MAX_SERVERS {
            return Err(SynapseError::InvalidOption(format!(
                "servers = {} (1 to {MAX_SERVERS})",
                options.servers
            )));
        }
        if !options.base.bind_address.is_loopback() {
            return Err(SynapseError::InvalidOption(format!(
                "bind address {}: a test federation federates on loopback only",
                options.base.bind_address
            )));
        }
        let r = options.retry;
        if r.min_interval.is_zero() || r.max_interval < r.min_interval || r.multiplier == 0 {
            return Err(SynapseError::InvalidOption(format!(
                "retry {r:?}: need 0 < min_interval <= max_interval and multiplier >= 1"
            )));
        }
        let tls = tempfile::Builder::new()
            .prefix("groupcall-federation-tls-")
            .tempdir()
            .map_err(SynapseError::io("creating the certificate directory"))?;
        let (cert, key) = make_certificate(tls.path(), options.base.bind_address).await?;

        // A port picked here may be taken before Synapse binds it; since the
        // ports are part of the server names every server knows, a busy
        // port restarts the whole federation with new ports.
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(&options, &cert, &key).await {
                Ok(servers) => {
                    info!(
                        servers = ?servers.iter().map(|s| s.server_name().to_owned()).collect::<Vec<_>>(),
                        "test federation up"
                    );
                    return Ok(Federation { servers, tls });
                }
                Err(SynapseError::PortBusy { port }) => {
                    debug!(port, "a picked port got taken; new ports for every server");
                    last = Some(SynapseError::PortBusy { port });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(SynapseError::PortBusy { port: 0 }))
    }

    async fn try_start(
        options: &FederationOptions,
        cert: &Path,
        key: &Path,
    ) -> Result<Vec<Synapse>, SynapseError> {
        let bind = options.base.bind_address;
        let ports = free_ports(bind, 2 * options.servers)?;
        let names: Vec<String> = (0..options.servers)
            .map(|i| server_name(bind, ports[2 * i + 1]))
            .collect();
        let mut set = tokio::task::JoinSet::new();
        for (i, name) in names.iter().enumerate() {
            let mut o = options.base.clone();
            o.port = Some(ports[2 * i]);
            o.server_name = name.clone();
            o.data_dir = None;
            o.federation = Some(FederationListener {
                port: ports[2 * i + 1],
                tls_certificate: cert.to_owned(),
                tls_private_key: key.to_owned(),
                peers: names.clone(),
                retry: options.retry,
            });
            set.spawn(async move { (i, Synapse::start(o).await) });
        }
        let mut started: Vec<Option<Synapse>> = (0..options.servers).map(|_| None).collect();
        let mut first_err = None;
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, Ok(hs))) => started[i] = Some(hs),
                Ok((i, Err(e))) => {
                    warn!(server = %names[i], error = %e, "a federation server failed to start");
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(SynapseError::Io {
                        what: "starting a federation server".to_owned(),
                        source: std::io::Error::other(e),
                    });
                }
            }
        }
        if let Some(e) = first_err {
            // Dropping the started ones kills them.
            return Err(e);
        }
        Ok(started.into_iter().flatten().collect())
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether there is no server (never true for a started federation).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// All servers, in start order.
    pub fn servers(&self) -> &[Synapse] {
        &self.servers
    }

    /// Server `i`.
    ///
    /// # Panics
    /// When `i >= self.len()` (a test's own mistake, like indexing).
    #[allow(clippy::indexing_slicing)]
    pub fn server(&self, i: usize) -> &Synapse {
        &self.servers[i]
    }

    fn server_mut(&mut self, i: usize) -> Result<&mut Synapse, SynapseError> {
        let n = self.servers.len();
        self.servers
            .get_mut(i)
            .ok_or_else(|| SynapseError::InvalidOption(format!("no server {i} (have {n})")))
    }

    /// Stops server `i` (an outage); the others keep running and retry it.
    pub async fn stop_server(&mut self, i: usize) -> Result<(), SynapseError> {
        self.server_mut(i)?.stop().await
    }

    /// Starts server `i` again with the same name, ports and data.
    pub async fn restart_server(&mut self, i: usize) -> Result<(), SynapseError> {
        self.server_mut(i)?.restart().await
    }

    /// Stops every server (also done on drop).
    pub async fn stop(&mut self) -> Result<(), SynapseError> {
        let mut first = Ok(());
        for s in &mut self.servers {
            if let Err(e) = s.stop().await
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    /// Process ids of the running servers.
    pub fn pids(&self) -> Vec<u32> {
        self.servers.iter().filter_map(Synapse::pid).collect()
    }

    /// Creates a room as `creator` on its server, invites `members` (users
    /// of any server of the federation), makes each join (over federation
    /// when remote) and waits until every member's server sees all of them
    /// joined. `extra` adds fields to the `createRoom` body (e.g.
    /// `power_level_content_override`). Returns the room id.
    pub async fn shared_room(
        &self,
        creator: &RegisteredUser,
        members: &[RegisteredUser],
        extra: Map<String, Value>,
    ) -> Result<String, SynapseError> {
        let http = self.http()?;
        let mut body = Map::new();
        body.insert("preset".into(), json!("private_chat"));
        body.insert("name".into(), json!("groupcall federation"));
        body.insert(
            "invite".into(),
            json!(members.iter().map(|m| &m.user_id).collect::<Vec<_>>()),
        );
        for (k, v) in extra {
            body.insert(k, v);
        }
        let created = request(
            http,
            reqwest::Method::POST,
            url(&creator.homeserver_url, &["createRoom"])?,
            &creator.access_token,
            Some(Value::Object(body)),
            "createRoom",
        )
        .await?;
        let room = created["room_id"]
            .as_str()
            .ok_or_else(|| SynapseError::Request {
                what: "createRoom".into(),
                status: 200,
                body: format!("no room_id in {created}"),
            })?
            .to_owned();
        let via = server_of(&creator.user_id).unwrap_or_default().to_owned();
        for m in members {
            let mut u = url(&m.homeserver_url, &["join", &room])?;
            u.query_pairs_mut().append_pair("server_name", &via);
            request(
                http,
                reqwest::Method::POST,
                u,
                &m.access_token,
                Some(json!({})),
                &format!("{} joining {room}", m.user_id),
            )
            .await?;
        }
        let everyone: Vec<&RegisteredUser> = std::iter::once(creator).chain(members).collect();
        let timeout = Duration::from_secs(30);
        let deadline = Instant::now() + timeout;
        for m in &everyone {
            loop {
                let joined = request(
                    http,
                    reqwest::Method::GET,
                    url(&m.homeserver_url, &["rooms", &room, "joined_members"])?,
                    &m.access_token,
                    None,
                    "joined_members",
                )
                .await?;
                let all = everyone
                    .iter()
                    .all(|u| joined["joined"].get(&u.user_id).is_some());
                if all {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(SynapseError::Timeout {
                        what: format!(
                            "{} to see all {} members of {room} joined (sees {})",
                            m.user_id,
                            everyone.len(),
                            joined["joined"]
                        ),
                        timeout,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        info!(%room, members = everyone.len(), "room shared across the federation");
        Ok(room)
    }

    fn http(&self) -> Result<&reqwest::Client, SynapseError> {
        self.servers
            .first()
            .map(Synapse::http)
            .ok_or_else(|| SynapseError::InvalidOption("an empty federation".into()))
    }
}

/// `<ip>:<port>` (`[v6]:<port>`): the server name of a loopback server.
fn server_name(bind: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(bind, port).to_string()
}

/// The server name part of a user id (`@name:server`).
fn server_of(user_id: &str) -> Option<&str> {
    user_id.split_once(':').map(|(_, s)| s)
}

/// `n` distinct ports that were free on `bind` a moment ago.
fn free_ports(bind: IpAddr, n: usize) -> Result<Vec<u16>, SynapseError> {
    let held = (0..n)
        .map(|_| TcpListener::bind((bind, 0)).map_err(SynapseError::io("binding port 0")))
        .collect::<Result<Vec<_>, _>>()?;
    held.iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(SynapseError::io("reading a bound port"))
        })
        .collect()
}

/// A client-server API URL under `base` with percent-encoded segments.
fn url(base: &str, segments: &[&str]) -> Result<reqwest::Url, SynapseError> {
    let mut u = reqwest::Url::parse(base)
        .map_err(|e| SynapseError::InvalidOption(format!("homeserver URL {base}: {e}")))?;
    u.path_segments_mut()
        .map_err(|()| SynapseError::InvalidOption(format!("homeserver URL {base}")))?
        .extend(["_matrix", "client", "v3"])
        .extend(segments);
    Ok(u)
}

async fn request(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: reqwest::Url,
    token: &str,
    body: Option<Value>,
    what: &str,
) -> Result<Value, SynapseError> {
    let mut req = http.request(method, url.clone()).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.map_err(|source| SynapseError::Http {
        what: format!("{what} ({url})"),
        source,
    })?;
    let status = resp.status();
    let text = resp.text().await.map_err(|source| SynapseError::Http {
        what: format!("reading the response of {what}"),
        source,
    })?;
    if !status.is_success() {
        return Err(SynapseError::Request {
            what: what.to_owned(),
            status: status.as_u16(),
            body: text,
        });
    }
    serde_json::from_str(&text).map_err(|e| SynapseError::Request {
        what: what.to_owned(),
        status: status.as_u16(),
        body: format!("not JSON ({e}): {text}"),
    })
}

/// A self-signed certificate for the bind address (and `127.0.0.1`),
/// valid for two days.
async fn make_certificate(dir: &Path, bind: IpAddr) -> Result<(PathBuf, PathBuf), SynapseError> {
    let cert = dir.join("federation.crt");
    let key = dir.join("federation.key");
    let mut san = "subjectAltName=IP:127.0.0.1,IP:::1".to_owned();
    if !bind.is_loopback() {
        san.push_str(&format!(",IP:{bind}"));
    }
    let out = tokio::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=groupcall test federation",
            "-addext",
            &san,
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| SynapseError::Certificate {
            reason: format!("running openssl: {e}"),
        })?;
    if !out.status.success() {
        return Err(SynapseError::Certificate {
            reason: format!(
                "openssl {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok((cert, key))
}

/// Adds the federation listener and settings to a server's overrides.
pub(crate) fn apply(config: &mut Map<String, Value>, bind: IpAddr, f: &FederationListener) {
    let listener = json!({
        "port": f.port,
        "bind_addresses": [bind.to_string()],
        "type": "http",
        "tls": true,
        "x_forwarded": false,
        "resources": [{ "names": ["federation", "keys"], "compress": false }],
    });
    if let Some(Value::Array(l)) = config.get_mut("listeners") {
        l.push(listener);
    }
    // Synapse checks IP-literal server names against the block list alone
    // (its allow list applies after DNS resolution only), so loopback is
    // taken out of the block list, and allowed as well.
    let blocked: Vec<&str> = DEFAULT_IP_RANGE_BLOCKLIST
        .iter()
        .copied()
        .filter(|r| !LOOPBACK_RANGES.contains(r))
        .collect();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let r = f.retry;
    let short = r.max_interval.min(Duration::from_secs(2));
    let settings = json!({
        "tls_certificate_path": f.tls_certificate,
        "tls_private_key_path": f.tls_private_key,
        "federation_verify_certificates": false,
        "trusted_key_servers": [],
        "ip_range_blacklist": blocked,
        "ip_range_whitelist": LOOPBACK_RANGES,
        "federation_domain_whitelist": f.peers,
        "federation": {
            "client_timeout": ms(r.request_timeout),
            "destination_min_retry_interval": ms(r.min_interval),
            "destination_retry_multiplier": r.multiplier,
            "destination_max_retry_interval": ms(r.max_interval),
            "max_short_retry_delay": ms(short),
            "max_long_retry_delay": ms(r.max_interval),
        },
    });
    if let Value::Object(m) = settings {
        config.extend(m);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn apply_adds_a_tls_federation_listener_and_loopback_only_settings() {
        let mut m = crate::overrides(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            1000,
            Path::new("/tmp/x"),
            "hs1",
        );
        let f = FederationListener {
            port: 1001,
            tls_certificate: "/c.pem".into(),
            tls_private_key: "/k.pem".into(),
            peers: vec!["127.0.0.1:1001".into(), "127.0.0.1:2001".into()],
            retry: FederationRetry::default(),
        };
        apply(&mut m, IpAddr::V4(Ipv4Addr::LOCALHOST), &f);
        assert_eq!(m["listeners"][0]["resources"][0]["names"][0], "client");
        assert_eq!(m["listeners"][0]["tls"], false);
        assert_eq!(m["listeners"][1]["port"], 1001);
        assert_eq!(m["listeners"][1]["tls"], true);
        assert_eq!(
            m["listeners"][1]["resources"][0]["names"],
            json!(["federation", "keys"])
        );
        assert_eq!(m["federation_verify_certificates"], false);
        assert_eq!(m["ip_range_whitelist"], json!(["127.0.0.0/8", "::1/128"]));
        let blocked = m["ip_range_blacklist"].as_array().unwrap();
        assert_eq!(blocked.len(), DEFAULT_IP_RANGE_BLOCKLIST.len() - 2);
        assert!(blocked.contains(&json!("10.0.0.0/8")));
        assert!(!blocked.contains(&json!("127.0.0.0/8")));
        assert!(!blocked.contains(&json!("::1/128")));
        assert_eq!(
            m["federation_domain_whitelist"],
            json!(["127.0.0.1:1001", "127.0.0.1:2001"])
        );
        assert_eq!(m["federation"]["destination_min_retry_interval"], 500);
        assert_eq!(m["federation"]["destination_max_retry_interval"], 2000);
    }

    #[test]
    fn names_and_urls() {
        assert_eq!(
            server_name(IpAddr::V4(Ipv4Addr::LOCALHOST), 8448),
            "127.0.0.1:8448"
        );
        assert_eq!(server_name("::1".parse().unwrap(), 8448), "[::1]:8448");
        assert_eq!(server_of("@a:127.0.0.1:8448"), Some("127.0.0.1:8448"));
        let u = url("http://127.0.0.1:1", &["join", "!r:127.0.0.1:2"]).unwrap();
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:1/_matrix/client/v3/join/!r:127.0.0.1:2"
        );
        let u = url("http://127.0.0.1:1", &["rooms", "!a/b", "x"]).unwrap();
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:1/_matrix/client/v3/rooms/!a%2Fb/x"
        );
    }
}
