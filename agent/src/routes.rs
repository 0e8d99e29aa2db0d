//! Which instance-metadata request this is: path normalisation and routing, as pure
//! functions.
//!
//! The path is percent-decoded first (so `%2e%2e` and `%2F` are dot segments and slashes
//! like any other), then empty and `.` segments are dropped and `..` pops a segment, all
//! before any decision. Only the routes AWS SDKs need for credentials are answered;
//! everything else is denied.

use percent_encoding::percent_decode_str;

/// A request the agent answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `PUT /latest/api/token`: an IMDSv2 session token.
    Token,
    /// `GET …/meta-data/iam/security-credentials[/]`: the pod's role name.
    ListRoles,
    /// `GET …/meta-data/iam/security-credentials/<role>`: that role's credentials.
    Credentials(String),
    /// `GET …/meta-data/iam/info`: the instance-profile view of the pod's role.
    Info,
    /// Anything else: denied.
    Denied,
    /// A known path with the wrong method.
    MethodNotAllowed,
}

/// Normalises a raw request path into its segments.
pub fn normalise(raw_path: &str) -> Vec<String> {
    // Decoding twice would let `%252e` become `.`; decode exactly once.
    let decoded = percent_decode_str(raw_path).decode_utf8_lossy();
    let mut segments: Vec<String> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other.to_string()),
        }
    }
    segments
}

/// Whether a first segment is an API version prefix SDKs use: `latest`, `1.0` or a date.
fn is_version(segment: &str) -> bool {
    let b = segment.as_bytes();
    segment == "latest"
        || segment == "1.0"
        || (b.len() == 10
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                _ => c.is_ascii_digit(),
            }))
}

/// Routes a request by method and raw path.
pub fn route(method: &http::Method, raw_path: &str) -> Route {
    let segments = normalise(raw_path);
    let parts: Vec<&str> = segments.iter().map(String::as_str).collect();
    let Some((version, rest)) = parts.split_first() else {
        return Route::Denied;
    };
    if !is_version(version) {
        return Route::Denied;
    }
    let (route, wants_put) = match rest {
        ["api", "token"] => (Route::Token, true),
        ["meta-data", "iam", "security-credentials"] => (Route::ListRoles, false),
        ["meta-data", "iam", "security-credentials", role] => {
            (Route::Credentials((*role).to_string()), false)
        }
        ["meta-data", "iam", "info"] => (Route::Info, false),
        _ => return Route::Denied,
    };
    let method_ok = if wants_put {
        method == http::Method::PUT
    } else {
        method == http::Method::GET || method == http::Method::HEAD
    };
    if method_ok {
        route
    } else {
        Route::MethodNotAllowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn routes() {
        let creds = |r: &str| Route::Credentials(r.to_string());
        let cases: &[(Method, &str, Route)] = &[
            (Method::PUT, "/latest/api/token", Route::Token),
            (Method::GET, "/latest/api/token", Route::MethodNotAllowed),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/",
                Route::ListRoles,
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials",
                Route::ListRoles,
            ),
            (
                Method::GET,
                "/2016-09-02/meta-data/iam/security-credentials/",
                Route::ListRoles,
            ),
            (
                Method::GET,
                "/1.0/meta-data/iam/security-credentials/",
                Route::ListRoles,
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/app",
                creds("app"),
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/app/",
                creds("app"),
            ),
            (
                Method::HEAD,
                "/latest/meta-data/iam/security-credentials/app",
                creds("app"),
            ),
            (
                Method::PUT,
                "/latest/meta-data/iam/security-credentials/app",
                Route::MethodNotAllowed,
            ),
            (Method::GET, "/latest/meta-data/iam/info", Route::Info),
            (Method::GET, "//latest//meta-data/./iam/info", Route::Info),
            (Method::GET, "/latest/meta-data/x/../iam/info", Route::Info),
            (
                Method::GET,
                "/latest/meta-data/x/%2e%2e/iam/info",
                Route::Info,
            ),
            (Method::GET, "/latest/meta-data%2Fiam%2Finfo", Route::Info),
            (Method::GET, "/latest/user-data", Route::Denied),
            (Method::GET, "/latest/meta-data/", Route::Denied),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/app/../../../user-data",
                Route::Denied,
            ),
            (
                Method::GET,
                "/latest/dynamic/instance-identity/pkcs7",
                Route::Denied,
            ),
            (Method::GET, "/", Route::Denied),
            (Method::GET, "/v2/meta-data/iam/info", Route::Denied),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/a/b",
                Route::Denied,
            ),
            // Decoded once only: %252e stays a literal "%2e" segment, not "..".
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/%252e%252e",
                creds("%2e%2e"),
            ),
        ];
        for (method, path, want) in cases {
            assert_eq!(&route(method, path), want, "{method} {path}");
        }
    }
}
