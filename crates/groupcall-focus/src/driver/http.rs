//! A minimal HTTP/1.1 endpoint for `GET /metrics` and `GET /health`: one
//! request per connection (`Connection: close`), answered by the service's
//! loop through a channel (so the answer reflects its current state).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{debug, warn};

/// Longest request head we read.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 32;

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Metrics,
    Health,
}

/// An answer: status, content type, body.
#[derive(Debug)]
pub(super) struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// A request for the service's loop to answer.
pub(super) struct Request {
    pub route: Route,
    pub reply: oneshot::Sender<Answer>,
}

/// Accepts connections until the receiver of `requests` is gone.
pub(super) async fn serve(listener: TcpListener, requests: mpsc::Sender<Request>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = requests.closed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "http: too many connections; closing this one");
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &requests).await {
                debug!(%peer, error = %e, "http: connection ended with an error");
            }
            drop(slot);
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    requests: &mpsc::Sender<Request>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let answer = match complete {
        Err(_) | Ok(Ok(false)) => plain(400, "bad request\n"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(true)) => {
            let (method, route) = parse_request_line(&head);
            match (method.as_str(), route) {
                ("GET" | "HEAD", Some(route)) => ask(requests, route).await,
                ("GET" | "HEAD", None) => plain(404, "not found (try /metrics or /health)\n"),
                _ => plain(405, "method not allowed\n"),
            }
        }
    };
    let head_only = head.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.status,
        reason(answer.status),
        answer.content_type,
        answer.body.len()
    );
    if !head_only {
        out.push_str(&answer.body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

/// The method and, for a known path, the route.
fn parse_request_line(head: &[u8]) -> (String, Option<Route>) {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    let route = match path {
        "/metrics" => Some(Route::Metrics),
        "/health" => Some(Route::Health),
        _ => None,
    };
    (method, route)
}

async fn ask(requests: &mpsc::Sender<Request>, route: Route) -> Answer {
    let (reply, answer) = oneshot::channel();
    if requests.send(Request { route, reply }).await.is_err() {
        return plain(503, "stopping\n");
    }
    answer.await.unwrap_or_else(|_| plain(503, "stopping\n"))
}

fn plain(status: u16, body: &str) -> Answer {
    Answer {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.to_owned(),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Binds the endpoint's listener.
pub(super) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        let r = |s: &str| parse_request_line(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("GET".to_owned(), Some(Route::Metrics))
        );
        assert_eq!(
            r("HEAD /health?x=1 HTTP/1.1\r\n\r\n"),
            ("HEAD".to_owned(), Some(Route::Health))
        );
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), ("GET".to_owned(), None));
        assert_eq!(r("\u{0}\u{1}"), ("\u{0}\u{1}".to_owned(), None));
    }
}
