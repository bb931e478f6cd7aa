//! Admission of incoming to-device messages: filtering, rate limits,
//! holding messages of devices not (yet) in the member state, and `seq`
//! reordering, before the per-peer state machine sees them.

use tracing::debug;

use crate::ids::DeviceKey;
use crate::reorder::{Pushed, ReorderBuffer};
use crate::signalling::{Body, Message, MessageType};
use crate::types::*;

use super::{GroupCall, MAX_BUFFERS_PER_DEVICE, MAX_HELD_PER_DEVICE, REORDER_CAPACITY, truncate};

impl GroupCall {
    // ------------------------------------------------------------------
    // Incoming signalling

    /// A to-device message. What was done with it comes out first as an
    /// [`Output::Signalling`], ahead of the outputs it caused.
    pub fn handle_to_device(&mut self, now: impl Into<Now>, m: IncomingToDevice) {
        let now = self.clock(now.into());
        let at = self.out.len();
        let (sender, event_type, encrypted) =
            (truncate(&m.sender), truncate(&m.event_type), m.encrypted);
        let outcome = self.receive_to_device(now, m);
        if let Err(e) = &outcome {
            debug!("signalling ignored: {e}");
        }
        self.out.insert(
            at.min(self.out.len()),
            Output::Signalling(SignallingReport {
                sender,
                event_type,
                encrypted,
                outcome,
            }),
        );
        self.flush();
    }

    pub(super) fn receive_to_device(
        &mut self,
        now: u64,
        m: IncomingToDevice,
    ) -> Result<Accepted, Ignored> {
        if MessageType::from_event_type(&m.event_type).is_none() {
            return Err(Ignored::NotSignalling(truncate(&m.event_type)));
        }
        let Some(j) = &self.joined else {
            return Err(Ignored::NotJoined);
        };
        let (conf, session) = (j.call_id.clone(), j.session_id.clone());
        if self.cfg.require_encrypted && !m.encrypted {
            return Err(Ignored::Unencrypted);
        }
        if !self.take_token(&m.sender, now) {
            return Err(Ignored::RateLimited(truncate(&m.sender)));
        }
        let msg = Message::parse(&m.event_type, &m.content)?;
        if msg.common.conf_id != conf {
            return Err(Ignored::OtherCall(msg.common.conf_id));
        }
        if msg.common.dest_session_id != session {
            return Err(Ignored::WrongSession(msg.common.dest_session_id));
        }
        // The sending device: named in the message (required on invites
        // only), known from Olm, or else the peer whose call this is.
        let device_id = match (&msg.common.device_id, &m.sender_device) {
            (Some(claimed), Some(actual)) if claimed != actual => {
                return Err(Ignored::DeviceMismatch {
                    claimed: claimed.clone(),
                    actual: actual.clone(),
                });
            }
            (Some(d), _) | (None, Some(d)) => d.clone(),
            (None, None) => self
                .peers
                .values()
                .find(|p| p.remote.user_id == m.sender && p.call_id == msg.common.call_id)
                .map(|p| p.remote.device_id.clone())
                .ok_or_else(|| Ignored::UnknownCall(truncate(&msg.common.call_id)))?,
        };
        let key = DeviceKey::new(m.sender, device_id);
        if key == self.me {
            return Err(Ignored::OwnEcho);
        }
        // Our focus has no member entry: what it sends on our call with it
        // is taken (only Olm-verified when encryption is required).
        let known = self.room.participants().get(&key).is_some_and(|p| {
            msg.common
                .sender_session_id
                .as_ref()
                .is_none_or(|s| *s == p.session_id)
        }) || (self.is_focus(&key)
            && self
                .peers
                .get(&key)
                .is_some_and(|p| p.call_id == msg.common.call_id));
        // Messages of our call with it are its answer (or its end): the
        // state machine takes those.
        let other_call = self
            .peers
            .get(&key)
            .is_none_or(|p| p.call_id != msg.common.call_id);
        if known && other_call {
            self.device_active(now, &key);
        }
        if !known {
            let held = self.held.entry(key.clone()).or_default();
            if held.len() >= MAX_HELD_PER_DEVICE {
                return Err(Ignored::Overflow);
            }
            debug!(device = %key, "holding signalling until the sender's member event arrives");
            held.push((now, msg, m.encrypted));
            return Ok(Accepted::HeldForMembership);
        }
        let r = self.accept_from_member(now, key, msg);
        self.mesh(now);
        r
    }

