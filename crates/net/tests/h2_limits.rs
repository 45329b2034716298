//! The HTTP/2 protections every listener sets, observed on the wire (127.0.0.1): a peer that never
//! answers keepalive pings is disconnected, and a connection past its maximum age is sent GOAWAY and
//! closed. (Stream and header limits are advertised in SETTINGS; `tests/serve.rs` reads them.)

use std::time::Duration;

use ferroserve_net::{ConnectionLimits, H2_PREFACE_BYTES, Listen, health_service, incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Far more than any of these waits needs; each wait is bounded by it.
const BOUND: Duration = Duration::from_secs(30);

/// A gRPC server (health only) with `limits` on an ephemeral loopback port.
async fn server(limits: ConnectionLimits) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_, health) = health_service(&[]);
    let listen = Listen {
        name: "test",
        limits,
        tls: None,
        first_bytes: H2_PREFACE_BYTES,
    };
    tokio::spawn(
        limits
            .grpc_server()
            .add_service(health)
            .serve_with_incoming(incoming(listener, listen)),
    );
    addr
}

/// HTTP/2 frame types, by their wire number.
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_disconnected() {
    let addr = server(ConnectionLimits {
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(200),
        ..ConnectionLimits::default()
    })
    .await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The client preface and an empty SETTINGS frame; then it only reads: no acknowledgement of the
    // server's SETTINGS, and none of its PINGs.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server closed a connection whose peer ignores pings"
    );
    assert!(
        frame_types(&seen).contains(&6),
        "the server pinged first: frames {:?}",
        frame_types(&seen)
    );
}

#[tokio::test]
async fn a_connection_past_its_maximum_age_is_sent_goaway_and_closed() {
    let addr = server(ConnectionLimits {
        max_connection_age: Some(Duration::from_millis(300)),
        max_connection_age_grace: Duration::from_millis(300),
        ..ConnectionLimits::default()
    })
    .await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (_send, connection) = h2::client::handshake(tcp).await.unwrap();
    let ended = tokio::time::timeout(BOUND, connection).await;
    assert!(ended.is_ok(), "the aged connection ended");

    // Without a maximum age, the same idle connection stays open past that time.
    let addr = server(ConnectionLimits::default()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (_send, connection) = h2::client::handshake(tcp).await.unwrap();
    let still_open = tokio::time::timeout(Duration::from_millis(1500), connection).await;
    assert!(still_open.is_err(), "no age limit, no GOAWAY");
}
