//! Server plumbing written once, for every listener Ferroserve opens (the public gRPC port, the worker
//! port, `/metrics`), and TLS for its clients:
//!
//! - [`incoming`]: accepting connections under a cap, with TCP keepalive and NODELAY, a TLS handshake and
//!   the HTTP/2 preface bounded by a handshake timeout;
//! - [`ConnectionLimits`]: HTTP/2 limits set explicitly (streams per connection, resets, header size,
//!   keepalive, connection age), with hyper's defaults;
//! - [`ServerTls`]: rustls, reloadable while serving (SIGHUP), optionally verifying client certificates;
//!   [`ClientTlsFiles`] for the client side;
//! - [`reflection_services`], [`OversizeIsInvalid`], [`health_service`] and [`Drain`] (health NOT_SERVING
//!   first, a pre-stop delay, GOAWAY, then a cut-off at the deadline), which every gRPC server uses.
#![forbid(unsafe_code)]

mod drain;
mod grpc;
mod health;
mod incoming;
mod limits;
pub mod metrics;
mod tls;
mod token;

pub use drain::{Drain, DrainPlan, DrainWatch, Phase};
pub use grpc::{OversizeIsInvalid, OversizeService, reflection_services};
pub use health::{HealthService, HealthSwitch, Serving, health_service};
pub use incoming::{Conn, H2_PREFACE_BYTES, Listen, incoming};
pub use limits::ConnectionLimits;
pub use tls::{ALPN_H2, ALPN_HTTP1, ClientTlsFiles, ServerTls, TlsError, TlsFiles, endpoint};
pub use token::TokenHash;
