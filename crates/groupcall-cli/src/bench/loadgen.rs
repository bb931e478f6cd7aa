//! The load generator of `groupcall bench focus`: a separate process
//! (`groupcall bench loadgen`, started by the bench, pinned to its own core)
//! holding every publisher and subscriber of a scenario as real WebRTC peers
//! (ICE, DTLS-SRTP; groupcall-media's peer set in forwarding mode). Janus's
//! peers share one UDP socket (Janus gives each PeerConnection a port of
//! its own); clients of a focus that serves everyone from one socket get a
//! socket each, as their 5-tuples would otherwise be the same.
//!
//! Publishers send real VP8 (the built-in pattern, packetized here with a
//! VP8 payload descriptor and a 15-bit PictureID) at a fixed packet rate,
//! and Opus (the built-in tone) at 50 packets/s. The last 12 bytes of every
//! payload are a stamp: a magic number and the send time in ns since the
//! process's epoch; an SFU forwards payloads unchanged (ours patches only
//! the VP8 descriptor), so a subscriber in the same process reads the
//! latency on one clock. Subscribers count packets and sequence gaps per
//! stream.
//!
//! Control: JSON lines on stdin, one JSON line answered on stdout per
//! command:
//! - `{"op":"publisher","id":ID,"video":BOOL}` → `{"offer":SDP}` (audio
//!   only when `video` is false)
//! - `{"op":"answer","id":ID,"sdp":SDP}` → `{"ok":true}`
//! - `{"op":"subscriber","id":ID,"offer":SDP}` → `{"answer":SDP}`
//! - `{"op":"client","id":ID,"publish":BOOL,"video":BOOL,"subscribe":BOOL}`
//!   → `{"offer":SDP}`: a client of an MSC3898 focus: its offer opens the
//!   data channel (and carries a usermedia stream `ID` when publishing,
//!   audio only without `video`); it answers `m.call.ping`, takes the
//!   focus's `m.call.negotiate` offers, and when subscribing (default: when
//!   not publishing) subscribes to every track the focus's metadata lists
//!   (`m.call.track_subscription`). Its answer goes through `answer`.
//! - `{"op":"connected","timeout_s":S}` → `{"connected":N,"peers":M}` once
//!   every peer is connected and every publisher's tracks are ready
//! - `{"op":"rate","video_pps":N}` → `{"ok":true}`: each publisher's video
//!   packet rate (audio stays at 50/s; 0 stops sending)
//! - `{"op":"window","secs":S}` → the [`Window`] figures over S seconds
//! - `{"op":"quit"}` → `{"ok":true}`, then the process exits.
//!
//! Errors are answered as `{"error":TEXT}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use groupcall::media::ivf::IvfReader;
use groupcall::media::ogg::OggPacketReader;
use groupcall::media::source::{BUILTIN_PATTERN_IVF, BUILTIN_TONE_OGG};
use groupcall::media::{
    LocalFeed, MediaHost, MediaPeer, Mid, PeerConfig, PeerEvent, PeerEvents, RtpIn, RtpOut,
    TrackKind,
};
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};

/// The stamp's magic number (ASCII "gcLG").
const MAGIC: [u8; 4] = *b"gcLG";
/// Bytes of the stamp at the end of every payload.
pub const STAMP_LEN: usize = 12;
/// Largest VP8 payload (descriptor, data and stamp) of a packet.
const MAX_VIDEO_PAYLOAD: usize = 1100;
/// VP8 payload descriptor: X=1 S? PID=0, then I=1, then the 15-bit
/// PictureID (M=1): 4 bytes.
const VP8_DESCRIPTOR_LEN: usize = 4;

/// Appends the stamp for `sent_ns`.
pub fn stamp(payload: &mut Vec<u8>, sent_ns: u64) {
    payload.extend_from_slice(&MAGIC);
    payload.extend_from_slice(&sent_ns.to_be_bytes());
}

