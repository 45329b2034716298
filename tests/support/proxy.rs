//! A TCP proxy on 127.0.0.1 that can stop forwarding without closing anything: a network partition as a
//! router sees it (no RST, no FIN, bytes simply stop arriving).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy's control. Dropping it stops accepting (open connections stay as they are).
pub struct Proxy {
    /// `host:port` to connect to instead of the upstream.
    pub addr: String,
    /// True while bytes flow.
    flowing: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

/// Copies `from` to `to` while `flowing` is true; while it is false, reads nothing (the sender's window
/// and socket buffers fill, as behind a partition).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flowing: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if flowing.wait_for(|f| *f).await.is_err() {
            return;
        }
        let n = {
            let mut stop = flowing.clone();
            tokio::select! {
                n = from.read(&mut buf) => n,
                _ = stop.wait_for(|f| !*f) => continue,
            }
        };
        match n {
            Ok(0) | Err(_) => return,
            // Bytes read just before a partition are held back until it ends.
            Ok(n) => {
                if flowing.wait_for(|f| *f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards every connection to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (flowing, _) = watch::channel(true);
        let upstream = upstream.to_string();
        let tx = flowing.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, tx.subscribe()));
                tokio::spawn(pipe(sr, cw, tx.subscribe()));
            }
        });
        Proxy { addr, flowing, accept }
    }

    /// Stops forwarding in both directions, closing nothing.
    pub fn partition(&self) {
        self.flowing.send_replace(false);
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.flowing.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
