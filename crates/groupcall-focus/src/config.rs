//! `focus.toml`: the focus's configuration, parsed and validated.
//!
//! [`Config::parse`] is pure (text in, a [`Config`] or a [`ConfigError`]
//! out); [`Config::load`] reads the file first. The only other I/O here is
//! [`Config::matrix_password`] / [`Config::turn_password`], which read the
//! secrets from the environment or a file when the driver needs them: the
//! configuration file itself never holds a password.
//!
//! Every error names the file and the field (`section.key`), e.g.
//! `focus.toml: limits.max_participants_per_call: must be at least 1`.
//! Unknown keys are errors too (a misspelt key would otherwise be ignored
//! silently). Relative paths (`data_dir`, `password_file`) are relative to
//! the directory of the configuration file.
//!
//! The reference with every key is `docs/focus.example.toml`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

/// Default [`HeartbeatConfig::ping_interval`] (MSC3898: 30 s).
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Default [`HeartbeatConfig::ping_timeout`] (60 s).
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`DrainConfig::grace_period`] (10 s).
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// Default [`Limits::max_participants_per_call`].
pub const DEFAULT_MAX_PARTICIPANTS_PER_CALL: u32 = 50;
/// Default [`Limits::max_tracks_per_participant`] (audio, camera video,
/// screenshare video and audio).
pub const DEFAULT_MAX_TRACKS_PER_PARTICIPANT: u32 = 4;
/// Default [`Limits::max_kbps_per_participant`].
pub const DEFAULT_MAX_KBPS_PER_PARTICIPANT: u32 = 5_000;

/// The focus's configuration (see the module docs).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// The file it was read from (for error messages).
    pub file: PathBuf,
    /// `homeserver`: the homeserver's base URL (`http://` or `https://`).
    pub homeserver: String,
    /// `user`: the bot account, a full user id (`@focus:example.org`) or a
    /// localpart.
    pub user: String,
    /// `password_env` or `password_file`: where the account's password is.
    pub password: SecretSource,
    /// `data_dir`: the device's session and E2EE store.
    pub data_dir: PathBuf,
    /// `allow`: whose invites are accepted.
    pub allow: AllowList,
    /// `allow_plaintext`: accept call signalling that did not come
    /// Olm-encrypted (default false).
    pub allow_plaintext: bool,
    /// `cascade`: link with the other foci the call's participants name
    /// (one focus per homeserver; docs/protocol.md, "Cascading foci").
    /// Default false while cascading is being built (issue 14).
    pub cascade: bool,
    /// `http_listen`: the address of the HTTP endpoint serving `/metrics`
    /// and `/health` (none: no endpoint).
    pub http_listen: Option<SocketAddr>,
    /// `[media]`.
    pub media: MediaConfig,
    /// `[turn]`, optional.
    pub turn: Option<TurnConfig>,
    /// `[limits]`.
    pub limits: Limits,
    /// `[heartbeat]`.
    pub heartbeat: HeartbeatConfig,
    /// `[drain]`.
    pub drain: DrainConfig,
}

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecretSource {
    /// An environment variable (`password_env`).
    Env(String),
    /// A file (`password_file`); its content minus trailing line breaks.
    File(PathBuf),
}

/// Users and servers whose invites the focus accepts (`allow`).
///
/// An entry `@user:server` allows that user; any other entry is a server
/// name (`example.org`, `example.org:8448`) and allows every user of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    /// Allowed user ids.
    pub users: BTreeSet<String>,
    /// Allowed server names.
    pub servers: BTreeSet<String>,
}

impl AllowList {
    /// Whether `user_id` (`@local:server`) may invite the focus.
    pub fn allows(&self, user_id: &str) -> bool {
        if self.users.contains(user_id) {
            return true;
        }
        match user_id.strip_prefix('@').and_then(|u| u.split_once(':')) {
            Some((_, server)) => self.servers.contains(server),
            None => false,
        }
    }
}

/// `[media]`: the media sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MediaConfig {
    /// `bind`: the UDP addresses to bind (`IP:port`, port 0 for any).
    pub bind: Vec<SocketAddr>,
    /// `advertise`: IP addresses offered to clients as candidates instead
    /// of the bound ones (a public IP in front of a NAT that maps the same
    /// ports). Empty: the bound addresses; one per bound address, in
    /// order; or several for a single bound address (see
    /// [`offered_addrs`]).
    pub advertise: Vec<IpAddr>,
    /// `estimate_bandwidth`: estimate each subscriber's downlink
    /// (transport-wide congestion control feedback) and fit its simulcast
    /// layers to it once it shows congestion, together with a sign of loss
    /// (see docs/focus-forwarding.md). Default true; false: the layers
    /// follow the requested sizes and the loss the subscriber's receiver
    /// reports alone.
    pub estimate_bandwidth: bool,
}

/// `[turn]`: a TURN server the focus may relay through.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TurnConfig {
    /// `uris`: `turn:`, `turns:` or `stun:` URIs.
    pub uris: Vec<String>,
    /// `username`.
    pub username: String,
    /// `password_env` or `password_file`.
    pub password: SecretSource,
    /// `relay_only`: offer clients only the relayed candidates (a focus
    /// whose own addresses clients cannot reach). Default false: the bound
    /// (or advertised) addresses and the relayed ones.
    pub relay_only: bool,
}

