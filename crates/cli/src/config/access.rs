//! `[auth]` and `[admission]`: the API keys and the admin credential, and the rate and concurrency limits
//! of each tenant and of the whole server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferroserve_admission::{
    AdmissionLimits, KeyStore, Priority, ServerLimits, Tenant, TenantKey, TenantLimits, parse_sha256, rate,
};
use serde::Deserialize;

use super::{ConfigError, err};

/// Rate and concurrency limits, as written in `[admission]` and in each `[[auth.keys]]` entry.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LimitFields {
    /// Requests per second (token bucket).
    pub requests_per_second: Option<f64>,
    /// Requests that may arrive at once; default one second's worth.
    pub request_burst: Option<u32>,
    /// Tokens per minute: prompt + max_tokens reserved at admission, reconciled with real usage.
    pub tokens_per_minute: Option<f64>,
    /// Tokens that may be reserved at once; default one minute's worth.
    pub token_burst: Option<u32>,
    /// Requests running or waiting at once.
    pub max_in_flight: Option<u32>,
}

/// `[admission]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    /// Requests per second over all tenants.
    pub requests_per_second: Option<f64>,
    /// Burst of the above.
    pub request_burst: Option<u32>,
    /// Tokens per minute over all tenants.
    pub tokens_per_minute: Option<f64>,
    /// Burst of the above.
    pub token_burst: Option<u32>,
    /// Requests sent to workers at once; more wait in the queue. Unset: one per worker.
    pub max_in_flight: Option<u32>,
    /// Requests that may wait for a slot.
    pub max_queued_requests: u32,
    /// Tokens the waiting requests may reserve together.
    pub max_queued_tokens: u64,
}

impl Default for AdmissionSection {
    fn default() -> Self {
        let d = ServerLimits::default();
        AdmissionSection {
            requests_per_second: None,
            request_burst: None,
            tokens_per_minute: None,
            token_burst: None,
            max_in_flight: None,
            max_queued_requests: d.max_queued_requests,
            max_queued_tokens: d.max_queued_tokens,
        }
    }
}

impl LimitFields {
    /// The typed limits; `key` prefixes the name of a bad field.
    pub(super) fn validate(&self, key: &str) -> Result<TenantLimits, ConfigError> {
        let field = |f: &str| format!("{key}{f}");
        if self.request_burst.is_some() && self.requests_per_second.is_none() {
            return Err(err(&field("request_burst"), "set requests_per_second as well"));
        }
        if self.token_burst.is_some() && self.tokens_per_minute.is_none() {
            return Err(err(&field("token_burst"), "set tokens_per_minute as well"));
        }
        let requests = self
            .requests_per_second
            .map(|r| rate(r, Duration::from_secs(1), self.request_burst, "requests_per_second"))
            .transpose()
            .map_err(|m| err(&field("requests_per_second"), m))?;
        let tokens = self
            .tokens_per_minute
            .map(|r| rate(r, Duration::from_secs(60), self.token_burst, "tokens_per_minute"))
            .transpose()
            .map_err(|m| err(&field("tokens_per_minute"), m))?;
        if self.max_in_flight == Some(0) {
            return Err(err(
                &field("max_in_flight"),
                "must be at least 1, or left out for no limit",
            ));
        }
        Ok(TenantLimits {
            requests,
            tokens,
            max_in_flight: self.max_in_flight,
        })
    }
}

/// `[auth]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// sha256 (hex) of the admin credential for the `Admin` service.
    pub admin_token_sha256: Option<String>,
    /// A file holding `admin_token_sha256` (a Kubernetes Secret mounted as a file); re-read on reload.
    pub admin_token_sha256_file: Option<PathBuf>,
    /// Data-plane keys, one table per key.
    pub keys: Vec<KeySection>,
    /// A TOML file of more `[[keys]]` tables (a mounted Secret), added to `keys`; re-read on reload.
    pub keys_file: Option<PathBuf>,
    /// Allow binding a non-loopback address with no keys (also `--allow-unauthenticated`). `Admin` stays
    /// closed there until `admin_token_sha256` is set.
    pub allow_unauthenticated: bool,
    /// `[min, max]` request priorities allowed when no keys are configured [default: `[0, 0]`].
    pub anonymous_request_priorities: Option<[i32; 2]>,
}

/// `[[auth.keys]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySection {
    /// Tenant name, used in metric labels and logs.
    pub tenant: String,
    /// sha256 (hex) of the key; the plaintext is never stored.
    pub key_sha256: String,
    /// `interactive` (default) or `batch`.
    #[serde(default)]
    pub priority: Option<String>,
    /// `[min, max]` of the request `priority` values this tenant may send; others are clamped into it
    /// [default: `[0, 0]`, so that a tenant cannot jump the engine's queue].
    #[serde(default)]
    pub request_priorities: Option<[i32; 2]>,
    /// The tenant's requests per second. Several keys of one tenant (during a rotation) share one set of
    /// buckets, so they must give the same limits.
    pub requests_per_second: Option<f64>,
    /// Burst of the above; default one second's worth.
    pub request_burst: Option<u32>,
    /// The tenant's tokens per minute.
    pub tokens_per_minute: Option<f64>,
    /// Burst of the above; default one minute's worth.
    pub token_burst: Option<u32>,
    /// The tenant's requests running or waiting at once.
    pub max_in_flight: Option<u32>,
}

