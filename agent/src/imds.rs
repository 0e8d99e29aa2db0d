//! The bytes EC2's instance metadata service answers with, reproduced exactly: the
//! credentials document's field order and layout, and its `YYYY-MM-DDTHH:MM:SSZ` times.

use podiam_proto::v1::Credentials;

/// Which credentials document a request asks for. Recent SDKs (Java v2, Go v2, Ruby, PHP,
/// Kotlin) ask for the extended one first and fall back to the legacy one on a 404 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Document {
    /// `…/iam/security-credentials/ROLE`: EC2's document since the beginning.
    Legacy,
    /// `…/iam/security-credentials-extended/ROLE`: the same, and the role's `AccountId`.
    Extended,
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), EC2's layout.
pub fn utc_timestamp(unix: i64) -> String {
    // Out-of-range times cannot come from STS; clamp rather than fail a response.
    let at = jiff::Timestamp::from_second(unix).unwrap_or(jiff::Timestamp::MAX);
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn json_string(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

/// The credentials document, in EC2's own layout; the extended one (`…/iam/
/// security-credentials-extended/ROLE`) ends with the role's `AccountId`, as EC2's does, when
/// its ARN names an account.
pub fn credentials_document(credentials: &Credentials, document: Document) -> String {
    let account = match document {
        Document::Legacy => None,
        Document::Extended => account_of(&credentials.role_arn),
    }
    .map(|account| format!(",\n  \"AccountId\" : {}", json_string(account)))
    .unwrap_or_default();
    format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : {},\n  \"SecretAccessKey\" : {},\n  \"Token\" : {},\n  \"Expiration\" : \"{}\"{account}\n}}",
        utc_timestamp(credentials.issued_unix),
        json_string(&credentials.access_key_id),
        json_string(&credentials.secret_access_key),
        json_string(&credentials.session_token),
        utc_timestamp(credentials.expiration_unix),
    )
}

/// The account of a role ARN (`arn:PARTITION:iam::ACCOUNT:role/NAME`): twelve digits.
pub fn account_of(role_arn: &str) -> Option<&str> {
    let account = role_arn.split(':').nth(4)?;
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
}

/// The `iam/info` document for a role, as EC2 shows an instance profile: the profile ARN is
/// the role's ARN with `:role/` read as `:instance-profile/`.
pub fn info_document(role_arn: &str, issued_unix: i64) -> String {
    let profile_arn = role_arn.replacen(":role/", ":instance-profile/", 1);
    format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"InstanceProfileArn\" : {},\n  \"InstanceProfileId\" : {}\n}}",
        utc_timestamp(issued_unix),
        json_string(&profile_arn),
        json_string(&profile_id(&profile_arn)),
    )
}

/// A stable, EC2-shaped profile id (`AIPA` + 17 characters) derived from the profile ARN.
fn profile_id(profile_arn: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, profile_arn.as_bytes());
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let tail: String = digest
        .as_ref()
        .iter()
        .take(17)
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect();
    format!("AIPA{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc_timestamp(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    fn credentials(role_arn: &str) -> Credentials {
        Credentials {
            access_key_id: "ASIA1".into(),
            secret_access_key: "sec\"ret".into(),
            session_token: "tok".into(),
            issued_unix: 0,
            expiration_unix: 3600,
            role_arn: role_arn.into(),
            valid_for_ms: 0,
        }
    }

    #[test]
    fn credentials_document_is_ec2_shaped_json() {
        let doc = credentials_document(
            &credentials("arn:aws:iam::123456789012:role/app"),
            Document::Legacy,
        );
        let parsed: serde_json::Value = serde_json::from_str(&doc).expect("valid JSON");
        assert_eq!(parsed["Code"], "Success");
        assert_eq!(parsed["Type"], "AWS-HMAC");
        assert_eq!(parsed["SecretAccessKey"], "sec\"ret");
        assert_eq!(parsed["Expiration"], "1970-01-01T01:00:00Z");
        assert!(doc.starts_with("{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : "));
        let order: Vec<usize> = [
            "Code",
            "LastUpdated",
            "Type",
            "AccessKeyId",
            "SecretAccessKey",
            "Token",
            "Expiration",
        ]
        .iter()
        .map(|k| doc.find(&format!("\"{k}\"")).expect("field present"))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "EC2's field order");
        assert!(!doc.contains("AccountId"), "{doc}");
    }

    #[test]
    fn the_extended_document_is_the_legacy_one_and_the_account() {
        let creds = credentials("arn:aws:iam::123456789012:role/team/app");
        let legacy = credentials_document(&creds, Document::Legacy);
        let extended = credentials_document(&creds, Document::Extended);
        assert_eq!(
            extended,
            format!(
                "{},\n  \"AccountId\" : \"123456789012\"\n}}",
                legacy.strip_suffix("\n}").expect("a closing brace")
            )
        );
        let parsed: serde_json::Value = serde_json::from_str(&extended).expect("valid JSON");
        assert_eq!(parsed["AccountId"], "123456789012");
        // An ARN naming no account the way IAM's do: the document without one.
        let odd = credentials("arn:aws-cn:iam::12345:role/app");
        assert_eq!(
            credentials_document(&odd, Document::Extended),
            credentials_document(&odd, Document::Legacy)
        );
        assert_eq!(
            account_of("arn:aws-us-gov:iam::000000000001:role/x/y"),
            Some("000000000001")
        );
        assert_eq!(account_of("not-an-arn"), None);
        assert_eq!(account_of("arn:aws:iam::12345678901a:role/x"), None);
    }

    #[test]
    fn info_document_names_the_instance_profile() {
        let doc = info_document("arn:aws:iam::123456789012:role/app", 0);
        let parsed: serde_json::Value = serde_json::from_str(&doc).expect("valid JSON");
        assert_eq!(
            parsed["InstanceProfileArn"],
            "arn:aws:iam::123456789012:instance-profile/app"
        );
        let id = parsed["InstanceProfileId"].as_str().expect("id");
        assert!(id.starts_with("AIPA") && id.len() == 21, "{id}");
    }
}
