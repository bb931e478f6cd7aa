//! Network namespaces for the reliability tests, and a userspace
//! impairment router between them.
//!
//! This machine's kernel has no `sch_netem` (CONFIG_NET_SCH_NETEM is not
//! set, and there are no loadable modules), so `tc qdisc ... netem` fails
//! with "Specified qdisc kind is unknown". Instead every packet between two
//! namespaces is routed through a TUN device owned by the test process,
//! which drops, delays and jitters it (and can cut one namespace off):
//!
//! ```text
//!  ns0 (10.231.N.10) --veth--+                      +-- TUN gctN (userspace:
//!  ns1 (10.231.N.11) --veth--+-- root namespace ----+     loss, delay, jitter, cut)
//!  ns2 (10.231.N.12) --veth--+   Synapse on 10.231.N.1
//! ```
//!
//! Root-side veth ends carry 10.231.N.1/32 (where Synapse listens) and a
//! /32 route to their namespace. A policy rule per veth sends what arrives
//! from a namespace and is not for the root namespace into the TUN; what the
//! test writes back into the TUN is routed to the destination veth.
//!
//! With [`Net::create_dual_stack`], every namespace also has an IPv6
//! address (`fd00:231:N::1i`, gateway `fd00:231:N::1`) routed the same way,
//! through the same router.
//!
//! Shared by test crates that each use part of it
//! (`groupcall/tests/reliability.rs`, `groupcall-cli/tests/netns_join.rs`).

use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Namespaces whose links can be rate-limited ([`Impairment::rates`]).
pub const MAX_RATED: usize = 8;

/// Link impairment applied in the router (each direction, each packet).
#[derive(Debug, Clone, Copy, Default)]
pub struct Impairment {
    /// Probability to drop a packet.
    pub loss: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Uniform jitter added to the delay (+- this).
    pub jitter: Duration,
    /// Drop everything from and to this namespace index.
    pub cut: Option<usize>,
    /// A partition: bit `i` set puts namespace `i` on one side, clear on
    /// the other; packets between the two sides are dropped, those within
    /// a side pass (0: no partition). E.g. `0b0101` splits {ns0, ns2} from
    /// {ns1, ns3}: two sites that lose each other but not themselves.
    pub partition: u64,
    /// Per namespace index: the rate of its link (what it sends, what it
    /// receives), a token bucket with a queue; see [`LinkRate`].
    pub rates: [LinkRate; MAX_RATED],
}

/// The rate of one namespace's link, each direction on its own: a token
/// bucket of `burst` bytes filled at the rate, in front of a queue. A
/// packet that finds enough tokens goes at once; otherwise it waits in the
/// queue until the bucket has filled enough for it, and is dropped when that
/// wait would exceed `max_queue` (a bottleneck link's tail drop). The wait
/// adds to [`Impairment::delay`]. A packet between two rate-limited
/// namespaces waits for both buckets, each reckoned at its arrival.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkRate {
    /// What the namespace receives, bits/s (`None`: unlimited).
    pub down_bps: Option<u64>,
    /// What the namespace sends, bits/s (`None`: unlimited).
    pub up_bps: Option<u64>,
    /// Bucket depth, bytes (0: 15000, ten full-size packets).
    pub burst: u32,
    /// Longest wait in the queue (zero: 200 ms).
    pub max_queue: Duration,
}

impl LinkRate {
    /// Unlimited both ways.
    pub const UNLIMITED: LinkRate = LinkRate {
        down_bps: None,
        up_bps: None,
        burst: 0,
        max_queue: Duration::ZERO,
    };

    fn burst_bytes(&self) -> f64 {
        f64::from(if self.burst == 0 { 15_000 } else { self.burst })
    }

    fn queue(&self) -> Duration {
        if self.max_queue.is_zero() {
            Duration::from_millis(200)
        } else {
            self.max_queue
        }
    }
}