impl KeySection {
    fn limits(&self) -> LimitFields {
        LimitFields {
            requests_per_second: self.requests_per_second,
            request_burst: self.request_burst,
            tokens_per_minute: self.tokens_per_minute,
            token_burst: self.token_burst,
            max_in_flight: self.max_in_flight,
        }
    }
}

impl AuthSection {
    /// Builds the key store and the tenants' limits, refusing an open server on a non-loopback address
    /// unless allowed.
    pub(super) fn validate(
        self,
        listen: SocketAddr,
    ) -> Result<(KeyStore, BTreeMap<String, TenantLimits>), ConfigError> {
        let mut keys: Vec<TenantKey> = Vec::new();
        let mut tenants = BTreeMap::new();
        for (i, k) in self.keys.into_iter().enumerate() {
            if k.tenant.is_empty() {
                return Err(err(&format!("auth.keys[{i}].tenant"), "must be non-empty"));
            }
            let limits = k.limits().validate(&format!("auth.keys[{i}]."))?;
            if let Some(earlier) = tenants.insert(k.tenant.clone(), limits.clone())
                && earlier != limits
            {
                return Err(err(
                    &format!("auth.keys[{i}]"),
                    format!(
                        "tenant `{}` has another key with different limits; a tenant's keys share its limits",
                        k.tenant
                    ),
                ));
            }
            let key_sha256 = parse_sha256(&k.key_sha256).map_err(|m| err(&format!("auth.keys[{i}].key_sha256"), m))?;
            let priority = match k.priority {
                None => Priority::default(),
                Some(p) => p
                    .parse()
                    .map_err(|m: String| err(&format!("auth.keys[{i}].priority"), m))?,
            };
            let mut tenant = Tenant::new(k.tenant, priority);
            tenant.request_priorities =
                priority_range(&format!("auth.keys[{i}].request_priorities"), k.request_priorities)?;
            keys.push(TenantKey { tenant, key_sha256 });
        }
        let admin = self
            .admin_token_sha256
            .map(|h| parse_sha256(&h).map_err(|m| err("auth.admin_token_sha256", m)))
            .transpose()?;
        if keys.is_empty() && !listen.ip().is_loopback() && !self.allow_unauthenticated {
            return Err(err(
                "auth.keys",
                format!(
                    "refusing to listen on {listen} with no API keys: anyone who can reach it could use it; \
                     add [[auth.keys]] entries, or pass --allow-unauthenticated if that is really intended"
                ),
            ));
        }
        if let Some((i, k)) = keys.iter().enumerate().find(|(_, k)| {
            keys.iter()
                .any(|o| o.tenant.name == k.tenant.name && o.tenant.priority != k.tenant.priority)
        }) {
            return Err(err(
                &format!("auth.keys[{i}].priority"),
                format!("tenant `{}` has keys with different priorities", k.tenant.name),
            ));
        }
        let anonymous = priority_range("auth.anonymous_request_priorities", self.anonymous_request_priorities)?;
        let store = KeyStore::new(keys, admin, listen.ip().is_loopback()).with_anonymous_priorities(anonymous);
        Ok((store, tenants))
    }
}

/// A `[min, max]` request-priority range; `[0, 0]` when unset.
fn priority_range(key: &str, range: Option<[i32; 2]>) -> Result<std::ops::RangeInclusive<i32>, ConfigError> {
    match range {
        None => Ok(0..=0),
        Some([min, max]) if min <= max => Ok(min..=max),
        Some([min, max]) => Err(err(
            key,
            format!("[{min}, {max}] is not a range; write [min, max] with min <= max"),
        )),
    }
}

impl AdmissionSection {
    /// The admission limits: these server-wide ones (`default_in_flight` where `max_in_flight` is unset)
    /// and the tenants' from `[auth]`.
    pub(super) fn limits(
        &self,
        tenants: BTreeMap<String, TenantLimits>,
        default_in_flight: u32,
    ) -> Result<AdmissionLimits, ConfigError> {
        let shared = LimitFields {
            requests_per_second: self.requests_per_second,
            request_burst: self.request_burst,
            tokens_per_minute: self.tokens_per_minute,
            token_burst: self.token_burst,
            max_in_flight: Some(self.max_in_flight.unwrap_or(default_in_flight)),
        }
        .validate("admission.")?;
        Ok(AdmissionLimits {
            server: ServerLimits {
                shared,
                max_queued_requests: self.max_queued_requests,
                max_queued_tokens: self.max_queued_tokens,
            },
            tenants,
        })
    }
}
