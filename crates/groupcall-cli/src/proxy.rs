//! A counting HTTP/1.1 reverse proxy in front of the local Synapse.
//!
//! Every client (groupcall participants in this process, reference peers in
//! Node) talks to the homeserver through it, so one method counts the
//! requests of both systems: to-device sends (requests, messages, body
//! bytes, by event type) and member state events. Requests are parsed only
//! as far as needed to find where each ends (`Content-Length` or chunked);
//! responses are copied through untouched.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::debug;

/// What a request was, as far as the benchmarks care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `PUT /sendToDevice/{type}/{txn}`.
    ToDevice {
        /// The event type in the path.
        event_type: String,
        /// Recipient devices in the body.
        messages: usize,
    },
    /// `PUT /rooms/{room}/state/{…call.member}/{key}`.
    MemberState {
        /// The state key (the user id for MSC3401 member events).
        state_key: String,
        /// An MSC4140 delayed state event (scheduled, not sent now).
        delayed: bool,
    },
    /// An MSC4140 `delayed_events` management request.
    DelayedEvents,
    /// Anything else.
    Other,
}

/// One request that went through.
#[derive(Debug, Clone)]
pub struct Record {
    /// When its body had been forwarded.
    pub at: Instant,
    /// HTTP method.
    pub method: String,
    /// Request target (path and query), as sent.
    pub target: String,
    /// Body bytes (decoded from chunks).
    pub body_bytes: usize,
    /// What it was.
    pub kind: Kind,
}

/// The running proxy; stops when dropped.
pub struct Proxy {
    url: String,
    records: Arc<Mutex<Vec<Record>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the counting proxy on 127.0.0.1")?;
        let addr = listener.local_addr().context("the proxy's address")?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let rec = records.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let rec = rec.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(client, upstream, rec).await {
                        debug!("proxy connection: {e}");
                    }
                });
            }
        });
        Ok(Proxy {
            url: format!("http://{addr}"),
            records,
            task,
        })
    }

    /// The base URL clients use.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every request since `since`.
    pub fn since(&self, since: Instant) -> Vec<Record> {
        match self.records.lock() {
            Ok(r) => r.iter().filter(|r| r.at >= since).cloned().collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    records: Arc<Mutex<Vec<Record>>>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_r, mut client_w) = client.into_split();
    let (mut server_r, server_w) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_r, &mut client_w).await;
        let _ = client_w.shutdown().await;
    });
    let up = requests(client_r, server_w, records).await;
    // The client is done sending; let the last response finish.
    let _ = down.await;
    up
}

/// Forwards requests one after the other, recording each.
async fn requests(
    client: OwnedReadHalf,
    mut server: OwnedWriteHalf,
    records: Arc<Mutex<Vec<Record>>>,
) -> std::io::Result<()> {
    let mut client = BufReader::new(client);
    loop {
        let mut head = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            if client.read_until(b'\n', &mut line).await? == 0 {
                let _ = server.shutdown().await;
                return Ok(());
            }
            head.extend_from_slice(&line);
            if line == b"\r\n" || line == b"\n" {
                break;
            }
            if head.len() > 256 * 1024 {
                return Err(std::io::Error::other("request head too long"));
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.lines();
        let mut first = lines.next().unwrap_or_default().split_whitespace();
        let method = first.next().unwrap_or_default().to_owned();
        let target = first.next().unwrap_or_default().to_owned();
        let mut length = 0usize;
        let mut chunked = false;
        for h in lines {
            if let Some((name, value)) = h.split_once(':') {
                let name = name.trim().to_ascii_lowercase();
                let value = value.trim();
                if name == "content-length" {
                    length = value.parse().unwrap_or(0);
                } else if name == "transfer-encoding"
                    && value.to_ascii_lowercase().contains("chunked")
                {
                    chunked = true;
                }
            }
        }
        server.write_all(&head).await?;
        let keep = target.contains("/sendToDevice/");
        let mut body = Vec::new();
        let body_bytes = if chunked {
            forward_chunked(&mut client, &mut server, keep.then_some(&mut body)).await?
        } else {
            let mut buf = vec![0u8; length];
            client.read_exact(&mut buf).await?;
            server.write_all(&buf).await?;
            if keep {
                body = buf;
            }
            length
        };
        server.flush().await?;
        let record = Record {
            at: Instant::now(),
            kind: classify(&method, &target, &body),
            method,
            target,
            body_bytes,
        };
        if let Ok(mut r) = records.lock() {
            r.push(record);
        }
    }
}

/// Forwards a chunked body as is; returns its decoded length.
async fn forward_chunked(
    client: &mut BufReader<OwnedReadHalf>,
    server: &mut OwnedWriteHalf,
    mut keep: Option<&mut Vec<u8>>,
) -> std::io::Result<usize> {
    let mut total = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        client.read_until(b'\n', &mut line).await?;
        server.write_all(&line).await?;
        let size_text = String::from_utf8_lossy(&line);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                line.clear();
                if client.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(total);
                }
                server.write_all(&line).await?;
                if line == b"\r\n" || line == b"\n" {
                    return Ok(total);
                }
            }
        }
        let mut buf = vec![0u8; size + 2];
        client.read_exact(&mut buf).await?;
        server.write_all(&buf).await?;
        if let Some(k) = keep.as_deref_mut() {
            k.extend_from_slice(&buf[..size]);
        }
        total += size;
    }
}

