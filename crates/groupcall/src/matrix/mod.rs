//! The Matrix transport: login with a persisted E2EE session, room and
//! state helpers, a resilient sync loop that feeds [`MatrixInput`]s into a
//! channel, plaintext and Olm-encrypted to-device sending (with a plaintext
//! fallback for devices without keys), MSC4140
//! delayed events, and the homeserver's TURN servers.
//!
//! Everything here speaks raw JSON (`serde_json::Value`) for event contents:
//! the MSC3401 shapes on the wire differ from ruma's typed `m.call.*`
//! contents, and the protocol core owns its own serde types.

mod delayed;
mod error;
mod room;
mod sync;
mod to_device;
mod turn;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use matrix_sdk::authentication::matrix::MatrixSession as SdkSession;
use matrix_sdk::config::RequestConfig;
use matrix_sdk::ruma::api::error::ErrorKind;
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use matrix_sdk::{Client, Room};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

pub use delayed::DelayedAction;
pub use error::MatrixError;
pub use room::CreateRoomOptions;
pub use sync::{MatrixInput, SyncHandle, SyncOptions};
pub use to_device::{DeviceSendMode, KeylessDevices, SendModes, SendReport};
pub use turn::{TurnServers, TurnWatch};

/// Unstable (on-the-wire) type of the MSC3401 call state event.
pub const CALL_EVENT_TYPE: &str = "org.matrix.msc3401.call";
/// Unstable (on-the-wire) type of the MSC3401 call member state event.
pub const CALL_MEMBER_EVENT_TYPE: &str = "org.matrix.msc3401.call.member";
/// Stable name of the call state event.
pub const CALL_EVENT_TYPE_STABLE: &str = "m.call";
/// Stable name of the call member state event.
pub const CALL_MEMBER_EVENT_TYPE_STABLE: &str = "m.call.member";

const SESSION_FILE: &str = "session.json";
const STORE_DIR: &str = "store";
const DEVICE_DISPLAY_NAME: &str = "groupcall";

/// What is persisted in `<data_dir>/session.json`.
#[derive(Serialize, Deserialize)]
struct StoredSession {
    homeserver: String,
    session: SdkSession,
}

/// A logged-in Matrix device with end-to-end encryption, backed by a
/// SQLite store in a data directory. Cheap to clone (shares the client).
#[derive(Clone, Debug)]
pub struct MatrixSession {
    client: Client,
    user_id: OwnedUserId,
    data_dir: PathBuf,
    delayed_support: Arc<OnceCell<bool>>,
    /// Recipient devices found without published keys (for Olm).
    keyless: Arc<to_device::KeylessCache>,
    /// The call `session_id` of this client load (see
    /// [`MatrixSession::call_session_id`]).
    call_session_id: Arc<str>,
}

/// A fresh call session id: 16 letters from the OS-seeded hasher.
fn new_call_session_id() -> Arc<str> {
    use std::hash::{BuildHasher, RandomState};
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let state = RandomState::new();
    let now = std::time::SystemTime::now();
    (0..16u64)
        .map(|i| {
            let x = state.hash_one((i, now));
            char::from(ALPHABET[(x % ALPHABET.len() as u64) as usize])
        })
        .collect::<String>()
        .into()
}