/// The addresses offered to clients for each bound socket
/// (`[media] advertise`): with no advertised IP, each socket's own
/// address; with as many as there are sockets, one for each, in order;
/// with one socket, every advertised IP with its port. A socket bound to
/// every address (`0.0.0.0`, `::`) must be given one. Anything else is an
/// error, in words.
pub fn offered_addrs(
    bound: &[SocketAddr],
    advertise: &[IpAddr],
) -> Result<Vec<Vec<SocketAddr>>, String> {
    let offered: Vec<Vec<SocketAddr>> = if advertise.is_empty() {
        bound.iter().map(|b| vec![*b]).collect()
    } else if bound.len() == 1 {
        let port = bound.first().map_or(0, SocketAddr::port);
        vec![
            advertise
                .iter()
                .map(|ip| SocketAddr::new(*ip, port))
                .collect(),
        ]
    } else if advertise.len() == bound.len() {
        bound
            .iter()
            .zip(advertise)
            .map(|(b, ip)| vec![SocketAddr::new(*ip, b.port())])
            .collect()
    } else {
        return Err(format!(
            "{} advertised addresses for {} bound ones: give none, one per bound address, or bind one address",
            advertise.len(),
            bound.len()
        ));
    };
    if let Some((b, _)) = bound
        .iter()
        .zip(&offered)
        .find(|(_, o)| o.iter().any(|a| a.ip().is_unspecified()))
    {
        return Err(format!(
            "`{b}` binds every address: name the one clients reach (advertise) or bind that address"
        ));
    }
    Ok(offered)
}

/// `[limits]`: what one call and one participant may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// `max_participants_per_call`.
    pub max_participants_per_call: u32,
    /// `max_tracks_per_participant`: tracks one participant may publish.
    pub max_tracks_per_participant: u32,
    /// `max_kbps_per_participant`: upload bitrate of one participant, in
    /// kbit/s.
    pub max_kbps_per_participant: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_participants_per_call: DEFAULT_MAX_PARTICIPANTS_PER_CALL,
            max_tracks_per_participant: DEFAULT_MAX_TRACKS_PER_PARTICIPANT,
            max_kbps_per_participant: DEFAULT_MAX_KBPS_PER_PARTICIPANT,
        }
    }
}

/// `[heartbeat]`: the data channel's `m.call.ping` / `m.call.pong`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeartbeatConfig {
    /// `ping_interval` (default 30 s).
    pub ping_interval: Duration,
    /// `ping_timeout` (default 60 s): silence after which a peer is gone.
    pub ping_timeout: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            ping_interval: DEFAULT_PING_INTERVAL,
            ping_timeout: DEFAULT_PING_TIMEOUT,
        }
    }
}

/// `[drain]`: the graceful stop on SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainConfig {
    /// `grace_period` (default 10 s): how long calls may go on after the
    /// focus stopped accepting.
    pub grace_period: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            grace_period: DEFAULT_GRACE_PERIOD,
        }
    }
}

/// A configuration that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the configuration: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}: line {line}: not valid TOML: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A field is missing, unknown or has a bad value.
    #[error("{}: {field}: {reason}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The field, `key` or `section.key`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl ConfigError {
    /// The field the error is about, if it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