/// Percent-decodes a path segment.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(h) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(h, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request is, from its method, target and (to-device) body.
pub fn classify(method: &str, target: &str, body: &[u8]) -> Kind {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.split('/').collect();
    if method == "PUT"
        && let Some(i) = segments.iter().position(|s| *s == "sendToDevice")
    {
        let event_type = segments.get(i + 1).map(|s| decode(s)).unwrap_or_default();
        let messages = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                v.get("messages").and_then(|m| m.as_object()).map(|users| {
                    users
                        .values()
                        .map(|d| d.as_object().map_or(0, serde_json::Map::len))
                        .sum()
                })
            })
            .unwrap_or(0);
        return Kind::ToDevice {
            event_type,
            messages,
        };
    }
    if method == "PUT"
        && let Some(i) = segments.iter().position(|s| *s == "state")
        && segments.get(i.wrapping_sub(2)) == Some(&"rooms")
        && let Some(ty) = segments.get(i + 1)
        && decode(ty).ends_with("call.member")
    {
        return Kind::MemberState {
            state_key: segments.get(i + 2).map(|s| decode(s)).unwrap_or_default(),
            delayed: query.contains("delay="),
        };
    }
    if path.contains("delayed_events") {
        return Kind::DelayedEvents;
    }
    Kind::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let body = br#"{"messages":{"@a:x":{"D1":{},"D2":{}},"@b:x":{"D3":{}}}}"#;
        assert_eq!(
            classify(
                "PUT",
                "/_matrix/client/v3/sendToDevice/m.call.invite/txn1",
                body
            ),
            Kind::ToDevice {
                event_type: "m.call.invite".into(),
                messages: 3
            }
        );
        assert_eq!(
            classify(
                "PUT",
                "/_matrix/client/v3/rooms/%21r%3Ax/state/org.matrix.msc3401.call.member/%40a%3Ax",
                b"{}"
            ),
            Kind::MemberState {
                state_key: "@a:x".into(),
                delayed: false
            }
        );
        assert_eq!(
            classify(
                "PUT",
                "/_matrix/client/v3/rooms/!r:x/state/org.matrix.msc3401.call.member/@a:x?org.matrix.msc4140.delay=5000",
                b"{}"
            ),
            Kind::MemberState {
                state_key: "@a:x".into(),
                delayed: true
            }
        );
        assert_eq!(
            classify(
                "POST",
                "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/abc",
                b"{}"
            ),
            Kind::DelayedEvents
        );
        assert_eq!(
            classify("GET", "/_matrix/client/v3/sync?timeout=30000", b""),
            Kind::Other
        );
        assert_eq!(decode("%40a%3Ax%zz"), "@a:x%zz");
    }

    #[tokio::test]
    async fn forwards_and_counts() {
        // A tiny upstream that answers every request with a fixed response.
        let upstream = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = upstream.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            for _ in 0..2 {
                let mut line = String::new();
                let mut len = 0;
                loop {
                    line.clear();
                    r.read_line(&mut line).await.unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).await.unwrap();
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    .await
                    .unwrap();
            }
        });
        let proxy = Proxy::start(up_addr).await.unwrap();
        let t0 = Instant::now();
        let addr = proxy.url().trim_start_matches("http://").to_owned();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let body = r#"{"messages":{"@a:x":{"D":{"x":1}}}}"#;
        let req = format!(
            "PUT /_matrix/client/v3/sendToDevice/m.call.answer/1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut resp = [0u8; 40];
        s.read_exact(&mut resp).await.unwrap();
        assert!(resp.starts_with(b"HTTP/1.1 200 OK"));
        s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        s.read_exact(&mut resp).await.unwrap();
        let recs = proxy.since(t0);
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0].kind,
            Kind::ToDevice {
                event_type: "m.call.answer".into(),
                messages: 1
            }
        );
        assert_eq!(recs[0].body_bytes, body.len());
        assert_eq!(recs[1].kind, Kind::Other);
    }
}