/// One direction's token bucket (state kept by the router).
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Bytes available; negative: bytes queued beyond the bucket.
    tokens: f64,
    /// When `tokens` was last brought up to date (`None`: never used).
    at: Option<Instant>,
}

impl Bucket {
    /// A packet of `len` bytes arriving at `now` on a link of `bps` with
    /// `rate`'s bucket and queue: how long it waits, or `None` (dropped).
    fn admit(&mut self, now: Instant, len: usize, bps: u64, rate: &LinkRate) -> Option<Duration> {
        let byte_rate = bps.max(1) as f64 / 8.0;
        let depth = rate.burst_bytes();
        let elapsed = self.at.map_or(f64::INFINITY, |t| {
            now.saturating_duration_since(t).as_secs_f64()
        });
        self.tokens = (self.tokens + elapsed * byte_rate).min(depth);
        self.at = Some(now);
        let after = self.tokens - len as f64;
        let wait = if after >= 0.0 {
            0.0
        } else {
            -after / byte_rate
        };
        if wait > rate.queue().as_secs_f64() {
            return None;
        }
        self.tokens = after;
        Some(Duration::from_secs_f64(wait))
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub forwarded: u64,
    pub dropped: u64,
    /// Of `dropped`: by a rate limit's full queue.
    pub dropped_rate: u64,
    /// Of `forwarded`: IPv6 packets.
    pub forwarded_v6: u64,
    /// Bytes forwarded to each rate-limitable namespace (IP packets).
    pub bytes_to: [u64; MAX_RATED],
}

pub struct Net {
    pub id: u8,
    pub n: usize,
    pub impairment: Arc<Mutex<Impairment>>,
    pub counts: Arc<Mutex<Counts>>,
    router: Option<JoinHandle<()>>,
    forward_was: String,
    /// IPv6 too, and the IPv6 forwarding setting to restore.
    ipv6: Option<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    sh("ip", args)
}

fn sh(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd} {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    pub fn ns(&self, i: usize) -> String {
        format!("gcn{}x{i}", self.id)
    }
    fn veth(&self, i: usize) -> String {
        format!("gcv{}x{i}", self.id)
    }
    fn tun(&self) -> String {
        format!("gct{}", self.id)
    }
    fn table(&self) -> String {
        (1000 + u32::from(self.id)).to_string()
    }
    /// Where Synapse listens.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.id, 1)
    }
    /// The address of namespace `i`.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.id, 10 + i as u8)
    }
    /// The gateway's IPv6 address (with `create_dual_stack`).
    pub fn gateway6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x231, u16::from(self.id), 0, 0, 0, 0, 1)
    }
    /// The IPv6 address of namespace `i` (with `create_dual_stack`).
    pub fn addr6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x231,
            u16::from(self.id),
            0,
            0,
            0,
            0,
            0x10 + i as u16,
        )
    }
    fn prefix6(&self) -> String {
        format!("fd00:231:{:x}::/64", self.id)
    }

    /// Creates `n` namespaces and the router; `Err` says why it is not
    /// possible here (not root, no `ip`, no TUN...).
    pub async fn create(n: usize) -> Result<Net, String> {
        Self::create_inner(n, false).await
    }

    /// As [`Net::create`], with an IPv6 address in every namespace too.
    pub async fn create_dual_stack(n: usize) -> Result<Net, String> {
        Self::create_inner(n, true).await
    }

    async fn create_inner(n: usize, ipv6: bool) -> Result<Net, String> {
        let id = (std::process::id() % 200) as u8 + 20;
        let ipv6 = if ipv6 {
            let was = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding")
                .map_err(|e| format!("reading IPv6 forwarding: {e}"))?;
            Some(was.trim().to_owned())
        } else {
            None
        };
        let forward_was = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .map_err(|e| format!("reading ip_forward: {e}"))?;
        let mut net = Net {
            id,
            n,
            impairment: Arc::default(),
            counts: Arc::default(),
            router: None,
            forward_was: forward_was.trim().to_owned(),
            ipv6,
        };
        net.cleanup();
        if let Err(e) = net.setup().await {
            net.cleanup();
            return Err(e);
        }
        Ok(net)
    }

    async fn setup(&mut self) -> Result<(), String> {
        let tun_name = self.tun();
        let mut cfg = tun::Configuration::default();
        cfg.tun_name(&tun_name).mtu(1500).up();
        let dev =
            tun::create_as_async(&cfg).map_err(|e| format!("creating TUN {tun_name}: {e}"))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| format!("enabling ip_forward: {e}"))?;
        let gw = self.gateway().to_string();
        let table = self.table();
        for i in 0..self.n {
            let (ns, veth, peer) = (self.ns(i), self.veth(i), format!("gcp{}x{i}", self.id));
            let addr = self.addr(i).to_string();
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &peer, "netns", &ns])?;
            ip(&["-n", &ns, "link", "set", &peer, "name", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &format!("{gw}/32"),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &format!("10.231.{}.0/24", self.id),
                "via",
                &gw,
                "dev",
                "eth0",
            ])?;
            ip(&["addr", "add", &format!("{gw}/32"), "dev", &veth])?;
            ip(&["link", "set", &veth, "up"])?;
            ip(&["route", "add", &format!("{addr}/32"), "dev", &veth])?;
            ip(&["rule", "add", "iif", &veth, "lookup", &table])?;
            if self.ipv6.is_some() {
                let (gw6, addr6) = (self.gateway6().to_string(), self.addr6(i).to_string());
                let addr = format!("{addr6}/128");
                ip(&[
                    "-n", &ns, "-6", "addr", "add", &addr, "dev", "eth0", "nodad",
                ])?;
                let gw = format!("{gw6}/128");
                ip(&["-n", &ns, "-6", "route", "add", &gw, "dev", "eth0"])?;
                let prefix = self.prefix6();
                ip(&[
                    "-n", &ns, "-6", "route", "add", &prefix, "via", &gw6, "dev", "eth0",
                ])?;
                ip(&["-6", "addr", "add", &gw, "dev", &veth, "nodad"])?;
                ip(&["-6", "route", "add", &addr, "dev", &veth])?;
                ip(&["-6", "rule", "add", "iif", &veth, "lookup", &table])?;
            }
        }
        if self.ipv6.is_some() {
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
                .map_err(|e| format!("enabling IPv6 forwarding: {e}"))?;
            let prefix = self.prefix6();
            ip(&[
                "-6", "route", "add", &prefix, "dev", &tun_name, "table", &table,
            ])?;
        }
        ip(&[
            "route",
            "add",
            &format!("10.231.{}.0/24", self.id),
            "dev",
            &tun_name,
            "table",
            &table,
        ])?;
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{tun_name}/rp_filter"), "0");
        self.router = Some(tokio::spawn(route(
            dev,
            self.id,
            self.impairment.clone(),
            self.counts.clone(),
        )));
        Ok(())
    }

    fn cleanup(&mut self) {
        if let Some(r) = self.router.take() {
            r.abort();
        }
        let table = self.table();
        for i in 0..self.n {
            let _ = ip(&["rule", "del", "iif", &self.veth(i), "lookup", &table]);
            if self.ipv6.is_some() {
                let _ = ip(&["-6", "rule", "del", "iif", &self.veth(i), "lookup", &table]);
            }
            let _ = ip(&["link", "del", &self.veth(i)]);
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["route", "flush", "table", &table]);
        if let Some(was) = &self.ipv6 {
            let _ = ip(&["-6", "route", "flush", "table", &table]);
            if was == "0" {
                let _ = std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "0");
            }
        }
        if self.forward_was == "0" {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "0");
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut Impairment)) {
        f(&mut self.impairment.lock().unwrap());
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Index of the namespace an address of ours belongs to.
fn ns_of(id: u8, a: [u8; 4]) -> Option<usize> {
    (a[0] == 10 && a[1] == 231 && a[2] == id && a[3] >= 10).then(|| usize::from(a[3] - 10))
}

/// The same for an IPv6 address (`fd00:231:id::1i`).
fn ns_of6(id: u8, a: &[u8]) -> Option<usize> {
    let s = Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?).segments();
    (s[..3] == [0xfd00, 0x231, u16::from(id)] && s[3..7] == [0; 4] && s[7] >= 0x10)
        .then(|| usize::from(s[7] - 0x10))
}

