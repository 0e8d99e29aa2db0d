//! Which instance-metadata request this is: path normalisation and routing, as pure
//! functions.
//!
//! The path is percent-decoded first (so `%2e%2e` and `%2F` are dot segments and slashes
//! like any other), then empty and `.` segments are dropped and `..` pops a segment, all
//! before any decision. Only the routes AWS SDKs need for credentials are answered by the
//! agent; a path matching the operator's allow-list (`--allow-route-regexp`) is passed to the
//! node's metadata service unless it is on the hard-block list, which nothing can open:
//! user-data, anything under `meta-data/iam/` (the node's own credentials),
//! `identity-credentials/`, and the signed identity documents. Everything else is denied.

use percent_encoding::percent_decode_str;
use regex::Regex;

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
    /// An allow-listed path, passed to the node's metadata service (the normalised path).
    Proxy(String),
    /// Anything else: denied.
    Denied,
    /// A known path with the wrong method.
    MethodNotAllowed,
}

impl Route {
    /// A short name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::ListRoles => "list-roles",
            Route::Credentials(_) => "credentials",
            Route::Info => "info",
            Route::Proxy(_) => "proxy",
            Route::Denied => "denied",
            Route::MethodNotAllowed => "method-not-allowed",
        }
    }
}

/// Compiles an allow-list regex so that it must match the WHOLE normalised path.
pub fn allow_list(source: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{source})$"))
}

/// Paths the allow-list can never open (segments after the version prefix).
pub fn hard_blocked(rest: &[&str]) -> bool {
    match rest {
        ["user-data", ..] | ["api", ..] => true,
        ["meta-data", "iam", ..] | ["meta-data", "identity-credentials", ..] => true,
        ["dynamic", "instance-identity", doc, ..] => {
            matches!(*doc, "pkcs7" | "signature" | "rsa2048")
        }
        _ => false,
    }
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

/// Routes a request by method and raw path; `allow` is the compiled allow-list, if any.
pub fn route(method: &http::Method, raw_path: &str, allow: Option<&Regex>) -> Route {
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
        _ => {
            let path = format!("/{}", parts.join("/"));
            return match allow {
                Some(allow) if !hard_blocked(rest) && allow.is_match(&path) => {
                    if method == http::Method::GET || method == http::Method::HEAD {
                        Route::Proxy(path)
                    } else {
                        Route::MethodNotAllowed
                    }
                }
                _ => Route::Denied,
            };
        }
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

    fn creds(role: &str) -> Route {
        Route::Credentials(role.to_string())
    }

    #[test]
    fn routes() {
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
            assert_eq!(&route(method, path, None), want, "{method} {path}");
        }
    }

    #[test]
    fn the_allow_list_never_opens_the_hard_block_list() {
        // An operator allowing everything still gets none of the node's secrets.
        let everything = allow_list(".*").expect("compiles");
        let narrow = allow_list("/latest/meta-data/(placement/.*|instance-id)").expect("compiles");
        let proxy = |p: &str| Route::Proxy(p.to_string());
        let cases: &[(&Regex, Method, &str, Route)] = &[
            (
                &narrow,
                Method::GET,
                "/latest/meta-data/instance-id",
                proxy("/latest/meta-data/instance-id"),
            ),
            (
                &narrow,
                Method::GET,
                "/latest/meta-data/placement/region",
                proxy("/latest/meta-data/placement/region"),
            ),
            (
                &narrow,
                Method::GET,
                "/latest//meta-data/./instance-id",
                proxy("/latest/meta-data/instance-id"),
            ),
            (
                &narrow,
                Method::PUT,
                "/latest/meta-data/instance-id",
                Route::MethodNotAllowed,
            ),
            // Whole-path match: a prefix is not enough.
            (
                &narrow,
                Method::GET,
                "/latest/meta-data/instance-id-x",
                Route::Denied,
            ),
            (
                &narrow,
                Method::GET,
                "/latest/meta-data/ami-id",
                Route::Denied,
            ),
            (
                &narrow,
                Method::GET,
                "/latest/meta-data/placement/../../user-data",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/latest/meta-data/ami-id",
                proxy("/latest/meta-data/ami-id"),
            ),
            (&everything, Method::GET, "/latest/user-data", Route::Denied),
            (
                &everything,
                Method::GET,
                "/latest/user-data/",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/latest/%75ser-data",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/latest/meta-data/x/..%2F..%2Fuser-data",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/2021-01-03/user-data",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/latest/meta-data/iam/security-credentials/node-role",
                creds("node-role"),
            ),
            (
                &everything,
                Method::GET,
                "/latest/meta-data/iam/security-credentials/a/b",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/latest/meta-data/iam/anything",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/latest/dynamic/instance-identity/pkcs7",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/latest/dynamic/instance-identity/signature",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/latest/dynamic/instance-identity/rsa2048",
                Route::Denied,
            ),
            (
                &everything,
                Method::GET,
                "/latest/dynamic/instance-identity/document",
                proxy("/latest/dynamic/instance-identity/document"),
            ),
            (
                &everything,
                Method::GET,
                "/latest/api/token",
                Route::MethodNotAllowed,
            ),
            (
                &everything,
                Method::GET,
                "/not-a-version/meta-data/ami-id",
                Route::Denied,
            ),
        ];
        for (allow, method, path, want) in cases {
            assert_eq!(&route(method, path, Some(allow)), want, "{method} {path}");
        }
    }
}