impl MatrixSession {
    /// Logs in with a password, keeping the E2EE store and the session in
    /// `data_dir`.
    ///
    /// If `data_dir` already holds a session of the same user on the same
    /// homeserver, that device is reused: its stored access token if it
    /// still works, else a fresh password login onto the same device id.
    /// A session of another account is [`MatrixError::SessionMismatch`].
    pub async fn login(
        homeserver_url: &str,
        user: &str,
        password: &str,
        data_dir: impl AsRef<Path>,
    ) -> Result<MatrixSession, MatrixError> {
        let data_dir = data_dir.as_ref().to_owned();
        std::fs::create_dir_all(&data_dir).map_err(|source| MatrixError::Io {
            what: "creating data directory",
            path: data_dir.clone(),
            source,
        })?;
        let stored = read_session(&data_dir)?;
        let mut reuse_device = None;
        if let Some(stored) = stored {
            let same_user = user_matches(user, &stored.session.meta.user_id);
            let same_hs =
                stored.homeserver.trim_end_matches('/') == homeserver_url.trim_end_matches('/');
            if !same_user || !same_hs {
                return Err(MatrixError::SessionMismatch {
                    dir: data_dir,
                    stored: format!("{} on {}", stored.session.meta.user_id, stored.homeserver),
                    requested: format!("{user} on {homeserver_url}"),
                });
            }
            let device = stored.session.meta.device_id.to_string();
            match Self::restore(&data_dir).await {
                Ok(s) => match s.client.whoami().await {
                    Ok(_) => {
                        info!(user_id = %s.user_id, device_id = device, "reusing stored session");
                        return Ok(s);
                    }
                    Err(e) => {
                        let e = MatrixError::http("checking the stored access token", e);
                        if e.is_transient() {
                            return Err(e);
                        }
                        info!(error = %e, "stored access token rejected; logging in again on the same device");
                    }
                },
                Err(e) => {
                    warn!(error = %e, "stored session unusable; logging in again on the same device")
                }
            }
            reuse_device = Some(device);
        } else {
            // A store without a session belongs to a device we cannot log
            // into again: start afresh.
            let store = data_dir.join(STORE_DIR);
            if store.exists() {
                warn!(store = %store.display(), "removing an E2EE store that has no session");
                std::fs::remove_dir_all(&store).map_err(|source| MatrixError::Io {
                    what: "removing stale store",
                    path: store.clone(),
                    source,
                })?;
            }
        }

        let client = build_client(homeserver_url, &data_dir).await?;
        let mut login = client
            .matrix_auth()
            .login_username(user, password)
            .initial_device_display_name(DEVICE_DISPLAY_NAME);
        if let Some(device) = &reuse_device {
            login = login.device_id(device);
        }
        let response = login.send().await.map_err(|e| {
            let wrong_password = matches!(e.client_api_error_kind(), Some(ErrorKind::Forbidden));
            if wrong_password {
                MatrixError::WrongPassword {
                    user: user.to_owned(),
                    homeserver: homeserver_url.to_owned(),
                }
            } else {
                MatrixError::sdk(format!("logging in as {user}"), e)
            }
        })?;
        info!(user_id = %response.user_id, device_id = %response.device_id, "logged in");
        let session = client
            .matrix_auth()
            .session()
            .ok_or_else(|| MatrixError::Http {
                action: "logging in".to_owned(),
                message: "no session after a successful login".to_owned(),
            })?;
        write_session(
            &data_dir,
            &StoredSession {
                homeserver: homeserver_url.to_owned(),
                session,
            },
        )?;
        Ok(MatrixSession {
            client,
            user_id: response.user_id,
            data_dir,
            delayed_support: Arc::default(),
            keyless: Arc::default(),
            call_session_id: new_call_session_id(),
        })
    }

    /// Our call `session_id`: MSC3401 asks for one "generated once per
    /// client load". A `MatrixSession` (a login or a restore) is one client
    /// load: every call joined with it (and its clones) uses this id, so a
    /// leave and a rejoin keep it, and a restart (a new session object, in a
    /// new process or the same one) makes a new one, which others answer as
    /// a restart (`new_session`).
    pub fn call_session_id(&self) -> &str {
        &self.call_session_id
    }

    /// Restores the session stored in `data_dir` by an earlier
    /// [`MatrixSession::login`], without contacting the homeserver.
    pub async fn restore(data_dir: impl AsRef<Path>) -> Result<MatrixSession, MatrixError> {
        let data_dir = data_dir.as_ref().to_owned();
        let stored = read_session(&data_dir)?.ok_or_else(|| MatrixError::NoSession {
            dir: data_dir.clone(),
        })?;
        let client = build_client(&stored.homeserver, &data_dir).await?;
        let user_id = stored.session.meta.user_id.clone();
        client
            .restore_session(stored.session)
            .await
            .map_err(|e| MatrixError::sdk("restoring the stored session", e))?;
        debug!(%user_id, "session restored");
        Ok(MatrixSession {
            client,
            user_id,
            data_dir,
            delayed_support: Arc::default(),
            keyless: Arc::default(),
            call_session_id: new_call_session_id(),
        })
    }

