//! What one listener allows a client: connections, streams per connection, resets, idle time and age.
//!
//! tonic passes `None` for the HTTP/2 settings it does not set, which overrides hyper's own defaults and
//! leaves them unlimited (concurrent streams per connection, locally generated resets: the CVE-2025-8671
//! class). Every limit here is set explicitly, with hyper's values as the defaults where hyper has one.

use std::time::Duration;

/// Connection and HTTP/2 limits of a listener, from the `[connections]` config section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; one more is closed at accept (and counted).
    pub max_connections: usize,
    /// HTTP/2 streams (requests) open at once on one connection. hyper's default is 200.
    pub max_concurrent_streams: u32,
    /// Streams the server may reset for a protocol error before it closes the connection. hyper's
    /// default is 1024.
    pub max_local_error_resets: usize,
    /// Streams a client may open and reset before the server accepts them. h2's default is 20.
    pub max_pending_accept_resets: usize,
    /// Largest header block a client may send, in bytes. hyper's default is 16 KiB.
    pub max_header_list_bytes: u32,
    /// An HTTP/2 ping after this much idle time; the connection is closed when it goes unanswered for
    /// `keepalive_timeout`.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// TCP keepalive probes start after this much idle time.
    pub tcp_keepalive: Duration,
    /// A connection older than this is asked to go away (GOAWAY) so that clients reconnect, spreading load
    /// over new replicas; `None` keeps connections for ever.
    pub max_connection_age: Option<Duration>,
    /// After `max_connection_age`, how long its streams may finish before the connection is closed.
    pub max_connection_age_grace: Duration,
    /// The TLS handshake and the HTTP/2 connection preface must arrive within this.
    pub handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            max_concurrent_streams: 200,
            max_local_error_resets: 1024,
            max_pending_accept_resets: 20,
            max_header_list_bytes: 16 << 10,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
            max_connection_age: None,
            max_connection_age_grace: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl ConnectionLimits {
    /// A tonic server with these limits set, and TCP_NODELAY: a token is a small write; without it, Nagle
    /// holds the next one until the client's delayed ACK (up to 40 ms on Linux), which shows up in TTFT and
    /// inter-token latency. (The accept loop in `incoming` sets the socket options itself; these are the
    /// HTTP/2 ones.)
    pub fn grpc_server(&self) -> tonic::transport::Server {
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_max_local_error_reset_streams(Some(self.max_local_error_resets))
            .http2_max_pending_accept_reset_streams(Some(self.max_pending_accept_resets))
            .http2_max_header_list_size(self.max_header_list_bytes)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout));
        match self.max_connection_age {
            Some(age) => server
                .max_connection_age(age)
                .max_connection_age_grace(self.max_connection_age_grace),
            None => server,
        }
    }
}
