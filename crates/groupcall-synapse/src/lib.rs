//! A throwaway local [Synapse](https://github.com/element-hq/synapse)
//! homeserver for groupcall's integration tests.
//!
//! [`Synapse::start`] makes sure a Python venv with a pinned
//! `matrix-synapse` exists in a cache directory (installing it with pip
//! when missing, under a lock file so that concurrent test processes do not
//! install at once), puts a configuration in a fresh data directory (a
//! copy of one generated once per Synapse version and kept in the cache
//! directory, with its own name and paths),
//! tunes it for tests (no rate limits, no sync response cache, MSC4140
//! delayed events on, open registration, no federation) and starts Synapse
//! as a child process on a loopback port. [`Federation::start`] starts
//! several that federate with each other on loopback (see [`Federation`]).
//!
//! The child runs in its own process group and is killed when the
//! [`Synapse`] value is dropped, so a panicking test leaves no stray server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), groupcall_synapse::SynapseError> {
//! use groupcall_synapse::{Synapse, SynapseOptions};
//! let mut hs = Synapse::start(SynapseOptions::default()).await?;
//! let alice = hs.register_user("alice", "secret").await?;
//! println!("{} is {} on {}", alice.user_id, alice.device_id, hs.base_url());
//! hs.stop().await?;
//! # Ok(()) }
//! ```
//!
//! Environment variables:
//! - `GROUPCALL_CACHE_DIR`: cache directory (else `$XDG_CACHE_HOME/groupcall`,
//!   else `~/.cache/groupcall`); the venv lives in its `synapse-venv`.
//! - `GROUPCALL_SYNAPSE_OFFLINE=1`: never run pip; a missing install is an
//!   error ([`SynapseError::NotInstalled`]).
//! - `GROUPCALL_SYNAPSE_PYTHON`: the Python interpreter used to create the
//!   venv (default `python3`).
//! - `GROUPCALL_SYNAPSE_KEEP=1`: keep temporary data directories (config,
//!   database, log) after the server is dropped, for debugging.

#![warn(missing_docs)]

mod federation;
mod install;
mod process;

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info};

pub use federation::{Federation, FederationListener, FederationOptions, FederationRetry};
pub use install::{SYNAPSE_VERSION, default_cache_dir};