    pub(super) fn accept_from_member(
        &mut self,
        now: u64,
        key: DeviceKey,
        msg: Message,
    ) -> Result<Accepted, Ignored> {
        // Both sides can end a call at the same moment (both saw the same
        // room state change): what the other sent before it learnt of the
        // end arrives after it. No order is left to restore (the call's
        // buffer went with it) and nothing to do.
        if self.ended_calls.contains_key(&msg.common.call_id)
            && self
                .peers
                .get(&key)
                .is_none_or(|p| p.call_id != msg.common.call_id)
        {
            debug!(device = %key, call_id = %msg.common.call_id, kind = ?msg.body.message_type(), "message for a call that has ended");
            return Ok(Accepted::AfterEnd);
        }
        let bkey = (key.clone(), msg.common.call_id.clone());
        if !self.reorder.contains_key(&bkey) {
            let n = self.reorder.keys().filter(|(d, _)| *d == key).count();
            if n >= MAX_BUFFERS_PER_DEVICE {
                // Drop the oldest-named buffers of that device that have no peer.
                let live = self.peers.get(&key).map(|p| p.call_id.clone());
                self.reorder
                    .retain(|(d, c), _| *d != key || Some(c) == live.as_ref());
            }
        }
        let buf = self
            .reorder
            .entry(bkey)
            .or_insert_with(|| ReorderBuffer::new(REORDER_CAPACITY));
        // An invite is kept aside: a repeated one still matters.
        let invite = matches!(msg.body, Body::Invite(_)).then(|| msg.clone());
        match buf.push(msg.common.seq, msg, now) {
            Pushed::Released(msgs) => {
                let mut first = Ok(Accepted::Processed);
                for (i, m) in msgs.into_iter().enumerate() {
                    let r = self.process(now, &key, m);
                    if i == 0 {
                        first = r.map(|_| Accepted::Processed);
                    }
                }
                first
            }
            Pushed::Buffered => Ok(Accepted::Reordered),
            Pushed::Duplicate => match invite {
                Some(msg) => self.on_repeated_invite(now, &key, msg),
                None => Err(Ignored::Duplicate),
            },
            Pushed::Overflow => Err(Ignored::Overflow),
        }
    }

    pub(super) fn release_held(&mut self, now: u64, device: &DeviceKey) {
        let Some(session) = self
            .room
            .participants()
            .get(device)
            .map(|p| p.session_id.clone())
        else {
            return;
        };
        let Some(held) = self.held.remove(device) else {
            return;
        };
        let (ready, keep): (Vec<_>, Vec<_>) = held.into_iter().partition(|(_, m, _)| {
            m.common
                .sender_session_id
                .as_ref()
                .is_none_or(|s| *s == session)
        });
        if !keep.is_empty() {
            self.held.insert(device.clone(), keep);
        }
        for (_, m, _) in ready {
            if let Err(e) = self.accept_from_member(now, device.clone(), m) {
                debug!(%device, "held signalling ignored: {e}");
            }
        }
    }

    pub(super) fn take_token(&mut self, sender: &str, now: u64) -> bool {
        let (burst, rate) = (self.cfg.rate_burst, self.cfg.rate_per_sec);
        self.buckets
            .entry(sender.to_owned())
            .or_insert_with(|| Bucket::full(burst, now))
            .take(now, burst, rate)
    }
}

/// A sender's token bucket for the rate limit on incoming signalling.
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    tokens: f64,
    at: u64,
}

impl Bucket {
    pub(super) fn full(burst: u32, now: u64) -> Self {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Refills at `rate` tokens per second up to `burst`, then takes one
    /// token if there is one.
    pub(super) fn take(&mut self, now: u64, burst: u32, rate: u32) -> bool {
        let elapsed = now.saturating_sub(self.at) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_then_its_rate() {
        let mut b = Bucket::full(3, 0);
        assert!((0..3).all(|_| b.take(0, 3, 10)));
        assert!(!b.take(0, 3, 10));
        // 10 per second: one more token after 100 ms, not before.
        assert!(!b.take(99, 3, 10));
        assert!(b.take(100, 3, 10));
        // Refills up to the burst only.
        assert_eq!((0..10).filter(|_| b.take(60_000, 3, 10)).count(), 3);
    }
}
