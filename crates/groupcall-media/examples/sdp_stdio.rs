//! A media peer driven over stdin/stdout, to try the crate against another
//! WebRTC stack (e.g. libwebrtc in Node) by hand.
//!
//! ```text
//! sdp_stdio answer [SECONDS]   read an offer (ended by a line "END"), print the answer + "END"
//! sdp_stdio offer  [SECONDS]   print an offer + "END", read the answer (ended by "END")
//! ```
//!
//! It sends the built-in tone and test pattern as stream `rust-stream`,
//! prints `EVENT ...` lines, and after SECONDS (default 8) a `STATS ...` line
//! per remote track, then exits. With `SCREENSHARE=1` it also renegotiates:
//! after 3 s it offers a screenshare stream `rust-screen` (printing the offer
//! + "END" and reading the answer), and after 6 s an offer without it.

use std::io::BufRead;
use std::time::Duration;

use groupcall_media::{IvfSource, LocalFeed, MediaPeer, OggOpusSource, PeerConfig, PeerEvent};

fn read_sdp() -> String {
    let mut sdp = String::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "END" {
            break;
        }
        sdp.push_str(line.trim_end());
        sdp.push_str("\r\n");
    }
    sdp
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
    let feed = LocalFeed::usermedia("rust-stream");
    peer.set_source("rust-stream-audio", OggOpusSource::tone())?;
    peer.set_source("rust-stream-video", IvfSource::test_pattern()?)?;

    if mode == "offer" {
        let offer = peer.create_offer(std::slice::from_ref(&feed)).await?;
        println!("{}END", offer.replace("\r\n", "\n"));
        let answer = tokio::task::spawn_blocking(read_sdp).await?;
        peer.apply_answer(&answer).await?;
    } else {
        let offer = tokio::task::spawn_blocking(read_sdp).await?;
        let answer = peer
            .accept_offer(&offer, std::slice::from_ref(&feed))
            .await?;
        println!("{}END", answer.replace("\r\n", "\n"));
    }

    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let screenshare = std::env::var("SCREENSHARE").is_ok_and(|v| v == "1");
    let screen = LocalFeed::screenshare("rust-screen");
    let mut steps: Vec<(u64, Vec<LocalFeed>)> = if screenshare {
        peer.set_source("rust-screen-video", IvfSource::test_pattern()?)?;
        vec![(6, vec![feed.clone()]), (3, vec![feed.clone(), screen])]
    } else {
        vec![]
    };
    loop {
        let next = steps
            .last()
            .map(|(at, _)| start + Duration::from_secs(*at))
            .unwrap_or(deadline)
            .min(deadline);
        match tokio::time::timeout_at(next, events.recv()).await {
            Ok(Some(PeerEvent::Frame(_))) => {}
            Ok(Some(ev)) => println!("EVENT {ev:?}"),
            Ok(None) => break,
            Err(_) => {
                let Some((_, feeds)) = steps.pop() else { break };
                let offer = peer.create_offer(&feeds).await?;
                println!("{}END", offer.replace("\r\n", "\n"));
                let answer = tokio::task::spawn_blocking(read_sdp).await?;
                peer.apply_answer(&answer).await?;
                println!("EVENT renegotiated with {} feeds", feeds.len());
            }
        }
    }
    let stats = peer.stats().await?;
    for r in &stats.remote {
        println!(
            "STATS remote {} {} {} frames={} bytes={} keyframes={}",
            r.stream_id,
            r.track_id,
            r.kind,
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
