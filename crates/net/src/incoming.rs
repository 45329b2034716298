//! Accepting connections: the connection cap, socket options, the TLS handshake and the HTTP/2 preface,
//! each bounded, before a connection reaches the server.
//!
//! The accept loop never waits on a client: each handshake runs on a task of its own, under
//! `handshake_timeout`, and only finished connections are handed on. A connection over the cap is closed
//! at once (and counted): that is a condition of this replica, so a client's retry elsewhere is right.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ferroserve_telemetry::names;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::limits::ConnectionLimits;
use crate::tls::ServerTls;

/// Bytes of the HTTP/2 client connection preface (`PRI * HTTP/2.0...`).
pub const H2_PREFACE_BYTES: usize = 24;
/// Finished handshakes waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// What one listener accepts.
#[derive(Clone)]
pub struct Listen {
    /// A name for metrics and logs: `grpc`, `worker`, `metrics`.
    pub name: &'static str,
    /// Connection limits.
    pub limits: ConnectionLimits,
    /// TLS, if configured.
    pub tls: Option<Arc<ServerTls>>,
    /// Bytes the client must send within the handshake timeout (the HTTP/2 preface); 0 for HTTP/1,
    /// where hyper's header-read timeout applies instead.
    pub first_bytes: usize,
}

/// The transport under a connection.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// The client must still send `left` bytes before `deadline`.
struct Preface {
    left: usize,
    deadline: Pin<Box<Sleep>>,
}

/// An accepted connection: TLS done, holding its place under the connection cap until dropped.
pub struct Conn {
    io: Io,
    preface: Option<Preface>,
    info: TcpConnectInfo,
    /// The connection-cap slot, released when the connection closes.
    _permit: OwnedSemaphorePermit,
    /// Decrements the open-connections gauge on drop.
    _open: OpenGauge,
}

struct OpenGauge(metrics::Gauge);

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn refused(listener: &'static str, reason: &'static str) {
    metrics::counter!(
        names::CONNECTIONS_REFUSED_TOTAL,
        names::LABEL_LISTENER => listener,
        names::LABEL_REASON => reason
    )
    .increment(1);
}

/// Accepts connections on `listener` until the returned stream is dropped (the server stopped
/// accepting), which closes the listening socket.
pub fn incoming(listener: TcpListener, listen: Listen) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    tokio::spawn(accept_loop(listener, listen, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(listener: TcpListener, listen: Listen, tx: mpsc::Sender<io::Result<Conn>>) {
    let slots = Arc::new(Semaphore::new(listen.limits.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: the listener itself is fine.
                    tracing::warn!(listener = listen.name, error = %e, "accept failed");
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(listener = listen.name, %peer, "connection cap reached; closing");
            refused(listen.name, "limit");
            continue;
        };
        if let Err(e) = configure(&stream, &listen.limits) {
            tracing::debug!(listener = listen.name, error = %e, "socket options not set");
        }
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: Some(peer),
        };
        let (listen, tx) = (listen.clone(), tx.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + listen.limits.handshake_timeout;
            let io = match tokio::time::timeout_at(deadline, handshake(stream, listen.tls.as_deref())).await {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => {
                    tracing::debug!(listener = listen.name, %peer, error = %e, "TLS handshake failed");
                    refused(listen.name, "tls");
                    return;
                }
                Err(_) => {
                    refused(listen.name, "handshake_timeout");
                    return;
                }
            };
            let gauge = metrics::gauge!(names::CONNECTIONS_OPEN, names::LABEL_LISTENER => listen.name);
            gauge.increment(1.0);
            let conn = Conn {
                io,
                preface: (listen.first_bytes > 0).then(|| Preface {
                    left: listen.first_bytes,
                    deadline: Box::pin(tokio::time::sleep_until(deadline)),
                }),
                info,
                _permit: permit,
                _open: OpenGauge(gauge),
            };
            let _ = tx.send(Ok(conn)).await;
        });
    }
}

/// TCP_NODELAY (tokens are small writes; Nagle would hold each until the peer's delayed ACK) and TCP
/// keepalive (a peer that vanished without a FIN is noticed).
fn configure(stream: &TcpStream, limits: &ConnectionLimits) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new().with_time(limits.tcp_keepalive);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

async fn handshake(stream: TcpStream, tls: Option<&ServerTls>) -> io::Result<Io> {
    match tls {
        None => Ok(Io::Plain(stream)),
        Some(tls) => Ok(Io::Tls(Box::new(tls.acceptor().accept(stream).await?))),
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl Conn {
    /// The peer's address.
    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.info.remote_addr
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Some(p) = &mut this.preface {
            match &polled {
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len() - before;
                    p.left = p.left.saturating_sub(n);
                    if p.left == 0 || n == 0 {
                        this.preface = None;
                    }
                }
                Poll::Pending if p.deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent no HTTP/2 preface within the handshake timeout",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn listen(max_connections: usize) -> Listen {
        Listen {
            name: "test",
            limits: ConnectionLimits {
                max_connections,
                handshake_timeout: Duration::from_millis(300),
                ..ConnectionLimits::default()
            },
            tls: None,
            first_bytes: H2_PREFACE_BYTES,
        }
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_a_slot_comes_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Box::pin(incoming(listener, listen(1)));
        let _first = TcpStream::connect(addr).await.unwrap();
        let held = conns.next().await.unwrap().unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        // The second connection is accepted and closed at once: the read sees EOF (or a reset).
        let read = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(held);
        let _third = TcpStream::connect(addr).await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(10), conns.next())
            .await
            .unwrap();
        assert!(again.unwrap().is_ok(), "a freed slot takes the next connection");
    }

    #[tokio::test]
    async fn a_client_without_a_preface_is_cut_off_at_the_handshake_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Box::pin(incoming(listener, listen(4)));
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        let mut buf = [0u8; 8];
        silent.write_all(b"PRI").await.unwrap();
        let n = conn.read(&mut buf).await.unwrap();
        assert_eq!(n, 3);
        let err = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the deadline ends the read")
            .expect_err("too slow a preface is an error");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // A client that sends the whole preface reads on without a deadline.
        let mut prompt = TcpStream::connect(addr).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        prompt.write_all(&[b'x'; H2_PREFACE_BYTES]).await.unwrap();
        let mut got = vec![0u8; H2_PREFACE_BYTES];
        conn.read_exact(&mut got).await.unwrap();
        assert!(conn.preface.is_none());
    }
}
