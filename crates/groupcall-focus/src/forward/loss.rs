//! A loss-based guard against a slow subscriber: from the loss its receiver
//! reports (RTCP receiver reports, summarised by the driver about once a
//! second), it decides when the forwarder drops that subscriber's video
//! ([`super::Congestion::Video`]) and when to try video again.
//!
//! Why loss: the driver sends each packet as it is forwarded (no pacer), so
//! no queue builds up at the focus for a subscriber whose link is too slow;
//! that link drops the excess instead, and the subscriber's receiver
//! reports the loss. Dropping its video leaves its link to its audio.
//!
//! Rules: [`LossGuardConfig::reports`] reports in a row at or above
//! [`LossGuardConfig::threshold_permille`] start dropping; after a backoff
//! (first [`LossGuardConfig::first_backoff`], doubled, up to
//! [`LossGuardConfig::max_backoff`], each time video fails again within
//! [`LossGuardConfig::calm`] of being resumed) video is resumed, at a key
//! frame. Reports while video is dropped are ignored. Sans-IO: time comes
//! in as an argument.

use std::time::{Duration, Instant};

use super::Congestion;

/// Tunables of a [`LossGuard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossGuardConfig {
    /// Reported loss, in per mille, that counts as too much (300: 30 %).
    pub threshold_permille: u16,
    /// Reports in a row at or above the threshold that start dropping
    /// video (2).
    pub reports: u8,
    /// The first time video stays dropped (4 s).
    pub first_backoff: Duration,
    /// The longest (64 s).
    pub max_backoff: Duration,
    /// Video failing again within this long of being resumed doubles the
    /// backoff; later, the backoff starts over (30 s).
    pub calm: Duration,
}

impl Default for LossGuardConfig {
    fn default() -> Self {
        Self {
            threshold_permille: 300,
            reports: 2,
            first_backoff: Duration::from_secs(4),
            max_backoff: Duration::from_secs(64),
            calm: Duration::from_secs(30),
        }
    }
}

/// The guard of one subscriber (see the module documentation).
#[derive(Debug, Clone)]
pub struct LossGuard {
    cfg: LossGuardConfig,
    high_run: u8,
    dropping_since: Option<Instant>,
    backoff: Duration,
    resumed_at: Option<Instant>,
}

impl Default for LossGuard {
    fn default() -> Self {
        Self::new(LossGuardConfig::default())
    }
}

impl LossGuard {
    /// A guard not dropping anything.
    pub fn new(cfg: LossGuardConfig) -> Self {
        let backoff = cfg.first_backoff;
        Self {
            cfg,
            high_run: 0,
            dropping_since: None,
            backoff,
            resumed_at: None,
        }
    }

    /// Whether the subscriber's video is being dropped.
    pub fn dropping(&self) -> bool {
        self.dropping_since.is_some()
    }

    /// One summary of the subscriber's receiver reports (the highest loss
    /// in per mille over its streams; `None`: no report this time). Returns
    /// the congestion to set when it changes.
    pub fn report(&mut self, now: Instant, loss_permille: Option<u16>) -> Option<Congestion> {
        if let Some(since) = self.dropping_since {
            if now.saturating_duration_since(since) < self.backoff {
                return None;
            }
            self.dropping_since = None;
            self.resumed_at = Some(now);
            self.high_run = 0;
            return Some(Congestion::None);
        }
        let loss = loss_permille?;
        if loss < self.cfg.threshold_permille {
            self.high_run = 0;
            return None;
        }
        self.high_run = self.high_run.saturating_add(1);
        if self.high_run < self.cfg.reports {
            return None;
        }
        let again = self
            .resumed_at
            .is_some_and(|t| now.saturating_duration_since(t) < self.cfg.calm);
        self.backoff = if again {
            (self.backoff * 2).min(self.cfg.max_backoff)
        } else {
            self.cfg.first_backoff
        };
        self.dropping_since = Some(now);
        self.high_run = 0;
        Some(Congestion::Video)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_on_sustained_loss_and_backs_off_when_video_fails_again() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut g = LossGuard::default();
        // Some loss, or one bad report, is not enough.
        assert_eq!(g.report(at(0), Some(150)), None);
        assert_eq!(g.report(at(1), Some(400)), None);
        assert_eq!(g.report(at(2), Some(100)), None);
        assert_eq!(g.report(at(3), None), None);
        assert_eq!(g.report(at(4), Some(400)), None);
        // Two in a row.
        assert_eq!(g.report(at(5), Some(800)), Some(Congestion::Video));
        assert!(g.dropping());
        // Reports while dropping are ignored until the backoff (4 s) ends.
        assert_eq!(g.report(at(6), Some(0)), None);
        assert_eq!(g.report(at(8), None), None);
        assert_eq!(g.report(at(9), None), Some(Congestion::None));
        assert!(!g.dropping());
        // Video fails again at once: 8 s this time.
        assert_eq!(g.report(at(10), Some(700)), None);
        assert_eq!(g.report(at(11), Some(700)), Some(Congestion::Video));
        assert_eq!(g.report(at(18), Some(0)), None);
        assert_eq!(g.report(at(19), Some(0)), Some(Congestion::None));
        // Then fine for longer than `calm`: the next episode starts over
        // at 4 s.
        assert_eq!(g.report(at(40), Some(0)), None);
        assert_eq!(g.report(at(60), Some(900)), None);
        assert_eq!(g.report(at(61), Some(900)), Some(Congestion::Video));
        assert_eq!(g.report(at(64), None), None);
        assert_eq!(g.report(at(65), None), Some(Congestion::None));
    }

    #[test]
    fn backoff_is_capped() {
        let t0 = Instant::now();
        let mut g = LossGuard::default();
        let mut t = t0;
        let mut longest = Duration::ZERO;
        for _ in 0..10 {
            g.report(t, Some(1000));
            t += Duration::from_millis(100);
            assert_eq!(g.report(t, Some(1000)), Some(Congestion::Video));
            let start = t;
            loop {
                t += Duration::from_secs(1);
                if g.report(t, None) == Some(Congestion::None) {
                    break;
                }
            }
            longest = longest.max(t - start);
        }
        assert_eq!(longest, Duration::from_secs(64));
    }
}