const TOP_KEYS: &[&str] = &[
    "homeserver",
    "user",
    "password_env",
    "password_file",
    "data_dir",
    "allow",
    "allow_plaintext",
    "cascade",
    "http_listen",
    "media",
    "turn",
    "limits",
    "heartbeat",
    "drain",
];
const MEDIA_KEYS: &[&str] = &["bind", "advertise", "estimate_bandwidth"];
const TURN_KEYS: &[&str] = &[
    "uris",
    "username",
    "password_env",
    "password_file",
    "relay_only",
];
const LIMIT_KEYS: &[&str] = &[
    "max_participants_per_call",
    "max_tracks_per_participant",
    "max_kbps_per_participant",
];
const HEARTBEAT_KEYS: &[&str] = &["ping_interval", "ping_timeout"];
const DRAIN_KEYS: &[&str] = &["grace_period"];

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`, the content of the file `file` (named
    /// in errors; relative paths in it are taken relative to its
    /// directory). Pure: reads neither the file nor the secrets.
    pub fn parse(text: &str, file: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let file = file.as_ref();
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            ConfigError::Syntax {
                file: file.to_owned(),
                line,
                message: e.message().trim().to_owned(),
            }
        })?;
        let p = Parser { file };
        p.parse(&table)
    }

    /// The bot account's password, read from its environment variable or
    /// file.
    pub fn matrix_password(&self) -> Result<String, ConfigError> {
        self.read_secret(&self.password, "")
    }

    /// The TURN password, if TURN is configured.
    pub fn turn_password(&self) -> Result<Option<String>, ConfigError> {
        match &self.turn {
            Some(t) => self.read_secret(&t.password, "turn.").map(Some),
            None => Ok(None),
        }
    }

    fn read_secret(&self, source: &SecretSource, prefix: &str) -> Result<String, ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            file: self.file.clone(),
            field: format!("{prefix}{field}"),
            reason,
        };
        let secret = match source {
            SecretSource::Env(var) => std::env::var(var).map_err(|e| {
                invalid(
                    "password_env",
                    format!("environment variable {var} not usable: {e}"),
                )
            })?,
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| invalid("password_file", format!("{}: {e}", path.display())))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        };
        if secret.is_empty() {
            let field = match source {
                SecretSource::Env(_) => "password_env",
                SecretSource::File(_) => "password_file",
            };
            return Err(invalid(field, "the password is empty".into()));
        }
        Ok(secret)
    }
}

/// The validation, with the file at hand for errors.
struct Parser<'a> {
    file: &'a Path,
}

impl Parser<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn base_dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new(""))
    }

    fn parse(&self, t: &Table) -> Result<Config, ConfigError> {
        self.known_keys(t, "", TOP_KEYS)?;
        let homeserver = self.required_str(t, "", "homeserver")?;
        let hs = homeserver.trim_end_matches('/');
        let host = hs
            .strip_prefix("https://")
            .or_else(|| hs.strip_prefix("http://"));
        match host {
            Some(h) if !h.is_empty() && !h.contains(char::is_whitespace) => {}
            _ => {
                return Err(self.err(
                    "homeserver",
                    format!("`{homeserver}` is not an http:// or https:// URL"),
                ));
            }
        }
        let user = self.required_str(t, "", "user")?;
        if !valid_user(&user) {
            return Err(self.err(
                "user",
                format!("`{user}` is neither a user id (@name:server) nor a localpart"),
            ));
        }
        let password = self.secret(t, "")?;
        let data_dir = self.base_dir().join(self.required_str(t, "", "data_dir")?);
        let allow = self.allow(t)?;
        let allow_plaintext = self.opt_bool(t, "", "allow_plaintext")?.unwrap_or(false);
        let cascade = self.opt_bool(t, "", "cascade")?.unwrap_or(false);
        let http_listen = self
            .opt_str(t, "", "http_listen")?
            .map(|s| {
                s.parse::<SocketAddr>().map_err(|_| {
                    self.err(
                        "http_listen",
                        format!("`{s}` is not an address IP:port (e.g. 127.0.0.1:9480)"),
                    )
                })
            })
            .transpose()?;

        let media = self.media(self.section(t, "media")?.ok_or_else(|| {
            self.err(
                "media",
                "missing: the [media] section with `bind` is required",
            )
        })?)?;
        let turn = self.section(t, "turn")?.map(|s| self.turn(s)).transpose()?;
        let limits = match self.section(t, "limits")? {
            Some(s) => self.limits(s)?,
            None => Limits::default(),
        };
        let heartbeat = match self.section(t, "heartbeat")? {
            Some(s) => self.heartbeat(s)?,
            None => HeartbeatConfig::default(),
        };
        let drain = match self.section(t, "drain")? {
            Some(s) => {
                self.known_keys(s, "drain.", DRAIN_KEYS)?;
                DrainConfig {
                    grace_period: self
                        .opt_duration(s, "drain.", "grace_period")?
                        .unwrap_or(DEFAULT_GRACE_PERIOD),
                }
            }
            None => DrainConfig::default(),
        };
        Ok(Config {
            file: self.file.to_owned(),
            homeserver,
            user,
            password,
            data_dir,
            allow,
            allow_plaintext,
            cascade,
            http_listen,
            media,
            turn,
            limits,
            heartbeat,
            drain,
        })
    }

    fn allow(&self, t: &Table) -> Result<AllowList, ConfigError> {
        let entries = self.opt_str_array(t, "", "allow")?.ok_or_else(|| {
            self.err(
                "allow",
                "missing: list the users (@name:server) and servers whose invites the focus accepts",
            )
        })?;
        if entries.is_empty() {
            return Err(self.err(
                "allow",
                "empty: the focus would accept no invite; list users (@name:server) or servers",
            ));
        }
        let mut allow = AllowList::default();
        for e in entries {
            if e.starts_with('@') {
                if !valid_user_id(&e) {
                    return Err(self.err("allow", format!("`{e}` is not a user id (@name:server)")));
                }
                allow.users.insert(e);
            } else {
                if e.is_empty() || e.contains(['@', '/', '*']) || e.contains(char::is_whitespace) {
                    return Err(self.err(
                        "allow",
                        format!("`{e}` is neither a user id (@name:server) nor a server name"),
                    ));
                }
                allow.servers.insert(e);
            }
        }
        Ok(allow)
    }

    fn media(&self, s: &Table) -> Result<MediaConfig, ConfigError> {
        self.known_keys(s, "media.", MEDIA_KEYS)?;
        let bind = self
            .opt_str_array(s, "media.", "bind")?
            .ok_or_else(|| self.err("media.bind", "missing: the UDP addresses to bind"))?;
        if bind.is_empty() {
            return Err(self.err("media.bind", "empty: at least one address IP:port"));
        }
        let bind = bind
            .iter()
            .map(|b| {
                b.parse::<SocketAddr>().map_err(|_| {
                    self.err(
                        "media.bind",
                        format!("`{b}` is not an address IP:port (e.g. 0.0.0.0:50000)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let advertise = self
            .opt_str_array(s, "media.", "advertise")?
            .unwrap_or_default()
            .iter()
            .map(|a| {
                let ip = a.parse::<IpAddr>().map_err(|_| {
                    self.err(
                        "media.advertise",
                        format!("`{a}` is not an IP address (the ports are the bound ones)"),
                    )
                })?;
                if ip.is_unspecified() || ip.is_multicast() {
                    return Err(self.err(
                        "media.advertise",
                        format!("`{a}` cannot be advertised (unspecified or multicast)"),
                    ));
                }
                Ok(ip)
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A wildcard socket cannot tell clients where to reach it (and does
        // not learn which address a packet came to): the address to offer
        // must be named.
        if let Some(b) = bind.iter().find(|b| b.ip().is_unspecified())
            && advertise.is_empty()
        {
            return Err(self.err(
                "media.advertise",
                format!(
                    "missing: `{b}` binds every address; name the one clients reach \
                     (advertise = [\"IP\"]) or bind that address"
                ),
            ));
        }
        offered_addrs(&bind, &advertise).map_err(|e| self.err("media.advertise", e))?;
        let estimate_bandwidth = self
            .opt_bool(s, "media.", "estimate_bandwidth")?
            .unwrap_or(true);
        Ok(MediaConfig {
            bind,
            advertise,
            estimate_bandwidth,
        })
    }

    fn turn(&self, s: &Table) -> Result<TurnConfig, ConfigError> {
        self.known_keys(s, "turn.", TURN_KEYS)?;
        let uris = self
            .opt_str_array(s, "turn.", "uris")?
            .ok_or_else(|| self.err("turn.uris", "missing: the TURN server's URIs"))?;
        if uris.is_empty() {
            return Err(self.err("turn.uris", "empty: at least one turn: or turns: URI"));
        }
        for u in &uris {
            if !(u.starts_with("turn:") || u.starts_with("turns:") || u.starts_with("stun:")) {
                return Err(self.err(
                    "turn.uris",
                    format!("`{u}` is not a turn:, turns: or stun: URI"),
                ));
            }
        }
        let username = self.required_str(s, "turn.", "username")?;
        let password = self.secret(s, "turn.")?;
        let relay_only = self.opt_bool(s, "turn.", "relay_only")?.unwrap_or(false);
        Ok(TurnConfig {
            uris,
            username,
            password,
            relay_only,
        })
    }

    fn limits(&self, s: &Table) -> Result<Limits, ConfigError> {
        self.known_keys(s, "limits.", LIMIT_KEYS)?;
        let d = Limits::default();
        Ok(Limits {
            max_participants_per_call: self
                .opt_count(s, "limits.", "max_participants_per_call")?
                .unwrap_or(d.max_participants_per_call),
            max_tracks_per_participant: self
                .opt_count(s, "limits.", "max_tracks_per_participant")?
                .unwrap_or(d.max_tracks_per_participant),
            max_kbps_per_participant: self
                .opt_count(s, "limits.", "max_kbps_per_participant")?
                .unwrap_or(d.max_kbps_per_participant),
        })
    }

    fn heartbeat(&self, s: &Table) -> Result<HeartbeatConfig, ConfigError> {
        self.known_keys(s, "heartbeat.", HEARTBEAT_KEYS)?;
        let ping_interval = self
            .opt_duration(s, "heartbeat.", "ping_interval")?
            .unwrap_or(DEFAULT_PING_INTERVAL);
        let ping_timeout = self
            .opt_duration(s, "heartbeat.", "ping_timeout")?
            .unwrap_or(DEFAULT_PING_TIMEOUT);
        if ping_interval.is_zero() {
            return Err(self.err("heartbeat.ping_interval", "must be more than 0"));
        }
        if ping_timeout <= ping_interval {
            return Err(self.err(
                "heartbeat.ping_timeout",
                format!(
                    "must be longer than heartbeat.ping_interval ({} ms <= {} ms)",
                    ping_timeout.as_millis(),
                    ping_interval.as_millis()
                ),
            ));
        }
        Ok(HeartbeatConfig {
            ping_interval,
            ping_timeout,
        })
    }

    /// `password_env` xor `password_file` under `prefix`.
    fn secret(&self, t: &Table, prefix: &str) -> Result<SecretSource, ConfigError> {
        let env = self.opt_str(t, prefix, "password_env")?;
        let file = self.opt_str(t, prefix, "password_file")?;
        match (env, file) {
            (Some(_), Some(_)) => Err(self.err(
                format!("{prefix}password_env"),
                format!("give either {prefix}password_env or {prefix}password_file, not both"),
            )),
            (Some(var), None) if var.is_empty() || var.contains(['=', '\0']) => Err(self.err(
                format!("{prefix}password_env"),
                format!("`{var}` is not an environment variable name"),
            )),
            (Some(var), None) => Ok(SecretSource::Env(var)),
            (None, Some(path)) if path.is_empty() => {
                Err(self.err(format!("{prefix}password_file"), "empty path"))
            }
            (None, Some(path)) => Ok(SecretSource::File(self.base_dir().join(path))),
            (None, None) => Err(self.err(
                format!("{prefix}password_file"),
                format!(
                    "missing: give {prefix}password_file (a file holding the password) or \
                     {prefix}password_env (an environment variable); the password itself never \
                     goes into the configuration"
                ),
            )),
        }
    }

    fn known_keys(&self, t: &Table, prefix: &str, known: &[&str]) -> Result<(), ConfigError> {
        for key in t.keys() {
            if key == "password" {
                return Err(self.err(
                    format!("{prefix}password"),
                    format!(
                        "passwords do not go into the configuration: use {prefix}password_file \
                         or {prefix}password_env"
                    ),
                ));
            }
            if !known.contains(&key.as_str()) {
                return Err(self.err(
                    format!("{prefix}{key}"),
                    format!("unknown key (known here: {})", known.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn section<'t>(&self, t: &'t Table, name: &str) -> Result<Option<&'t Table>, ConfigError> {
        match t.get(name) {
            None => Ok(None),
            Some(Value::Table(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(
                name,
                format!("must be a section [{name}], not a {}", v.type_str()),
            )),
        }
    }

    fn opt_str(&self, t: &Table, prefix: &str, key: &str) -> Result<Option<String>, ConfigError> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(
                format!("{prefix}{key}"),
                format!("must be a string, not a {}", v.type_str()),
            )),
        }
    }

    fn required_str(&self, t: &Table, prefix: &str, key: &str) -> Result<String, ConfigError> {
        match self.opt_str(t, prefix, key)? {
            Some(s) if s.trim().is_empty() => Err(self.err(format!("{prefix}{key}"), "empty")),
            Some(s) => Ok(s),
            None => Err(self.err(format!("{prefix}{key}"), "missing (required)")),
        }
    }

    fn opt_bool(&self, t: &Table, prefix: &str, key: &str) -> Result<Option<bool>, ConfigError> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(
                format!("{prefix}{key}"),
                format!("must be true or false, not a {}", v.type_str()),
            )),
        }
    }

    fn opt_count(&self, t: &Table, prefix: &str, key: &str) -> Result<Option<u32>, ConfigError> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::Integer(n)) if *n >= 1 => u32::try_from(*n)
                .map(Some)
                .map_err(|_| self.err(format!("{prefix}{key}"), format!("{n} is too large"))),
            Some(Value::Integer(_)) => {
                Err(self.err(format!("{prefix}{key}"), "must be at least 1"))
            }
            Some(v) => Err(self.err(
                format!("{prefix}{key}"),
                format!("must be a whole number, not a {}", v.type_str()),
            )),
        }
    }

    fn opt_str_array(
        &self,
        t: &Table,
        prefix: &str,
        key: &str,
    ) -> Result<Option<Vec<String>>, ConfigError> {
        let field = || format!("{prefix}{key}");
        match t.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(self.err(
                        field(),
                        format!("must be a list of strings, not of {}s", v.type_str()),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.err(
                field(),
                format!("must be a list of strings, not a {}", v.type_str()),
            )),
        }
    }

    fn opt_duration(
        &self,
        t: &Table,
        prefix: &str,
        key: &str,
    ) -> Result<Option<Duration>, ConfigError> {
        let field = || format!("{prefix}{key}");
        match t.get(key) {
            None => Ok(None),
            Some(Value::Integer(n)) => u64::try_from(*n)
                .map(|s| Some(Duration::from_secs(s)))
                .map_err(|_| self.err(field(), "must not be negative")),
            Some(Value::String(s)) => parse_duration(s).map(Some).ok_or_else(|| {
                self.err(
                    field(),
                    format!("`{s}` is not a duration (e.g. \"30s\", \"500ms\", \"2m\")"),
                )
            }),
            Some(v) => Err(self.err(
                field(),
                format!(
                    "must be a duration (\"30s\", \"500ms\") or seconds, not a {}",
                    v.type_str()
                ),
            )),
        }
    }
}

/// `"500ms"`, `"30s"`, `"2m"`: a whole number and a unit.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" | "min" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

/// `@local:server` with non-empty parts and no whitespace.
fn valid_user_id(s: &str) -> bool {
    match s.strip_prefix('@').and_then(|u| u.split_once(':')) {
        Some((local, server)) => {
            !local.is_empty() && !server.is_empty() && !s.contains(char::is_whitespace)
        }
        None => false,
    }
}

/// A user id or a bare localpart.
fn valid_user(s: &str) -> bool {
    if s.starts_with('@') {
        valid_user_id(s)
    } else {
        !s.is_empty() && !s.contains([':', '@']) && !s.contains(char::is_whitespace)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
homeserver = "https://matrix.example.org"
user = "@focus:example.org"
password_env = "FOCUS_PASSWORD"
data_dir = "data"
allow = ["@alice:example.org", "example.net"]

[media]
bind = ["192.0.2.10:50000"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "/etc/focus/focus.toml")
    }

    /// The error for `MINIMAL` with `edit` applied: asserts it names the
    /// file and `field`, and returns its message.
    fn error(text: &str, field: &str) -> String {
        let e = parse(text).expect_err("invalid");
        let msg = e.to_string();
        assert_eq!(e.field(), Some(field), "{msg}");
        assert!(
            msg.starts_with(&format!("/etc/focus/focus.toml: {field}: ")),
            "{msg}"
        );
        msg
    }

    fn with(extra_top: &str, extra_sections: &str) -> String {
        let (top, sections) = MINIMAL.split_once("[media]").unwrap();
        format!("{top}{extra_top}\n[media]{sections}{extra_sections}")
    }

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.homeserver, "https://matrix.example.org");
        assert_eq!(c.user, "@focus:example.org");
        assert_eq!(c.password, SecretSource::Env("FOCUS_PASSWORD".into()));
        assert_eq!(c.data_dir, PathBuf::from("/etc/focus/data"));
        assert!(!c.allow_plaintext);
        assert_eq!(c.http_listen, None);
        assert_eq!(c.media.bind, ["192.0.2.10:50000".parse().unwrap()]);
        assert!(c.media.advertise.is_empty());
        assert_eq!(c.turn, None);
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.limits.max_participants_per_call, 50);
        assert_eq!(c.limits.max_tracks_per_participant, 4);
        assert_eq!(c.limits.max_kbps_per_participant, 5000);
        assert_eq!(c.heartbeat.ping_interval, Duration::from_secs(30));
        assert_eq!(c.heartbeat.ping_timeout, Duration::from_secs(60));
        assert_eq!(c.drain.grace_period, Duration::from_secs(10));
        assert_eq!(c.file, PathBuf::from("/etc/focus/focus.toml"));
    }

    #[test]
    fn allow_list_matches_users_and_servers() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.allow.allows("@alice:example.org"));
        assert!(!c.allow.allows("@bob:example.org"));
        assert!(c.allow.allows("@bob:example.net"));
        assert!(!c.allow.allows("@bob:evil.example.net"));
        assert!(!c.allow.allows("@bob:example.net.evil"));
        assert!(!c.allow.allows("example.net"));
    }

    #[test]
    fn bandwidth_estimation_is_on_unless_turned_off() {
        assert!(parse(MINIMAL).unwrap().media.estimate_bandwidth);
        let off = MINIMAL.replace("[media]\n", "[media]\nestimate_bandwidth = false\n");
        assert!(!parse(&off).unwrap().media.estimate_bandwidth);
        let bad = MINIMAL.replace("[media]\n", "[media]\nestimate_bandwidth = \"yes\"\n");
        let msg = error(&bad, "media.estimate_bandwidth");
        assert!(msg.contains("must be true or false"), "{msg}");
    }

    #[test]
    fn example_file_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/focus.example.toml");
        let c = Config::load(path).unwrap();
        assert_eq!(
            c.password,
            SecretSource::Env("GROUPCALL_FOCUS_PASSWORD".into())
        );
        assert_eq!(c.http_listen, Some("127.0.0.1:9480".parse().unwrap()));
        assert_eq!(
            c.media.advertise,
            ["203.0.113.7".parse::<IpAddr>().unwrap()]
        );
        assert!(c.media.estimate_bandwidth);
        assert!(c.turn.is_some());
        assert!(c.allow.allows("@alice:example.org"));
        assert!(c.allow.allows("@anyone:example.com"));
        assert_eq!(c.heartbeat.ping_interval, Duration::from_secs(30));
        assert_eq!(c.drain.grace_period, Duration::from_secs(10));
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn every_key_is_read() {
        let text = with(
            "allow_plaintext = true\nhttp_listen = \"[::1]:9000\"\n",
            r#"advertise = ["198.51.100.1", "2001:db8::1"]
[turn]
uris = ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"]
username = "focus"
password_file = "turn.pw"
[limits]
max_participants_per_call = 8
max_tracks_per_participant = 2
max_kbps_per_participant = 1500
[heartbeat]
ping_interval = "200ms"
ping_timeout = 1
[drain]
grace_period = "0s"
"#,
        );
        let c = parse(&text).unwrap();
        assert!(c.allow_plaintext);
        assert!(!c.cascade);
        assert_eq!(c.http_listen, Some("[::1]:9000".parse().unwrap()));
        assert_eq!(c.media.advertise.len(), 2);
        let turn = c.turn.unwrap();
        assert_eq!(turn.uris.len(), 2);
        assert_eq!(turn.username, "focus");
        assert_eq!(
            turn.password,
            SecretSource::File("/etc/focus/turn.pw".into())
        );
        assert_eq!(
            c.limits,
            Limits {
                max_participants_per_call: 8,
                max_tracks_per_participant: 2,
                max_kbps_per_participant: 1500
            }
        );
        assert_eq!(c.heartbeat.ping_interval, Duration::from_millis(200));
        assert_eq!(c.heartbeat.ping_timeout, Duration::from_secs(1));
        assert_eq!(c.drain.grace_period, Duration::ZERO);
    }

    #[test]
    fn password_file_is_relative_to_the_config() {
        let text = MINIMAL.replace(
            "password_env = \"FOCUS_PASSWORD\"",
            "password_file = \"secret/pw\"",
        );
        let c = parse(&text).unwrap();
        assert_eq!(
            c.password,
            SecretSource::File("/etc/focus/secret/pw".into())
        );
        let c = parse(&text.replace("secret/pw", "/run/pw")).unwrap();
        assert_eq!(c.password, SecretSource::File("/run/pw".into()));
    }

    #[test]
    fn secrets_are_read_from_file_and_env() {
        let dir = std::env::temp_dir().join(format!("focus-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "s3cret\n").unwrap();
        let text = MINIMAL.replace(
            "password_env = \"FOCUS_PASSWORD\"",
            "password_file = \"pw\"",
        );
        let c = Config::parse(&text, dir.join("focus.toml")).unwrap();
        assert_eq!(c.matrix_password().unwrap(), "s3cret");
        std::fs::write(dir.join("pw"), "\n").unwrap();
        let e = c.matrix_password().unwrap_err();
        assert_eq!(e.field(), Some("password_file"));
        assert!(e.to_string().contains("empty"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let e = c.matrix_password().unwrap_err();
        assert!(e.to_string().contains("/pw"), "{e}");

        // An environment variable nobody sets.
        let text = MINIMAL.replace("FOCUS_PASSWORD", "GROUPCALL_FOCUS_TEST_UNSET_VAR");
        let e = parse(&text).unwrap().matrix_password().unwrap_err();
        assert_eq!(e.field(), Some("password_env"));
        assert!(
            e.to_string().contains("GROUPCALL_FOCUS_TEST_UNSET_VAR"),
            "{e}"
        );
        assert_eq!(parse(MINIMAL).unwrap().turn_password().unwrap(), None);
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = parse("homeserver = \"x\"\nuser = \n").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Syntax { line: 2, .. }), "{msg}");
        assert!(
            msg.starts_with("/etc/focus/focus.toml: line 2: not valid TOML"),
            "{msg}"
        );
    }

    #[test]
    fn unreadable_file_is_named() {
        let e = Config::load("/nonexistent/focus.toml").unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(
            e.to_string()
                .starts_with("/nonexistent/focus.toml: cannot read")
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let msg = error(&with("homserver = \"x\"\n", ""), "homserver");
        assert!(msg.contains("unknown key"), "{msg}");
        error(&with("", "bnd = []\n"), "media.bnd");
        error(
            &with("", "[limits]\nmax_participants = 3\n"),
            "limits.max_participants",
        );
        error(
            &with("", "[heartbeat]\ninterval = \"1s\"\n"),
            "heartbeat.interval",
        );
        error(&with("", "[drain]\ngrace = 1\n"), "drain.grace");
        error(
            &with(
                "",
                "[turn]\nuris = [\"turn:x\"]\nusername = \"u\"\npassword_env = \"P\"\nrealm = \"r\"\n",
            ),
            "turn.realm",
        );
        error(&with("", "[metrics]\nlisten = \"x\"\n"), "metrics");
    }

    #[test]
    fn inline_passwords_are_refused() {
        let msg = error(&with("password = \"hunter2\"\n", ""), "password");
        assert!(msg.contains("password_file or password_env"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        let msg = error(
            &with(
                "",
                "[turn]\nuris = [\"turn:x\"]\nusername = \"u\"\npassword = \"p\"\n",
            ),
            "turn.password",
        );
        assert!(msg.contains("turn.password_file"), "{msg}");
    }

    #[test]
    fn missing_required_fields() {
        for field in ["homeserver", "user", "data_dir"] {
            let text: String = MINIMAL
                .lines()
                .filter(|l| !l.starts_with(&format!("{field} =")))
                .collect::<Vec<_>>()
                .join("\n");
            let msg = error(&text, field);
            assert!(msg.contains("missing"), "{msg}");
        }
        let text = MINIMAL.replace("password_env = \"FOCUS_PASSWORD\"\n", "");
        let msg = error(&text, "password_file");
        assert!(msg.contains("password_env"), "{msg}");
        let text = MINIMAL.replace("allow = [\"@alice:example.org\", \"example.net\"]\n", "");
        error(&text, "allow");
        let (top, _) = MINIMAL.split_once("[media]").unwrap();
        error(top, "media");
        error(
            &MINIMAL.replace("bind = [\"192.0.2.10:50000\"]", ""),
            "media.bind",
        );
    }

    #[test]
    fn bad_values() {
        let cases: &[(&str, &str, &str)] = &[
            ("homeserver = \"matrix.example.org\"", "", "homeserver"),
            ("homeserver = \"https://\"", "", "homeserver"),
            ("homeserver = 3", "", "homeserver"),
            ("user = \"@focus\"", "", "user"),
            ("user = \"a b\"", "", "user"),
            ("user = \"\"", "", "user"),
            ("data_dir = \"  \"", "", "data_dir"),
            ("password_file = \"pw\"", "", "password_env"),
            ("allow_plaintext = \"yes\"", "", "allow_plaintext"),
            ("http_listen = \"localhost:80\"", "", "http_listen"),
            ("http_listen = \"127.0.0.1\"", "", "http_listen"),
            ("", "advertise = [\"0.0.0.0\"]\n", "media.advertise"),
            ("", "advertise = [\"1.2.3.4:5\"]\n", "media.advertise"),
            ("", "advertise = [\"224.0.0.1\"]\n", "media.advertise"),
            (
                "",
                "[limits]\nmax_participants_per_call = 0\n",
                "limits.max_participants_per_call",
            ),
            (
                "",
                "[limits]\nmax_tracks_per_participant = -1\n",
                "limits.max_tracks_per_participant",
            ),
            (
                "",
                "[limits]\nmax_kbps_per_participant = 1e3\n",
                "limits.max_kbps_per_participant",
            ),
            (
                "",
                "[limits]\nmax_kbps_per_participant = 5000000000\n",
                "limits.max_kbps_per_participant",
            ),
            (
                "",
                "[heartbeat]\nping_interval = \"0s\"\n",
                "heartbeat.ping_interval",
            ),
            (
                "",
                "[heartbeat]\nping_interval = \"5 parsecs\"\n",
                "heartbeat.ping_interval",
            ),
            (
                "",
                "[heartbeat]\nping_timeout = \"30s\"\n",
                "heartbeat.ping_timeout",
            ),
            (
                "",
                "[heartbeat]\nping_timeout = -1\n",
                "heartbeat.ping_timeout",
            ),
            ("", "[drain]\ngrace_period = true\n", "drain.grace_period"),
            (
                "",
                "[turn]\nusername = \"u\"\npassword_env = \"P\"\n",
                "turn.uris",
            ),
            (
                "",
                "[turn]\nuris = []\nusername = \"u\"\npassword_env = \"P\"\n",
                "turn.uris",
            ),
            (
                "",
                "[turn]\nuris = [\"http://x\"]\nusername = \"u\"\npassword_env = \"P\"\n",
                "turn.uris",
            ),
            (
                "",
                "[turn]\nuris = [\"turn:x\"]\npassword_env = \"P\"\n",
                "turn.username",
            ),
            (
                "",
                "[turn]\nuris = [\"turn:x\"]\nusername = \"u\"\n",
                "turn.password_file",
            ),
        ];
        for (top, section, field) in cases {
            // A top-level line replaces the one with the same key.
            let mut text: String = match top.split_once(" = ") {
                Some((key, _)) => MINIMAL
                    .lines()
                    .map(|l| {
                        if l.starts_with(&format!("{key} =")) {
                            *top
                        } else {
                            l
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                None => MINIMAL.to_owned(),
            };
            if !text.contains(top) {
                let (head, rest) = text.split_once("[media]").unwrap();
                text = format!("{head}{top}\n[media]{rest}");
            }
            text.push('\n');
            text.push_str(section);
            error(&text, field);
        }
        let (head, _) = MINIMAL.split_once("[media]").unwrap();
        error(&format!("{head}media = 1\n"), "media");
        let msg = error(
            &MINIMAL.replace("192.0.2.10:50000", "0.0.0.0"),
            "media.bind",
        );
        assert!(msg.contains("IP:port"), "{msg}");
        // A wildcard bind needs the address to offer.
        let msg = error(
            &MINIMAL.replace("192.0.2.10:50000", "0.0.0.0:50000"),
            "media.advertise",
        );
        assert!(msg.contains("0.0.0.0:50000"), "{msg}");
        let c = parse(&format!(
            "{}advertise = [\"203.0.113.7\"]\n",
            MINIMAL.replace("192.0.2.10:50000", "0.0.0.0:50000")
        ))
        .unwrap();
        assert_eq!(
            c.media.advertise,
            ["203.0.113.7".parse::<IpAddr>().unwrap()]
        );
        let msg = error(&MINIMAL.replace("\"example.net\"", "\"*\""), "allow");
        assert!(msg.contains("`*`"), "{msg}");
        error(&MINIMAL.replace("\"example.net\"", "\"@bob\""), "allow");
        error(&MINIMAL.replace("\"example.net\"", "3"), "allow");
        error(
            &MINIMAL.replace(
                "allow = [\"@alice:example.org\", \"example.net\"]",
                "allow = []",
            ),
            "allow",
        );
        error(
            &MINIMAL.replace(
                "allow = [\"@alice:example.org\", \"example.net\"]",
                "allow = \"x\"",
            ),
            "allow",
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("2 s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("1h"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
    #[test]
    fn offered_addresses_pair_with_the_bound_ones() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let two = [a("127.0.0.1:5000"), a("[::1]:5001")];
        assert_eq!(
            offered_addrs(&two, &[]).unwrap(),
            vec![vec![two[0]], vec![two[1]]]
        );
        assert_eq!(
            offered_addrs(&two, &[ip("203.0.113.7"), ip("2001:db8::7")]).unwrap(),
            vec![vec![a("203.0.113.7:5000")], vec![a("[2001:db8::7]:5001")]]
        );
        // One socket (bound to every address) offered at two public IPs.
        assert_eq!(
            offered_addrs(&[a("[::]:6000")], &[ip("203.0.113.7"), ip("2001:db8::7")]).unwrap(),
            vec![vec![a("203.0.113.7:6000"), a("[2001:db8::7]:6000")]]
        );
        let e = offered_addrs(&two, &[ip("203.0.113.7")]).unwrap_err();
        assert!(e.contains("1 advertised addresses for 2 bound ones"), "{e}");
        let e = offered_addrs(&[a("0.0.0.0:1"), a("127.0.0.1:2")], &[]).unwrap_err();
        assert!(e.contains("`0.0.0.0:1` binds every address"), "{e}");
    }

    #[test]
    fn two_bound_addresses_take_none_or_two_advertised() {
        let two = MINIMAL.replace(
            r#"bind = ["192.0.2.10:50000"]"#,
            r#"bind = ["127.0.0.1:0", "[::1]:0"]"#,
        );
        let c = parse(&two).unwrap();
        assert_eq!(c.media.bind.len(), 2);
        let c = parse(&format!(
            "{two}advertise = [\"198.51.100.1\", \"2001:db8::1\"]\n"
        ))
        .unwrap();
        assert_eq!(c.media.advertise.len(), 2);
        let e = parse(&format!("{two}advertise = [\"198.51.100.1\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("media.advertise") && e.contains("1 advertised addresses for 2"),
            "{e}"
        );
    }
}
