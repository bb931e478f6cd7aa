//! UDP sockets for media, shared by the participants' media hosts and the
//! focus's engine: bound with room for bursts, read from several at once,
//! each datagram with the time it arrived.
//!
//! Arrival times: on Linux the kernel stamps each datagram as it is
//! received (`SO_TIMESTAMPNS`, read with `recvmsg`), as libwebrtc does.
//! Those times go into str0m's transport-wide congestion feedback; stamped
//! when the task got round to reading them instead, a task briefly off the
//! CPU looks like a queue on the link, and the sender's delay-based
//! estimate falls (a focus then moved a subscriber off 1280x720 on an idle
//! link under CPU load). Elsewhere, or where the socket gives no stamp, a
//! datagram's time is when it was read.

use std::future::Future;
use std::net::SocketAddr;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::debug;

/// A datagram read into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Its length (the first `len` bytes of the buffer).
    pub len: usize,
    /// Its sender.
    pub from: SocketAddr,
    /// When it arrived: the kernel's receive time where known, else when
    /// it was read. At or before `Instant::now()` at the read.
    pub at: Instant,
}

/// How far back a kernel receive time is believed (a wall clock stepped
/// between the stamp and the read would otherwise throw it off).
const MAX_AGE: Duration = Duration::from_secs(1);

/// The buffer size asked for each way on a media socket. Every peer's
/// media arrives on one socket (through a focus, everyone's; at a focus,
/// every client's): a burst (key frames, or the task briefly off the CPU)
/// must not overflow the kernel's default of about 200 KB. The kernel caps
/// it at `net.core.rmem_max` / `wmem_max`.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Binds a non-blocking UDP socket on `addr` for the current tokio
/// runtime, asking for [`SOCKET_BUFFER`] each way (a refusal is logged and
/// is not an error). Its datagrams are stamped with their arrival times
/// where the system can ([`Received::at`]).
pub fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    let sock = socket2::SockRef::from(&s);
    for (what, r) in [
        ("receive", sock.set_recv_buffer_size(SOCKET_BUFFER)),
        ("send", sock.set_send_buffer_size(SOCKET_BUFFER)),
    ] {
        if let Err(e) = r {
            debug!(error = %e, "media socket: {what} buffer size not set");
        }
    }
    stamp::enable(&s);
    UdpSocket::from_std(s)
}

/// The next datagram waiting on `socket`, without waiting
/// ([`std::io::ErrorKind::WouldBlock`] when there is none).
pub fn try_recv(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Received> {
    socket.try_io(Interest::READABLE, || stamp::recv(socket, buf))
}

/// The buffer sizes the kernel gave `socket` (receive, send; 0 if it
/// cannot tell).
pub fn buffer_sizes(socket: &UdpSocket) -> (usize, usize) {
    let sock = socket2::SockRef::from(socket);
    (
        sock.recv_buffer_size().unwrap_or(0),
        sock.send_buffer_size().unwrap_or(0),
    )
}

/// Asks the kernel to stamp the datagrams of a socket bound elsewhere (a
/// bare peer's) with their arrival times, as [`bind`] does; read them with
/// [`try_recv_std`]. A refusal is logged.
pub fn stamp_arrivals(socket: &std::net::UdpSocket) {
    stamp::enable(socket);
}

/// [`try_recv`] for a non-blocking std socket (one set up with
/// [`stamp_arrivals`]).
pub fn try_recv_std(socket: &std::net::UdpSocket, buf: &mut [u8]) -> std::io::Result<Received> {
    stamp::recv_std(socket, buf)
}

/// The next datagram of any of `sockets`, read into `buf`: which socket,
/// and the datagram (or the socket's error). The sockets are polled from
/// `*start` on, which moves on by one at each call, so that a busy socket
/// cannot starve the others.
pub fn recv_any<'a>(
    sockets: &'a [UdpSocket],
    buf: &'a mut [u8],
    start: &'a mut usize,
) -> impl Future<Output = (usize, std::io::Result<Received>)> + 'a {
    let n = sockets.len().max(1);
    *start = (*start + 1) % n;
    let first = *start;
    std::future::poll_fn(move |cx| {
        for k in 0..sockets.len() {
            let i = (first + k) % n;
            let Some(socket) = sockets.get(i) else {
                continue;
            };
            // Ready, then read; a read that would block clears the
            // readiness, and the next poll registers for the next datagram.
            loop {
                match socket.poll_recv_ready(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Err(e)) => return Poll::Ready((i, Err(e))),
                    Poll::Ready(Ok(())) => match try_recv(socket, buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        r => return Poll::Ready((i, r)),
                    },
                }
            }
        }
        Poll::Pending
    })
}

/// Arrival times from the kernel: `SO_TIMESTAMPNS` and `recvmsg`.
#[cfg(target_os = "linux")]
mod stamp {
    use std::io::IoSliceMut;
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use nix::sys::socket::{
        ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
    };
    use nix::sys::time::TimeSpec;
    use tracing::debug;

    use super::{MAX_AGE, Received};

