//! The one retry policy of the Matrix transport.
//!
//! Every request this crate retries goes through [`Backoff::run`]: capped
//! exponential backoff (honouring a homeserver's `retry_after`), a bounded
//! number of attempts and/or a time budget. matrix-sdk's own retrying is
//! switched off for these requests ([`once`]), so retries never stack; the
//! client-wide [`RequestConfig`] (see `build_client`) disables the SDK's
//! retries for everything else too, and the sync loop takes its delays from
//! [`Backoff::delay`].
//!
//! One exception we cannot configure: matrix-sdk 0.18 sends Olm-encrypted
//! to-device requests with its own `RequestConfig::short_retry()` inside
//! `encrypt_and_send_raw_to_device`; we do not retry those sends on top
//! (only errors before the send, such as a failed key claim).

use std::future::IntoFuture;
use std::time::Duration;

use matrix_sdk::HttpError;
use matrix_sdk::config::RequestConfig;
use matrix_sdk::ruma::api::error::{ErrorKind, RetryAfter};
use tokio::time::Instant;
use tracing::warn;

/// Whether a retry is safe and useful for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Idempotent request: retry transport errors, 5xx and 429.
    Transient,
    /// Not idempotent: retry only when the request provably was not
    /// processed (the connection could not be made, or 429).
    ConnectOnly,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Try again, after at least this long if the server said so.
    Retry(Option<Duration>),
    /// Give up with this error.
    Fail,
}

/// Capped exponential backoff: waits `first`, `2 * first`, ... at most
/// `max_delay` between attempts, for at most `attempts` attempts (first one
/// included) and, with a `budget`, never waiting past that much time after
/// the first attempt started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// Wait before the second attempt.
    pub first: Duration,
    /// Cap of a single wait (also of a server's `retry_after`).
    pub max_delay: Duration,
    /// Attempts in all, the first included (`None`: unbounded).
    pub attempts: Option<u32>,
    /// Time budget from the first attempt (`None`: unbounded).
    pub budget: Option<Duration>,
}

/// One request to the homeserver: 4 attempts, 200 ms, 400 ms, 800 ms apart.
pub(crate) const REQUEST: Backoff = Backoff {
    first: Duration::from_millis(200),
    max_delay: Duration::from_secs(5),
    attempts: Some(4),
    budget: None,
};

/// Publishing our state (the member event): keeps trying for ~15 s.
pub(crate) const STATE: Backoff = Backoff {
    first: Duration::from_millis(200),
    max_delay: Duration::from_secs(5),
    attempts: None,
    budget: Some(Duration::from_secs(15)),
};

impl Backoff {
    /// The wait after failed attempt number `failed` (1 = the first).
    pub(crate) fn delay(&self, failed: u32) -> Duration {
        let shift = failed.saturating_sub(1).min(30);
        self.first.saturating_mul(1u32 << shift).min(self.max_delay)
    }

