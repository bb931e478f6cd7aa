//! The homeserver's TURN servers (`GET /_matrix/client/v3/voip/turnServer`)
//! and a task that keeps the time-limited credentials fresh for a call.

use std::time::Duration;

use groupcall_media::IceServer;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::requests::turn_server;
use super::retry::{self, Retry};
use super::{MatrixError, MatrixSession};

/// What `/voip/turnServer` answered: TURN URIs with time-limited
/// credentials (Synapse makes them from `turn_shared_secret`, the TURN REST
/// API scheme, or hands out its static `turn_username`/`turn_password`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnServers {
    /// `turn:`/`turns:` URIs, e.g. `turn:turn.example.org:3478?transport=udp`.
    pub uris: Vec<String>,
    /// TURN user name.
    pub username: String,
    /// TURN password.
    pub password: String,
    /// How long the credentials are valid.
    pub ttl: Duration,
}

impl TurnServers {
    /// The servers as a media peer's [`IceServer`].
    pub fn ice_server(&self) -> IceServer {
        IceServer {
            urls: self.uris.clone(),
            username: Some(self.username.clone()),
            credential: Some(self.password.clone()),
        }
    }

    /// Parses the answer; `None` when it names no server (Synapse answers
    /// `{}` when TURN is not configured, or for guests without
    /// `turn_allow_guests`).
    pub fn from_response(body: &Value) -> Result<Option<TurnServers>, MatrixError> {
        let uris: Vec<String> = body
            .get("uris")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if uris.is_empty() {
            return Ok(None);
        }
        let text = |k: &str| {
            body.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| MatrixError::Http {
                    action: "reading the TURN server answer".to_owned(),
                    message: format!("`{k}` missing or not a string in {body}"),
                })
        };
        let ttl = body
            .get("ttl")
            .and_then(Value::as_u64)
            .ok_or_else(|| MatrixError::Http {
                action: "reading the TURN server answer".to_owned(),
                message: format!("`ttl` missing or not a number in {body}"),
            })?;
        Ok(Some(TurnServers {
            uris,
            username: text("username")?,
            password: text("password")?,
            ttl: Duration::from_secs(ttl),
        }))
    }
}

impl MatrixSession {
    /// The homeserver's TURN servers with fresh credentials, or `None` when
    /// it has none (an empty answer, or 404 from a server without the
    /// endpoint).
    pub async fn turn_servers(&self) -> Result<Option<TurnServers>, MatrixError> {
        let what = "asking for TURN servers";
        let r = retry::REQUEST
            .run(
                what,
                || {
                    self.client
                        .send(turn_server::Request)
                        .with_request_config(retry::once())
                },
                |e| retry::classify_http(e, Retry::Transient),
            )
            .await
            .map_err(|e| MatrixError::http(what, e));
        match r {
            Ok(response) => TurnServers::from_response(&response.body),
            Err(MatrixError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Fetches the TURN servers now and keeps them fresh in a task (a new
    /// fetch shortly before the credentials expire). Failures leave the
    /// previous servers in place and are retried; a homeserver without
    /// TURN is asked again every hour.
    pub async fn watch_turn_servers(&self) -> TurnWatch {
        let first = self.fetch_turn_logged().await;
        let (tx, rx) = watch::channel(first.as_ref().ok().cloned().flatten());
        let session = self.clone();
        let task = tokio::spawn(async move {
            let mut last = first;
            loop {
                let wait = refresh_delay(&last);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = tx.closed() => return,
                }
                last = session.fetch_turn_logged().await;
                match &last {
                    Ok(servers) => {
                        tx.send_replace(servers.clone());
                    }
                    Err(_) => {
                        // Keep the old credentials; they may still be valid.
                    }
                }
            }
        });
        TurnWatch { rx, task }
    }

    async fn fetch_turn_logged(&self) -> Result<Option<TurnServers>, MatrixError> {
        let r = self.turn_servers().await;
        match &r {
            Ok(Some(t)) => info!(uris = ?t.uris, ttl = ?t.ttl, "homeserver TURN servers"),
            Ok(None) => debug!("the homeserver offers no TURN servers"),
            Err(e) => warn!(error = %e, "cannot get the homeserver's TURN servers"),
        }
        r
    }
}

/// When to ask again: 80 % into the credentials' lifetime (at least 10 s,
/// at most one day), after 30 s on errors, after an hour without TURN.
fn refresh_delay(last: &Result<Option<TurnServers>, MatrixError>) -> Duration {
    match last {
        Ok(Some(t)) => (t.ttl * 4 / 5).clamp(Duration::from_secs(10), Duration::from_secs(86400)),
        Ok(None) => Duration::from_secs(3600),
        Err(_) => Duration::from_secs(30),
    }
}

/// The homeserver's current TURN servers, kept fresh by a task that ends
/// when this is dropped.
#[derive(Debug)]
pub struct TurnWatch {
    rx: watch::Receiver<Option<TurnServers>>,
    task: JoinHandle<()>,
}

impl TurnWatch {
    /// The current servers, if any.
    pub fn current(&self) -> Option<TurnServers> {
        self.rx.borrow().clone()
    }

    /// The current servers as ICE servers for a media peer (empty without
    /// TURN).
    pub fn ice_servers(&self) -> Vec<IceServer> {
        self.rx
            .borrow()
            .as_ref()
            .map(|t| vec![t.ice_server()])
            .unwrap_or_default()
    }
}

impl Drop for TurnWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_answers() {
        let body = json!({
            "username": "1443779631:@user:example.com",
            "password": "JlKfBy1QwLrO20385QyAtEyIv0=",
            "uris": ["turn:turn.example.com:3478?transport=udp", 5, "turn:10.20.30.40:3478?transport=tcp"],
            "ttl": 86400
        });
        let t = TurnServers::from_response(&body).unwrap().unwrap();
        assert_eq!(t.uris.len(), 2);
        assert_eq!(t.ttl, Duration::from_secs(86400));
        let ice = t.ice_server();
        assert_eq!(
            ice.username.as_deref(),
            Some("1443779631:@user:example.com")
        );
        assert_eq!(ice.urls, t.uris);
        assert_eq!(TurnServers::from_response(&json!({})).unwrap(), None);
        assert_eq!(
            TurnServers::from_response(&json!({"uris": []})).unwrap(),
            None
        );
        assert_eq!(TurnServers::from_response(&Value::Null).unwrap(), None);
        assert!(TurnServers::from_response(&json!({"uris": ["turn:x"], "ttl": 5})).is_err());
        assert!(
            TurnServers::from_response(
                &json!({"uris": ["turn:x"], "username": "u", "password": "p", "ttl": "5"})
            )
            .is_err()
        );
    }

    #[test]
    fn refresh_delays() {
        let t = |ttl| {
            Ok(Some(TurnServers {
                uris: vec!["turn:x".into()],
                username: "u".into(),
                password: "p".into(),
                ttl: Duration::from_secs(ttl),
            }))
        };
        assert_eq!(refresh_delay(&t(86400)), Duration::from_secs(69120));
        assert_eq!(refresh_delay(&t(5)), Duration::from_secs(10));
        assert_eq!(refresh_delay(&Ok(None)), Duration::from_secs(3600));
        let e = Err(MatrixError::DelayedEventsUnsupported);
        assert_eq!(refresh_delay(&e), Duration::from_secs(30));
    }
}