/// Errors of starting, driving and stopping a local Synapse.
#[derive(Debug, thiserror::Error)]
pub enum SynapseError {
    /// The Python interpreter used to create the venv could not be run.
    #[error(
        "Python interpreter `{python}` not found or not runnable ({reason}); install Python 3.10+ \
         with the venv module (Debian: apt-get install python3 python3-venv) or set \
         GROUPCALL_SYNAPSE_PYTHON"
    )]
    PythonMissing {
        /// The interpreter that was tried.
        python: String,
        /// Why running it failed.
        reason: String,
    },
    /// Synapse is not installed and installing was refused (offline mode).
    #[error(
        "matrix-synapse {version} is not installed in {venv} and installing is disabled \
         (GROUPCALL_SYNAPSE_OFFLINE or SynapseOptions::install): run once with access to PyPI, \
         or point GROUPCALL_CACHE_DIR at a cache that has it"
    )]
    NotInstalled {
        /// Where the venv was expected.
        venv: PathBuf,
        /// The pinned Synapse version.
        version: String,
    },
    /// Creating the venv or `pip install` failed.
    #[error("installing matrix-synapse {version} into {venv} failed ({step}); log tail:\n{log}")]
    InstallFailed {
        /// The venv being created.
        venv: PathBuf,
        /// The pinned Synapse version.
        version: String,
        /// Which step failed.
        step: String,
        /// The end of the installer's output.
        log: String,
    },
    /// The requested fixed port is in use on the listen address.
    #[error(
        "port {port} is busy (another program listens there); pick another port or let groupcall-synapse choose a free one"
    )]
    PortBusy {
        /// The busy port.
        port: u16,
    },
    /// `--generate-config` failed.
    #[error("generating the Synapse config in {dir} failed; output:\n{log}")]
    ConfigFailed {
        /// The data directory.
        dir: PathBuf,
        /// Synapse's output.
        log: String,
    },
    /// Synapse did not answer `/_matrix/client/versions` in time.
    #[error("Synapse did not answer {url} within {timeout:?}; log tail ({log}):\n{log_tail}")]
    StartTimeout {
        /// The URL polled.
        url: String,
        /// The timeout that expired.
        timeout: Duration,
        /// Path of the full log.
        log: PathBuf,
        /// The end of Synapse's log.
        log_tail: String,
    },
    /// Synapse exited while starting.
    #[error("Synapse exited during startup ({status}); log tail ({log}):\n{log_tail}")]
    Exited {
        /// The exit status.
        status: String,
        /// Path of the full log.
        log: PathBuf,
        /// The end of Synapse's log.
        log_tail: String,
    },
    /// Registration was refused.
    #[error("registering user `{user}` failed: HTTP {status}: {body}")]
    Register {
        /// The requested user name.
        user: String,
        /// HTTP status code.
        status: u16,
        /// Response body (a Matrix error JSON).
        body: String,
    },
    /// An HTTP request to Synapse failed below the HTTP layer.
    #[error("HTTP request to Synapse ({what}) failed: {source}")]
    Http {
        /// What was being requested.
        what: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// A file system or process operation failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No cache directory could be determined.
    #[error("no cache directory: set GROUPCALL_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// Making the throwaway TLS certificate of a test federation failed.
    #[error(
        "making the test federation's throwaway TLS certificate with `openssl` failed ({reason}); \
         install openssl (Debian: apt-get install openssl)"
    )]
    Certificate {
        /// Why it failed (with openssl's output).
        reason: String,
    },
    /// A client-server request made by the federation helpers failed.
    #[error("{what} failed: HTTP {status}: {body}")]
    Request {
        /// What was being requested.
        what: String,
        /// HTTP status code.
        status: u16,
        /// Response body (a Matrix error JSON).
        body: String,
    },
    /// A federation option is out of range.
    #[error("invalid federation option: {0}")]
    InvalidOption(String),
    /// Something expected over federation did not arrive in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
    },
}

impl SynapseError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SynapseError {
        let what = what.into();
        move |source| SynapseError::Io { what, source }
    }
}

/// Whether a missing Synapse install may be installed with pip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InstallPolicy {
    /// Install unless the environment variable `GROUPCALL_SYNAPSE_OFFLINE`
    /// is set to a non-empty value other than `0`.
    #[default]
    FromEnv,
    /// Install when missing.
    Allow,
    /// Never install: a missing install is [`SynapseError::NotInstalled`].
    Refuse,
}

