//! The ping/pong liveness of one MSC3898 data channel, for either side.
//!
//! - The focus ([`Role::Focus`]) sends `m.call.ping` every
//!   [`HeartbeatConfig::interval_ms`] and declares the client dead when no
//!   `m.call.pong` has arrived for [`HeartbeatConfig::timeout_ms`]. The
//!   timeout runs from the last pong received (from the start before the
//!   first), never from a ping sent: a focus whose pings cannot be sent
//!   still declares the client dead on schedule.
//! - The client ([`Role::Client`]) answers every ping with a pong at once and
//!   declares the focus dead when no ping has arrived for
//!   [`HeartbeatConfig::timeout_ms`] (which must exceed the focus's
//!   interval, as the MSC says).
//!
//! Either side also answers a ping with a pong (harmless, and what a
//! focus-to-focus link needs); only the messages named above count as signs
//! of life.
//!
//! Sans-IO: the driver feeds received messages ([`Heartbeat::handle_received`]),
//! reports failed sends ([`Heartbeat::handle_send_failed`]), sends what
//! [`Heartbeat::poll_output`] says and calls [`Heartbeat::handle_timeout`] at
//! [`Heartbeat::poll_timeout`]. Time is monotonic milliseconds (`u64`, any
//! epoch: the driver's `Instant` at start is a good zero), never wall-clock.

use std::collections::VecDeque;

use thiserror::Error;
use tracing::{debug, info};

use crate::dc::DcMessage;

/// The MSC's ping interval: "no greater than 30 seconds".
pub const DEFAULT_INTERVAL_MS: u64 = 30_000;
/// Default silence after which the other side is dead: the interval plus
/// 15 s of slack for a loaded machine or a slow path.
pub const DEFAULT_TIMEOUT_MS: u64 = 45_000;

/// Heartbeat timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// The focus's ping interval, ms (the client's expectation of it).
    pub interval_ms: u64,
    /// Silence after which the other side is dead, ms: since the last pong
    /// (focus) or the last ping (client). Must exceed `interval_ms`.
    pub timeout_ms: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
}

/// Why heartbeat timings were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HeartbeatConfigError {
    /// A zero interval.
    #[error("the ping interval must be greater than 0")]
    ZeroInterval,
    /// A timeout that would declare a healthy peer dead between two pings.
    #[error(
        "the timeout ({timeout_ms} ms) must be greater than the ping interval ({interval_ms} ms)"
    )]
    TimeoutNotAfterInterval {
        /// The interval.
        interval_ms: u64,
        /// The timeout.
        timeout_ms: u64,
    },
}

impl HeartbeatConfig {
    /// Checks the timings: `0 < interval_ms < timeout_ms`.
    pub fn validate(&self) -> Result<(), HeartbeatConfigError> {
        if self.interval_ms == 0 {
            return Err(HeartbeatConfigError::ZeroInterval);
        }
        if self.timeout_ms <= self.interval_ms {
            return Err(HeartbeatConfigError::TimeoutNotAfterInterval {
                interval_ms: self.interval_ms,
                timeout_ms: self.timeout_ms,
            });
        }
        Ok(())
    }
}

/// Which end of the data channel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// The focus: sends pings, expects pongs.
    Focus,
    /// The client: answers pings, expects them.
    Client,
}

/// Why the other side was declared dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DeadReason {
    /// (Focus) no pong for the timeout.
    #[error("no pong for {silent_ms} ms")]
    NoPong {
        /// Time since the last pong (or the start), ms.
        silent_ms: u64,
    },
    /// (Client) no ping for the timeout.
    #[error("no ping for {silent_ms} ms")]
    NoPing {
        /// Time since the last ping (or the start), ms.
        silent_ms: u64,
    },
}

