//! Sending simulcast (issue 12): which layers a publisher sends, given its
//! estimated uplink.
//!
//! A peer configured with [`SimulcastConfig`] offers its camera video as
//! simulcast (`a=rid:<rid> send` for each layer, `a=simulcast:send q;h;f`,
//! lowest first, with the `sdes:mid`, `sdes:rtp-stream-id` and
//! `sdes:repaired-rtp-stream-id` header extensions). When the remote accepts
//! (its answer says `a=simulcast:recv`), every layer of a
//! [`SimulcastSource`](crate::source::SimulcastSource) (or of frames pushed
//! per layer) goes out on its own SSRC with its RID; otherwise one layer is
//! sent as before.
//!
//! [`LayerGovernor`] is sans-IO (time comes in as an [`Instant`]): it is
//! told the measured bitrate of each layer and the estimates of the uplink
//! (str0m's transport-wide congestion control estimate and the remote's
//! REMB, the lower of the two counts), and decides how many layers, from
//! the lowest, fit: it drops the top layer(s) when the estimate has stayed
//! below [`SimulcastConfig::drop_factor`] times their cumulative bitrate for
//! [`SimulcastConfig::drop_after`] (then keeping the layers that fit the
//! estimate), and resumes the next layer when the estimate has stayed at least
//! [`SimulcastConfig::resume_factor`] times the cumulative bitrate with it
//! for [`SimulcastConfig::resume_after`]. The lowest layer is never
//! dropped.

use std::time::{Duration, Instant};

/// How a peer sends simulcast ([`PeerConfig::simulcast`](crate::PeerConfig::simulcast)).
#[derive(Debug, Clone, PartialEq)]
pub struct SimulcastConfig {
    /// The RIDs offered, lowest layer first (default `q`, `h`, `f`). A
    /// source's layers ([`FrameSource::rids`](crate::FrameSource::rids)) are
    /// sent under the RIDs the remote accepted.
    pub rids: Vec<String>,
    /// Drop the top layer(s) once the estimate has stayed below
    /// [`SimulcastConfig::drop_factor`] times their cumulative bitrate this
    /// long (default 1 s).
    pub drop_after: Duration,
    /// How far below what the sent layers need the estimate must be to
    /// drop a layer (default 0.8). The delay-based estimate answers a
    /// single overuse signal (a burst of queueing delay, e.g. from a busy
    /// CPU) with 0.85 times the bitrate it saw acknowledged: just under what
    /// is sent, whatever the link could carry. Dropping on that (as at 1.0)
    /// paused the top layer every few seconds on loopback, and each pause
    /// froze the subscribers on that layer until the focus moved them. A
    /// link that cannot carry the layers brings the estimate further down
    /// (0.85 of what gets through, again at each overuse). Once dropping,
    /// the layers kept are those that fit the estimate.
    pub drop_factor: f64,
    /// Resume a layer once the estimate has stayed at least this factor
    /// times the cumulative bitrate with that layer (default 1.25) for
    /// [`SimulcastConfig::resume_after`].
    pub resume_factor: f64,
    /// How long the estimate must leave room for a paused layer before it
    /// resumes (default 3 s).
    pub resume_after: Duration,
    /// Run str0m's send-side bandwidth estimation (transport-wide
    /// congestion control feedback) and use its estimate (default true).
    /// The remote's REMB is used either way.
    pub twcc: bool,
    /// The starting estimate of the bandwidth estimation, bits per second
    /// (default 2 Mbit/s: all three built-in layers fit).
    pub initial_estimate_bps: u64,
    /// The bandwidth estimation probes towards this factor times the
    /// cumulative bitrate of all layers (default 2): an estimate that only
    /// just covers what is sent dips below it on every burst.
    pub probe_factor: f64,
}

impl Default for SimulcastConfig {
    fn default() -> Self {
        Self {
            rids: vec!["q".into(), "h".into(), "f".into()],
            drop_after: Duration::from_secs(1),
            drop_factor: 0.8,
            resume_factor: 1.25,
            resume_after: Duration::from_secs(3),
            twcc: true,
            initial_estimate_bps: 2_000_000,
            probe_factor: 2.0,
        }
    }
}

