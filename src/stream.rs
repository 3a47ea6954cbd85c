//! A connection to a client or a server, plain TCP or TLS, its socket options, and its two
//! halves for the relay. Plain halves keep the readiness fast path of a shared `&TcpStream`;
//! TLS halves go through tokio-rustls. Both sides of the proxy use it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

pub use crate::config::TcpOptions;

/// TCP_NODELAY (every message is a round trip), keepalive (an idle peer that vanished is
/// noticed) and TCP_USER_TIMEOUT (a peer that stopped acknowledging data is given up on).
/// Set on a listening socket, Linux gives them to every connection it accepts, at no cost
/// per connection.
pub(crate) fn tune_socket(s: &impl std::os::fd::AsFd, o: TcpOptions) {
    let s = SockRef::from(s);
    let _ = s.set_tcp_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(o.idle)
        .with_interval(o.interval)
        .with_retries(o.count);
    let _ = s.set_tcp_keepalive(&ka);
    if !o.user_timeout.is_zero() {
        let _ = s.set_tcp_user_timeout(Some(o.user_timeout));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn relay_buffers_keep_at_most_one_read_each_between_relays() {
        let mut b = RelayBuffers::default();
        b.up.read.reserve(BUF_SIZE);
        b.down.out.extend_from_slice(&vec![7u8; 10 * BUF_SIZE]);
        b.trim();
        assert!(
            b.up.read.is_empty() && b.up.read.capacity() >= BUF_SIZE,
            "one read kept"
        );
        assert!(b.down.out.is_empty());
        assert!(b.down.out.capacity() <= BUF_SIZE, "a batch's growth let go");
    }

    #[tokio::test]
    async fn sockets_give_up_on_unacknowledged_data_and_silent_peers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let o = TcpOptions {
            idle: Duration::from_secs(7),
            interval: Duration::from_secs(2),
            count: 3,
            user_timeout: Duration::from_secs(30),
        };
        tune_socket(&s, o);
        let sock = SockRef::from(&s);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(30))
        );
        assert!(sock.tcp_nodelay().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 3);
    }
}

/// Read buffer per direction.
pub const BUF_SIZE: usize = 16 * 1024;

/// What one direction of a relay reads into and writes from.
#[derive(Debug, Default)]
pub struct Scratch {
    pub read: BytesMut,
    pub out: BytesMut,
}

/// The buffers of a transaction-pooled relay, kept with its server connection: a relay
/// that lasts one transaction allocates none.
#[derive(Debug, Default)]
pub struct RelayBuffers {
    pub up: Scratch,
    pub down: Scratch,
}

impl RelayBuffers {
    /// Buffers that grew past one read (a batch of many messages) are let go after the
    /// relay: an idle connection keeps at most four reads' worth.
    const KEPT: usize = BUF_SIZE;

    /// Empties them, and lets go of any that grew large.
    pub fn trim(&mut self) {
        for b in [
            &mut self.up.read,
            &mut self.up.out,
            &mut self.down.read,
            &mut self.down.out,
        ] {
            b.clear();
            if b.capacity() > Self::KEPT {
                *b = BytesMut::new();
            }
        }
    }
}

#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    /// The ALPN protocol agreed in the TLS handshake, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }

    /// Waits for what a client sends next and reads it, taking room in `buf` only once
    /// something has come (an idle client holds no buffer), and learning from a short read
    /// that the socket is drained (no read that only returns EAGAIN afterwards).
    pub async fn read_next(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        const ROOM: usize = 1024;
        match self {
            Stream::Plain(s) => {
                s.readable().await?;
                if buf.capacity() == buf.len() {
                    buf.reserve(ROOM);
                }
                read_some(s, buf).await
            }
            Stream::Tls(s) => s.read_buf(buf).await,
        }
    }

    /// The two halves, which the relay's two pumps use at the same time.
    pub fn split(&mut self) -> (Reader<'_>, Writer<'_>) {
        match self {
            Stream::Plain(s) => (Reader::Plain(s), Writer::Plain(s)),
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (Reader::Tls(r), Writer::Tls(w))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Writes all of `data` and flushes it: TLS records must leave, not wait in a buffer.
pub async fn send(s: &mut Stream, data: &[u8]) -> io::Result<()> {
    s.write_all(data).await?;
    s.flush().await
}

pub enum Reader<'a> {
    Plain(&'a TcpStream),
    Tls(ReadHalf<&'a mut TlsStream<TcpStream>>),
}

impl Reader<'_> {
    /// Reads what is available into `buf`'s spare capacity; `Ok(0)` is the end of the stream.
    pub async fn read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() == buf.len() {
            buf.reserve(BUF_SIZE);
        }
        match self {
            Reader::Plain(s) => read_some(s, buf).await,
            Reader::Tls(s) => s.read_buf(buf).await,
        }
    }
}

pub enum Writer<'a> {
    Plain(&'a TcpStream),
    Tls(WriteHalf<&'a mut TlsStream<TcpStream>>),
}

impl Writer<'_> {
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Writer::Plain(s) => write_all(s, data).await,
            Writer::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }

    /// Closes the write side: a FIN, after a TLS close_notify on TLS.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Writer::Plain(s) => socket2::SockRef::from(*s).shutdown(std::net::Shutdown::Write),
            Writer::Tls(s) => s.shutdown().await,
        }
    }
}

/// A short read means the socket is drained, so readiness is cleared at once instead of being
/// learnt from one more read that only returns EAGAIN: one syscall less per message and
/// direction. The read runs inside `try_io`, whose readiness snapshot is taken before it, so
/// an event that arrives meanwhile carries a newer tick and is never cleared.
async fn read_some(s: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        s.readable().await?;
        let spare = buf.capacity() - buf.len();
        let mut got = None;
        let r = s.try_io(Interest::READABLE, || {
            let n = s.try_read_buf(buf)?;
            got = Some(n);
            if n > 0 && n < spare {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match (got, r) {
            (Some(n), _) => return Ok(n),
            (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (None, Err(e)) => return Err(e),
            (None, Ok(())) => unreachable!("the closure sets `got` before it returns Ok"),
        }
    }
}

/// Writes all of `data`, waiting for writability only when the socket's buffer is full.
async fn write_all(s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match s.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
