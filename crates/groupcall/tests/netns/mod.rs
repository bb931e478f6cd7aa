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

use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

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
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub forwarded: u64,
    pub dropped: u64,
}

pub struct Net {
    pub id: u8,
    pub n: usize,
    pub impairment: Arc<Mutex<Impairment>>,
    pub counts: Arc<Mutex<Counts>>,
    router: Option<JoinHandle<()>>,
    forward_was: String,
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

    /// Creates `n` namespaces and the router; `Err` says why it is not
    /// possible here (not root, no `ip`, no TUN...).
    pub async fn create(n: usize) -> Result<Net, String> {
        let id = (std::process::id() % 200) as u8 + 20;
        let forward_was = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .map_err(|e| format!("reading ip_forward: {e}"))?;
        let mut net = Net {
            id,
            n,
            impairment: Arc::default(),
            counts: Arc::default(),
            router: None,
            forward_was: forward_was.trim().to_owned(),
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
            let _ = ip(&["link", "del", &self.veth(i)]);
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["route", "flush", "table", &table]);
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
    let mut seq = 0u64;
    let mut buf = vec![0u8; 2048];
    loop {
        let next = heap.peek().map(|q| q.0);
        tokio::select! {
            r = dev.recv(&mut buf) => {
                let Ok(n) = r else { continue };
                let pkt = &buf[..n];
                if n < 20 || pkt[0] >> 4 != 4 {
                    continue;
                }
                let src = [pkt[12], pkt[13], pkt[14], pkt[15]];
                let dst = [pkt[16], pkt[17], pkt[18], pkt[19]];
                let i = *imp.lock().unwrap();
                let cut = i.cut.is_some_and(|c| ns_of(id, src) == Some(c) || ns_of(id, dst) == Some(c));
                if cut || unit() < i.loss {
                    counts.lock().unwrap().dropped += 1;
                    continue;
                }
                let jitter = i.jitter.as_secs_f64() * (2.0 * unit() - 1.0);
                let d = (i.delay.as_secs_f64() + jitter).max(0.0);
                seq += 1;
                heap.push(Queued(Instant::now() + Duration::from_secs_f64(d), seq, pkt.to_vec()));
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
                        counts.lock().unwrap().forwarded += 1;
                    }
                }
            }
        }
    }
}