/// The send time of a stamped payload, if it carries a stamp.
pub fn read_stamp(payload: &[u8]) -> Option<u64> {
    let at = payload.len().checked_sub(STAMP_LEN)?;
    let s = payload.get(at..)?;
    if s[..4] != MAGIC {
        return None;
    }
    Some(u64::from_be_bytes(s[4..12].try_into().ok()?))
}

/// One VP8 packet of a frame, before its stamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Vp8Packet {
    /// Descriptor and data.
    pub payload: Vec<u8>,
    /// Last packet of its frame.
    pub marker: bool,
    /// RTP timestamp step from the previous frame (on a frame's first
    /// packet; 0 otherwise).
    pub ts_step: u32,
}

/// Packetizes `frame` (RFC 7741) into payloads of at most
/// [`MAX_VIDEO_PAYLOAD`] bytes with room for the stamp.
pub fn packetize_vp8(frame: &[u8], picture_id: u16, duration: u32) -> Vec<Vp8Packet> {
    let room = MAX_VIDEO_PAYLOAD - VP8_DESCRIPTOR_LEN - STAMP_LEN;
    let chunks: Vec<&[u8]> = if frame.is_empty() {
        vec![&[][..]]
    } else {
        frame.chunks(room).collect()
    };
    let n = chunks.len();
    let pid = picture_id & 0x7fff;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut payload = Vec::with_capacity(VP8_DESCRIPTOR_LEN + c.len() + STAMP_LEN);
            // X=1, S on the first packet, PID 0; I=1; M=1 + 15-bit id.
            payload.push(0x80 | if i == 0 { 0x10 } else { 0 });
            payload.push(0x80);
            payload.push(0x80 | (pid >> 8) as u8);
            payload.push((pid & 0xff) as u8);
            payload.extend_from_slice(c);
            Vp8Packet {
                payload,
                marker: i + 1 == n,
                ts_step: if i == 0 { duration } else { 0 },
            }
        })
        .collect()
}

/// The packets of a looping source: VP8 frames packetized, or Opus packets.
struct Packets {
    packets: Vec<Vp8Packet>,
    pos: usize,
}

impl Packets {
    fn video() -> anyhow::Result<Packets> {
        let r = IvfReader::new(BUILTIN_PATTERN_IVF).map_err(|e| anyhow!("pattern: {e}"))?;
        let frames = r.frames().map_err(|e| anyhow!("pattern: {e}"))?;
        let mut packets = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            packets.extend(packetize_vp8(f.data, i as u16, 3000));
        }
        Ok(Packets { packets, pos: 0 })
    }

    fn audio() -> anyhow::Result<Packets> {
        let mut r = OggPacketReader::new(BUILTIN_TONE_OGG);
        let mut packets = Vec::new();
        while let Some(p) = r.next_packet().map_err(|e| anyhow!("tone: {e}"))? {
            // The two Ogg header packets are not audio.
            if p.data.starts_with(b"OpusHead") || p.data.starts_with(b"OpusTags") {
                continue;
            }
            packets.push(Vp8Packet {
                payload: p.data,
                marker: false,
                ts_step: 960,
            });
        }
        Ok(Packets { packets, pos: 0 })
    }

    fn next(&mut self) -> Option<&Vp8Packet> {
        let p = self.packets.get(self.pos % self.packets.len().max(1))?;
        self.pos += 1;
        Some(p)
    }
}

/// What a subscriber counted, per received stream (SSRC).
#[derive(Debug, Default, Clone)]
struct StreamCount {
    received: u64,
    /// Lowest and highest extended sequence number seen in the window.
    first: Option<u64>,
    last: u64,
}

/// Counters shared by the peers' event tasks.
#[derive(Default)]
struct Counters {
    /// (subscriber, ssrc) → counts in the current window.
    streams: HashMap<(String, u32), StreamCount>,
    /// Latencies of stamped packets in the window, µs.
    latencies_us: Vec<u32>,
    connected: usize,
    tracks_ready: usize,
}

