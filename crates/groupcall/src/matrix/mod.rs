//! The Matrix transport: login with a persisted E2EE session, room and
//! state helpers, a resilient sync loop that feeds [`MatrixInput`]s into a
//! channel, plaintext and Olm-encrypted to-device sending (with a plaintext
//! fallback for devices without keys), MSC4140
//! delayed events, and the homeserver's TURN servers.
//!
//! Everything here speaks raw JSON (`serde_json::Value`) for event contents:
//! the MSC3401 shapes on the wire differ from ruma's typed `m.call.*`
//! contents, and the protocol core owns its own serde types.

pub(crate) mod batch;
mod delayed;
mod error;
mod requests;
pub(crate) mod retry;
mod room;
mod sync;
mod to_device;
mod turn;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use matrix_sdk::authentication::matrix::MatrixSession as SdkSession;
use matrix_sdk::config::RequestConfig;
use matrix_sdk::ruma::api::client::account::whoami;
use matrix_sdk::ruma::api::client::session::login;
use matrix_sdk::ruma::api::client::uiaa::{MatrixUserIdentifier, UserIdentifier};
use matrix_sdk::ruma::api::error::ErrorKind;
use matrix_sdk::ruma::assign;
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

/// How long [`MatrixSession::login`] keeps retrying to check a stored
/// session while the homeserver is unreachable or answers with transient
/// errors, before it gives up (keeping the session for the next try).
pub const STORED_SESSION_PATIENCE: Duration = Duration::from_secs(30);

/// What is persisted in `<data_dir>/session.json`.
#[derive(Serialize, Deserialize)]
struct StoredSession {
    homeserver: String,
    session: SdkSession,
}

