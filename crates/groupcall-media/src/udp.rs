//! UDP sockets for media, shared by the participants' media hosts and the
//! focus's engine: bound with room for bursts, and read from several at
//! once.

use std::future::Future;
use std::net::SocketAddr;
use std::task::Poll;

use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tracing::debug;

/// The buffer size asked for each way on a media socket. Every peer's
/// media arrives on one socket (through a focus, everyone's; at a focus,
/// every client's): a burst (key frames, or the task briefly off the CPU)
/// must not overflow the kernel's default of about 200 KB. The kernel caps
/// it at `net.core.rmem_max` / `wmem_max`.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Binds a non-blocking UDP socket on `addr` for the current tokio
/// runtime, asking for [`SOCKET_BUFFER`] each way (a refusal is logged and
/// is not an error).
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
    UdpSocket::from_std(s)
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

/// The next datagram of any of `sockets`, read into `buf`: which socket,
/// and its length and sender (or the socket's error). The sockets are
/// polled from `*start` on, which moves on by one at each call, so that a
/// busy socket cannot starve the others.
pub fn recv_any<'a>(
    sockets: &'a [UdpSocket],
    buf: &'a mut [u8],
    start: &'a mut usize,
) -> impl Future<Output = (usize, std::io::Result<(usize, SocketAddr)>)> + 'a {
    let n = sockets.len().max(1);
    *start = (*start + 1) % n;
    let first = *start;
    std::future::poll_fn(move |cx| {
        for k in 0..sockets.len() {
            let i = (first + k) % n;
            let Some(socket) = sockets.get(i) else {
                continue;
            };
            let mut rb = ReadBuf::new(buf);
            if let Poll::Ready(r) = socket.poll_recv_from(cx, &mut rb) {
                return Poll::Ready((i, r.map(|from| (rb.filled().len(), from))));
            }
        }
        Poll::Pending
    })
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
            let (len, from) = r.unwrap();
            assert_eq!(from, tx.local_addr().unwrap());
            got.push((i, len));
        }
        got.sort_unstable();
        assert_eq!(got, [(0, 4), (0, 4), (0, 4), (1, 5), (1, 5), (1, 5)]);
        let (r, s) = buffer_sizes(&sockets[0]);
        assert!(r > 0 && s > 0);
    }
}
