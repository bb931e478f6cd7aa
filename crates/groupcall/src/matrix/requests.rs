//! Typed requests, sent with matrix-sdk's `Client::send` (which builds the
//! URL, authenticates and parses Matrix errors), for endpoints whose ruma
//! types do not fit:
//!
//! - state events under exactly the type we give: ruma's `StateEventType`
//!   turns `m.call.member` into `org.matrix.msc3401.call.member` on the
//!   wire (so do its send-state and MSC4140 delayed-state requests);
//! - the MSC4140 per-action update endpoints (`.../{delay_id}/{action}`)
//!   and the list of our delayed events: ruma 0.16 has only the older
//!   `{"action": ...}` form (which we use as it is);
//! - `/voip/turnServer`: Synapse answers `{}` without TURN, which ruma's
//!   response type (all fields required) refuses.
//!
//! ruma's `#[request]`/`#[response]` macros need `client`/`server` features
//! on the calling crate, so the (few) trait implementations are written out
//! here; [`endpoint`] does the common part.

use std::fmt::Display;

use matrix_sdk::ruma::api::auth_scheme::{AccessToken, AuthScheme, SendAccessToken};
use matrix_sdk::ruma::api::error::{
    DeserializationError, Error as ApiError, FromHttpResponseError, IntoHttpError,
};
use matrix_sdk::ruma::api::path_builder::{PathBuilder, SinglePath};
use matrix_sdk::ruma::api::{EndpointError, Metadata};
use matrix_sdk::ruma::exports::bytes::BufMut;
use matrix_sdk::ruma::exports::http;
use serde::de::DeserializeOwned;

/// An HTTP request for endpoint `R`: path arguments percent-encoded into
/// its path, `query` appended, a JSON body (POST/PUT get `{}` when none),
/// the access token as bearer.
fn build<R, T>(
    base_url: &str,
    token: SendAccessToken<'_>,
    path_args: &[&dyn Display],
    query: &str,
    body: Option<Vec<u8>>,
) -> Result<http::Request<T>, IntoHttpError>
where
    R: Metadata<PathBuilder = SinglePath, Authentication = AccessToken>,
    T: Default + BufMut + AsRef<[u8]>,
{
    let url = R::PATH_BUILDER.make_endpoint_url((), base_url, path_args, query)?;
    let mut buf = T::default();
    match body {
        Some(b) => buf.put_slice(&b),
        None if R::METHOD != http::Method::GET => buf.put_slice(b"{}"),
        None => {}
    }
    let mut request = http::Request::builder()
        .method(R::METHOD)
        .uri(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(buf)?;
    AccessToken::add_authentication(&mut request, token)
        .map_err(|e| IntoHttpError::Authentication(e.into()))?;
    Ok(request)
}

/// The response body as `B`, or the Matrix error of a non-2xx answer.
fn parse<B, T>(response: http::Response<T>) -> Result<B, FromHttpResponseError<ApiError>>
where
    B: DeserializeOwned,
    T: AsRef<[u8]>,
{
    if !response.status().is_success() {
        return Err(FromHttpResponseError::Server(ApiError::from_http_response(
            response,
        )));
    }
    let body = response.body().as_ref();
    let body = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body)
        .map_err(|e| FromHttpResponseError::Deserialization(DeserializationError::Json(e)))
}

