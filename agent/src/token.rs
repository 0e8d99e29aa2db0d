//! IMDSv2 session tokens, issued by the agent itself and bound to the pod that asked.
//!
//! A token is `base64url(claim) "." base64url(HMAC-SHA256(key, claim))` with
//! `claim = ip "|" pod-uid "|" expiry` and a key drawn at start-up: tokens die with the
//! process (SDKs fetch a new one on 401), cannot be forged, and a token taken from one pod
//! fails in another — also in a new pod that reuses the first one's IP (another UID). The
//! UID is empty for tokens issued while the agent could not know it (no pod table yet);
//! such tokens are bound to the IP alone.

use std::net::IpAddr;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The TTLs EC2 accepts for a token, in seconds.
pub const TTL_RANGE: std::ops::RangeInclusive<u64> = 1..=21600;

/// Why a token was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token was issued to another address")]
    WrongAddress,
    #[error("token was issued to another pod")]
    WrongPod,
    #[error("token expired")]
    Expired,
}

/// Issues and checks tokens with one per-process key.
pub struct TokenKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

impl TokenKey {
    /// A fresh random key.
    pub fn generate() -> Result<TokenKey, aws_lc_rs::error::Unspecified> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        Ok(TokenKey {
            key: hmac::Key::generate(hmac::HMAC_SHA256, &rng)?,
        })
    }

    /// A token for the pod `uid` at `ip`, valid until `now_unix + ttl_secs`.
    pub fn issue(&self, ip: IpAddr, uid: &str, now_unix: i64, ttl_secs: u64) -> String {
        let claim = format!("{ip}|{uid}|{}", now_unix.saturating_add(ttl_secs as i64));
        let tag = hmac::sign(&self.key, claim.as_bytes());
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(claim.as_bytes()),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    /// Checks that `token` was issued by this key, to `ip` and — when both are known — to
    /// the pod `uid`, and that it has not expired at `now_unix`.
    pub fn validate(
        &self,
        token: &str,
        ip: IpAddr,
        uid: Option<&str>,
        now_unix: i64,
    ) -> Result<(), TokenError> {
        let (claim, tag) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
        let claim = URL_SAFE_NO_PAD
            .decode(claim)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, &claim, &tag).map_err(|_| TokenError::BadSignature)?;
        let claim = String::from_utf8(claim).map_err(|_| TokenError::Malformed)?;
        let mut parts = claim.splitn(3, '|');
        let (Some(owner), Some(owner_uid), Some(expiry)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if owner != ip.to_string() {
            return Err(TokenError::WrongAddress);
        }
        if let Some(uid) = uid
            && !owner_uid.is_empty()
            && owner_uid != uid
        {
            return Err(TokenError::WrongPod);
        }
        let expiry: i64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
        if now_unix >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// Parses the `X-aws-ec2-metadata-token-ttl-seconds` header value.
pub fn parse_ttl(value: Option<&str>) -> Option<u64> {
    value?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|t| TTL_RANGE.contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_to_address_pod_and_time() {
        let key = TokenKey::generate().expect("key");
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let token = key.issue(a, "uid-a", 1000, 60);
        // The clock is injected: validity is checked against the given `now`.
        assert_eq!(key.validate(&token, a, Some("uid-a"), 1000), Ok(()));
        assert_eq!(key.validate(&token, a, Some("uid-a"), 1059), Ok(()));
        assert_eq!(
            key.validate(&token, a, Some("uid-a"), 1060),
            Err(TokenError::Expired)
        );
        assert_eq!(
            key.validate(&token, b, Some("uid-a"), 1000),
            Err(TokenError::WrongAddress)
        );
        // A new pod on the same IP (another UID) cannot use it.
        assert_eq!(
            key.validate(&token, a, Some("uid-new"), 1000),
            Err(TokenError::WrongPod)
        );
        // With no pod table, the IP alone is checked.
        assert_eq!(key.validate(&token, a, None, 1000), Ok(()));
        // A token issued without a UID is bound to the IP alone.
        let ip_only = key.issue(a, "", 1000, 60);
        assert_eq!(key.validate(&ip_only, a, Some("uid-a"), 1000), Ok(()));
        let other = TokenKey::generate().expect("key");
        assert_eq!(
            other.validate(&token, a, Some("uid-a"), 1000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            key.validate("garbage", a, None, 1000),
            Err(TokenError::Malformed)
        );
        // Tampering with the claim breaks the signature.
        let (_, tag) = token.split_once('.').expect("dot");
        let forged = format!(
            "{}.{tag}",
            URL_SAFE_NO_PAD.encode(b"10.0.0.1|uid-a|99999999")
        );
        assert_eq!(
            key.validate(&forged, a, Some("uid-a"), 1000),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl(Some("21600")), Some(21600));
        assert_eq!(parse_ttl(Some("1")), Some(1));
        assert_eq!(parse_ttl(Some("0")), None);
        assert_eq!(parse_ttl(Some("21601")), None);
        assert_eq!(parse_ttl(Some("-5")), None);
        assert_eq!(parse_ttl(Some("abc")), None);
        assert_eq!(parse_ttl(None), None);
    }
}