/// Where an uplink estimate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EstimateKind {
    /// str0m's transport-wide congestion control estimate.
    Twcc,
    /// The remote's REMB.
    Remb,
}

/// Decides how many simulcast layers (from the lowest) fit the uplink.
/// Sans-IO: see the [module docs](self).
#[derive(Debug, Clone)]
pub struct LayerGovernor {
    config: SimulcastConfig,
    /// Measured bitrate of each layer, bits per second (the last measure
    /// while it was sent).
    rates: Vec<u64>,
    sending: usize,
    twcc: Option<u64>,
    remb: Option<u64>,
    /// Since when the estimate is below what the sent layers need.
    below_since: Option<Instant>,
    /// Since when the estimate leaves room for the next layer.
    above_since: Option<Instant>,
}

impl LayerGovernor {
    /// A governor for `layers` layers, all sent at first.
    pub fn new(config: SimulcastConfig, layers: usize) -> Self {
        Self {
            config,
            rates: vec![0; layers],
            sending: layers,
            twcc: None,
            remb: None,
            below_since: None,
            above_since: None,
        }
    }

    /// How many layers, from the lowest, are to be sent.
    pub fn sending(&self) -> usize {
        self.sending
    }

    /// The estimate in use: the lower of the last TWCC and REMB estimates.
    pub fn estimate(&self) -> Option<u64> {
        match (self.twcc, self.remb) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The measured bitrate of layer `layer` (ignored out of range).
    pub fn set_layer_rate(&mut self, layer: usize, bps: u64) {
        if let Some(r) = self.rates.get_mut(layer) {
            *r = bps;
        }
    }

    /// The cumulative bitrate of the lowest `n` layers.
    pub fn need(&self, n: usize) -> u64 {
        self.rates.iter().take(n).sum()
    }

    /// A new estimate. Returns the new number of layers when it changed.
    pub fn handle_estimate(&mut self, now: Instant, kind: EstimateKind, bps: u64) -> Option<usize> {
        match kind {
            EstimateKind::Twcc => self.twcc = Some(bps),
            EstimateKind::Remb => self.remb = Some(bps),
        }
        self.handle_timeout(now)
    }

    /// Re-evaluates at `now` (call at [`LayerGovernor::poll_timeout`] or
    /// any time). Returns the new number of layers when it changed.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<usize> {
        let est = self.estimate()?;
        let n = self.rates.len();
        // Dropping: the sent layers (beyond the lowest) do not fit, by more
        // than one back-off of the estimator.
        if self.sending > 1
            && (est as f64) < self.need(self.sending) as f64 * self.config.drop_factor
        {
            self.above_since = None;
            let since = *self.below_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= self.config.drop_after {
                let mut k = self.sending;
                while k > 1 && est < self.need(k) {
                    k -= 1;
                }
                self.sending = k;
                self.below_since = None;
                return Some(k);
            }
            return None;
        }
        self.below_since = None;
        // Resuming: room for the next layer with a margin.
        if self.sending < n {
            let want = self.need(self.sending + 1) as f64 * self.config.resume_factor;
            if est as f64 >= want {
                let since = *self.above_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.config.resume_after {
                    self.sending += 1;
                    // The wait for the next layer starts now, if it fits.
                    let next = self.need(self.sending + 1) as f64 * self.config.resume_factor;
                    self.above_since = (self.sending < n && est as f64 >= next).then_some(now);
                    return Some(self.sending);
                }
                return None;
            }
        }
        self.above_since = None;
        None
    }

    /// What the bandwidth estimation should aim for, bits per second:
    /// `(minimum, desired)`. Desired: every layer times
    /// [`SimulcastConfig::probe_factor`] (str0m probes towards it). Minimum: with paused layers, the next
    /// layer with the margin (str0m pads up to it, within its estimate, so
    /// that the estimate can grow back); else 0. `None` until every layer's
    /// rate is known.
    pub fn bwe_targets(&self) -> Option<(u64, u64)> {
        if self.rates.contains(&0) {
            return None;
        }
        let f = self.config.resume_factor;
        let desired = (self.need(self.rates.len()) as f64 * self.config.probe_factor) as u64;
        let minimum = if self.sending < self.rates.len() {
            (self.need(self.sending + 1) as f64 * f) as u64
        } else {
            0
        };
        Some((minimum, desired))
    }

