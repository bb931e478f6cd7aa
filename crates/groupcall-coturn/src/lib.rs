//! A throwaway [coturn](https://github.com/coturn/coturn) TURN server on a
//! loopback port, for groupcall's tests.
//!
//! [`Coturn::start`] finds Debian's `turnserver` (or fails with
//! [`CoturnError::NotInstalled`]: it installs nothing; `scripts/setup-system`
//! installs the `coturn` package), writes a configuration into a fresh
//! temporary directory and starts it on a free loopback port, returning once
//! it answers a STUN Binding request. The configuration is the one a
//! homeserver's `turn_shared_secret` pairs with: TURN REST API credentials
//! (`use-auth-secret` + `static-auth-secret`), `listening-ip` and `relay-ip`
//! 127.0.0.1, loopback peers allowed, no TLS/DTLS, no TCP relays, no CLI, a
//! small relay port range below the kernel's ephemeral ports.
//!
//! The server runs in its own process group and is killed when the
//! [`Coturn`] value is dropped.
//!
//! Environment variables:
//! - `GROUPCALL_TURNSERVER`: the `turnserver` binary to run (else `PATH`).

#![warn(missing_docs)]

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sha1::Sha1;
use tracing::{debug, info, warn};

/// Errors of running coturn.
#[derive(Debug, thiserror::Error)]
pub enum CoturnError {
    /// `turnserver` is not installed.
    #[error(
        "coturn's `turnserver` is not installed ({reason}); run scripts/setup-system as root \
         (it installs the coturn package; scripts/test runs it), or point \
         GROUPCALL_TURNSERVER at the binary"
    )]
    NotInstalled {
        /// Where it was looked for.
        reason: String,
    },
    /// A file or process operation failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server exited while starting.
    #[error("turnserver exited during startup ({status}); log tail:\n{log_tail}")]
    Exited {
        /// Exit status.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// The server did not answer a STUN Binding request in time.
    #[error("turnserver did not answer on {addr} within {timeout:?}; log tail:\n{log_tail}")]
    StartTimeout {
        /// The address probed.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
        /// The end of its log.
        log_tail: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CoturnError {
    let what = what.into();
    move |source| CoturnError::Io { what, source }
}

/// How to start a [`Coturn`].
#[derive(Debug, Clone)]
pub struct CoturnOptions {
    /// `static-auth-secret` (the homeserver's `turn_shared_secret`).
    pub secret: String,
    /// The realm.
    pub realm: String,
    /// How long to wait for the server to answer.
    pub start_timeout: Duration,
}

impl Default for CoturnOptions {
    fn default() -> Self {
        Self {
            secret: format!("groupcall-test-{:016x}", fastrand::u64(..)),
            realm: "groupcall.test".into(),
            start_timeout: Duration::from_secs(10),
        }
    }
}

/// Bytes and packets a TURN session relayed, from coturn's `usage:` log
/// lines (written while a session lives and when it ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionUsage {
    /// The session's TURN user name.
    pub username: String,
    /// Packets received from the client.
    pub received_packets: u64,
    /// Bytes received from the client.
    pub received_bytes: u64,
    /// Packets sent to the client.
    pub sent_packets: u64,
    /// Bytes sent to the client.
    pub sent_bytes: u64,
}

/// A running coturn. Dropping it kills the process.
pub struct Coturn {
    child: Option<Child>,
    port: u16,
    relay_ports: (u16, u16),
    secret: String,
    realm: String,
    // Removed after the process is dead (field order).
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Coturn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coturn")
            .field("addr", &self.addr())
            .field("relay_ports", &self.relay_ports)
            .finish()
    }
}

