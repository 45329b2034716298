//! Admission: who may use the server. This is the first stage of the request path: a request that fails
//! here costs nothing else.
//!
//! - [`KeyStore`] maps `authorization: Bearer <key>` to a tenant. Only the sha256 of each key is stored,
//!   and every presented key is compared against every stored hash in constant time.
//! - The admin credential is separate: a data-plane key never opens the `Admin` service.
//!
//! Rate limits, bounded queues and shedding build on the tenant this stage resolves.
#![forbid(unsafe_code)]

mod keys;

pub use keys::{AdminAccess, AuthError, KeyStore, Priority, Tenant, TenantKey, parse_sha256, sha256_hex};