impl InstallPolicy {
    fn allowed(self) -> bool {
        match self {
            InstallPolicy::Allow => true,
            InstallPolicy::Refuse => false,
            InstallPolicy::FromEnv => !env_flag("GROUPCALL_SYNAPSE_OFFLINE"),
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// How to start a [`Synapse`].
#[derive(Debug, Clone)]
pub struct SynapseOptions {
    /// Cache directory holding `synapse-venv`; `None` uses
    /// [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Directory for config, database and log. `None` makes a fresh
    /// temporary directory that is removed when the server is dropped
    /// (unless `GROUPCALL_SYNAPSE_KEEP=1`). A given directory is kept and,
    /// when it already holds a generated config, reused as is.
    pub data_dir: Option<PathBuf>,
    /// Fixed port; `None` picks a free one.
    pub port: Option<u16>,
    /// The address the client API listens on (default 127.0.0.1). Tests
    /// with network namespaces use the address of a bridge they created.
    pub bind_address: IpAddr,
    /// Further addresses the client API also listens on, same port (none
    /// by default): a test federation binds loopback, and processes in
    /// network namespaces reach it on the namespaces' gateway address
    /// ([`Synapse::base_url_on`]). Federation stays on `bind_address`.
    pub extra_client_addresses: Vec<IpAddr>,
    /// The homeserver's `server_name` (default `localhost`).
    pub server_name: String,
    /// Whether pip may install Synapse when it is missing.
    pub install: InstallPolicy,
    /// Python interpreter that creates the venv; `None` uses
    /// `$GROUPCALL_SYNAPSE_PYTHON` or `python3`.
    pub python: Option<String>,
    /// How long to wait for `/_matrix/client/versions` to answer.
    pub start_timeout: Duration,
    /// How long to wait after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// Extra top-level config keys, applied last (they win over ours).
    pub extra_config: serde_json::Map<String, serde_json::Value>,
    /// A federation listener (TLS) and the settings that let this server
    /// federate with the other servers of a loopback test federation;
    /// `None` (the default) disables federation. Normally set by
    /// [`Federation::start`], which also makes `server_name`
    /// `<bind address>:<federation port>`.
    pub federation: Option<FederationListener>,
}

impl Default for SynapseOptions {
    fn default() -> Self {
        SynapseOptions {
            cache_dir: None,
            data_dir: None,
            port: None,
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            extra_client_addresses: Vec::new(),
            server_name: "localhost".to_owned(),
            install: InstallPolicy::FromEnv,
            python: None,
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(10),
            extra_config: serde_json::Map::new(),
            federation: None,
        }
    }
}

/// Credentials of a freshly registered user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisteredUser {
    /// Full Matrix user id, e.g. `@alice:localhost`.
    pub user_id: String,
    /// Access token of the device created by registration.
    pub access_token: String,
    /// Device created by registration.
    pub device_id: String,
    /// The password given at registration.
    #[serde(skip)]
    pub password: String,
    /// Base URL of the homeserver, e.g. `http://127.0.0.1:41234`.
    #[serde(skip)]
    pub homeserver_url: String,
}

enum DataDir {
    Temp(tempfile::TempDir),
    Given(PathBuf),
}

impl DataDir {
    fn path(&self) -> &Path {
        match self {
            DataDir::Temp(t) => t.path(),
            DataDir::Given(p) => p,
        }
    }
}

/// A running (or stopped) local Synapse. Dropping it kills the process.
pub struct Synapse {
    // Field order matters for Drop: the process must die before its data
    // directory is removed.
    process: Option<process::Running>,
    venv: PathBuf,
    cache_dir: PathBuf,
    data: DataDir,
    port: u16,
    bind_address: IpAddr,
    extra_client_addresses: Vec<IpAddr>,
    server_name: String,
    start_timeout: Duration,
    stop_timeout: Duration,
    federation: Option<FederationListener>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Synapse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synapse")
            .field("base_url", &self.base_url())
            .field("data_dir", &self.data_dir())
            .field("running", &self.process.is_some())
            .finish()
    }
}

const CONFIG_FILE: &str = "homeserver.yaml";
const OVERRIDES_FILE: &str = "groupcall-overrides.yaml";
const LOG_CONFIG_FILE: &str = "groupcall-log.yaml";
const LOG_FILE: &str = "synapse.log";

impl Synapse {
    /// Installs Synapse if needed, configures a data directory and starts
    /// the server, returning once `/_matrix/client/versions` answers.
    pub async fn start(options: SynapseOptions) -> Result<Synapse, SynapseError> {
        let cache_dir = match &options.cache_dir {
            Some(d) => d.clone(),
            None => default_cache_dir().ok_or(SynapseError::NoCacheDir)?,
        };
        let python = options
            .python
            .clone()
            .or_else(|| std::env::var("GROUPCALL_SYNAPSE_PYTHON").ok())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "python3".to_owned());
        let venv = install::ensure_venv(&cache_dir, &python, options.install.allowed()).await?;

        let data = match &options.data_dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .map_err(SynapseError::io(format!("creating {}", d.display())))?;
                DataDir::Given(d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("groupcall-synapse-")
                    .tempdir()
                    .map_err(SynapseError::io("creating a temporary data directory"))?;
                if env_flag("GROUPCALL_SYNAPSE_KEEP") {
                    let path = t.keep();
                    info!(dir = %path.display(), "keeping Synapse data directory");
                    DataDir::Given(path)
                } else {
                    DataDir::Temp(t)
                }
            }
        };

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .map_err(|source| SynapseError::Http {
                what: "building the HTTP client".to_owned(),
                source,
            })?;