impl Coturn {
    /// Starts coturn on a free loopback port (it must be installed, see
    /// [`CoturnError::NotInstalled`]).
    pub async fn start(options: CoturnOptions) -> Result<Coturn, CoturnError> {
        let binary = find_binary().ok_or_else(|| CoturnError::NotInstalled {
            reason: "no turnserver in $GROUPCALL_TURNSERVER, $PATH, /usr/bin or /usr/sbin".into(),
        })?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut turn = Self::spawn(&binary, &options)?;
            match turn.wait_ready(options.start_timeout).await {
                Ok(()) => {
                    info!(addr = %turn.addr(), relay_ports = ?turn.relay_ports, "coturn started");
                    return Ok(turn);
                }
                // The port was taken between our probe and coturn's bind.
                Err(e @ CoturnError::Exited { .. }) if attempt < 3 => {
                    debug!(error = %e, "coturn did not start, retrying on another port");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(binary: &Path, options: &CoturnOptions) -> Result<Coturn, CoturnError> {
        let dir = tempfile::Builder::new()
            .prefix("groupcall-coturn-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        let port = free_udp_port()?;
        // Relay ports below Linux's ephemeral range (32768-60999), so that
        // they do not collide with the tests' own sockets.
        let min = 10_000 + fastrand::u16(0..200) * 100;
        let relay_ports = (min, min + 99);
        let conf = config(
            dir.path(),
            port,
            relay_ports,
            &options.secret,
            &options.realm,
        );
        let conf_path = dir.path().join("turnserver.conf");
        std::fs::write(&conf_path, conf).map_err(io("writing turnserver.conf"))?;
        // coturn writes its log itself (line by line); stdout and stderr
        // only get what it prints before opening it.
        let log = File::create(dir.path().join("turnserver.out"))
            .map_err(io("creating the coturn output file"))?;
        let err = log.try_clone().map_err(io("duplicating the log handle"))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        Ok(Coturn {
            child: Some(child),
            port,
            relay_ports,
            secret: options.secret.clone(),
            realm: options.realm.clone(),
            dir,
        })
    }

    /// The UDP (and TCP) listening address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `turn:127.0.0.1:<port>?transport=udp`.
    pub fn turn_url(&self) -> String {
        format!("turn:127.0.0.1:{}?transport=udp", self.port)
    }

    /// `stun:127.0.0.1:<port>` (coturn answers Binding requests too).
    pub fn stun_url(&self) -> String {
        format!("stun:127.0.0.1:{}", self.port)
    }

    /// The shared secret.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The relay port range (inclusive).
    pub fn relay_ports(&self) -> (u16, u16) {
        self.relay_ports
    }

    /// TURN REST API credentials valid for `ttl`, as a homeserver makes
    /// them: user name `<expiry unix time>:<user>`, password
    /// base64(HMAC-SHA1(secret, user name)).
    pub fn credentials(&self, user: &str, ttl: Duration) -> (String, String) {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl)
            .as_secs();
        let username = format!("{expiry}:{user}");
        let password = rest_password(&self.secret, &username);
        (username, password)
    }

    /// The whole log so far (its output before the log file opened, then
    /// the log file).
    pub fn log(&self) -> String {
        let read = |name: &str| {
            std::fs::read(self.dir.path().join(name))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        read("turnserver.out") + &read("turn.log")
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Every `usage:` line of the log, parsed.
    pub fn usage(&self) -> Vec<SessionUsage> {
        self.log().lines().filter_map(parse_usage).collect()
    }

    /// How many allocations coturn made for `username`: its log's
    /// `user <NAME>: incoming packet ALLOCATE processed, success` lines (one
    /// per successful Allocate request; refreshes are REFRESH lines).
    pub fn allocations(&self, username: &str) -> usize {
        count_allocations(&self.log(), username)
    }

    /// Whether the log shows an allocation for `username`.
    pub fn has_allocation(&self, username: &str) -> bool {
        self.log().lines().any(|l| {
            l.contains("new") && l.contains("ALLOCATE") && l.contains(username)
                || (l.contains("usage:") && l.contains(username))
        })
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), CoturnError> {
        let sock = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io("binding a probe socket"))?;
        let started = Instant::now();
        let mut tid = [0u8; 12];
        tid.iter_mut().for_each(|b| *b = fastrand::u8(..));
        // A STUN Binding request without attributes.
        let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        req.extend_from_slice(&tid);
        let mut buf = [0u8; 512];
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(CoturnError::Exited {
                    status: status.to_string(),
                    log_tail: self.log_tail(30),
                });
            }
            if started.elapsed() > timeout {
                return Err(CoturnError::StartTimeout {
                    addr: self.addr(),
                    timeout,
                    log_tail: self.log_tail(30),
                });
            }
            let _ = sock.send_to(&req, self.addr()).await;
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(50), sock.recv_from(&mut buf)).await
                && n >= 20
                && buf[8..20] == tid
            {
                return Ok(());
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id())
                && let Err(e) = killpg(Pid::from_raw(pid), Signal::SIGKILL)
                && e != nix::errno::Errno::ESRCH
            {
                warn!(pid, error = %e, "killing coturn failed");
            }
            let _ = child.wait();
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(mut self) {
        if let Some(child) = &mut self.child {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        self.kill();
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(dir: &Path, port: u16, relay: (u16, u16), secret: &str, realm: &str) -> String {
    format!(
        "listening-ip=127.0.0.1\n\
         relay-ip=127.0.0.1\n\
         listening-port={port}\n\
         min-port={}\n\
         max-port={}\n\
         use-auth-secret\n\
         static-auth-secret={secret}\n\
         realm={realm}\n\
         allow-loopback-peers\n\
         no-tls\n\
         no-dtls\n\
         no-tcp-relay\n\
         no-cli\n\
         fingerprint\n\
         no-software-attribute\n\
         verbose\n\
         simple-log\n\
         log-file={}\n\
         pidfile={}\n\
         userdb={}\n",
        relay.0,
        relay.1,
        dir.join("turn.log").display(),
        dir.join("turnserver.pid").display(),
        dir.join("turndb").display(),
    )
}

fn count_allocations(log: &str, username: &str) -> usize {
    let user = format!("user <{username}>:");
    // One allocation per session; a line can be in both of coturn's
    // outputs (its stdout and its log file), so sessions are counted.
    log.lines()
        .filter(|l| l.contains(&user) && l.contains("ALLOCATE processed, success"))
        .map(|l| {
            l.split("session ")
                .nth(1)
                .and_then(|r| r.split(':').next())
                .unwrap_or(l)
        })
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// base64(HMAC-SHA1(secret, username)): the TURN REST API password.
pub fn rest_password(secret: &str, username: &str) -> String {
    let digest: Vec<u8> = match Hmac::<Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(username.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC accepts keys of any length.
        Err(_) => Vec::new(),
    };
    base64(&digest)
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn parse_usage(line: &str) -> Option<SessionUsage> {
    let rest = &line[line.find("usage:")? + 6..];
    let field = |key: &str| -> Option<&str> {
        let start = rest.find(key)? + key.len();
        let v = &rest[start..];
        Some(v.split([',', ' ']).next().unwrap_or(""))
    };
    let num = |key: &str| field(key).and_then(|v| v.parse::<u64>().ok());
    let username = field("username=")?
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string();
    Some(SessionUsage {
        username,
        received_packets: num("rp=")?,
        received_bytes: num("rb=")?,
        sent_packets: num("sp=")?,
        sent_bytes: num("sb=")?,
    })
}

fn free_udp_port() -> Result<u16, CoturnError> {
    // coturn listens on UDP and TCP: find a port free for both.
    for _ in 0..20 {
        let u = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("binding port 0"))?;
        let port = u.local_addr().map_err(io("reading a bound port"))?.port();
        if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(CoturnError::Io {
        what: "finding a free port".into(),
        source: std::io::Error::other("no port free for both UDP and TCP"),
    })
}

fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GROUPCALL_TURNSERVER").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("turnserver"))
        .find(|p| p.is_file())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_rest_password() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // RFC 2202 test case 2 for HMAC-SHA1, in base64.
        assert_eq!(
            rest_password("Jefe", "what do ya want for nothing?"),
            base64(&[
                0xef, 0xfc, 0xdf, 0x6a, 0xe5, 0xeb, 0x2f, 0xa2, 0xd2, 0x74, 0x16, 0xd5, 0xf1, 0x84,
                0xdf, 0x9c, 0x25, 0x9a, 0x7c, 0x79
            ])
        );
    }

    #[test]
    fn usage_lines() {
        let l = "12: : session 001000000000000001: usage: realm=<groupcall.test>, \
                 username=<1700000000:alice>, rp=12, rb=3400, sp=11, sb=3300";
        assert_eq!(
            parse_usage(l),
            Some(SessionUsage {
                username: "1700000000:alice".into(),
                received_packets: 12,
                received_bytes: 3400,
                sent_packets: 11,
                sent_bytes: 3300,
            })
        );
        assert_eq!(parse_usage("nothing here"), None);
        assert_eq!(parse_usage("usage: rp=x"), None);
    }

    #[test]
    fn allocation_lines() {
        // Lines as coturn 4.6 writes them (checked with turnutils_uclient).
        let log = "1: : session 000000000000000001: new, realm=<test>, username=<17:bob>, lifetime=777\n\
                   1: : session 000000000000000001: realm <test> user <17:bob>: incoming packet ALLOCATE processed, success\n\
                   1: : session 000000000000000001: realm <test> user <17:bob>: incoming packet REFRESH processed, success\n\
                   1: : session 000000000000000002: realm <test> user <17:bobby>: incoming packet ALLOCATE processed, success\n\
                   1: : session 000000000000000003: realm <test> user <17:bob>: incoming packet ALLOCATE processed, error 401: Unauthorized\n";
        assert_eq!(count_allocations(log, "17:bob"), 1);
        assert_eq!(count_allocations(log, "17:bobby"), 1);
        // The same line twice (coturn's stdout and its log file), or an
        // Allocate answered twice in one session: one allocation.
        let twice = format!("{log}{log}");
        assert_eq!(count_allocations(&twice, "17:bob"), 1);
        assert_eq!(count_allocations(log, "17:alice"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starts_and_answers_stun() {
        let turn = match Coturn::start(CoturnOptions::default()).await {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert!(turn.log().contains("UDP listener opened"), "{}", turn.log());
        let (user, pass) = turn.credentials("alice", Duration::from_secs(60));
        assert!(user.ends_with(":alice"));
        assert_eq!(pass.len(), 28);
        turn.stop().await;
    }
}
