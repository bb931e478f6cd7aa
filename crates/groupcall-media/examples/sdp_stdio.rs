//! A media peer driven over stdin/stdout, to try the crate against another
//! WebRTC stack (e.g. libwebrtc in Node, see `wrtc-check.mjs`) by hand.
//!
//! ```text
//! sdp_stdio answer [SECONDS]   wait for the other side's offer
//! sdp_stdio offer  [SECONDS]   make the first offer
//! ```
//!
//! Messages both ways are a line `OFFER` or `ANSWER`, the SDP, and a line
//! `END`; offers may come at any time (renegotiation). The peer sends the
//! built-in tone and test pattern as stream `rust-stream`, prints
//! `EVENT ...` lines, and after SECONDS (default 8) a `STATS ...` line per
//! track, then exits. With `SCREENSHARE=1` it also offers a screenshare
//! stream `rust-screen` after 3 s and an offer without it after 6 s.

use std::io::BufRead;
use std::time::Duration;

use groupcall_media::{IvfSource, LocalFeed, MediaPeer, OggOpusSource, PeerConfig, PeerEvent};
use tokio::sync::mpsc;

fn send(kind: &str, sdp: &str) {
    println!("{kind}\n{}END", sdp.replace("\r\n", "\n"));
}

/// Reads `OFFER`/`ANSWER` messages from stdin on a thread.
fn stdin_messages() -> mpsc::UnboundedReceiver<(String, String)> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut kind: Option<String> = None;
        let mut sdp = String::new();
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end();
            match (&kind, line) {
                (None, "OFFER" | "ANSWER") => kind = Some(line.to_string()),
                (None, _) => {}
                (Some(_), "END") => {
                    if let Some(k) = kind.take() {
                        let _ = tx.send((k, std::mem::take(&mut sdp)));
                    }
                }
                (Some(_), l) => {
                    sdp.push_str(l);
                    sdp.push_str("\r\n");
                }
            }
        }
    });
    rx
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "answer".into());
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(8);

    let (peer, mut events) = MediaPeer::new(PeerConfig::default()).await?;
    let usermedia = LocalFeed::usermedia("rust-stream");
    peer.set_source("rust-stream-audio", OggOpusSource::tone())?;
    peer.set_source("rust-stream-video", IvfSource::test_pattern()?)?;
    let mut feeds = vec![usermedia.clone()];
    let mut incoming = stdin_messages();

    if mode == "offer" {
        send("OFFER", &peer.create_offer(&feeds).await?);
    }
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut steps: Vec<(u64, Vec<LocalFeed>)> = Vec::new();
    if std::env::var("SCREENSHARE").is_ok_and(|v| v == "1") {
        peer.set_source("rust-screen-video", IvfSource::test_pattern()?)?;
        steps = vec![
            (6, vec![usermedia.clone()]),
            (3, vec![usermedia, LocalFeed::screenshare("rust-screen")]),
        ];
    }
    loop {
        let next = steps
            .last()
            .map(|(at, _)| start + Duration::from_secs(*at))
            .unwrap_or(deadline)
            .min(deadline);
        tokio::select! {
            ev = events.recv() => match ev {
                Some(PeerEvent::Frame(_)) => {}
                Some(ev) => println!("EVENT {ev:?}"),
                None => break,
            },
            msg = incoming.recv() => match msg {
                Some((kind, sdp)) if kind == "OFFER" => {
                    send("ANSWER", &peer.accept_offer(&sdp, &feeds).await?);
                }
                Some((_, sdp)) => {
                    peer.apply_answer(&sdp).await?;
                    println!("EVENT applied answer ({} feeds)", feeds.len());
                }
                None => break,
            },
            _ = tokio::time::sleep_until(next) => {
                let Some((_, f)) = steps.pop() else { break };
                feeds = f;
                send("OFFER", &peer.create_offer(&feeds).await?);
            }
        }
    }
    let stats = peer.stats().await?;
    for r in &stats.remote {
        println!(
            "STATS remote {} {} {} active={} frames={} bytes={} keyframes={}",
            r.stream_id,
            r.track_id,
            r.kind,
            r.active,
            r.received.frames,
            r.received.bytes,
            r.received.keyframes
        );
    }
    for l in &stats.local {
        println!(
            "STATS local {} {} {} sent={} keyframes={}",
            l.stream_id, l.track_id, l.kind, l.sent.frames, l.sent.keyframes
        );
    }
    peer.close().await?;
    Ok(())
}