        let mut hs = Synapse {
            process: None,
            venv,
            cache_dir,
            data,
            port: 0,
            bind_address: options.bind_address,
            extra_client_addresses: options.extra_client_addresses.clone(),
            server_name: options.server_name.clone(),
            start_timeout: options.start_timeout,
            stop_timeout: options.stop_timeout,
            federation: options.federation.clone(),
            http,
        };
        hs.generate_config().await?;

        // A port picked by binding port 0 may be taken by someone else before
        // Synapse binds it: retry with a new one a few times.
        let attempts = if options.port.is_some() { 1 } else { 3 };
        let mut last_err = None;
        for _ in 0..attempts {
            let port = match options.port {
                Some(p) => {
                    check_port_free(hs.bind_address, p)?;
                    p
                }
                None => free_port(hs.bind_address)?,
            };
            if let Some(f) = &options.federation {
                check_port_free(hs.bind_address, f.port)?;
            }
            hs.port = port;
            hs.write_overrides(&options.extra_config)?;
            match hs.launch().await {
                Ok(()) => return Ok(hs),
                Err(SynapseError::PortBusy { port }) if options.port.is_none() => {
                    debug!(port, "picked port got taken, trying another");
                    last_err = Some(SynapseError::PortBusy { port });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(SynapseError::PortBusy { port: hs.port }))
    }

    /// Base URL of the client API, e.g. `http://127.0.0.1:41234`.
    pub fn base_url(&self) -> String {
        format!(
            "http://{}",
            std::net::SocketAddr::new(self.bind_address, self.port)
        )
    }

    /// Base URL of the client API on `addr`: the bind address or one of
    /// [`SynapseOptions::extra_client_addresses`] (not checked).
    pub fn base_url_on(&self, addr: IpAddr) -> String {
        format!("http://{}", std::net::SocketAddr::new(addr, self.port))
    }

    /// The port Synapse listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The federation listener, when this server federates.
    pub fn federation(&self) -> Option<&FederationListener> {
        self.federation.as_ref()
    }

    /// The HTTP client used for requests to this server (no proxy).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The homeserver's `server_name` (the part after `:` in user ids).
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// Directory holding config, database and log.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Path of Synapse's log (its stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.data.path().join(LOG_FILE)
    }