/// Declares an endpoint: its metadata, how a request becomes HTTP, and that
/// its response is the JSON body.
macro_rules! endpoint {
    ($method:ident $path:literal, $request:ty => $response:ty,
     |$req:ident| ($args:expr, $query:expr, $body:expr)) => {
        impl ::matrix_sdk::ruma::api::Metadata for $request {
            const METHOD: ::matrix_sdk::ruma::exports::http::Method =
                ::matrix_sdk::ruma::exports::http::Method::$method;
            const RATE_LIMITED: bool = false;
            type Authentication = ::matrix_sdk::ruma::api::auth_scheme::AccessToken;
            type PathBuilder = ::matrix_sdk::ruma::api::path_builder::SinglePath;
            const PATH_BUILDER: ::matrix_sdk::ruma::api::path_builder::SinglePath =
                ::matrix_sdk::ruma::api::path_builder::SinglePath::new($path);
        }

        impl ::matrix_sdk::ruma::api::OutgoingRequest for $request {
            type EndpointError = ::matrix_sdk::ruma::api::error::Error;
            type IncomingResponse = $response;

            fn try_into_http_request<T: Default + BufMut + AsRef<[u8]>>(
                self,
                base_url: &str,
                token: SendAccessToken<'_>,
                _: <SinglePath as PathBuilder>::Input<'_>,
            ) -> Result<http::Request<T>, IntoHttpError> {
                let $req = self;
                let (args, query, body): (Vec<&dyn Display>, String, Option<Vec<u8>>) =
                    ($args, $query, $body);
                super::build::<Self, T>(base_url, token, &args, &query, body)
            }
        }

        impl ::matrix_sdk::ruma::api::IncomingResponse for $response {
            type EndpointError = ::matrix_sdk::ruma::api::error::Error;

            fn try_from_http_response<T: AsRef<[u8]>>(
                response: http::Response<T>,
            ) -> Result<Self, FromHttpResponseError<Self::EndpointError>> {
                super::parse(response)
            }
        }
    };
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`,
/// with MSC4140's `org.matrix.msc4140.delay` query parameter when
/// scheduling a delayed state event.
pub(crate) mod send_state {
    use super::*;
    use matrix_sdk::ruma::OwnedRoomId;
    use serde::Deserialize;
    use serde_json::Value;

    /// The request.
    #[derive(Clone, Debug)]
    pub(crate) struct Request {
        /// The room.
        pub room_id: OwnedRoomId,
        /// The event type, verbatim.
        pub event_type: String,
        /// The state key.
        pub state_key: String,
        /// MSC4140: have the homeserver send it after this many ms instead.
        pub delay_ms: Option<u64>,
        /// The event content.
        pub content: Value,
    }

    /// The answer: an event id, or a delay id for a delayed event.
    #[derive(Debug, Deserialize)]
    pub(crate) struct Response {
        /// The event id of a state event sent now.
        #[serde(default)]
        pub event_id: Option<String>,
        /// The delay id of a scheduled event.
        #[serde(default)]
        pub delay_id: Option<String>,
    }

    endpoint!(PUT "/_matrix/client/v3/rooms/{room_id}/state/{event_type}/{state_key}",
    Request => Response,
    |r| (
        vec![&r.room_id as &dyn Display, &r.event_type, &r.state_key],
        r.delay_ms
            .map(|d| format!("org.matrix.msc4140.delay={d}"))
            .unwrap_or_default(),
        Some(serde_json::to_vec(&r.content)?)
    ));
}

/// `POST /_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}/{action}`
/// and its stable `v1` twin.
pub(crate) mod update_delayed {
    use super::*;
    use serde::Deserialize;

    /// The request on the unstable path.
    #[derive(Clone, Debug)]
    pub(crate) struct Unstable {
        /// The delay id.
        pub delay_id: String,
        /// `restart`, `cancel` or `send`.
        pub action: &'static str,
    }

    /// The request on the stable path.
    #[derive(Clone, Debug)]
    pub(crate) struct Stable {
        /// The delay id.
        pub delay_id: String,
        /// `restart`, `cancel` or `send`.
        pub action: &'static str,
    }

    /// The (empty) answer.
    #[derive(Debug, Deserialize)]
    pub(crate) struct Response {}

    /// The (empty) answer on the stable path.
    #[derive(Debug, Deserialize)]
    pub(crate) struct StableResponse {}

    endpoint!(POST "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}/{action}",
        Unstable => Response,
        |r| (vec![&r.delay_id as &dyn Display, &r.action], String::new(), None));
    endpoint!(POST "/_matrix/client/v1/delayed_events/{delay_id}/{action}",
        Stable => StableResponse,
        |r| (vec![&r.delay_id as &dyn Display, &r.action], String::new(), None));
}

/// `GET /_matrix/client/unstable/org.matrix.msc4140/delayed_events`.
pub(crate) mod list_delayed {
    use super::*;
    use serde::Deserialize;
    use serde_json::Value;

    /// The request.
    #[derive(Clone, Debug)]
    pub(crate) struct Request;

    /// Our scheduled delayed events.
    #[derive(Debug, Deserialize)]
    pub(crate) struct Response {
        /// As the homeserver describes them.
        #[serde(default)]
        pub delayed_events: Vec<Value>,
    }

    endpoint!(GET "/_matrix/client/unstable/org.matrix.msc4140/delayed_events",
        Request => Response,
        |_r| (Vec::new(), String::new(), None));
}

/// `GET /_matrix/client/v3/voip/turnServer`, its answer as JSON (parsed by
/// `TurnServers::from_response`).
pub(crate) mod turn_server {
    use super::*;
    use serde::Deserialize;
    use serde_json::Value;

    /// The request.
    #[derive(Clone, Debug)]
    pub(crate) struct Request;

    /// The answer (`{}` without TURN).
    #[derive(Debug, Deserialize)]
    #[serde(transparent)]
    pub(crate) struct Response {
        /// The whole JSON body.
        pub body: Value,
    }

    endpoint!(GET "/_matrix/client/v3/voip/turnServer",
        Request => Response,
        |_r| (Vec::new(), String::new(), None));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use matrix_sdk::ruma::api::OutgoingRequest;
    use matrix_sdk::ruma::owned_room_id;
    use serde_json::json;

    use super::*;

    #[test]
    fn state_requests_keep_the_type_and_carry_the_delay() {
        let r = send_state::Request {
            room_id: owned_room_id!("!r:localhost"),
            event_type: "m.call.member".to_owned(),
            state_key: "@a:localhost".to_owned(),
            delay_ms: Some(5000),
            content: json!({"m.calls": []}),
        };
        let http: http::Request<Vec<u8>> = r
            .try_into_http_request("http://hs", SendAccessToken::IfRequired("tok"), ())
            .unwrap();
        assert_eq!(http.method(), http::Method::PUT);
        assert_eq!(
            http.uri().to_string(),
            "http://hs/_matrix/client/v3/rooms/!r:localhost/state/m.call.member/@a:localhost?org.matrix.msc4140.delay=5000"
        );
        assert_eq!(http.headers().get("authorization").unwrap(), "Bearer tok");
        assert_eq!(http.body(), br#"{"m.calls":[]}"#);

        let u = update_delayed::Unstable {
            delay_id: "syd/x y".to_owned(),
            action: "restart",
        };
        let http: http::Request<Vec<u8>> = u
            .try_into_http_request("http://hs/", SendAccessToken::IfRequired("tok"), ())
            .unwrap();
        assert_eq!(
            http.uri().to_string(),
            "http://hs/_matrix/client/unstable/org.matrix.msc4140/delayed_events/syd%2Fx%20y/restart"
        );
        assert_eq!(http.body(), b"{}");
    }

    #[test]
    fn answers_parse_and_errors_are_matrix_errors() {
        use matrix_sdk::ruma::api::IncomingResponse;
        let ok = http::Response::builder()
            .status(200)
            .body(br#"{"delay_id":"d1"}"#.to_vec())
            .unwrap();
        let r = send_state::Response::try_from_http_response(ok).unwrap();
        assert_eq!(r.delay_id.as_deref(), Some("d1"));
        assert!(r.event_id.is_none());
        let empty = http::Response::builder()
            .status(200)
            .body(b"{}".to_vec())
            .unwrap();
        let t = turn_server::Response::try_from_http_response(empty).unwrap();
        assert_eq!(t.body, json!({}));
        let missing = http::Response::builder()
            .status(404)
            .body(br#"{"errcode":"M_NOT_FOUND","error":"no such delay"}"#.to_vec())
            .unwrap();
        let e = update_delayed::Response::try_from_http_response(missing).unwrap_err();
        assert!(matches!(e, FromHttpResponseError::Server(ref s) if s.status_code == 404));
    }
}