    /// When [`LayerGovernor::handle_timeout`] may change something next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let drop = self.below_since.map(|t| t + self.config.drop_after);
        let resume = self.above_since.map(|t| t + self.config.resume_after);
        match (drop, resume) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Measures one layer's bitrate over windows of one second.
#[derive(Debug, Clone, Default)]
pub(crate) struct RateMeter {
    start: Option<Instant>,
    bytes: u64,
}

impl RateMeter {
    /// Counts `len` bytes sent at `now`; returns the bitrate of the window
    /// that just ended, if one did.
    pub(crate) fn add(&mut self, now: Instant, len: usize) -> Option<u64> {
        let start = *self.start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        let mut out = None;
        if elapsed >= Duration::from_secs(1) {
            out = Some(self.bytes * 8 * 1000 / (elapsed.as_millis().max(1) as u64));
            self.start = Some(now);
            self.bytes = 0;
        }
        self.bytes += len as u64;
        out
    }

    /// Forgets the current window (the layer paused).
    pub(crate) fn reset(&mut self) {
        self.start = None;
        self.bytes = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn gov() -> (LayerGovernor, Instant) {
        let mut g = LayerGovernor::new(SimulcastConfig::default(), 3);
        g.set_layer_rate(0, 130_000);
        g.set_layer_rate(1, 350_000);
        g.set_layer_rate(2, 900_000);
        (g, Instant::now())
    }

    fn ms(t: Instant, ms: u64) -> Instant {
        t + Duration::from_millis(ms)
    }

    #[test]
    fn drops_after_one_second_below_and_resumes_after_three_above() {
        let (mut g, t) = gov();
        assert_eq!(g.sending(), 3);
        assert_eq!(g.need(3), 1_380_000);
        // Plenty: nothing changes.
        assert_eq!(g.handle_estimate(t, EstimateKind::Twcc, 2_000_000), None);
        // 400 kbit/s: below the three layers; not yet after 999 ms.
        assert_eq!(
            g.handle_estimate(ms(t, 100), EstimateKind::Twcc, 400_000),
            None
        );
        assert_eq!(g.poll_timeout(), Some(ms(t, 1100)));
        assert_eq!(g.handle_timeout(ms(t, 1099)), None);
        // At 1 s: down to what fits, the lowest layer (130k + 350k > 400k).
        assert_eq!(g.handle_timeout(ms(t, 1100)), Some(1));
        assert_eq!(g.sending(), 1);
        // 500 kbit/s fits two layers but not with the 1.25 margin
        // (480k * 1.25 = 600k): stays at one.
        assert_eq!(
            g.handle_estimate(ms(t, 2000), EstimateKind::Twcc, 500_000),
            None
        );
        assert_eq!(g.handle_timeout(ms(t, 9000)), None);
        // 5 Mbit/s: the second layer after 3 s, the third 3 s later.
        assert_eq!(
            g.handle_estimate(ms(t, 10_000), EstimateKind::Twcc, 5_000_000),
            None
        );
        assert_eq!(g.handle_timeout(ms(t, 12_999)), None);
        assert_eq!(g.handle_timeout(ms(t, 13_000)), Some(2));
        assert_eq!(g.handle_timeout(ms(t, 14_000)), None);
        assert_eq!(g.handle_timeout(ms(t, 16_000)), Some(3));
        assert_eq!(g.poll_timeout(), None);
    }

    /// The delay-based estimator's answer to one overuse signal: 0.85
    /// times what it saw acknowledged, here exactly what the three layers
    /// send. That is no narrower link: all three stay, however long it
    /// lasts. A second back-off (0.85 * 0.85 = 0.72) is one: down to the
    /// layers that fit, after `drop_after`.
    #[test]
    fn one_back_off_of_the_estimator_drops_nothing_a_second_does() {
        let (mut g, t) = gov();
        let sent = g.need(3);
        let once = sent * 85 / 100;
        assert_eq!(g.handle_estimate(t, EstimateKind::Twcc, once), None);
        assert_eq!(g.poll_timeout(), None);
        assert_eq!(g.handle_timeout(ms(t, 10_000)), None);
        assert_eq!(g.sending(), 3);
        let twice = once * 85 / 100;
        assert_eq!(
            g.handle_estimate(ms(t, 10_000), EstimateKind::Twcc, twice),
            None
        );
        assert_eq!(g.handle_timeout(ms(t, 10_999)), None);
        // 0.72 * 1.38M = 995k: q and h (480k) fit, f does not.
        assert_eq!(g.handle_timeout(ms(t, 11_000)), Some(2));
    }

    #[test]
    fn a_short_dip_or_a_short_recovery_changes_nothing() {
        let (mut g, t) = gov();
        assert_eq!(g.handle_estimate(t, EstimateKind::Twcc, 600_000), None);
        // Back up before the second is over: the timer is cleared.
        assert_eq!(
            g.handle_estimate(ms(t, 800), EstimateKind::Twcc, 3_000_000),
            None
        );
        assert_eq!(g.handle_timeout(ms(t, 1500)), None);
        assert_eq!(g.sending(), 3);
        // Down to two layers (480k fits 600k).
        assert_eq!(
            g.handle_estimate(ms(t, 2000), EstimateKind::Twcc, 600_000),
            None
        );
        assert_eq!(g.handle_timeout(ms(t, 3000)), Some(2));
        // A recovery shorter than 3 s does not bring the top layer back.
        assert_eq!(
            g.handle_estimate(ms(t, 4000), EstimateKind::Twcc, 3_000_000),
            None
        );
        assert_eq!(
            g.handle_estimate(ms(t, 6000), EstimateKind::Twcc, 600_000),
            None
        );
        assert_eq!(g.handle_timeout(ms(t, 7500)), None);
        assert_eq!(g.sending(), 2);
    }

    #[test]
    fn the_lower_of_twcc_and_remb_counts_and_the_lowest_layer_stays() {
        let (mut g, t) = gov();
        g.handle_estimate(t, EstimateKind::Twcc, 5_000_000);
        assert_eq!(g.handle_estimate(t, EstimateKind::Remb, 100_000), None);
        assert_eq!(g.estimate(), Some(100_000));
        // Even below the lowest layer, that one is kept.
        assert_eq!(g.handle_timeout(ms(t, 1000)), Some(1));
        // Targets for the estimator: all layers with the margin; with
        // paused layers, the next one (with the margin) as the minimum.
        assert_eq!(g.bwe_targets(), Some((600_000, 2_760_000)));
        assert_eq!(g.handle_timeout(ms(t, 5000)), None);
        // The REMB lifts: back up (one layer per 3 s).
        g.handle_estimate(ms(t, 6000), EstimateKind::Remb, 10_000_000);
        assert_eq!(g.handle_timeout(ms(t, 9000)), Some(2));
        assert_eq!(g.bwe_targets(), Some((1_725_000, 2_760_000)));
        // Without any estimate nothing happens.
        let (mut g2, t2) = gov();
        assert_eq!(g2.handle_timeout(ms(t2, 10_000)), None);
        assert_eq!(g2.sending(), 3);
        assert_eq!(g2.bwe_targets(), Some((0, 2_760_000)));
        let g3 = LayerGovernor::new(SimulcastConfig::default(), 3);
        assert_eq!(g3.bwe_targets(), None);
    }

    #[test]
    fn rate_meter_reports_each_second() {
        let t = Instant::now();
        let mut m = RateMeter::default();
        // 30 frames of 1000 bytes per second: 240 kbit/s.
        let mut got = None;
        for i in 0..=30u64 {
            if let Some(r) = m.add(t + Duration::from_millis(i * 1000 / 30), 1000) {
                got = Some(r);
            }
        }
        assert_eq!(got, Some(240_000));
        m.reset();
        assert_eq!(m.add(t + Duration::from_secs(5), 10), None);
    }
}