    /// Asks the kernel to stamp `socket`'s datagrams (a refusal is logged:
    /// its datagrams are then timed when read).
    pub(super) fn enable(socket: &std::net::UdpSocket) {
        if let Err(e) = setsockopt(socket, sockopt::ReceiveTimestampns, &true) {
            debug!(error = %e, "media socket: no kernel receive times");
        }
    }

    pub(super) fn recv_std(
        socket: &std::net::UdpSocket,
        buf: &mut [u8],
    ) -> std::io::Result<Received> {
        recv(socket, buf)
    }

    /// One `recvmsg` on the non-blocking `socket`.
    pub(super) fn recv(socket: &impl AsRawFd, buf: &mut [u8]) -> std::io::Result<Received> {
        let mut iov = [IoSliceMut::new(buf)];
        let mut space = nix::cmsg_space!(TimeSpec);
        let msg = recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(std::io::Error::from)?;
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut at = now;
        for c in msg.cmsgs().into_iter().flatten() {
            if let ControlMessageOwned::ScmTimestampns(ts) = c
                && let Some(kernel) = wall_time(ts)
            {
                let age = wall.duration_since(kernel).unwrap_or_default();
                at = now.checked_sub(age.min(MAX_AGE)).unwrap_or(now);
            }
        }
        let from = msg
            .address
            .as_ref()
            .and_then(socket_addr)
            .ok_or_else(|| std::io::Error::other("a datagram without an IP sender"))?;
        Ok(Received {
            len: msg.bytes,
            from,
            at,
        })
    }

    fn wall_time(ts: TimeSpec) -> Option<SystemTime> {
        let secs = u64::try_from(ts.tv_sec()).ok()?;
        let nanos = u32::try_from(ts.tv_nsec()).ok()?;
        UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
    }

    fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
        if let Some(v4) = a.as_sockaddr_in() {
            return Some(SocketAddr::V4((*v4).into()));
        }
        a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
    }
}

/// Elsewhere: a datagram's time is when it was read.
#[cfg(not(target_os = "linux"))]
mod stamp {
    use std::time::Instant;

    use super::Received;

    pub(super) fn enable(_socket: &std::net::UdpSocket) {}

    pub(super) fn recv_std(
        socket: &std::net::UdpSocket,
        buf: &mut [u8],
    ) -> std::io::Result<Received> {
        let (len, from) = socket.recv_from(buf)?;
        Ok(Received {
            len,
            from,
            at: Instant::now(),
        })
    }

    pub(super) fn recv(
        socket: &tokio::net::UdpSocket,
        buf: &mut [u8],
    ) -> std::io::Result<Received> {
        let (len, from) = socket.try_recv_from(buf)?;
        Ok(Received {
            len,
            from,
            at: Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Datagrams on two sockets are all read, each reported with its
    /// socket and length.
    #[tokio::test]
    async fn recv_any_reads_every_socket_in_turn() {
        let a = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..3 {
            tx.send_to(b"to-a", aa).unwrap();
            tx.send_to(b"to-b!", ba).unwrap();
        }
        let sockets = [a, b];
        let mut buf = [0u8; 64];
        let mut start = 0;
        let mut got = Vec::new();
        for _ in 0..6 {
            let (i, r) = recv_any(&sockets, &mut buf, &mut start).await;
            let d = r.unwrap();
            assert_eq!(d.from, tx.local_addr().unwrap());
            assert!(d.at <= Instant::now());
            got.push((i, d.len));
        }
        got.sort_unstable();
        assert_eq!(got, [(0, 4), (0, 4), (0, 4), (1, 5), (1, 5), (1, 5)]);
        let (r, s) = buffer_sizes(&sockets[0]);
        assert!(r > 0 && s > 0);
        // Nothing left: a read that would block.
        let e = try_recv(&sockets[0], &mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    }

    /// A datagram that waited in the socket is stamped with when it
    /// arrived, not when it was read (Linux: the kernel's time); on IPv6
    /// too.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_datagram_is_stamped_with_its_arrival_not_its_read() {
        for (bind_at, send_from) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
            let Ok(rx) = bind(bind_at.parse().unwrap()) else {
                // No IPv6 loopback on this machine.
                continue;
            };
            let tx = std::net::UdpSocket::bind(send_from).unwrap();
            // The kernel turns its receive stamps on a moment after the
            // first socket asks (a deferred switch); until then a datagram
            // is stamped when read. Media sockets are bound well before
            // media flows.
            std::thread::sleep(Duration::from_millis(50));
            let sent = Instant::now();
            tx.send_to(b"waits", rx.local_addr().unwrap()).unwrap();
            std::thread::sleep(Duration::from_millis(80));
            let read = Instant::now();
            let sockets = [rx];
            let mut buf = [0u8; 64];
            let (i, r) = recv_any(&sockets, &mut buf, &mut 0).await;
            let d = r.unwrap();
            assert_eq!((i, d.len, d.from), (0, 5, tx.local_addr().unwrap()));
            assert_eq!(&buf[..5], b"waits");
            // Arrived within a few ms of the send, read 80 ms later (the
            // clocks' readings differ by microseconds, hence the slack).
            assert!(
                d.at + Duration::from_millis(60) <= read,
                "{bind_at}: {:?}",
                read - d.at
            );
            assert!(d.at + Duration::from_millis(5) >= sent, "{bind_at}");
        }
    }
}
