//! Active speaker detection from RFC 6464 audio levels: a smoothed level
//! per audio track ([`LevelMeter`]) and, per call, a speaker that changes
//! only after another participant has been the loudest for a hold time
//! ([`SpeakerState`]).

use std::time::{Duration, Instant};

use super::ParticipantId;
use super::rtp::AudioLevel;

/// The smoothed loudness of one audio track.
///
/// Loudness is `127 - level` (0 silence, 127 the loudest); each packet
/// moves the average 1/8 of the way to its own loudness (about 160 ms of
/// time constant at 20 ms packets).
#[derive(Debug, Clone, Copy, Default)]
pub struct LevelMeter {
    /// The average loudness, times 256.
    avg: u32,
    last: Option<Instant>,
}

impl LevelMeter {
    /// Folds in one packet's level.
    pub fn update(&mut self, now: Instant, level: AudioLevel) {
        let loud = u32::from(127 - level.level.min(127)) << 8;
        self.avg = if self.last.is_none() {
            loud
        } else if loud >= self.avg {
            self.avg + (loud - self.avg) / 8
        } else {
            self.avg - (self.avg - loud) / 8
        };
        self.last = Some(now);
    }

    /// The smoothed loudness (0..=127), 0 if no level arrived within
    /// `stale` before `now`.
    pub fn loudness(&self, now: Instant, stale: Duration) -> u8 {
        match self.last {
            Some(t) if now.saturating_duration_since(t) <= stale => (self.avg >> 8).min(127) as u8,
            _ => 0,
        }
    }
}

/// The active speaker of one call, with hysteresis.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpeakerState {
    /// The current speaker.
    pub current: Option<ParticipantId>,
    candidate: Option<(ParticipantId, Instant)>,
}

impl SpeakerState {
    /// Takes the loudest participant of this tick (None: nobody above the
    /// threshold; the current speaker then stays). Returns the new speaker
    /// when it changes: `loudest` must have been the loudest at every tick
    /// for `hold`.
    pub fn tick(
        &mut self,
        now: Instant,
        loudest: Option<ParticipantId>,
        hold: Duration,
    ) -> Option<ParticipantId> {
        let Some(l) = loudest else {
            self.candidate = None;
            return None;
        };
        if self.current == Some(l) {
            self.candidate = None;
            return None;
        }
        if self.current.is_none() {
            // Nobody speaks yet: the first voice takes over at once.
            self.current = Some(l);
            self.candidate = None;
            return Some(l);
        }
        match self.candidate {
            Some((c, since)) if c == l => {
                if now.saturating_duration_since(since) >= hold {
                    self.current = Some(l);
                    self.candidate = None;
                    return Some(l);
                }
            }
            _ => self.candidate = Some((l, now)),
        }
        None
    }

    /// Forgets a participant (it left): returns true if it was the
    /// current speaker.
    pub fn forget(&mut self, p: ParticipantId) -> bool {
        if self.candidate.is_some_and(|(c, _)| c == p) {
            self.candidate = None;
        }
        if self.current == Some(p) {
            self.current = None;
            return true;
        }
        false
    }
}
