//! API keys and the admin credential.

use std::ops::RangeInclusive;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Scheduling class of a tenant: interactive traffic goes ahead of batch traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    /// Latency-sensitive (chat, autocomplete).
    #[default]
    Interactive,
    /// Throughput work that can wait (evaluations, backfills).
    Batch,
}

impl std::str::FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "interactive" => Ok(Priority::Interactive),
            "batch" => Ok(Priority::Batch),
            _ => Err(format!("unknown priority `{s}`; use `interactive` or `batch`")),
        }
    }
}

/// Who a request comes from, once its key checked out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant {
    /// Tenant name: used in metric labels and logs (never the key).
    pub name: String,
    /// Its scheduling class.
    pub priority: Priority,
    /// The request `priority` values it may ask for; others are clamped into this range, so that a
    /// tenant cannot jump the engine's queue unless an operator allowed it.
    pub request_priorities: RangeInclusive<i32>,
}

impl Tenant {
    /// A tenant of this class that may only send the default request priority (0).
    pub fn new(name: impl Into<String>, priority: Priority) -> Tenant {
        Tenant {
            name: name.into(),
            priority,
            request_priorities: 0..=0,
        }
    }

    /// `asked` clamped into the tenant's allowed request priorities.
    pub fn clamp_priority(&self, asked: i32) -> i32 {
        asked.clamp(*self.request_priorities.start(), *self.request_priorities.end())
    }
}

/// One configured key: the tenant it belongs to and the sha256 of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantKey {
    /// The tenant.
    pub tenant: Tenant,
    /// sha256 of the plaintext key.
    pub key_sha256: [u8; 32],
}

/// Why a caller was refused. The router maps these to UNAUTHENTICATED and PERMISSION_DENIED.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable key was presented, or it matches no tenant.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not use this service.
    #[error("{0}")]
    PermissionDenied(String),
}

/// What the `Admin` service accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAccess {
    /// No credentials are configured and the server listens on loopback only: open to local callers.
    Open,
    /// Only this credential, given as a bearer token (sha256 stored).
    Token([u8; 32]),
    /// No admin credential, and either data-plane keys exist or the server listens beyond loopback:
    /// nobody may use `Admin`, whatever `allow_unauthenticated` says.
    Closed,
}

/// Every configured credential.
#[derive(Debug, Clone)]
pub struct KeyStore {
    /// Data-plane keys.
    keys: Vec<TenantKey>,
    /// The admin rule.
    admin: AdminAccess,
    /// What requests run as when no keys are configured.
    anonymous: Tenant,
}

/// The sha256 of `text`, lower-case hex: what the config stores for a key.
pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Parses 64 hex digits into a sha256 digest.
pub fn parse_sha256(hex: &str) -> Result<[u8; 32], String> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "`{hex}` is not a sha256 in hex (64 hex digits); compute one with `printf %s KEY | sha256sum`"
        ));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// The bearer token in an `authorization` header value, if it has that form.
fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or_else(|| {
        AuthError::Unauthenticated("missing credentials; send the metadata `authorization: Bearer <key>`".into())
    })?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Unauthenticated(
            "malformed authorization metadata; expected `Bearer <key>`".into(),
        ));
    }
    Ok(token.trim())
}

impl KeyStore {
    /// A store with these keys and admin rule. With no keys and no admin token, the data plane is open, and
    /// `Admin` too when `loopback_only` (the server listens on loopback); a server reachable from the network
    /// keeps `Admin` closed until an admin credential is configured.
    pub fn new(keys: Vec<TenantKey>, admin_token_sha256: Option<[u8; 32]>, loopback_only: bool) -> KeyStore {
        let admin = match (admin_token_sha256, keys.is_empty() && loopback_only) {
            (Some(hash), _) => AdminAccess::Token(hash),
            (None, true) => AdminAccess::Open,
            (None, false) => AdminAccess::Closed,
        };
        KeyStore {
            keys,
            admin,
            anonymous: Tenant::new("anonymous", Priority::Interactive),
        }
    }

    /// The same store, with requests of an open server (no keys) allowed these request priorities.
    pub fn with_anonymous_priorities(mut self, allowed: RangeInclusive<i32>) -> KeyStore {
        self.anonymous.request_priorities = allowed;
        self
    }

    /// The admin rule in force.
    pub fn admin_access(&self) -> &AdminAccess {
        &self.admin
    }