    /// The last `lines` lines of Synapse's log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::log_tail(&self.log_path(), lines)
    }

    /// The venv Synapse runs from.
    pub fn venv(&self) -> &Path {
        &self.venv
    }

    /// Whether the server process is running (started and not stopped).
    pub fn is_running(&mut self) -> bool {
        match &mut self.process {
            Some(p) => p.is_alive(),
            None => false,
        }
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid())
    }

    /// Registers a user with a password (`m.login.dummy` auth) and returns
    /// the credentials of the device registration created.
    pub async fn register_user(
        &self,
        name: &str,
        password: &str,
    ) -> Result<RegisteredUser, SynapseError> {
        let url = format!("{}/_matrix/client/v3/register", self.base_url());
        let body = serde_json::json!({
            "username": name,
            "password": password,
            "auth": { "type": "m.login.dummy" },
            "initial_device_display_name": "groupcall-synapse",
        });
        let resp = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|source| SynapseError::Http {
                what: format!("POST {url}"),
                source,
            })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|source| SynapseError::Http {
            what: format!("reading the response of POST {url}"),
            source,
        })?;
        if !status.is_success() {
            return Err(SynapseError::Register {
                user: name.to_owned(),
                status: status.as_u16(),
                body: text,
            });
        }
        let mut user: RegisteredUser =
            serde_json::from_str(&text).map_err(|e| SynapseError::Register {
                user: name.to_owned(),
                status: status.as_u16(),
                body: format!("unexpected response ({e}): {text}"),
            })?;
        user.password = password.to_owned();
        user.homeserver_url = self.base_url();
        debug!(user_id = %user.user_id, device_id = %user.device_id, "registered user");
        Ok(user)
    }

    /// Stops the server: SIGTERM to its process group, then SIGKILL after
    /// the stop timeout. Data and port are kept for [`Synapse::restart`].
    /// Stopping a stopped server does nothing.
    pub async fn stop(&mut self) -> Result<(), SynapseError> {
        if let Some(p) = self.process.take() {
            p.stop(self.stop_timeout).await?;
            info!(port = self.port, "Synapse stopped");
        }
        Ok(())
    }

    /// Stops the server if it runs and starts it again on the same port
    /// with the same data.
    pub async fn restart(&mut self) -> Result<(), SynapseError> {
        self.stop().await?;
        check_port_free(self.bind_address, self.port)?;
        if let Some(f) = &self.federation {
            check_port_free(self.bind_address, f.port)?;
        }
        self.launch().await
    }

    /// Puts a generated `homeserver.yaml` and signing key into the data
    /// directory (a directory that holds a config already is reused as
    /// is). Synapse's `--generate-config` takes about 2 s (it imports all
    /// of Synapse), so it runs once per Synapse version and its output is
    /// kept under the cache directory (`synapse-generated/`); every later
    /// server starts from a copy. The overrides ([`overrides`]) give it its
    /// own server name and point every path of the generated file into its
    /// data directory. Servers started so share the signing key and the
    /// generated secrets (registration, macaroons): fine for throwaway
    /// local servers, and servers that federate tell each other apart by
    /// name (a key is fetched per server name).
    async fn generate_config(&self) -> Result<(), SynapseError> {
        let dir = self.data.path();
        if dir.join(CONFIG_FILE).exists() {
            debug!(dir = %dir.display(), "reusing existing Synapse config");
            return Ok(());
        }
        let generated = self.generated_config().await?;
        let key = signing_key_file(&self.server_name);
        for (from, to) in [(CONFIG_FILE, CONFIG_FILE), (GENERATED_KEY, key.as_str())] {
            std::fs::copy(generated.join(from), dir.join(to)).map_err(SynapseError::io(
                format!("copying the generated {from} from {}", generated.display()),
            ))?;
        }
        Ok(())
    }

    /// The directory under the cache holding the generated config (see
    /// [`Synapse::generate_config`]), generated now if missing.
    async fn generated_config(&self) -> Result<PathBuf, SynapseError> {
        let root = self.cache_dir.join("synapse-generated");
        let target = root.join(install::SYNAPSE_VERSION);
        let key = GENERATED_KEY;
        if target.join(CONFIG_FILE).exists() && target.join(key).exists() {
            return Ok(target);
        }
        std::fs::create_dir_all(&root)
            .map_err(SynapseError::io(format!("creating {}", root.display())))?;
        // Generated beside its final place and renamed into it, so that a
        // process reading the cache never sees half of it.
        let work = tempfile::Builder::new()
            .prefix(".generating-")
            .tempdir_in(&root)
            .map_err(SynapseError::io(format!(
                "creating a directory in {}",
                root.display()
            )))?;
        let out = tokio::process::Command::new(install::venv_python(&self.venv))
            .current_dir(work.path())
            .args(["-m", "synapse.app.homeserver", "--server-name"])
            .arg(GENERATED_NAME)
            .arg("--config-path")
            .arg(work.path().join(CONFIG_FILE))
            .arg("--data-directory")
            .arg(work.path())
            .args(["--generate-config", "--report-stats=no"])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(SynapseError::io("running synapse --generate-config"))?;
        if !out.status.success() || !work.path().join(key).exists() {
            return Err(SynapseError::ConfigFailed {
                dir: work.path().to_owned(),
                log: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        let work = work.keep();
        if std::fs::rename(&work, &target).is_err() {
            // Another process put it there first (a non-empty target), or
            // an incomplete one is in the way (removed, then ours goes in).
            let complete = target.join(CONFIG_FILE).exists() && target.join(key).exists();
            if complete {
                let _ = std::fs::remove_dir_all(&work);
                return Ok(target);
            }
            let _ = std::fs::remove_dir_all(&target);
            if let Err(e) = std::fs::rename(&work, &target) {
                debug!(error = %e, dir = %work.display(), "generated Synapse config not cached");
                return Ok(work);
            }
        }
        debug!(dir = %target.display(), "generated Synapse config cached");
        Ok(target)
    }

    /// Writes our settings to a second config file that Synapse reads after
    /// the generated one (later files override top-level keys). JSON is
    /// valid YAML, so no YAML writer is needed, and the generated file's
    /// missing trailing newline cannot corrupt anything.
    fn write_overrides(
        &self,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), SynapseError> {
        let dir = self.data.path();
        let log_config = serde_json::json!({
            "version": 1,
            "formatters": { "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"
            }},
            "handlers": { "console": {
                "class": "logging.StreamHandler",
                "formatter": "precise",
                "stream": "ext://sys.stderr",
            }},
            "loggers": { "synapse.storage.SQL": { "level": "INFO" } },
            "root": { "level": "INFO", "handlers": ["console"] },
            "disable_existing_loggers": false,
        });
        write_json(&dir.join(LOG_CONFIG_FILE), &log_config)?;

        let mut config = overrides(self.bind_address, self.port, dir, &self.server_name);
        if let Some(addrs) = config
            .get_mut("listeners")
            .and_then(|l| l.get_mut(0))
            .and_then(|l| l.get_mut("bind_addresses"))
            .and_then(|a| a.as_array_mut())
        {
            addrs.extend(
                self.extra_client_addresses
                    .iter()
                    .map(|a| serde_json::Value::String(a.to_string())),
            );
        }
        if let Some(f) = &self.federation {
            federation::apply(&mut config, self.bind_address, f);
        }
        for (k, v) in extra {
            config.insert(k.clone(), v.clone());
        }
        write_json(
            &dir.join(OVERRIDES_FILE),
            &serde_json::Value::Object(config),
        )
    }

    async fn launch(&mut self) -> Result<(), SynapseError> {
        let dir = self.data.path().to_owned();
        let log = self.log_path();
        let mut cmd = std::process::Command::new(install::venv_python(&self.venv));
        cmd.current_dir(&dir)
            .args(["-m", "synapse.app.homeserver", "--config-path"])
            .arg(dir.join(CONFIG_FILE))
            .arg("--config-path")
            .arg(dir.join(OVERRIDES_FILE))
            .env("PYTHONUNBUFFERED", "1");
        let mut running = process::Running::spawn(cmd, &log)?;
        info!(port = self.port, pid = running.pid(), dir = %dir.display(), "starting Synapse");

        let url = format!("{}/_matrix/client/versions", self.base_url());
        let started = tokio::time::Instant::now();
        loop {
            if let Some(status) = running.exited()? {
                let log_tail = process::log_tail(&log, 60);
                if log_tail.contains("Address already in use") {
                    return Err(SynapseError::PortBusy { port: self.port });
                }
                return Err(SynapseError::Exited {
                    status,
                    log,
                    log_tail,
                });
            }
            let ok = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                info!(
                    port = self.port,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "Synapse is ready"
                );
                self.process = Some(running);
                return Ok(());
            }
            if started.elapsed() > self.start_timeout {
                running.stop(self.stop_timeout).await?;
                return Err(SynapseError::StartTimeout {
                    url,
                    timeout: self.start_timeout,
                    log_tail: process::log_tail(&log, 60),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The file name `--generate-config` gives the signing key of
/// `server_name`.
fn signing_key_file(server_name: &str) -> String {
    format!("{server_name}.signing.key")
}

/// The server name the cached config is generated for (each server's
/// own is set in [`overrides`]), and the key file that names.
const GENERATED_NAME: &str = "localhost";
const GENERATED_KEY: &str = "localhost.signing.key";

/// Our settings on top of the generated config. Every path points into
/// the data directory `dir` (the generated config may come from the
/// cache, see [`Synapse::generate_config`]).
fn overrides(
    bind_address: IpAddr,
    port: u16,
    dir: &Path,
    server_name: &str,
) -> serde_json::Map<String, serde_json::Value> {
    // Rate limits: `per_second: 0` never refills, so "unlimited" is a huge
    // rate with a huge burst.
    let huge = serde_json::json!({ "per_second": 1_000_000, "burst_count": 1_000_000 });
    let value = serde_json::json!({
        "listeners": [{
            "port": port,
            "bind_addresses": [bind_address.to_string()],
            "type": "http",
            "tls": false,
            "x_forwarded": false,
            "resources": [{ "names": ["client"], "compress": false }],
        }],
        "database": {
            "name": "sqlite3",
            "args": { "database": dir.join("homeserver.db") },
        },
        "log_config": dir.join(LOG_CONFIG_FILE),
        "report_stats": false,
        "trusted_key_servers": [],
        "federation_domain_whitelist": [],
        "enable_registration": true,
        "enable_registration_without_verification": true,
        "presence": { "enabled": false },
        "caches": { "sync_response_cache_duration": 0 },
        "max_event_delay_duration": "24h",
        "experimental_features": { "msc4140_max_delayed_events_per_user": 10_000 },
        "url_preview_enabled": false,
        "suppress_key_server_warning": true,
        "rc_message": huge,
        "rc_registration": huge,
        "rc_registration_token_validity": huge,
        "rc_login": { "address": huge, "account": huge, "failed_attempts": huge },
        "rc_admin_redaction": huge,
        "rc_joins": { "local": huge, "remote": huge },
        "rc_joins_per_room": huge,
        "rc_3pid_validation": huge,
        "rc_invites": { "per_room": huge, "per_user": huge, "per_issuer": huge },
        "rc_third_party_invite": huge,
        "rc_key_requests": huge,
        "rc_media_create": huge,
        "rc_presence": { "per_user": huge },
        "rc_delayed_event_mgmt": huge,
        "rc_room_creation": huge,
        "rc_reports": huge,
        "rc_user_directory": huge,
        "rc_profile": huge,
        "rc_federation": {
            "window_size": 1000,
            "sleep_limit": 1_000_000,
            "sleep_delay": 1,
            "reject_limit": 1_000_000,
            "concurrent": 1_000_000,
        },
    });
    let mut m = match value {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    // Its own name and paths over the generated config's (which may be a
    // copy from the cache).
    let path = |p: PathBuf| serde_json::Value::String(p.to_string_lossy().into_owned());
    m.insert("server_name".into(), server_name.into());
    m.insert("pid_file".into(), path(dir.join("homeserver.pid")));
    m.insert("media_store_path".into(), path(dir.join("media_store")));
    m.insert(
        "signing_key_path".into(),
        path(dir.join(signing_key_file(server_name))),
    );
    m
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), SynapseError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| SynapseError::Io {
        what: format!("serialising {}", path.display()),
        source: std::io::Error::other(e),
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(SynapseError::io(format!("writing {}", path.display())))
}

/// Fails with [`SynapseError::PortBusy`] when `port` cannot be bound on
/// `addr`.
fn check_port_free(addr: IpAddr, port: u16) -> Result<(), SynapseError> {
    match TcpListener::bind((addr, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(SynapseError::PortBusy { port }),
        Err(e) => Err(SynapseError::Io {
            what: format!("probing port {port}"),
            source: e,
        }),
    }
}

/// A port that was free on `addr` a moment ago.
fn free_port(addr: IpAddr) -> Result<u16, SynapseError> {
    let l = TcpListener::bind((addr, 0)).map_err(SynapseError::io("binding port 0"))?;
    Ok(l.local_addr()
        .map_err(SynapseError::io("reading a bound port"))?
        .port())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_valid_json_with_our_keys() {
        let m = overrides(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            1234,
            Path::new("/tmp/x"),
            "localhost",
        );
        assert_eq!(m["listeners"][0]["port"], 1234);
        // Every path of the generated config points into the data dir.
        for key in [
            "pid_file",
            "media_store_path",
            "signing_key_path",
            "log_config",
        ] {
            assert!(m[key].as_str().unwrap().starts_with("/tmp/x/"), "{key}");
        }
        assert_eq!(m["signing_key_path"], "/tmp/x/localhost.signing.key");
        assert_eq!(m["server_name"], "localhost");
        assert_eq!(m["database"]["args"]["database"], "/tmp/x/homeserver.db");
        assert_eq!(m["listeners"][0]["bind_addresses"][0], "127.0.0.1");
        assert_eq!(m["max_event_delay_duration"], "24h");
        assert_eq!(m["caches"]["sync_response_cache_duration"], 0);
        assert!(
            m.keys()
                .filter(|k| k.starts_with("rc_"))
                .all(|k| !m[k].to_string().contains("\"per_second\":0,"))
        );
    }

    #[test]
    fn busy_port_detected() {
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(matches!(
            check_port_free(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            Err(SynapseError::PortBusy { .. })
        ));
    }
}