/// What the heartbeat asks of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeartbeatOutput {
    /// Send `m.call.ping` (focus).
    SendPing,
    /// Send `m.call.pong` (answer to a ping).
    SendPong,
    /// The other side is unresponsive: hang up. Nothing follows this.
    Dead {
        /// Why.
        reason: DeadReason,
    },
}

/// The liveness of one data channel. See the module docs.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    role: Role,
    config: HeartbeatConfig,
    /// When the other side last showed life (or the start).
    last_heard: u64,
    /// When the focus sends its next ping.
    next_ping: u64,
    dead: bool,
    outputs: VecDeque<HeartbeatOutput>,
    send_failures: u64,
}

impl Heartbeat {
    /// A heartbeat for a data channel that opened at `now`.
    pub fn new(
        role: Role,
        config: HeartbeatConfig,
        now: u64,
    ) -> Result<Self, HeartbeatConfigError> {
        config.validate()?;
        Ok(Self {
            role,
            config,
            last_heard: now,
            next_ping: now.saturating_add(config.interval_ms),
            dead: false,
            outputs: VecDeque::new(),
            send_failures: 0,
        })
    }

    /// Whether the other side has been declared dead.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// How many sends the driver reported as failed.
    pub fn send_failures(&self) -> u64 {
        self.send_failures
    }

    /// A message arrived on the data channel. Returns whether it was a
    /// heartbeat message (ping or pong); other messages are not looked at.
    /// Arriving after the deadline it revives nothing: the side is dead.
    pub fn handle_received(&mut self, now: u64, msg: &DcMessage) -> bool {
        let is_heartbeat = matches!(msg, DcMessage::Ping | DcMessage::Pong);
        self.handle_timeout(now);
        if self.dead || !is_heartbeat {
            return is_heartbeat;
        }
        match (self.role, msg) {
            (Role::Client, DcMessage::Ping) => {
                self.last_heard = self.last_heard.max(now);
                self.outputs.push_back(HeartbeatOutput::SendPong);
            }
            (Role::Focus, DcMessage::Pong) => self.last_heard = self.last_heard.max(now),
            (_, DcMessage::Ping) => self.outputs.push_back(HeartbeatOutput::SendPong),
            _ => debug!(role = ?self.role, "unexpected {} ignored", msg.message_type()),
        }
        true
    }

    /// The driver could not send a ping or pong. Nothing is retried and no
    /// deadline moves: the timeout still runs from the last sign of life.
    pub fn handle_send_failed(&mut self, now: u64) {
        self.send_failures += 1;
        debug!(role = ?self.role, now, "heartbeat send failed");
    }