    /// How many data-plane keys are configured.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// True when no data-plane keys are configured: every request is let in.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// The tenant for a data-plane request's `authorization` value. With no keys configured, requests
    /// run as the tenant `anonymous`.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Tenant, AuthError> {
        if self.is_open() {
            return Ok(self.anonymous.clone());
        }
        let presented: [u8; 32] = Sha256::digest(bearer(authorization)?.as_bytes()).into();
        // Compare against every key, without stopping at a match, so timing does not reveal which
        // (or whether a) stored hash matched.
        let mut found: Option<&TenantKey> = None;
        for k in &self.keys {
            if bool::from(k.key_sha256.ct_eq(&presented)) {
                found = Some(k);
            }
        }
        if let Some(k) = found {
            return Ok(k.tenant.clone());
        }
        if let AdminAccess::Token(admin) = &self.admin
            && bool::from(admin.ct_eq(&presented))
        {
            return Err(AuthError::PermissionDenied(
                "the admin credential cannot be used for inference; use a tenant API key".into(),
            ));
        }
        Err(AuthError::Unauthenticated("unknown API key".into()))
    }

    /// Checks an `Admin` call's `authorization` value.
    pub fn authorize_admin(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let expected = match &self.admin {
            AdminAccess::Open => return Ok(()),
            AdminAccess::Token(hash) => hash,
            AdminAccess::Closed => {
                return Err(AuthError::PermissionDenied(
                    "no admin credential is configured, and this server has API keys or listens beyond loopback; \
                     set auth.admin_token_sha256 to enable the Admin service"
                        .into(),
                ));
            }
        };
        let presented: [u8; 32] = Sha256::digest(bearer(authorization)?.as_bytes()).into();
        if bool::from(expected.ct_eq(&presented)) {
            return Ok(());
        }
        if self.authenticate(authorization).is_ok() {
            return Err(AuthError::PermissionDenied(
                "this API key is for inference only; the Admin service needs the admin credential".into(),
            ));
        }
        Err(AuthError::Unauthenticated("unknown admin credential".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, plaintext: &str) -> TenantKey {
        TenantKey {
            tenant: Tenant::new(tenant, Priority::Interactive),
            key_sha256: parse_sha256(&sha256_hex(plaintext)).unwrap(),
        }
    }

    fn store() -> KeyStore {
        KeyStore::new(
            vec![key("alpha", "demo-key-alpha"), key("beta", "demo-key-beta")],
            Some(parse_sha256(&sha256_hex("demo-admin-token")).unwrap()),
            true,
        )
    }

    #[test]
    fn keys_map_to_their_tenants() {
        let s = store();
        assert_eq!(s.authenticate(Some("Bearer demo-key-alpha")).unwrap().name, "alpha");
        assert_eq!(s.authenticate(Some("bearer demo-key-beta")).unwrap().name, "beta");
    }

    #[test]
    fn missing_malformed_and_unknown_keys_are_unauthenticated() {
        let s = store();
        for header in [
            None,
            Some("demo-key-alpha"),
            Some("Basic abc"),
            Some("Bearer "),
            Some("Bearer nope"),
        ] {
            assert!(
                matches!(s.authenticate(header), Err(AuthError::Unauthenticated(_))),
                "{header:?}"
            );
        }
    }

    #[test]
    fn admin_and_data_plane_credentials_do_not_mix() {
        let s = store();
        assert_eq!(s.authorize_admin(Some("Bearer demo-admin-token")), Ok(()));
        assert!(matches!(
            s.authorize_admin(Some("Bearer demo-key-alpha")),
            Err(AuthError::PermissionDenied(_))
        ));
        assert!(matches!(
            s.authorize_admin(Some("Bearer nope")),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(s.authorize_admin(None), Err(AuthError::Unauthenticated(_))));
        assert!(matches!(
            s.authenticate(Some("Bearer demo-admin-token")),
            Err(AuthError::PermissionDenied(_))
        ));
    }

    #[test]
    fn no_credentials_means_open_and_keys_without_admin_close_admin() {
        let open = KeyStore::new(vec![], None, true);
        assert!(open.is_open());
        assert_eq!(open.authenticate(None).unwrap().name, "anonymous");
        assert_eq!(open.authorize_admin(None), Ok(()));
        // Reachable from the network with no admin credential: the data plane may be open on purpose
        // (--allow-unauthenticated), Admin never is.
        let exposed = KeyStore::new(vec![], None, false);
        assert!(exposed.authenticate(None).is_ok());
        assert!(matches!(
            exposed.authorize_admin(None),
            Err(AuthError::PermissionDenied(_))
        ));
        let closed = KeyStore::new(vec![key("alpha", "k")], None, true);
        assert!(matches!(
            closed.authorize_admin(Some("Bearer k")),
            Err(AuthError::PermissionDenied(_))
        ));
    }

    #[test]
    fn request_priorities_are_clamped_to_the_tenant_range() {
        let mut t = Tenant::new("t", Priority::Batch);
        assert_eq!(t.clamp_priority(i32::MAX), 0);
        assert_eq!(t.clamp_priority(-3), 0);
        t.request_priorities = -5..=5;
        assert_eq!(t.clamp_priority(9), 5);
        assert_eq!(t.clamp_priority(-3), -3);
        let open = KeyStore::new(vec![], None, true).with_anonymous_priorities(0..=10);
        assert_eq!(open.authenticate(None).unwrap().clamp_priority(20), 10);
    }

    #[test]
    fn sha256_hex_round_trips_and_bad_hex_is_explained() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(parse_sha256("xyz").unwrap_err().contains("64 hex digits"));
        assert_eq!(parse_sha256(&sha256_hex("abc")).unwrap()[0], 0xba);
    }
}
