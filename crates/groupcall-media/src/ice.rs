//! ICE server configuration: [`IceServer`] (as in WebRTC's `RTCIceServer`
//! and Matrix's `/voip/turnServer` answer) and its `stun:` / `turn:` URLs
//! (RFC 7064, RFC 7065).

use std::str::FromStr;

/// A STUN or TURN server with its credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IceServer {
    /// `stun:host[:port]` and `turn:host[:port][?transport=udp|tcp]` URLs.
    /// `stuns:`/`turns:` and `transport=tcp` are accepted but skipped
    /// (only UDP is implemented).
    pub urls: Vec<String>,
    /// TURN user name (e.g. the homeserver's time-limited `expiry:user`).
    pub username: Option<String>,
    /// TURN password.
    pub credential: Option<String>,
}

impl IceServer {
    /// A STUN server without credentials.
    pub fn stun(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            ..Self::default()
        }
    }

    /// TURN URLs with long-term credentials.
    pub fn turn(
        urls: impl IntoIterator<Item = impl Into<String>>,
        username: impl Into<String>,
        credential: impl Into<String>,
    ) -> Self {
        Self {
            urls: urls.into_iter().map(Into::into).collect(),
            username: Some(username.into()),
            credential: Some(credential.into()),
        }
    }
}

/// `stun` or `turn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceUrlScheme {
    /// Server-reflexive addresses (Binding).
    Stun,
    /// Relayed addresses (Allocate).
    Turn,
}

/// Transport to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceTransport {
    /// UDP (the default for `stun:` and `turn:`).
    Udp,
    /// TCP (the default for `stuns:` and `turns:`, with TLS).
    Tcp,
}

/// A parsed `stun:`/`stuns:`/`turn:`/`turns:` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceUrl {
    /// STUN or TURN.
    pub scheme: IceUrlScheme,
    /// `stuns:`/`turns:` (TLS).
    pub secure: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port (default 3478, or 5349 when secure).
    pub port: u16,
    /// Transport.
    pub transport: IceTransport,
}

impl IceUrl {
    /// Whether this crate can use it (plain UDP).
    pub fn is_supported(&self) -> bool {
        !self.secure && self.transport == IceTransport::Udp
    }
}

/// Why an ICE server URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IceUrlError {
    /// Not `stun:`, `stuns:`, `turn:` or `turns:`.
    #[error("unknown ICE server URL scheme in {0:?}")]
    UnknownScheme(String),
    /// No host.
    #[error("no host in ICE server URL {0:?}")]
    MissingHost(String),
    /// The port is not a number in 1..=65535.
    #[error("bad port in ICE server URL {0:?}")]
    BadPort(String),
    /// A query other than `transport=udp|tcp`, or one on a `stun:` URL.
    #[error("bad query in ICE server URL {0:?}")]
    BadQuery(String),
}

impl FromStr for IceUrl {
    type Err = IceUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let s = url.trim();
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| IceUrlError::UnknownScheme(url.to_string()))?;
        let (scheme, secure) = match scheme.to_ascii_lowercase().as_str() {
            "stun" => (IceUrlScheme::Stun, false),
            "stuns" => (IceUrlScheme::Stun, true),
            "turn" => (IceUrlScheme::Turn, false),
            "turns" => (IceUrlScheme::Turn, true),
            _ => return Err(IceUrlError::UnknownScheme(url.to_string())),
        };
        // Not in RFC 7064/7065, but written that way sometimes.
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let (hostport, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let mut transport = if secure {
            IceTransport::Tcp
        } else {
            IceTransport::Udp
        };
        if let Some(q) = query {
            if scheme == IceUrlScheme::Stun {
                return Err(IceUrlError::BadQuery(url.to_string()));
            }
            transport = match q.to_ascii_lowercase().as_str() {
                "transport=udp" => IceTransport::Udp,
                "transport=tcp" => IceTransport::Tcp,
                _ => return Err(IceUrlError::BadQuery(url.to_string())),
            };
        }
        let default_port = if secure { 5349 } else { 3478 };
        let parse_port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| IceUrlError::BadPort(url.to_string()))
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| IceUrlError::MissingHost(url.to_string()))?;
            let port = match after {
                "" => default_port,
                p => parse_port(
                    p.strip_prefix(':')
                        .ok_or_else(|| IceUrlError::BadPort(url.to_string()))?,
                )?,
            };
            (h, port)
        } else if hostport.matches(':').count() > 1 {
            // A bare IPv6 address.
            (hostport, default_port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, parse_port(p)?),
                None => (hostport, default_port),
            }
        };
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(IceUrlError::MissingHost(url.to_string()));
        }
        Ok(IceUrl {
            scheme,
            secure,
            host: host.to_string(),
            port,
            transport,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn url(s: &str) -> IceUrl {
        s.parse().unwrap()
    }

    #[test]
    fn parses_urls() {
        let u = url("turn:turn.example.org:3479?transport=udp");
        assert_eq!(u.scheme, IceUrlScheme::Turn);
        assert_eq!((u.host.as_str(), u.port), ("turn.example.org", 3479));
        assert!(u.is_supported());
        let u = url("turn:turn.example.org?transport=tcp");
        assert_eq!((u.port, u.transport), (3478, IceTransport::Tcp));
        assert!(!u.is_supported());
        let u = url("turns:turn.example.org");
        assert_eq!(
            (u.port, u.transport, u.secure),
            (5349, IceTransport::Tcp, true)
        );
        let u = url("stun:127.0.0.1:19302");
        assert_eq!(u.scheme, IceUrlScheme::Stun);
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 19302));
        let u = url("STUN:[::1]:5000");
        assert_eq!((u.host.as_str(), u.port), ("::1", 5000));
        let u = url("turn:[2001:db8::1]");
        assert_eq!((u.host.as_str(), u.port), ("2001:db8::1", 3478));
        let u = url("stun:2001:db8::1");
        assert_eq!(u.host, "2001:db8::1");
        let u = url("turn://h:1");
        assert_eq!((u.host.as_str(), u.port), ("h", 1));
    }

    #[test]
    fn refuses_bad_urls() {
        for (s, e) in [
            ("http://x", IceUrlError::UnknownScheme("http://x".into())),
            ("turnx", IceUrlError::UnknownScheme("turnx".into())),
            ("turn:", IceUrlError::MissingHost("turn:".into())),
            ("turn::5", IceUrlError::MissingHost("turn::5".into())),
            ("turn:h:0", IceUrlError::BadPort("turn:h:0".into())),
            ("turn:h:99999", IceUrlError::BadPort("turn:h:99999".into())),
            ("turn:h:x", IceUrlError::BadPort("turn:h:x".into())),
            ("turn:[::1]x", IceUrlError::BadPort("turn:[::1]x".into())),
            ("turn:[::1", IceUrlError::MissingHost("turn:[::1".into())),
            (
                "turn:h?transport=sctp",
                IceUrlError::BadQuery("turn:h?transport=sctp".into()),
            ),
            (
                "stun:h?transport=udp",
                IceUrlError::BadQuery("stun:h?transport=udp".into()),
            ),
            (
                "turn:user@h",
                IceUrlError::MissingHost("turn:user@h".into()),
            ),
        ] {
            assert_eq!(s.parse::<IceUrl>(), Err(e), "{s}");
        }
        let mut rng = fastrand::Rng::with_seed(3);
        let alphabet: Vec<char> = "stunr:[]?=/@.0123456789abcdefx".chars().collect();
        for _ in 0..20000 {
            let s: String = (0..rng.usize(0..24))
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            let _ = s.parse::<IceUrl>();
        }
    }
}