/// Figures over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Seconds measured.
    pub secs: f64,
    /// Packets the publishers sent.
    pub sent: u64,
    /// Packets the subscribers received.
    pub received: u64,
    /// Packets missing by sequence number (gaps inside what each stream
    /// received).
    pub lost: u64,
    /// Latency percentiles, µs (publisher send to subscriber receive).
    pub p50_us: u32,
    /// 99th percentile, µs.
    pub p99_us: u32,
}

impl Window {
    fn to_json(&self) -> Value {
        json!({"secs": self.secs, "sent": self.sent, "received": self.received,
            "lost": self.lost, "p50_us": self.p50_us, "p99_us": self.p99_us})
    }
}

struct Publisher {
    peer: Arc<MediaPeer>,
    /// Tracks it offered (audio, and video unless audio-only).
    tracks: usize,
    audio: Option<Mid>,
    video: Option<Mid>,
    vseq: u64,
    vts: u32,
    aseq: u64,
    ats: u32,
    vpackets: Packets,
    apackets: Packets,
}

/// The usermedia stream `id`, with a video track when `video`.
fn feed(id: &str, video: bool) -> LocalFeed {
    let mut f = LocalFeed::usermedia(id.to_owned());
    if !video {
        f.video_track_id = None;
    }
    f
}

impl Publisher {
    /// A publisher on `peer`, its tracks not negotiated yet.
    fn new(peer: Arc<MediaPeer>, video: bool) -> anyhow::Result<Publisher> {
        Ok(Publisher {
            peer,
            tracks: 1 + usize::from(video),
            audio: None,
            video: None,
            vseq: 1,
            vts: 0,
            aseq: 1,
            ats: 0,
            vpackets: Packets::video()?,
            apackets: Packets::audio()?,
        })
    }
}

/// Runs the load generator on stdin/stdout until `quit` or the end of stdin.
pub async fn run() -> anyhow::Result<()> {
    let epoch = Instant::now();
    // The machine's own IPv4 addresses (not loopback: Janus's libnice
    // offers none there).
    let host = MediaHost::spawn(&[std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)])
        .context("binding the load generator's socket")?;
    let counters = Arc::new(Mutex::new(Counters::default()));
    let publishers: Arc<Mutex<HashMap<String, Publisher>>> = Arc::default();
    let mut subscribers: HashMap<String, MediaPeer> = HashMap::new();
    let mut clients: HashMap<String, Arc<MediaPeer>> = HashMap::new();
    let mut hosts: Vec<MediaHost> = Vec::new();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let video_pps = Arc::new(std::sync::atomic::AtomicU64::new(0));

    // The sender: every millisecond, what is due at the set rate.
    let sender = {
        let (publishers, sent, video_pps) = (publishers.clone(), sent.clone(), video_pps.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let start = Instant::now();
            let mut a_done = 0u64;
            let mut rate_at = (0u64, start, 0u64);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let pps = video_pps.load(std::sync::atomic::Ordering::Relaxed);
                if pps != rate_at.0 {
                    rate_at = (pps, now, 0);
                }
                let v_due = (now - rate_at.1).as_secs_f64() * pps as f64;
                let v_n = (v_due as u64).saturating_sub(rate_at.2);
                rate_at.2 += v_n;
                let a_due = ((now - start).as_secs_f64() * 50.0) as u64;
                let a_n = if pps == 0 {
                    0
                } else {
                    a_due.saturating_sub(a_done)
                };
                a_done = a_due;
                let mut pubs = publishers.lock().unwrap_or_else(|e| e.into_inner());
                for p in pubs.values_mut() {
                    for _ in 0..v_n {
                        send(p, TrackKind::Video, epoch, &sent);
                    }
                    for _ in 0..a_n {
                        send(p, TrackKind::Audio, epoch, &sent);
                    }
                }
            }
        })
    };

    let mut lines = crate::commands::spawn_stdin_reader();
    while let Some(line) = lines.recv().await {
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Err(e) => json!({"error": format!("not JSON: {e}")}),
            Ok(cmd) => {
                let r = command(
                    &cmd,
                    &host,
                    &counters,
                    &publishers,
                    &mut subscribers,
                    &mut clients,
                    &mut hosts,
                    &sent,
                    &video_pps,
                    epoch,
                )
                .await;
                match r {
                    Ok(v) => v,
                    Err(e) => json!({"error": format!("{e:#}")}),
                }
            }
        };
        {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{reply}")?;
            out.flush()?;
        }
        if reply.get("quit").is_some() {
            break;
        }
    }
    sender.abort();
    host.close().await;
    for h in &hosts {
        h.close().await;
    }
    Ok(())
}

