//! Admission: who may use the server, and how much. This is the first stage of the request path: a request
//! that fails here costs nothing else, and the decision takes microseconds under one short lock.
//!
//! - [`KeyStore`] maps `authorization: Bearer <key>` to a tenant. Only the sha256 of each key is stored,
//!   and every presented key is compared against every stored hash in constant time. The admin credential
//!   is separate: a data-plane key never opens the `Admin` service.
//! - [`Admission`] enforces per-tenant and server-wide limits: requests per second and tokens per minute
//!   (governor's GCRA, see [`bucket`]), a cap on requests in flight, and a bounded waiting queue where
//!   interactive tenants go ahead of batch ones. A request whose deadline cannot be met is shed at once.
//! - Tokens are reserved at admission (prompt + `max_tokens`) and reconciled with real usage when the
//!   request ends, so unused tokens are not charged.
//!
//! This crate knows nothing of the engine or of gRPC; the router maps [`Rejection`] to a status.
#![forbid(unsafe_code)]

pub mod bucket;
mod estimate;
mod gate;
mod keys;
mod limits;

pub use bucket::Rate;
pub use gate::{
    Admission, Admitted, Ask, FinishHook, Generated, LimitsView, PatchError, Permit, Reason, Rejection, Scope,
    Snapshot, Waiting, count_refusal,
};
pub use keys::{AdminAccess, AuthError, KeyStore, Priority, Tenant, TenantKey, parse_sha256, sha256_hex};
pub use limits::{AdmissionLimits, LimitsPatch, ServerLimits, TenantLimits, rate};