    /// When to call [`Heartbeat::handle_timeout`] next; `None` once dead.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.dead {
            return None;
        }
        let deadline = self.deadline();
        Some(match self.role {
            Role::Focus => deadline.min(self.next_ping),
            Role::Client => deadline,
        })
    }

    /// Advances time: pings fall due, the other side may be dead.
    pub fn handle_timeout(&mut self, now: u64) {
        if self.dead {
            return;
        }
        if now >= self.deadline() {
            let silent_ms = now.saturating_sub(self.last_heard);
            let reason = match self.role {
                Role::Focus => DeadReason::NoPong { silent_ms },
                Role::Client => DeadReason::NoPing { silent_ms },
            };
            info!(role = ?self.role, "data channel peer unresponsive: {reason}");
            self.dead = true;
            self.outputs.push_back(HeartbeatOutput::Dead { reason });
            return;
        }
        if self.role == Role::Focus && now >= self.next_ping {
            self.outputs.push_back(HeartbeatOutput::SendPing);
            // One ping per interval; after a late wake-up, no burst.
            self.next_ping = self.next_ping.saturating_add(self.config.interval_ms);
            if self.next_ping <= now {
                self.next_ping = now.saturating_add(self.config.interval_ms);
            }
        }
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<HeartbeatOutput> {
        self.outputs.pop_front()
    }

    fn deadline(&self) -> u64 {
        self.last_heard.saturating_add(self.config.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shortened timings, as the tests use.
    const CFG: HeartbeatConfig = HeartbeatConfig {
        interval_ms: 100,
        timeout_ms: 250,
    };
    const T0: u64 = 1_000;

    fn drain(h: &mut Heartbeat) -> Vec<HeartbeatOutput> {
        std::iter::from_fn(|| h.poll_output()).collect()
    }

    /// Runs `h` alone until `until`, waking exactly at each `poll_timeout`;
    /// returns `(time, output)` of everything it produced.
    fn run(h: &mut Heartbeat, until: u64) -> Vec<(u64, HeartbeatOutput)> {
        let mut out = Vec::new();
        while let Some(t) = h.poll_timeout().filter(|t| *t <= until) {
            h.handle_timeout(t);
            out.extend(drain(h).into_iter().map(|o| (t, o)));
        }
        out
    }

    #[test]
    fn defaults_are_the_msc_interval_and_timings_are_checked() {
        let d = HeartbeatConfig::default();
        assert_eq!(d.interval_ms, 30_000);
        assert!(d.timeout_ms > d.interval_ms);
        assert!(d.validate().is_ok());
        let zero = HeartbeatConfig {
            interval_ms: 0,
            timeout_ms: 10,
        };
        assert_eq!(
            Heartbeat::new(Role::Focus, zero, 0).unwrap_err(),
            HeartbeatConfigError::ZeroInterval
        );
        let short = HeartbeatConfig {
            interval_ms: 100,
            timeout_ms: 100,
        };
        assert!(matches!(
            Heartbeat::new(Role::Client, short, 0).unwrap_err(),
            HeartbeatConfigError::TimeoutNotAfterInterval { .. }
        ));
    }

    #[test]
    fn focus_pings_on_schedule_and_stays_alive_while_pongs_come() {
        let mut f = Heartbeat::new(Role::Focus, CFG, T0).unwrap();
        assert_eq!(f.poll_timeout(), Some(T0 + 100));
        let mut pings = Vec::new();
        let mut t = T0;
        while t < T0 + 2_000 {
            t = f.poll_timeout().unwrap();
            f.handle_timeout(t);
            for o in drain(&mut f) {
                assert_eq!(o, HeartbeatOutput::SendPing, "at {t}");
                pings.push(t);
                // The pong comes back 30 ms later.
                assert!(f.handle_received(t + 30, &DcMessage::Pong));
            }
        }
        assert!(!f.is_dead());
        let want: Vec<u64> = (1..=20).map(|i| T0 + i * 100).collect();
        assert_eq!(pings, want);
    }

    #[test]
    fn focus_declares_a_silent_client_dead_at_the_timeout() {
        let mut f = Heartbeat::new(Role::Focus, CFG, T0).unwrap();
        let out = run(&mut f, T0 + 10_000);
        assert_eq!(
            out,
            vec![
                (T0 + 100, HeartbeatOutput::SendPing),
                (T0 + 200, HeartbeatOutput::SendPing),
                (
                    T0 + 250,
                    HeartbeatOutput::Dead {
                        reason: DeadReason::NoPong { silent_ms: 250 }
                    }
                ),
            ]
        );
        assert!(f.is_dead());
        assert_eq!(f.poll_timeout(), None);
        // A late pong revives nothing.
        assert!(f.handle_received(T0 + 300, &DcMessage::Pong));
        assert!(drain(&mut f).is_empty());
        assert!(f.is_dead());
    }

    /// The case waterfall got wrong: every ping fails to send, yet the
    /// focus times out exactly when it would have with pings sent.
    #[test]
    fn focus_that_cannot_send_its_pings_still_times_out_on_schedule() {
        let mut f = Heartbeat::new(Role::Focus, CFG, T0).unwrap();
        // One pong after the first ping, then nothing (the pings fail).
        f.handle_timeout(T0 + 100);
        assert_eq!(drain(&mut f), vec![HeartbeatOutput::SendPing]);
        f.handle_received(T0 + 120, &DcMessage::Pong);
        let mut dead_at = None;
        while let Some(t) = f.poll_timeout() {
            f.handle_timeout(t);
            for o in drain(&mut f) {
                match o {
                    HeartbeatOutput::SendPing => f.handle_send_failed(t),
                    HeartbeatOutput::Dead { reason } => dead_at = Some((t, reason)),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(
            dead_at,
            Some((T0 + 120 + 250, DeadReason::NoPong { silent_ms: 250 }))
        );
        assert_eq!(f.send_failures(), 2); // the pings at +200 and +300
    }

    #[test]
    fn the_focus_answers_a_ping_but_only_pongs_keep_a_client_alive() {
        let mut f = Heartbeat::new(Role::Focus, CFG, T0).unwrap();
        assert!(f.handle_received(T0 + 50, &DcMessage::Ping));
        assert_eq!(drain(&mut f), vec![HeartbeatOutput::SendPong]);
        // The ping did not move the deadline (start + timeout).
        f.handle_timeout(T0 + 100);
        assert_eq!(drain(&mut f), vec![HeartbeatOutput::SendPing]);
        // Time is brought up to date before a message is handled: the ping
        // due at +200 comes out before the answer to this ping.
        f.handle_received(T0 + 240, &DcMessage::Ping);
        f.handle_timeout(T0 + 250);
        assert_eq!(
            drain(&mut f),
            vec![
                HeartbeatOutput::SendPing,
                HeartbeatOutput::SendPong,
                HeartbeatOutput::Dead {
                    reason: DeadReason::NoPong { silent_ms: 250 }
                }
            ]
        );
    }

    #[test]
    fn a_late_wakeup_sends_one_ping_not_a_burst() {
        let cfg = HeartbeatConfig {
            interval_ms: 100,
            timeout_ms: 10_000,
        };
        let mut f = Heartbeat::new(Role::Focus, cfg, T0).unwrap();
        f.handle_timeout(T0 + 550);
        assert_eq!(drain(&mut f), vec![HeartbeatOutput::SendPing]);
        assert_eq!(f.poll_timeout(), Some(T0 + 650));
    }

    #[test]
    fn client_answers_pings_at_once_and_stays_alive() {
        let mut c = Heartbeat::new(Role::Client, CFG, T0).unwrap();
        assert_eq!(c.poll_timeout(), Some(T0 + 250));
        for i in 1..=20 {
            let t = T0 + i * 100;
            c.handle_timeout(t);
            assert!(c.handle_received(t, &DcMessage::Ping));
            assert_eq!(drain(&mut c), vec![HeartbeatOutput::SendPong], "at {t}");
            assert_eq!(c.poll_timeout(), Some(t + 250));
        }
        assert!(!c.is_dead());
        // Other messages neither count nor answer.
        assert!(!c.handle_received(
            T0 + 2_010,
            &DcMessage::Unknown {
                msg_type: "x".into()
            }
        ));
        assert!(c.handle_received(T0 + 2_020, &DcMessage::Pong));
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.poll_timeout(), Some(T0 + 2_000 + 250));
    }

    #[test]
    fn client_declares_a_silent_focus_dead_even_when_its_pongs_fail() {
        let mut c = Heartbeat::new(Role::Client, CFG, T0).unwrap();
        c.handle_received(T0 + 100, &DcMessage::Ping);
        assert_eq!(drain(&mut c), vec![HeartbeatOutput::SendPong]);
        c.handle_send_failed(T0 + 100);
        let out = run(&mut c, T0 + 10_000);
        assert_eq!(
            out,
            vec![(
                T0 + 350,
                HeartbeatOutput::Dead {
                    reason: DeadReason::NoPing { silent_ms: 250 }
                }
            )]
        );
        // With no ping ever, dead at start + timeout.
        let mut c = Heartbeat::new(Role::Client, CFG, T0).unwrap();
        assert_eq!(
            run(&mut c, T0 + 10_000),
            vec![(
                T0 + 250,
                HeartbeatOutput::Dead {
                    reason: DeadReason::NoPing { silent_ms: 250 }
                }
            )]
        );
    }

    #[test]
    fn a_ping_after_the_deadline_is_too_late_even_without_a_wakeup() {
        // The driver missed its wake-up; the late ping finds the side dead.
        let mut c = Heartbeat::new(Role::Client, CFG, T0).unwrap();
        assert!(c.handle_received(T0 + 251, &DcMessage::Ping));
        assert_eq!(
            drain(&mut c),
            vec![HeartbeatOutput::Dead {
                reason: DeadReason::NoPing { silent_ms: 251 }
            }]
        );
    }

    /// Both sides wired through a simulated link, 10 ms each way; the link
    /// breaks one way at `cut` and each side notices on its own schedule.
    fn simulate(client_to_focus_ok: bool, focus_to_client_ok: bool) -> (Option<u64>, Option<u64>) {
        let cut = T0 + 1_000;
        let mut f = Heartbeat::new(Role::Focus, CFG, T0).unwrap();
        let mut c = Heartbeat::new(Role::Client, CFG, T0).unwrap();
        // (arrival time, to focus?, message)
        let mut wire: Vec<(u64, bool, DcMessage)> = Vec::new();
        let (mut f_dead, mut c_dead) = (None, None);
        let mut now = T0;
        while now < T0 + 3_000 {
            let next = [f.poll_timeout(), c.poll_timeout()]
                .into_iter()
                .flatten()
                .chain(wire.iter().map(|w| w.0))
                .min();
            let Some(next) = next else { break };
            now = next;
            f.handle_timeout(now);
            c.handle_timeout(now);
            let arrived: Vec<_> = wire.iter().filter(|w| w.0 <= now).cloned().collect();
            wire.retain(|w| w.0 > now);
            for (_, to_focus, m) in arrived {
                if to_focus {
                    f.handle_received(now, &m);
                } else {
                    c.handle_received(now, &m);
                }
            }
            for o in drain(&mut f) {
                match o {
                    HeartbeatOutput::SendPing if now < cut || focus_to_client_ok => {
                        wire.push((now + 10, false, DcMessage::Ping))
                    }
                    HeartbeatOutput::SendPing => f.handle_send_failed(now),
                    HeartbeatOutput::Dead { .. } => f_dead = Some(now),
                    _ => {}
                }
            }
            for o in drain(&mut c) {
                match o {
                    HeartbeatOutput::SendPong if now < cut || client_to_focus_ok => {
                        wire.push((now + 10, true, DcMessage::Pong))
                    }
                    HeartbeatOutput::SendPong => c.handle_send_failed(now),
                    HeartbeatOutput::Dead { .. } => c_dead = Some(now),
                    _ => {}
                }
            }
        }
        (f_dead, c_dead)
    }

    #[test]
    fn both_sides_over_a_simulated_link() {
        assert_eq!(simulate(true, true), (None, None));
        // Pings at T0+100k arrive at +10, pongs back at +20: the last pong
        // before the cut (at +1000) arrived at T0+920.
        // Client to focus broken: the focus notices at 920 + 250 and stops
        // pinging (it hangs up); the client, which got pings until then
        // (the last sent at +1100, arriving at +1110), notices 250 ms later.
        assert_eq!(simulate(false, true), (Some(T0 + 1_170), Some(T0 + 1_360)));
        // Focus to client broken (its pings cannot be sent): the client
        // notices at last ping (T0+910) + 250, the focus at last pong
        // (T0+920) + 250.
        assert_eq!(simulate(true, false), (Some(T0 + 1_170), Some(T0 + 1_160)));
    }
}