#[derive(PartialEq, Eq)]
struct Queued(Instant, u64, Vec<u8>);

impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.0, o.1).cmp(&(self.0, self.1))
    }
}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

async fn route(
    dev: tun::AsyncDevice,
    id: u8,
    imp: Arc<Mutex<Impairment>>,
    counts: Arc<Mutex<Counts>>,
) {
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d ^ u64::from(id);
    let mut unit = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut heap: BinaryHeap<Queued> = BinaryHeap::new();
    let mut buckets = [[Bucket::default(); 2]; MAX_RATED];
    let mut seq = 0u64;
    let mut buf = vec![0u8; 2048];
    loop {
        let next = heap.peek().map(|q| q.0);
        tokio::select! {
            r = dev.recv(&mut buf) => {
                let Ok(n) = r else { continue };
                let pkt = &buf[..n];
                let (src, dst) = match pkt.first().map(|b| b >> 4) {
                    Some(4) if n >= 20 => (
                        ns_of(id, [pkt[12], pkt[13], pkt[14], pkt[15]]),
                        ns_of(id, [pkt[16], pkt[17], pkt[18], pkt[19]]),
                    ),
                    Some(6) if n >= 40 => (ns_of6(id, &pkt[8..24]), ns_of6(id, &pkt[24..40])),
                    _ => continue,
                };
                let i = *imp.lock().unwrap();
                let cut = i.cut.is_some_and(|c| src == Some(c) || dst == Some(c))
                    || partitioned(i.partition, src, dst);
                if cut || unit() < i.loss {
                    counts.lock().unwrap().dropped += 1;
                    continue;
                }
                let now = Instant::now();
                // The sender's uplink, then the receiver's downlink.
                let mut wait = Duration::ZERO;
                let mut admitted = true;
                for (ns, dir) in [(src, 1), (dst, 0)] {
                    let Some(ns) = ns.filter(|n| *n < MAX_RATED) else { continue };
                    let rate = i.rates[ns];
                    let bps = if dir == 0 { rate.down_bps } else { rate.up_bps };
                    let Some(bps) = bps else {
                        buckets[ns][dir] = Bucket::default();
                        continue;
                    };
                    match buckets[ns][dir].admit(now + wait, n, bps, &rate) {
                        Some(w) => wait += w,
                        None => {
                            admitted = false;
                            break;
                        }
                    }
                }
                if !admitted {
                    let mut c = counts.lock().unwrap();
                    c.dropped += 1;
                    c.dropped_rate += 1;
                    continue;
                }
                let jitter = i.jitter.as_secs_f64() * (2.0 * unit() - 1.0);
                let d = (i.delay.as_secs_f64() + jitter).max(0.0);
                seq += 1;
                let at = now + wait + Duration::from_secs_f64(d);
                heap.push(Queued(at, seq, pkt.to_vec()));
            }
            _ = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = Instant::now();
                while heap.peek().is_some_and(|q| q.0 <= now) {
                    if let Some(q) = heap.pop() {
                        let _ = dev.send(&q.2).await;
                        let mut c = counts.lock().unwrap();
                        c.forwarded += 1;
                        let dst = match q.2.first().map(|b| b >> 4) {
                            Some(6) => {
                                c.forwarded_v6 += 1;
                                q.2.get(24..40).and_then(|a| ns_of6(id, a))
                            }
                            _ => q.2.get(16..20).and_then(|a| ns_of(id, [a[0], a[1], a[2], a[3]])),
                        };
                        if let Some(d) = dst.filter(|d| *d < MAX_RATED) {
                            c.bytes_to[d] += q.2.len() as u64;
                        }
                    }
                }
            }
        }
    }
}