    /// Runs `op` until it succeeds, `classify` says [`Verdict::Fail`], or
    /// the attempts or the budget are used up; returns the last error then.
    /// Each retry is logged (`what` names the request).
    pub(crate) async fn run<T, E, F, Fut>(
        &self,
        what: &str,
        mut op: F,
        classify: impl Fn(&E) -> Verdict,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: IntoFuture<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let start = Instant::now();
        let mut failed = 0u32;
        loop {
            let err = match op().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            failed += 1;
            let Verdict::Retry(after) = classify(&err) else {
                return Err(err);
            };
            if self.attempts.is_some_and(|max| failed >= max) {
                return Err(err);
            }
            let wait = after
                .map_or(self.delay(failed), |a| a.max(self.delay(failed)))
                .min(self.max_delay);
            if self.budget.is_some_and(|b| start.elapsed() + wait > b) {
                return Err(err);
            }
            warn!(what, attempt = failed, error = %err, ?wait, "request failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

/// The request config for a request that [`Backoff::run`] retries: the SDK
/// itself does not.
pub(crate) fn once() -> RequestConfig {
    RequestConfig::new().disable_retry()
}

/// Classifies an error of a matrix-sdk request.
pub(crate) fn classify_http(e: &HttpError, retry: Retry) -> Verdict {
    if let Some(api) = e.as_client_api_error() {
        let status = api.status_code.as_u16();
        if status == 429 {
            let after = match api.error_kind() {
                Some(ErrorKind::LimitExceeded(l)) => match l.retry_after {
                    Some(RetryAfter::Delay(d)) => Some(d),
                    _ => None,
                },
                _ => None,
            };
            return Verdict::Retry(after);
        }
        return if status >= 500 && retry == Retry::Transient {
            Verdict::Retry(None)
        } else {
            Verdict::Fail
        };
    }
    match e {
        HttpError::Reqwest(r) if retry == Retry::Transient || r.is_connect() => {
            Verdict::Retry(None)
        }
        // A response that does not parse as the endpoint's: a broken proxy
        // or server; worth another try for idempotent requests.
        HttpError::Api(_) if retry == Retry::Transient => Verdict::Retry(None),
        _ => Verdict::Fail,
    }
}

/// Classifies one of our errors: retry the transient ones.
pub(crate) fn classify_matrix(e: &super::MatrixError) -> Verdict {
    if e.is_transient() {
        Verdict::Retry(None)
    } else {
        Verdict::Fail
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn quick(attempts: Option<u32>, budget: Option<Duration>) -> Backoff {
        Backoff {
            first: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            attempts,
            budget,
        }
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let d: Vec<u128> = (1..=7).map(|n| REQUEST.delay(n).as_millis()).collect();
        assert_eq!(d, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(STATE.delay(u32::MAX), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn retries_transient_errors_up_to_the_attempts() {
        let calls = Cell::new(0);
        let r: Result<(), &str> = quick(Some(4), None)
            .run(
                "t",
                || {
                    calls.set(calls.get() + 1);
                    async { Err("down") }
                },
                |_| Verdict::Retry(None),
            )
            .await;
        assert_eq!(r, Err("down"));
        assert_eq!(calls.get(), 4);

        // Success on the third attempt ends it.
        calls.set(0);
        let r: Result<u32, &str> = quick(Some(4), None)
            .run(
                "t",
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move { if n < 3 { Err("down") } else { Ok(n) } }
                },
                |_| Verdict::Retry(None),
            )
            .await;
        assert_eq!(r, Ok(3));
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = Cell::new(0);
        let r: Result<(), &str> = quick(Some(4), None)
            .run(
                "t",
                || {
                    calls.set(calls.get() + 1);
                    async { Err("forbidden") }
                },
                |_| Verdict::Fail,
            )
            .await;
        assert_eq!(r, Err("forbidden"));
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test]
    async fn the_budget_and_retry_after_bound_the_waits() {
        // Unbounded attempts, 30 ms budget, waits of at most 4 ms: it gives
        // up within the budget after several attempts.
        let calls = Cell::new(0);
        let t = std::time::Instant::now();
        let r: Result<(), &str> = quick(None, Some(Duration::from_millis(30)))
            .run(
                "t",
                || {
                    calls.set(calls.get() + 1);
                    async { Err("down") }
                },
                |_| Verdict::Retry(None),
            )
            .await;
        assert!(r.is_err());
        assert!(calls.get() >= 4, "{} attempts", calls.get());
        assert!(t.elapsed() < Duration::from_secs(1));

        // A server's retry_after longer than the cap is capped.
        let t = std::time::Instant::now();
        let calls = Cell::new(0);
        let _: Result<(), &str> = quick(Some(2), None)
            .run(
                "t",
                || {
                    calls.set(calls.get() + 1);
                    async { Err("slow down") }
                },
                |_| Verdict::Retry(Some(Duration::from_secs(60))),
            )
            .await;
        assert_eq!(calls.get(), 2);
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn http_errors_are_classified_by_idempotence() {
        let api = |status: u16, body: &str| {
            let resp = matrix_sdk::ruma::exports::http::Response::builder()
                .status(status)
                .body(body.as_bytes().to_vec())
                .unwrap();
            use matrix_sdk::ruma::api::EndpointError as _;
            HttpError::from(matrix_sdk::ruma::api::error::FromHttpResponseError::Server(
                matrix_sdk::ruma::api::error::Error::from_http_response(resp),
            ))
        };
        let busy = api(502, r#"{"errcode":"M_UNKNOWN","error":"bad gateway"}"#);
        assert_eq!(classify_http(&busy, Retry::Transient), Verdict::Retry(None));
        assert_eq!(classify_http(&busy, Retry::ConnectOnly), Verdict::Fail);
        let limited = api(
            429,
            r#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow","retry_after_ms":1500}"#,
        );
        assert_eq!(
            classify_http(&limited, Retry::ConnectOnly),
            Verdict::Retry(Some(Duration::from_millis(1500)))
        );
        let missing = api(404, r#"{"errcode":"M_NOT_FOUND","error":"no"}"#);
        assert_eq!(classify_http(&missing, Retry::Transient), Verdict::Fail);
    }
}
