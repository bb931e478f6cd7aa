//! A seeded fault injector for `m.call.*` to-device messages, between the
//! driver and the homeserver: drops, duplicates and delays (which reorders)
//! incoming and outgoing signalling. Compiled only with the cargo feature
//! `faults` (the test kit, `groupcall-testkit`, turns it on; the product
//! does not), active only when [`crate::JoinOptions::faults`] is set: for
//! tests of the protocol's robustness against a misbehaving transport.
//!
//! The media path has a fault layer of its own (loss, an incoming rate cap,
//! a black hole on the participant's media UDP, changeable during the
//! call): [`MediaFaults`], set with [`crate::JoinOptions::media_faults`].

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::matrix::{MatrixInput, MatrixSession};

pub use groupcall_media::{MediaFaultCounts, MediaFaultOptions, MediaFaults};

/// What to do to signalling messages; each message gets at most one fault.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultOptions {
    /// Seed of the decisions (same seed, same sequence of decisions).
    pub seed: u64,
    /// Probability to drop a message.
    pub drop: f64,
    /// Probability to deliver a message twice.
    pub duplicate: f64,
    /// Probability to delay a message (by up to `max_delay`), which lets
    /// later messages overtake it.
    pub delay: f64,
    /// Longest delay.
    pub max_delay: Duration,
    /// Apply to messages we receive.
    pub incoming: bool,
    /// Apply to messages we send.
    pub outgoing: bool,
}

impl FaultOptions {
    /// No faults (all probabilities 0), both directions, up to 1 s delays.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            drop: 0.0,
            duplicate: 0.0,
            delay: 0.0,
            max_delay: Duration::from_secs(1),
            incoming: true,
            outgoing: true,
        }
    }
}

/// The fate of one message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Fate {
    Deliver,
    Drop,
    Duplicate,
    Delay(Duration),
}

/// Counts of what was done, for the log.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    seen: u64,
    dropped: u64,
    duplicated: u64,
    delayed: u64,
}

/// The decisions (splitmix64: no dependency, reproducible).
#[derive(Debug)]
pub(crate) struct Faults {
    state: u64,
    opts: FaultOptions,
    counts: Counts,
    what: &'static str,
}

impl Faults {
    pub(crate) fn new(opts: FaultOptions, what: &'static str) -> Self {
        Self {
            state: opts.seed ^ 0x9e37_79b9_7f4a_7c15,
            opts,
            counts: Counts::default(),
            what,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn fate(&mut self) -> Fate {
        self.counts.seen += 1;
        let r = self.unit();
        let o = &self.opts;
        let fate = if r < o.drop {
            Fate::Drop
        } else if r < o.drop + o.duplicate {
            Fate::Duplicate
        } else if r < o.drop + o.duplicate + o.delay {
            let ms = o.max_delay.as_millis() as f64 * self.unit();
            Fate::Delay(Duration::from_millis(ms as u64))
        } else {
            Fate::Deliver
        };
        match fate {
            Fate::Drop => self.counts.dropped += 1,
            Fate::Duplicate => self.counts.duplicated += 1,
            Fate::Delay(_) => self.counts.delayed += 1,
            Fate::Deliver => {}
        }
        fate
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        let c = self.counts;
        info!(
            direction = self.what,
            seen = c.seen,
            dropped = c.dropped,
            duplicated = c.duplicated,
            delayed = c.delayed,
            "fault injection summary"
        );
    }
}

fn is_signalling(event_type: &str) -> bool {
    event_type.starts_with("m.call.") || event_type.starts_with("org.matrix.call.")
}

/// Puts a fault injector between the sync loop and the driver: incoming
/// signalling is dropped, duplicated or delayed; everything else passes
/// through in order.
pub(crate) fn wrap_incoming(
    mut rx: mpsc::Receiver<MatrixInput>,
    opts: FaultOptions,
) -> mpsc::Receiver<MatrixInput> {
    let (tx, out) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut faults = Faults::new(opts, "incoming");
        while let Some(input) = rx.recv().await {
            let fate = match &input {
                MatrixInput::ToDevice { event_type, .. } if is_signalling(event_type) => {
                    faults.fate()
                }
                _ => Fate::Deliver,
            };
            debug!(?fate, "incoming fault");
            match fate {
                Fate::Deliver => {
                    if tx.send(input).await.is_err() {
                        break;
                    }
                }
                Fate::Drop => {}
                Fate::Duplicate => {
                    if tx.send(input.clone()).await.is_err() || tx.send(input).await.is_err() {
                        break;
                    }
                }
                Fate::Delay(d) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        let _ = tx.send(input).await;
                    });
                }
            }
        }
    });
    out
}

/// Applies faults to an outgoing batch: returns what to send now; dropped
/// messages are left out, duplicates and delayed messages are sent by
/// tasks of their own (so they arrive out of order).
pub(crate) fn outgoing(
    faults: &mut Faults,
    session: &MatrixSession,
    event_type: &str,
    messages: Vec<(String, String, Value)>,
    encrypt: bool,
) -> Vec<(String, String, Value)> {
    if !is_signalling(event_type) {
        return messages;
    }
    let mut now = Vec::new();
    for m in messages {
        let later = match faults.fate() {
            Fate::Deliver => {
                now.push(m);
                continue;
            }
            Fate::Drop => continue,
            Fate::Duplicate => {
                now.push(m.clone());
                Duration::from_millis(50)
            }
            Fate::Delay(d) => d,
        };
        let session = session.clone();
        let event_type = event_type.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(later).await;
            if let Err(e) = session.send_to_device(&event_type, vec![m], encrypt).await {
                debug!("delayed fault-injected send failed: {e}");
            }
        });
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_fates_and_rates_roughly_right() {
        let mut o = FaultOptions::new(7);
        o.drop = 0.1;
        o.duplicate = 0.1;
        o.delay = 0.2;
        let mut a = Faults::new(o.clone(), "a");
        let mut b = Faults::new(o, "b");
        let fa: Vec<Fate> = (0..10_000).map(|_| a.fate()).collect();
        let fb: Vec<Fate> = (0..10_000).map(|_| b.fate()).collect();
        assert_eq!(fa, fb);
        let drops = fa.iter().filter(|f| **f == Fate::Drop).count();
        let delays = fa
            .iter()
            .filter(|f| matches!(f, Fate::Delay(d) if *d <= Duration::from_secs(1)))
            .count();
        assert!((800..1200).contains(&drops), "{drops}");
        assert!((1700..2300).contains(&delays), "{delays}");
    }

    #[test]
    fn no_faults_by_default() {
        let mut f = Faults::new(FaultOptions::new(1), "x");
        assert!((0..1000).all(|_| f.fate() == Fate::Deliver));
    }
}
