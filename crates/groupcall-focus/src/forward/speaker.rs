//! Active speaker detection from RFC 6464 audio levels: a smoothed level
//! per audio track ([`LevelMeter`]) and, per call, a speaker that changes
//! only after another participant has been the loudest for a hold time
//! ([`SpeakerState`]); pauses shorter than the hold (between words, or the
//! beeps of a test signal) do not restart it.

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
    /// Who may take over: since when, and when it was last the loudest.
    candidate: Option<(ParticipantId, Instant, Instant)>,
}

impl SpeakerState {
    /// Takes the loudest participant of this tick (None: nobody above the
    /// threshold; the current speaker then stays). Returns the new speaker
    /// when it changes: `loudest` must have been the loudest at every tick
    /// for `hold`, ticks where nobody is loud aside as long as none of
    /// those pauses lasts `hold`.
    pub fn tick(
        &mut self,
        now: Instant,
        loudest: Option<ParticipantId>,
        hold: Duration,
    ) -> Option<ParticipantId> {
        let Some(l) = loudest else {
            // A pause: the candidate keeps its place unless it lasts.
            if self
                .candidate
                .is_some_and(|(_, _, last)| now.saturating_duration_since(last) >= hold)
            {
                self.candidate = None;
            }
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
            Some((c, since, _)) if c == l => {
                if now.saturating_duration_since(since) >= hold {
                    self.current = Some(l);
                    self.candidate = None;
                    return Some(l);
                }
                self.candidate = Some((c, since, now));
            }
            _ => self.candidate = Some((l, now, now)),
        }
        None
    }

    /// Forgets a participant (it left): returns true if it was the
    /// current speaker.
    pub fn forget(&mut self, p: ParticipantId) -> bool {
        if self.candidate.is_some_and(|(c, _, _)| c == p) {
            self.candidate = None;
        }
        if self.current == Some(p) {
            self.current = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_shorter_than_the_hold_do_not_restart_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let hold = Duration::from_secs(1);
        let (a, b) = (ParticipantId(1), ParticipantId(2));
        let mut s = SpeakerState::default();
        assert_eq!(s.tick(at(0), Some(a), hold), Some(a));
        // b is loud in bursts (loud 100 ms, quiet 400 ms): it takes over
        // once 1 s has passed since it started.
        let mut changed = None;
        for ms in (50..2000).step_by(50) {
            let loud = (ms - 50) % 500 < 100;
            if let Some(p) = s.tick(at(ms), loud.then_some(b), hold) {
                changed = Some((ms, p));
                break;
            }
        }
        assert_eq!(changed, Some((1050, b)));
        // a speaks once, then is quiet for longer than the hold: its
        // candidacy lapses, and one loud tick later does not take over.
        assert_eq!(s.tick(at(2000), Some(a), hold), None);
        assert_eq!(s.tick(at(3100), None, hold), None);
        assert_eq!(s.tick(at(3150), Some(a), hold), None);
        assert_eq!(s.current, Some(b));
        // Someone else loud in between restarts the hold.
        assert_eq!(s.tick(at(3600), Some(b), hold), None);
        assert_eq!(s.tick(at(4200), Some(a), hold), None);
        assert_eq!(s.tick(at(5100), Some(a), hold), None);
        assert_eq!(s.tick(at(5200), Some(a), hold), Some(a));
    }
}