/// Whether [`Impairment::partition`] puts `src` and `dst` on different
/// sides.
fn partitioned(partition: u64, src: Option<usize>, dst: Option<usize>) -> bool {
    let side = |n: Option<usize>| n.map(|n| n < 64 && partition >> n & 1 == 1);
    partition != 0
        && match (side(src), side(dst)) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_drops_only_between_its_sides() {
        let p = 0b0101;
        assert!(partitioned(p, Some(0), Some(1)));
        assert!(partitioned(p, Some(3), Some(2)));
        assert!(!partitioned(p, Some(0), Some(2)));
        assert!(!partitioned(p, Some(1), Some(3)));
        assert!(!partitioned(p, None, Some(1)));
        assert!(!partitioned(0, Some(0), Some(1)));
    }

    #[test]
    fn the_bucket_lets_a_burst_through_then_queues_at_the_rate_then_drops() {
        let rate = LinkRate {
            down_bps: Some(800_000), // 100 000 bytes/s
            up_bps: None,
            burst: 3000,
            max_queue: Duration::from_millis(50),
        };
        let t0 = Instant::now();
        let mut b = Bucket::default();
        // A full bucket: two 1500-byte packets go at once.
        assert_eq!(b.admit(t0, 1500, 800_000, &rate), Some(Duration::ZERO));
        assert_eq!(b.admit(t0, 1500, 800_000, &rate), Some(Duration::ZERO));
        // The next ones queue 15 ms each (1500 bytes at 100 000 bytes/s).
        let w = b.admit(t0, 1500, 800_000, &rate).unwrap();
        assert!((w.as_secs_f64() - 0.015).abs() < 1e-6, "{w:?}");
        let w = b.admit(t0, 1500, 800_000, &rate).unwrap();
        assert!((w.as_secs_f64() - 0.030).abs() < 1e-6, "{w:?}");
        let w = b.admit(t0, 1500, 800_000, &rate).unwrap();
        assert!((w.as_secs_f64() - 0.045).abs() < 1e-6, "{w:?}");
        // 60 ms would exceed the 50 ms queue: dropped, and costs nothing.
        assert_eq!(b.admit(t0, 1500, 800_000, &rate), None);
        // 45 ms later the queue has drained: the bucket is empty, not full.
        let w = b
            .admit(t0 + Duration::from_millis(45), 1500, 800_000, &rate)
            .unwrap();
        assert!((w.as_secs_f64() - 0.015).abs() < 1e-6, "{w:?}");
        // Long idle: full again, but no deeper than the burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(later, 3000, 800_000, &rate), Some(Duration::ZERO));
        assert!(b.admit(later, 100, 800_000, &rate).unwrap() > Duration::ZERO);
    }

    #[test]
    fn sustained_throughput_is_the_rate() {
        let rate = LinkRate {
            down_bps: Some(300_000),
            ..LinkRate::UNLIMITED
        };
        let t0 = Instant::now();
        let mut b = Bucket::default();
        // Offer 1 Mbit/s of 1250-byte packets for 10 s (100 per second).
        let mut sent = 0usize;
        for k in 0..1000u64 {
            let now = t0 + Duration::from_millis(k * 10);
            if b.admit(now, 1250, 300_000, &rate).is_some() {
                sent += 1250;
            }
        }
        // The rate, plus what the full bucket (15 000 bytes) and the queue
        // (200 ms at the rate, 7 500 bytes) let through once.
        let bps = sent as f64 * 8.0 / 10.0;
        let most = 300_000.0 + (15_000.0 + 7_500.0) * 8.0 / 10.0;
        assert!((295_000.0..=most).contains(&bps), "{bps} (at most {most})");
    }
}