/// Writes the next packet of `kind` of publisher `p`.
fn send(p: &mut Publisher, kind: TrackKind, epoch: Instant, sent: &std::sync::atomic::AtomicU64) {
    let (mid, packets, seq, ts) = match kind {
        TrackKind::Video => (p.video, &mut p.vpackets, &mut p.vseq, &mut p.vts),
        TrackKind::Audio => (p.audio, &mut p.apackets, &mut p.aseq, &mut p.ats),
    };
    let Some(mid) = mid else { return };
    let Some(pkt) = packets.next() else { return };
    *ts = ts.wrapping_add(pkt.ts_step);
    let mut payload = pkt.payload.clone();
    stamp(&mut payload, epoch.elapsed().as_nanos() as u64);
    let out = RtpOut {
        mid,
        pt: None,
        seq: *seq,
        timestamp: *ts,
        marker: pkt.marker,
        audio_level: (kind == TrackKind::Audio).then_some(-30),
        voice_activity: None,
        nackable: false,
        vp8_picture_id: None,
        payload: payload.into(),
        wallclock: Instant::now(),
    };
    *seq += 1;
    if p.peer.write_rtp(out).is_ok() {
        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn id_of(cmd: &Value) -> anyhow::Result<String> {
    cmd["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("missing \"id\""))
}

fn forwarding_config(receive: bool, data_channel: bool) -> PeerConfig {
    PeerConfig {
        forward: true,
        receive_audio: receive,
        receive_video: receive,
        data_channel,
        gather_wait: Duration::from_millis(50),
        ..PeerConfig::default()
    }
}

#[allow(clippy::too_many_arguments)]
async fn command(
    cmd: &Value,
    host: &MediaHost,
    counters: &Arc<Mutex<Counters>>,
    publishers: &Arc<Mutex<HashMap<String, Publisher>>>,
    subscribers: &mut HashMap<String, MediaPeer>,
    clients: &mut HashMap<String, Arc<MediaPeer>>,
    hosts: &mut Vec<MediaHost>,
    sent: &Arc<std::sync::atomic::AtomicU64>,
    video_pps: &Arc<std::sync::atomic::AtomicU64>,
    epoch: Instant,
) -> anyhow::Result<Value> {
    match cmd["op"].as_str().unwrap_or_default() {
        "publisher" => {
            let id = id_of(cmd)?;
            let video = cmd["video"].as_bool().unwrap_or(true);
            let (peer, events) = host.new_peer(forwarding_config(false, false))?;
            let offer = peer.create_offer(&[feed(&id, video)]).await?;
            publishers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), Publisher::new(Arc::new(peer), video)?);
            tokio::spawn(publisher_events(
                id,
                events,
                publishers.clone(),
                counters.clone(),
            ));
            Ok(json!({"offer": offer}))
        }
        "answer" => {
            let id = id_of(cmd)?;
            let sdp = cmd["sdp"].as_str().ok_or_else(|| anyhow!("missing sdp"))?;
            let peer = publishers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .map(|p| p.peer.clone())
                .or_else(|| clients.get(&id).cloned())
                .ok_or_else(|| anyhow!("no publisher or client {id}"))?;
            peer.apply_answer(sdp).await?;
            Ok(json!({"ok": true}))
        }
        "client" => {
            let id = id_of(cmd)?;
            let publish = cmd["publish"].as_bool().unwrap_or(false);
            let video = cmd["video"].as_bool().unwrap_or(true);
            let subscribe = cmd["subscribe"].as_bool().unwrap_or(!publish);
            // A socket of its own: a focus serves all its clients from one
            // socket, so peers sharing ours would have the same 5-tuple and
            // could not be told apart.
            let own = MediaHost::spawn(&[std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)])
                .context("binding a client's socket")?;
            let (peer, events) = own.new_peer(forwarding_config(false, true))?;
            hosts.push(own);
            let feeds: Vec<LocalFeed> = if publish {
                vec![feed(&id, video)]
            } else {
                Vec::new()
            };
            let offer = peer.create_offer(&feeds).await?;
            let peer = Arc::new(peer);
            if publish {
                publishers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), Publisher::new(peer.clone(), video)?);
            }
            clients.insert(id.clone(), peer.clone());
            tokio::spawn(client_events(
                id,
                peer,
                feeds,
                subscribe,
                events,
                (publishers.clone(), counters.clone(), epoch),
            ));
            Ok(json!({"offer": offer}))
        }
        "subscriber" => {
            let id = id_of(cmd)?;
            let offer = cmd["offer"]
                .as_str()
                .ok_or_else(|| anyhow!("missing offer"))?;
            let (peer, events) = host.new_peer(forwarding_config(true, false))?;
            let answer = peer.accept_offer(offer, &[]).await?;
            tokio::spawn(subscriber_events(
                id.clone(),
                events,
                counters.clone(),
                epoch,
            ));
            subscribers.insert(id, peer);
            Ok(json!({"answer": answer}))
        }
        "connected" => {
            let secs = cmd["timeout_s"].as_f64().unwrap_or(30.0);
            let peers = {
                let pubs = publishers.lock().unwrap_or_else(|e| e.into_inner());
                let pure_clients = clients.keys().filter(|k| !pubs.contains_key(*k)).count();
                pubs.len() + subscribers.len() + pure_clients
            };
            let tracks: usize = publishers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|p| p.tracks)
                .sum();
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            loop {
                let (c, t) = {
                    let c = counters.lock().unwrap_or_else(|e| e.into_inner());
                    (c.connected, c.tracks_ready)
                };
                if c >= peers && t >= tracks {
                    return Ok(json!({"connected": c, "peers": peers}));
                }
                if Instant::now() > deadline {
                    bail!(
                        "{c} of {peers} peers connected, {t} of {tracks} tracks ready after {secs} s"
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        "rate" => {
            let pps = cmd["video_pps"]
                .as_u64()
                .ok_or_else(|| anyhow!("missing video_pps"))?;
            video_pps.store(pps, std::sync::atomic::Ordering::Relaxed);
            Ok(json!({"ok": true}))
        }
        "window" => {
            let secs = cmd["secs"].as_f64().unwrap_or(10.0).clamp(0.1, 600.0);
            {
                let mut c = counters.lock().unwrap_or_else(|e| e.into_inner());
                c.streams.clear();
                c.latencies_us.clear();
            }
            let sent0 = sent.load(std::sync::atomic::Ordering::Relaxed);
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            // Packets in flight at the end are not lost: give them 100 ms.
            let sent1 = sent.load(std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut c = counters.lock().unwrap_or_else(|e| e.into_inner());
            let received = c.streams.values().map(|s| s.received).sum();
            let lost = c
                .streams
                .values()
                .map(|s| {
                    let span = s.first.map_or(0, |f| s.last.saturating_sub(f) + 1);
                    span.saturating_sub(s.received)
                })
                .sum();
            c.latencies_us.sort_unstable();
            let pct = |q: f64| -> u32 {
                let v = &c.latencies_us;
                if v.is_empty() {
                    return 0;
                }
                v[((v.len() - 1) as f64 * q).round() as usize]
            };
            let w = Window {
                secs: t0.elapsed().as_secs_f64() - 0.1,
                sent: sent1 - sent0,
                received,
                lost,
                p50_us: pct(0.5),
                p99_us: pct(0.99),
            };
            Ok(w.to_json())
        }
        "quit" => {
            video_pps.store(0, std::sync::atomic::Ordering::Relaxed);
            let pubs: Vec<Arc<MediaPeer>> = publishers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
                .map(|(_, p)| p.peer)
                .collect();
            for p in &pubs {
                let _ = p.close().await;
            }
            for p in subscribers.values() {
                let _ = p.close().await;
            }
            for p in clients.values() {
                let _ = p.close().await;
            }
            Ok(json!({"ok": true, "quit": true}))
        }
        other => bail!("unknown op {other:?}"),
    }
}

async fn publisher_events(
    id: String,
    mut events: PeerEvents,
    publishers: Arc<Mutex<HashMap<String, Publisher>>>,
    counters: Arc<Mutex<Counters>>,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            PeerEvent::Connected => {
                counters.lock().unwrap_or_else(|e| e.into_inner()).connected += 1;
            }
            PeerEvent::LocalTrackReady { kind, mid, .. } => {
                track_ready(&id, kind, mid, &publishers, &counters);
            }
            _ => {}
        }
    }
}

