//! The one spelling of a JWT that podiam takes where a ServiceAccount token is expected (a
//! pod's token at the container-credentials endpoint, an agent's token on its calls).
//!
//! The API server decodes a token leniently (it strips trailing `=` and ignores the unused
//! low bits of a part's last character), so one valid token has many spellings that all
//! authenticate as the same ServiceAccount. Agents and servers remember reviews and charge
//! budgets by the token's text, so each spelling would cost a review of its own and hold a
//! place of its own among those remembered. Kubernetes issues tokens in one spelling only:
//! three parts of unpadded base64url, each its bytes' one encoding. [`payload`] takes that
//! and nothing else.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The decoded payload (second part) of `token`, if it is three dot-separated parts, each
/// non-empty unpadded base64url in its one encoding (no `=`, no unused bits set); else what
/// is wrong with it.
pub fn payload(token: &str) -> Result<Vec<u8>, &'static str> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not three dot-separated parts");
    };
    // The engine refuses padding and a last character with unused bits set: what it
    // decodes, it decodes from the bytes' one encoding.
    let decoded = |part: &str| match URL_SAFE_NO_PAD.decode(part) {
        Ok(bytes) if !bytes.is_empty() => Ok(bytes),
        _ => Err(()),
    };
    decoded(header).map_err(|()| "the header is not base64url")?;
    decoded(signature).map_err(|()| "the signature is not base64url")?;
    decoded(payload).map_err(|()| "the payload is not base64url")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token of `payload` with a header and a 256-byte signature, as the API server signs.
    fn token(payload: &str) -> String {
        let part = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        format!(
            "{}.{}.{}",
            part(br#"{"alg":"RS256","kid":"k"}"#),
            part(payload.as_bytes()),
            part(&[7; 256])
        )
    }

    #[test]
    fn a_token_in_its_one_spelling_is_read() {
        let t = token(r#"{"exp":2000000000}"#);
        assert_eq!(payload(&t).expect("canonical"), br#"{"exp":2000000000}"#);
    }

    #[test]
    fn other_spellings_of_the_same_token_are_refused() {
        let t = token(r#"{"exp":2000000000}"#);
        // A 256-byte signature ends in a character that carries 4 unused bits: the next
        // character of the alphabet sets the lowest of them, and decodes to the same bytes
        // for a lenient decoder.
        const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let (rest, last) = t.split_at(t.len() - 1);
        let at = ALPHABET.find(last).expect("base64url");
        let other = &ALPHABET[at + 1..at + 2];
        let variants = [
            format!("{t}="),
            format!("{t}=="),
            format!("{rest}{other}"),
            t.replacen('.', "=.", 1),
            format!("{t}."),
            format!(".{t}"),
            t.replace('.', ".."),
            format!(" {t}"),
            t.replace('-', "+").replace('_', "/"),
        ];
        for v in variants.iter().filter(|v| **v != t) {
            assert!(payload(v).is_err(), "{v}");
        }
        assert!(payload(&t).is_ok());
    }

    #[test]
    fn what_is_wrong_is_said() {
        assert_eq!(payload("a.b"), Err("not three dot-separated parts"));
        assert_eq!(payload("a.b.c.d"), Err("not three dot-separated parts"));
        let t = token("{}");
        let (h, rest) = t.split_once('.').expect("parts");
        assert_eq!(
            payload(&format!("{h}.!.{}", rest.split_once('.').expect("parts").1)),
            Err("the payload is not base64url")
        );
        assert_eq!(
            payload(&format!("{h}.e30.")),
            Err("the signature is not base64url")
        );
        assert_eq!(
            payload(&format!(".e30.{h}")),
            Err("the header is not base64url")
        );
    }
}
