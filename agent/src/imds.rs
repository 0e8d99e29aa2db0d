//! The bytes EC2's instance metadata service answers with, reproduced exactly: the
//! credentials document's field order and layout, and its `YYYY-MM-DDTHH:MM:SSZ` times.

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), EC2's layout.
pub fn utc_timestamp(unix: i64) -> String {
    // Out-of-range times cannot come from STS; clamp rather than fail a response.
    let at = jiff::Timestamp::from_second(unix).unwrap_or(jiff::Timestamp::MAX);
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn json_string(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

/// The credentials document, in EC2's own layout.
pub fn credentials_document(
    access_key_id: &str,
    secret_access_key: &str,
    token: &str,
    issued_unix: i64,
    expiration_unix: i64,
) -> String {
    format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : {},\n  \"SecretAccessKey\" : {},\n  \"Token\" : {},\n  \"Expiration\" : \"{}\"\n}}",
        utc_timestamp(issued_unix),
        json_string(access_key_id),
        json_string(secret_access_key),
        json_string(token),
        utc_timestamp(expiration_unix),
    )
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

    #[test]
    fn credentials_document_is_ec2_shaped_json() {
        let doc = credentials_document("ASIA1", "sec\"ret", "tok", 0, 3600);
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