/// A publisher's track is negotiated: packets go to `mid` from now on.
fn track_ready(
    id: &str,
    kind: TrackKind,
    mid: Mid,
    publishers: &Mutex<HashMap<String, Publisher>>,
    counters: &Mutex<Counters>,
) {
    if let Some(p) = publishers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(id)
    {
        match kind {
            TrackKind::Audio => p.audio = Some(mid),
            TrackKind::Video => p.video = Some(mid),
        }
    }
    counters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .tracks_ready += 1;
}

/// What the peers' event tasks share: the publishers, the counters, the
/// epoch of the stamps.
type Shared = (
    Arc<Mutex<HashMap<String, Publisher>>>,
    Arc<Mutex<Counters>>,
    Instant,
);

/// A focus client's events: media counted as a subscriber's, the MSC3898
/// data channel answered.
async fn client_events(
    id: String,
    peer: Arc<MediaPeer>,
    feeds: Vec<LocalFeed>,
    subscribing: bool,
    mut events: PeerEvents,
    (publishers, counters, epoch): Shared,
) {
    use groupcall_proto::dc::{DcMessage, Negotiate, SdpType, TrackRequest, TrackSubscription};
    while let Some(ev) = events.recv().await {
        let reply = match ev {
            PeerEvent::Connected => {
                counters.lock().unwrap_or_else(|e| e.into_inner()).connected += 1;
                None
            }
            PeerEvent::LocalTrackReady { kind, mid, .. } => {
                track_ready(&id, kind, mid, &publishers, &counters);
                None
            }
            PeerEvent::Rtp(p) => {
                count(&id, &p, &counters, epoch);
                None
            }
            PeerEvent::ChannelMessage { text } => match DcMessage::parse(text.as_bytes()) {
                Ok(DcMessage::Ping) => Some(DcMessage::Pong),
                Ok(DcMessage::SdpStreamMetadataChanged {
                    sdp_stream_metadata,
                }) if subscribing => {
                    let subscribe = sdp_stream_metadata
                        .iter()
                        .flat_map(|(stream_id, s)| {
                            s.tracks.keys().map(move |track_id| TrackRequest {
                                stream_id: stream_id.clone(),
                                track_id: track_id.clone(),
                                width: None,
                                height: None,
                            })
                        })
                        .collect();
                    Some(DcMessage::TrackSubscription(TrackSubscription {
                        subscribe,
                        unsubscribe: Vec::new(),
                    }))
                }
                Ok(DcMessage::Negotiate(n)) if n.sdp_type == SdpType::Offer => {
                    match peer.accept_offer(&n.sdp, &feeds).await {
                        Ok(sdp) => Some(DcMessage::Negotiate(Negotiate {
                            sdp_type: SdpType::Answer,
                            sdp,
                            sdp_stream_metadata: Default::default(),
                        })),
                        Err(e) => {
                            tracing::warn!(client = %id, "focus offer refused: {e}");
                            None
                        }
                    }
                }
                Ok(DcMessage::Negotiate(n)) => {
                    if let Err(e) = peer.apply_answer(&n.sdp).await {
                        tracing::warn!(client = %id, "focus answer refused: {e}");
                    }
                    None
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(client = %id, "data channel message: {e}");
                    None
                }
            },
            _ => None,
        };
        if let Some(m) = reply
            && let Ok(text) = m.encode()
            && let Err(e) = peer.send_channel(&text).await
        {
            tracing::warn!(client = %id, "data channel send: {e}");
        }
    }
}

