//! A STUN server that answers late.

use std::sync::Arc;
use std::time::Duration;

/// A STUN Binding responder on 127.0.0.1 that answers after `delay` with a
/// made-up server-reflexive address (127.0.0.2, the request's port). Given
/// to the reference (`--ice-server`), it makes it trickle a late candidate in
/// `m.call.candidates`: on loopback everything else is gathered before its
/// invite/answer goes out. Given to groupcall (the homeserver's
/// `/voip/turnServer`, see [`Harness::with_stun`]), answers later than the
/// peer's gathering wait make it trickle too. Stops when dropped.
///
/// [`LateStun::held`] keeps every answer until [`LateStun::release`]: a test
/// releases them right after it saw the reference send its invite, so the
/// server-reflexive candidate is certain to come after the SDP went out and
/// before ICE can connect (libwebrtc drops a candidate gathered after that).
pub struct LateStun {
    pub uri: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    released: Arc<std::sync::atomic::AtomicBool>,
    answered: Arc<std::sync::atomic::AtomicUsize>,
}

impl LateStun {
    /// Answers every Binding request `delay` after it came.
    pub fn start(delay: Duration) -> LateStun {
        Self::spawn(delay, true)
    }

    /// Holds every answer until [`LateStun::release`] (then sends the held
    /// ones at once and answers later requests after `delay`).
    pub fn held(delay: Duration) -> LateStun {
        Self::spawn(delay, false)
    }

    /// Lets the held answers go out.
    pub fn release(&self) {
        self.released
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many Binding answers were sent so far.
    pub fn answered(&self) -> usize {
        self.answered.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn spawn(delay: Duration, released: bool) -> LateStun {
        use std::net::{SocketAddr, UdpSocket};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        const MAGIC: u32 = 0x2112_a442;
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Short, so that answers leave within a few ms of being due.
        socket
            .set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        let uri = format!("stun:{}", socket.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let released = Arc::new(AtomicBool::new(released));
        let answered = Arc::new(AtomicUsize::new(0));
        let (stopped, go, count) = (stop.clone(), released.clone(), answered.clone());
        std::thread::spawn(move || {
            let mut due: Vec<(std::time::Instant, Vec<u8>, SocketAddr)> = Vec::new();
            let mut buf = [0u8; 1500];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let m = &buf[..n];
                    let is_binding = n >= 20 && m[0..2] == [0, 1] && m[4..8] == MAGIC.to_be_bytes();
                    if is_binding {
                        let mut res = Vec::with_capacity(32);
                        res.extend_from_slice(&0x0101u16.to_be_bytes()); // Binding success
                        res.extend_from_slice(&12u16.to_be_bytes());
                        res.extend_from_slice(&m[4..20]); // cookie + transaction id
                        res.extend_from_slice(&0x0020u16.to_be_bytes()); // XOR-MAPPED-ADDRESS
                        res.extend_from_slice(&8u16.to_be_bytes());
                        res.extend_from_slice(&[0, 1]);
                        res.extend_from_slice(&(from.port() ^ (MAGIC >> 16) as u16).to_be_bytes());
                        res.extend_from_slice(
                            &(u32::from_be_bytes([127, 0, 0, 2]) ^ MAGIC).to_be_bytes(),
                        );
                        due.push((std::time::Instant::now() + delay, res, from));
                    }
                }
                if !go.load(Ordering::Relaxed) {
                    continue;
                }
                let now = std::time::Instant::now();
                due.retain(|(at, res, to)| {
                    if *at <= now {
                        if socket.send_to(res, to).is_ok() {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        false
                    } else {
                        true
                    }
                });
            }
        });
        LateStun {
            uri,
            stop,
            released,
            answered,
        }
    }
}

impl Drop for LateStun {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
