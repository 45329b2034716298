//! The internal plane's shared secret: a router presents it as a bearer token on every call to a worker,
//! and the worker keeps only its sha256, compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The sha256 of a shared secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

impl TokenHash {
    /// The hash of `token`.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// Parses 64 hex digits, as `printf %s TOKEN | sha256sum` prints them.
    pub fn from_hex(hex: &str) -> Result<TokenHash, String> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "`{hex}` is not a sha256 in hex (64 hex digits); compute one with `printf %s TOKEN | sha256sum`"
            ));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(TokenHash(out))
    }

    /// True when `authorization` is `Bearer <token>` for the token this hash was made from.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        let Some(token) = authorization
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
        else {
            return false;
        };
        bool::from(Self::of(token).0.ct_eq(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_bearer_token_is_admitted() {
        let h = TokenHash::of("s3cret");
        assert!(h.admits(Some("Bearer s3cret")));
        assert!(h.admits(Some("bearer  s3cret ")));
        for bad in [
            None,
            Some("s3cret"),
            Some("Bearer nope"),
            Some("Basic s3cret"),
            Some("Bearer "),
        ] {
            assert!(!h.admits(bad), "{bad:?}");
        }
        let hex: String = Sha256::digest(b"s3cret").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(TokenHash::from_hex(&hex).unwrap(), h);
        assert!(TokenHash::from_hex("abc").is_err());
    }
}