async fn subscriber_events(
    id: String,
    mut events: PeerEvents,
    counters: Arc<Mutex<Counters>>,
    epoch: Instant,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            PeerEvent::Connected => {
                counters.lock().unwrap_or_else(|e| e.into_inner()).connected += 1;
            }
            PeerEvent::Rtp(p) => count(&id, &p, &counters, epoch),
            _ => {}
        }
    }
}

fn count(id: &str, p: &RtpIn, counters: &Mutex<Counters>, epoch: Instant) {
    let mut c = counters.lock().unwrap_or_else(|e| e.into_inner());
    let s = c.streams.entry((id.to_owned(), p.ssrc)).or_default();
    s.received += 1;
    s.first = Some(s.first.map_or(p.seq, |f| f.min(p.seq)));
    s.last = s.last.max(p.seq);
    if let Some(sent_ns) = read_stamp(&p.payload) {
        let at = p.received_at.saturating_duration_since(epoch).as_nanos() as u64;
        let us = at.saturating_sub(sent_ns) / 1000;
        c.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
    }
}

/// Sends one command to a load generator process and reads its answer.
pub async fn ask(
    stdin: &mut tokio::process::ChildStdin,
    stdout: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    cmd: Value,
) -> anyhow::Result<Value> {
    stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
    stdin.flush().await?;
    let line = stdout
        .next_line()
        .await?
        .ok_or_else(|| anyhow!("the load generator exited"))?;
    let v: Value =
        serde_json::from_str(&line).with_context(|| format!("load generator: {line}"))?;
    if let Some(e) = v.get("error") {
        bail!("load generator: {e} (to {cmd})");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_unstamped_payloads_have_none() {
        let mut p = vec![1, 2, 3];
        stamp(&mut p, 123_456_789);
        assert_eq!(p.len(), 3 + STAMP_LEN);
        assert_eq!(read_stamp(&p), Some(123_456_789));
        assert_eq!(read_stamp(&[1, 2, 3]), None);
        assert_eq!(read_stamp(&[0; 12]), None);
    }

    #[test]
    fn vp8_frames_split_with_a_descriptor_and_room_for_the_stamp() {
        let frame: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let pkts = packetize_vp8(&frame, 0x1234, 3000);
        assert_eq!(pkts.len(), 3);
        assert!(
            pkts.iter()
                .all(|p| p.payload.len() + STAMP_LEN <= MAX_VIDEO_PAYLOAD)
        );
        assert_eq!(&pkts[0].payload[..4], &[0x90, 0x80, 0x80 | 0x12, 0x34]);
        assert_eq!(&pkts[1].payload[..4], &[0x80, 0x80, 0x80 | 0x12, 0x34]);
        assert_eq!(
            pkts.iter().map(|p| p.marker).collect::<Vec<_>>(),
            [false, false, true]
        );
        assert_eq!(pkts[0].ts_step, 3000);
        assert_eq!(pkts[1].ts_step, 0);
        let data: Vec<u8> = pkts.iter().flat_map(|p| p.payload[4..].to_vec()).collect();
        assert_eq!(data, frame);
    }

    #[test]
    fn the_builtin_media_packetizes() {
        let v = Packets::video().unwrap();
        assert!(v.packets.len() >= 60, "{}", v.packets.len());
        let a = Packets::audio().unwrap();
        // 2 s of 20 ms packets (ffmpeg ends the stream with one more).
        assert!(
            (100..=101).contains(&a.packets.len()),
            "{}",
            a.packets.len()
        );
    }
}