    /// The underlying matrix-sdk client, for what this module does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Our user id, e.g. `@alice:localhost`.
    pub fn user_id(&self) -> &str {
        self.user_id.as_str()
    }

    /// Our device id.
    pub fn device_id(&self) -> String {
        self.client
            .device_id()
            .map(|d| d.to_string())
            .unwrap_or_default()
    }

    /// The homeserver's base URL.
    pub fn homeserver_url(&self) -> String {
        self.client.homeserver().to_string()
    }

    /// The data directory holding store and session.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Logs the device out on the homeserver and forgets the stored
    /// session (the E2EE store is removed too: the device is gone).
    pub async fn logout(self) -> Result<(), MatrixError> {
        self.client
            .matrix_auth()
            .logout()
            .await
            .map_err(|e| MatrixError::http("logging out", e))?;
        let _ = std::fs::remove_file(self.data_dir.join(SESSION_FILE));
        drop(self.client);
        let _ = std::fs::remove_dir_all(self.data_dir.join(STORE_DIR));
        Ok(())
    }

    pub(crate) fn parse_room_id(room: &str) -> Result<OwnedRoomId, MatrixError> {
        RoomId::parse(room).map_err(|e| MatrixError::invalid("room id", room, e))
    }

    pub(crate) fn parse_user_id(user: &str) -> Result<OwnedUserId, MatrixError> {
        UserId::parse(user).map_err(|e| MatrixError::invalid("user id", user, e))
    }

    /// The locally known room with this id.
    pub(crate) fn room(&self, room: &str) -> Result<Room, MatrixError> {
        let id = Self::parse_room_id(room)?;
        self.client
            .get_room(&id)
            .ok_or_else(|| MatrixError::UnknownRoom {
                room: room.to_owned(),
            })
    }
}

fn user_matches(given: &str, stored: &UserId) -> bool {
    given == stored.as_str() || given == stored.localpart()
}

async fn build_client(homeserver_url: &str, data_dir: &Path) -> Result<Client, MatrixError> {
    Client::builder()
        .homeserver_url(homeserver_url)
        .sqlite_store(data_dir.join(STORE_DIR), None)
        // Bounded, quick retries: the sync loop has its own backoff, and
        // callers get errors instead of a 15-minute silent retry.
        .request_config(
            RequestConfig::new()
                .retry_limit(3)
                .max_retry_time(Duration::from_secs(2)),
        )
        .build()
        .await
        .map_err(|e| MatrixError::Http {
            action: format!("setting up a client for {homeserver_url}"),
            message: e.to_string(),
        })
}

fn read_session(data_dir: &Path) -> Result<Option<StoredSession>, MatrixError> {
    let path = data_dir.join(SESSION_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(MatrixError::Io {
                what: "reading session",
                path,
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| MatrixError::Io {
            what: "parsing session",
            path,
            source: std::io::Error::other(e),
        })
}

fn write_session(data_dir: &Path, stored: &StoredSession) -> Result<(), MatrixError> {
    let path = data_dir.join(SESSION_FILE);
    let io = |source| MatrixError::Io {
        what: "writing session",
        path: path.clone(),
        source,
    };
    let text = serde_json::to_string_pretty(stored).map_err(|e| io(std::io::Error::other(e)))?;
    // Write then rename, so a crash never leaves a half-written session.
    let tmp = data_dir.join(format!("{SESSION_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(io)?;
    restrict_permissions(&tmp);
    std::fs::rename(&tmp, &path).map_err(io)
}

/// The session file holds an access token: keep it private to the user.
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        warn!(path = %path.display(), error = %e, "could not restrict session file permissions");
    }
}
