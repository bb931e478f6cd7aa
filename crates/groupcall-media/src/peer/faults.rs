//! A test-only fault layer for a [`super::MediaHost`]'s UDP sockets: random
//! loss (each direction), a cap on the incoming rate (a token bucket that
//! drops what exceeds it, as a congested link's policer would) and a
//! black hole (every datagram in and out dropped), all changeable at run
//! time through a cloneable handle ([`MediaFaults`]).
//!
//! Compiled only with the cargo feature `faults` (groupcall's `faults`
//! feature turns it on, and the test kit turns that on); the product never
//! builds it. It sits between the sockets and the peer set: what it drops
//! the peer set never sees, or never leaves the host; STUN, DTLS, SCTP and
//! RTP alike.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::info;

/// What to do to a host's datagrams. Every field can be changed later
/// through the [`MediaFaults`] handle.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaFaultOptions {
    /// Seed of the random decisions (same seed, same sequence).
    pub seed: u64,
    /// Probability to drop an incoming datagram (0 to 1).
    pub loss_in: f64,
    /// Probability to drop an outgoing datagram (0 to 1).
    pub loss_out: f64,
    /// Cap on the incoming rate, in kbit/s (datagram bytes, UDP payload);
    /// what exceeds it is dropped. `None`: no cap.
    pub rate_in_kbps: Option<u32>,
    /// Depth of the rate cap's bucket, as time at the capped rate (what
    /// may arrive at once after a quiet spell).
    pub rate_burst: Duration,
    /// Drop every datagram, both ways.
    pub blackhole: bool,
}

impl MediaFaultOptions {
    /// No faults: no loss, no cap (a 100 ms bucket once one is set), no
    /// black hole.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            loss_in: 0.0,
            loss_out: 0.0,
            rate_in_kbps: None,
            rate_burst: Duration::from_millis(100),
            blackhole: false,
        }
    }
}

/// What the fault layer did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaFaultCounts {
    /// Incoming datagrams seen.
    pub in_seen: u64,
    /// Incoming datagrams dropped at random (`loss_in`).
    pub in_lost: u64,
    /// Incoming datagrams dropped over the rate cap.
    pub in_over_rate: u64,
    /// Incoming datagrams dropped by the black hole.
    pub in_blackholed: u64,
    /// Outgoing datagrams seen.
    pub out_seen: u64,
    /// Outgoing datagrams dropped at random (`loss_out`).
    pub out_lost: u64,
    /// Outgoing datagrams dropped by the black hole.
    pub out_blackholed: u64,
}

#[derive(Debug)]
struct Inner {
    opts: MediaFaultOptions,
    rng: fastrand::Rng,
    /// Bytes the rate cap lets through now, and when it was refilled.
    tokens: f64,
    refilled: Option<Instant>,
    counts: MediaFaultCounts,
}

/// The run-time handle of a host's fault layer: give a clone to
/// `MediaHost::spawn_with_faults` and keep one to change the faults while
/// the host runs.
#[derive(Debug, Clone)]
pub struct MediaFaults {
    inner: Arc<Mutex<Inner>>,
}

impl MediaFaults {
    /// A fault layer doing what `opts` says.
    pub fn new(opts: MediaFaultOptions) -> Self {
        let rng = fastrand::Rng::with_seed(opts.seed);
        Self {
            inner: Arc::new(Mutex::new(Inner {
                opts,
                rng,
                tokens: 0.0,
                refilled: None,
                counts: MediaFaultCounts::default(),
            })),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut g)
    }

    /// Turns the black hole on or off.
    pub fn set_blackhole(&self, on: bool) {
        info!(on, "media fault layer: black hole");
        self.with(|i| i.opts.blackhole = on);
    }

    /// Sets the incoming loss probability.
    pub fn set_loss_in(&self, p: f64) {
        info!(p, "media fault layer: incoming loss");
        self.with(|i| i.opts.loss_in = p);
    }

    /// Sets the outgoing loss probability.
    pub fn set_loss_out(&self, p: f64) {
        info!(p, "media fault layer: outgoing loss");
        self.with(|i| i.opts.loss_out = p);
    }

    /// Sets (or with `None` lifts) the incoming rate cap, in kbit/s. The
    /// bucket starts full.
    pub fn set_rate_in_kbps(&self, kbps: Option<u32>) {
        info!(?kbps, "media fault layer: incoming rate cap");
        self.with(|i| {
            i.opts.rate_in_kbps = kbps;
            i.refilled = None;
        });
    }

    /// The options in force.
    pub fn options(&self) -> MediaFaultOptions {
        self.with(|i| i.opts.clone())
    }

    /// What was done so far.
    pub fn counts(&self) -> MediaFaultCounts {
        self.with(|i| i.counts)
    }

    /// Whether an incoming datagram of `len` bytes, arrived at `now`, is
    /// let through.
    pub(crate) fn pass_in(&self, now: Instant, len: usize) -> bool {
        self.with(|i| {
            i.counts.in_seen += 1;
            if i.opts.blackhole {
                i.counts.in_blackholed += 1;
                return false;
            }
            if i.opts.loss_in > 0.0 && i.rng.f64() < i.opts.loss_in {
                i.counts.in_lost += 1;
                return false;
            }
            let Some(kbps) = i.opts.rate_in_kbps else {
                return true;
            };
            let rate = f64::from(kbps) * 125.0; // bytes per second
            let depth = (rate * i.opts.rate_burst.as_secs_f64()).max(1500.0);
            i.tokens = match i.refilled {
                None => depth,
                Some(t) => {
                    (i.tokens + rate * now.saturating_duration_since(t).as_secs_f64()).min(depth)
                }
            };
            i.refilled = Some(now);
            let len = len as f64;
            if i.tokens >= len {
                i.tokens -= len;
                true
            } else {
                i.counts.in_over_rate += 1;
                false
            }
        })
    }

    /// Whether an outgoing datagram is sent.
    pub(crate) fn pass_out(&self) -> bool {
        self.with(|i| {
            i.counts.out_seen += 1;
            if i.opts.blackhole {
                i.counts.out_blackholed += 1;
                return false;
            }
            if i.opts.loss_out > 0.0 && i.rng.f64() < i.opts.loss_out {
                i.counts.out_lost += 1;
                return false;
            }
            true
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loss_black_hole_and_rate_cap() {
        let f = MediaFaults::new(MediaFaultOptions::new(3));
        let t0 = Instant::now();
        assert!((0..1000).all(|_| f.pass_in(t0, 1000) && f.pass_out()));

        f.set_loss_in(0.2);
        let passed = (0..10_000).filter(|_| f.pass_in(t0, 100)).count();
        assert!((7_600..8_400).contains(&passed), "{passed}");
        f.set_loss_in(0.0);

        f.set_blackhole(true);
        assert!(!f.pass_in(t0, 10) && !f.pass_out());
        f.set_blackhole(false);
        assert!(f.pass_in(t0, 10) && f.pass_out());

        // 100 kbit/s = 12 500 bytes/s: over 10 s of 1000-byte datagrams
        // every 10 ms (800 kbit/s), about 125 + the bucket (1250 bytes,
        // at least 1500) pass.
        f.set_rate_in_kbps(Some(100));
        let passed = (0..1000)
            .filter(|k| f.pass_in(t0 + Duration::from_millis(10 * k), 1000))
            .count();
        assert!((120..=130).contains(&passed), "{passed}");
        let c = f.counts();
        assert_eq!(c.in_over_rate, 1000 - passed as u64);
        assert_eq!(c.in_blackholed, 1);
        assert_eq!(c.out_blackholed, 1);
    }
}