/// A logged-in Matrix device with end-to-end encryption: its Olm account
/// and sessions in a SQLite store in a data directory, the room state it
/// syncs in memory. Cheap to clone (shares the client).
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
    from_stored_session: bool,
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
    /// still works, else a fresh password login onto the same device id
    /// (never a new device: a homeserver that answers with another device id
    /// is an error). While the homeserver cannot be reached or answers with
    /// a transient error, checking the stored token is retried for up to
    /// [`STORED_SESSION_PATIENCE`] before giving up with that error. A
    /// session of another account is [`MatrixError::SessionMismatch`].
    ///
    /// A new login's session is written to `<data_dir>/session.json`
    /// (atomically, and synced to disk) before the E2EE store is touched, so
    /// that a process killed at any point leaves either no device or a
    /// session file for it, never a store whose device cannot be logged into
    /// again.
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
                Ok(mut s) => match s.check_stored_token().await {
                    Ok(()) => {
                        info!(user_id = %s.user_id, device_id = device, "reusing stored session");
                        s.from_stored_session = true;
                        return Ok(s);
                    }
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => {
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
        // The login request on its own (not the SDK's login, which sets the
        // session up in the store before we could write it down).
        let request = assign!(
            login::v3::Request::new(login::v3::LoginInfo::Password(login::v3::Password::new(
                UserIdentifier::Matrix(MatrixUserIdentifier::new(user.to_owned())),
                password.to_owned(),
            ))),
            {
                device_id: reuse_device.clone().map(Into::into),
                initial_device_display_name: Some(DEVICE_DISPLAY_NAME.to_owned()),
            }
        );
        // A login onto a known device is idempotent and retried like any
        // request; a new device's is not: a retry of a login the server did
        // complete would make a second, orphaned device, so it is retried
        // only when it cannot have been processed.
        let idempotence = if reuse_device.is_some() {
            retry::Retry::Transient
        } else {
            retry::Retry::ConnectOnly
        };
        let what = format!("logging in as {user}");
        let response = retry::REQUEST
            .run(
                &what,
                || {
                    client
                        .send(request.clone())
                        .with_request_config(retry::once())
                },
                |e| retry::classify_http(e, idempotence),
            )
            .await
            .map_err(|e| {
                if matches!(e.client_api_error_kind(), Some(ErrorKind::Forbidden)) {
                    MatrixError::WrongPassword {
                        user: user.to_owned(),
                        homeserver: homeserver_url.to_owned(),
                    }
                } else {
                    MatrixError::http(what.clone(), e)
                }
            })?;
        if let Some(device) = &reuse_device
            && response.device_id.as_str() != device
        {
            return Err(MatrixError::SessionMismatch {
                dir: data_dir,
                stored: format!("device {device}"),
                requested: format!(
                    "the homeserver logged {} in as device {}",
                    response.user_id, response.device_id
                ),
            });
        }
        info!(user_id = %response.user_id, device_id = %response.device_id, "logged in");
        let session = SdkSession::from(&response);
        write_session(
            &data_dir,
            &StoredSession {
                homeserver: homeserver_url.to_owned(),
                session: session.clone(),
            },
        )?;
        client
            .restore_session(session)
            .await
            .map_err(|e| MatrixError::sdk("setting up the new session", e))?;
        Ok(MatrixSession {
            client,
            user_id: response.user_id,
            data_dir,
            delayed_support: Arc::default(),
            keyless: Arc::default(),
            call_session_id: new_call_session_id(),
            from_stored_session: false,
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

    /// Whether the stored access token still works (`whoami`), retrying
    /// transient failures (homeserver unreachable, slow, 5xx, 429) with
    /// backoff for up to [`STORED_SESSION_PATIENCE`].
    async fn check_stored_token(&self) -> Result<(), MatrixError> {
        let what = "checking the stored access token";
        let patience = retry::Backoff {
            first: Duration::from_millis(250),
            max_delay: Duration::from_secs(4),
            attempts: None,
            budget: Some(STORED_SESSION_PATIENCE),
        };
        patience
            .run(
                what,
                || {
                    self.client
                        .send(whoami::v3::Request::new())
                        .with_request_config(retry::once())
                },
                |e| retry::classify_http(e, retry::Retry::Transient),
            )
            .await
            .map(drop)
            .map_err(|e| MatrixError::http(what, e))
    }

    /// Whether [`MatrixSession::login`] reused the stored session (its
    /// access token still worked) rather than logging in with the password.
    pub fn from_stored_session(&self) -> bool {
        self.from_stored_session
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
            from_stored_session: true,
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

/// A client whose E2EE (crypto) store is SQLite in `data_dir` and whose
/// room state store is in memory.
///
/// Every sync loop starts with a full initial sync
/// ([`SyncOptions::from_scratch`](sync::SyncOptions::from_scratch)), so
/// persisted room state would never be read back; keeping it in memory takes
/// SQLite off the path of every sync response (matrix-sdk processed one in
/// 3-4 ms instead of 6-8 in `bench setup`, three of them on a call's setup
/// path). No room operation depends on that store before the first sync:
/// leaving is a plain request ([`MatrixSession::leave_room`]), and the
/// permission checks wait for the first sync.
async fn build_client(homeserver_url: &str, data_dir: &Path) -> Result<Client, MatrixError> {
    let store_dir = data_dir.join(STORE_DIR);
    let crypto = matrix_sdk::SqliteCryptoStore::open(&store_dir, None)
        .await
        .map_err(|e| MatrixError::Io {
            what: "opening the E2EE store",
            path: store_dir.clone(),
            source: std::io::Error::other(e),
        })?;
    let stores = matrix_sdk::config::StoreConfig::new(
        matrix_sdk::cross_process_lock::CrossProcessLockConfig::multi_process("groupcall"),
    )
    .state_store(matrix_sdk::MemoryStore::new())
    .crypto_store(crypto);
    Client::builder()
        .homeserver_url(homeserver_url)
        .store_config(stores)
        // No retries inside matrix-sdk (its default retries for up to 15
        // minutes): every retry is ours, in one policy (`retry`), and never
        // stacked on the SDK's. Requests we do not retry (creating a room,
        // the SDK's own key uploads and queries, which it repeats with the
        // next sync) fail fast with an error.
        .request_config(RequestConfig::new().disable_retry())
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
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join(SESSION_FILE);
    let io = |source| MatrixError::Io {
        what: "writing session",
        path: path.clone(),
        source,
    };
    let text = serde_json::to_string_pretty(stored).map_err(|e| io(std::io::Error::other(e)))?;
    // Write, sync, then rename (and sync the directory), so that neither a
    // crash nor a power loss leaves a half-written or vanished session.
    let tmp = data_dir.join(format!("{SESSION_FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    restrict_permissions(&tmp);
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io)?;
    if let Err(e) = std::fs::File::open(data_dir).and_then(|d| d.sync_all()) {
        warn!(dir = %data_dir.display(), error = %e, "could not sync the data directory");
    }
    Ok(())
}

/// The session file holds an access token: keep it private to the user.
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        warn!(path = %path.display(), error = %e, "could not restrict session file permissions");
    }
}
