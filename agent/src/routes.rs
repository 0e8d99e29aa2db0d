//! Which instance-metadata request this is: path normalisation and routing, as pure
//! functions.
//!
//! The path is percent-decoded first (so `%2e%2e` and `%2F` are dot segments and slashes
//! like any other), then empty and `.` segments are dropped and `..` pops a segment, all
//! before any decision. Only the routes AWS SDKs need for credentials are answered by the
//! agent; a path matching the operator's allow-list (`--allow-route-regexp`) is passed to the
//! node's metadata service unless it is on the hard-block list, which nothing can open:
//! user-data, anything under `meta-data/iam/` (the node's own credentials),
//! `identity-credentials/`, and the signed identity documents (compared without regard to
//! letter case). Everything else is denied — also credentials for a name no IAM role can
//! have ([`podiam_proto::valid_role_name`]; `app%0D%0Areader` is no role), which is never
//! compared, passed to a server or logged.
//!
//! The allow-list and the hard-block list judge exactly the bytes the node's service will
//! receive. A decoded segment could otherwise carry a delimiter that changes the path once it
//! is put in the upstream URI: `user-data%23` decodes to `user-data#`, which is not on the
//! hard-block list, and the `#` then starts a fragment, so the node would be asked for
//! `user-data`. A path is therefore passed upstream only when every segment is made of
//! [`segment_byte`]s alone, which need no escaping in a URI path and mean the same to any
//! server: no `?`, `#`, `%`, `;`, space, control or non-ASCII byte ever leaves the agent.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;
use regex::Regex;

pub use crate::imds::Document;

/// A request the agent answers; a role name borrowed from the request's path when it needed
/// no decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `PUT /latest/api/token`: an IMDSv2 session token.
    Token,
    /// `GET …/meta-data/iam/security-credentials[/]`: the pod's role name; also
    /// `…/security-credentials-extended[/]`, which EC2 answers the same.
    ListRoles,
    /// `GET …/meta-data/iam/security-credentials/<role>`: that role's credentials; `role` is
    /// a name IAM allows. `…/security-credentials-extended/<role>` asks for the same
    /// credentials with the role's account ([`Document::Extended`]).
    Credentials(Cow<'a, str>, Document),
    /// `GET …/meta-data/iam/info`: the instance-profile view of the pod's role.
    Info,
    /// An allow-listed path, passed to the node's metadata service: the normalised path,
    /// exactly the bytes the node receives (only [`segment_byte`]s and `/`).
    Proxy(String),
    /// Anything else: denied.
    Denied,
    /// A known path with the wrong method.
    MethodNotAllowed,
}

impl Route<'_> {
    /// The same route, owning what it names.
    pub fn into_owned(self) -> Route<'static> {
        match self {
            Route::Credentials(role, document) => {
                Route::Credentials(Cow::Owned(role.into_owned()), document)
            }
            Route::Token => Route::Token,
            Route::ListRoles => Route::ListRoles,
            Route::Info => Route::Info,
            Route::Proxy(path) => Route::Proxy(path),
            Route::Denied => Route::Denied,
            Route::MethodNotAllowed => Route::MethodNotAllowed,
        }
    }

    /// A short name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::ListRoles => "list-roles",
            Route::Credentials(..) => "credentials",
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

/// Whether `byte` may appear in a path segment sent to the node's metadata service: ASCII
/// letters and digits, and the punctuation instance metadata paths are made of — `-`, `_`,
/// `.` and `:` (MAC addresses under `network/interfaces/macs/`), plus `+`, `=`, `,` and `@`,
/// which EC2 allows in the instance tag keys it publishes under `tags/instance/` — and `~`.
/// All are RFC 3986 path characters that need no escaping and delimit nothing.
pub fn segment_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-_.:+=,@~".contains(&byte)
}

/// Paths the allow-list can never open (segments after the version prefix, compared in
/// ASCII lower case: the list holds no upper-case letter).
pub fn hard_blocked(rest: &[&str]) -> bool {
    let lower: Vec<String> = rest.iter().map(|s| s.to_ascii_lowercase()).collect();
    let rest: Vec<&str> = lower.iter().map(String::as_str).collect();
    match rest.as_slice() {
        ["user-data", ..] | ["api", ..] => true,
        ["meta-data", "iam", ..] | ["meta-data", "identity-credentials", ..] => true,
        ["dynamic", "instance-identity", doc, ..] => {
            matches!(*doc, "pkcs7" | "signature" | "rsa2048")
        }
        _ => false,
    }
}

/// Decodes a raw request path, exactly once: decoding twice would let `%252e` become `.`.
/// Borrowed when there is nothing to decode (every SDK's path).
pub fn decode(raw_path: &str) -> Cow<'_, str> {
    // Without a `%` there is nothing to decode, and a `&str` is UTF-8 already: the answer
    // below would be `raw_path` itself, found by scanning it twice.
    if !raw_path.contains('%') {
        return Cow::Borrowed(raw_path);
    }
    percent_decode_str(raw_path).decode_utf8_lossy()
}

/// A decoded path's segments, `.`, `..` and empty ones resolved; borrowed from `decoded`,
/// so routing a request copies nothing.
pub fn normalise(decoded: &str) -> Segments<'_> {
    let mut segments = Segments::default();
    for segment in decoded.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => segments.pop(),
            other => segments.push(other),
        }
    }
    segments
}

/// Segments kept on the stack: SDKs' paths have at most five, metadata paths at most eight.
const INLINE_SEGMENTS: usize = 16;

/// A path's segments: on the stack, or on the heap once a path has more than
/// [`INLINE_SEGMENTS`] at a time (it is judged the same, only allocated).
#[derive(Debug)]
pub struct Segments<'a> {
    inline: [&'a str; INLINE_SEGMENTS],
    len: usize,
    /// Every segment, once there were too many for `inline`.
    spilled: Option<Vec<&'a str>>,
}

impl Default for Segments<'_> {
    fn default() -> Self {
        Segments {
            inline: [""; INLINE_SEGMENTS],
            len: 0,
            spilled: None,
        }
    }
}

impl<'a> Segments<'a> {
    fn push(&mut self, segment: &'a str) {
        if let Some(spilled) = &mut self.spilled {
            spilled.push(segment);
        } else if self.len < INLINE_SEGMENTS {
            self.inline[self.len] = segment;
            self.len += 1;
        } else {
            let mut spilled = Vec::with_capacity(2 * INLINE_SEGMENTS);
            spilled.extend_from_slice(&self.inline);
            spilled.push(segment);
            self.spilled = Some(spilled);
        }
    }

    fn pop(&mut self) {
        if let Some(spilled) = &mut self.spilled {
            spilled.pop();
        } else {
            self.len = self.len.saturating_sub(1);
        }
    }
}

impl<'a> std::ops::Deref for Segments<'a> {
    type Target = [&'a str];

    fn deref(&self) -> &[&'a str] {
        match &self.spilled {
            Some(spilled) => spilled,
            None => &self.inline[..self.len],
        }
    }
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
pub fn route<'a>(method: &http::Method, raw_path: &'a str, allow: Option<&Regex>) -> Route<'a> {
    match decode(raw_path) {
        Cow::Borrowed(path) => route_decoded(method, path, allow),
        Cow::Owned(path) => route_decoded(method, &path, allow).into_owned(),
    }
}

/// [`route`], the path decoded.
fn route_decoded<'a>(method: &http::Method, decoded: &'a str, allow: Option<&Regex>) -> Route<'a> {
    let parts = normalise(decoded);
    let Some((version, rest)) = parts.split_first() else {
        return Route::Denied;
    };
    if !is_version(version) {
        return Route::Denied;
    }
    let (route, wants_put) = match rest {
        ["api", "token"] => (Route::Token, true),
        [
            "meta-data",
            "iam",
            "security-credentials" | "security-credentials-extended",
        ] => (Route::ListRoles, false),
        [
            "meta-data",
            "iam",
            listing @ ("security-credentials" | "security-credentials-extended"),
            role,
        ] => {
            if !podiam_proto::valid_role_name(role) {
                return Route::Denied;
            }
            let document = match *listing {
                "security-credentials" => Document::Legacy,
                _ => Document::Extended,
            };
            (Route::Credentials(Cow::Borrowed(*role), document), false)
        }
        ["meta-data", "iam", "info"] => (Route::Info, false),
        _ => {
            // Checked before anything else: a segment with any other byte could mean
            // another path once it is in the upstream URI.
            if !parts.iter().all(|part| part.bytes().all(segment_byte)) {
                return Route::Denied;
            }
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

    fn creds(role: &str) -> Route<'static> {
        Route::Credentials(Cow::Owned(role.to_string()), Document::Legacy)
    }

    fn extended(role: &str) -> Route<'static> {
        Route::Credentials(Cow::Owned(role.to_string()), Document::Extended)
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
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials-extended/",
                Route::ListRoles,
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials-extended",
                Route::ListRoles,
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials-extended/app",
                extended("app"),
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials-extended/app/",
                extended("app"),
            ),
            (
                Method::PUT,
                "/latest/meta-data/iam/security-credentials-extended/app",
                Route::MethodNotAllowed,
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials-extended/app%0D%0Areader",
                Route::Denied,
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials-extended/a/b",
                Route::Denied,
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/SECURITY-CREDENTIALS-EXTENDED/app",
                Route::Denied,
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
            // Decoded once only: %252e stays a literal "%2e" segment, not a ".." that would
            // pop "app" and list the roles.
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/app/%252e%252e",
                Route::Denied,
            ),
            // Only names IAM allows are roles: anything else is never compared, passed on
            // or logged (a CR LF could forge a log line).
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/app.v2@team",
                creds("app.v2@team"),
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/app%0D%0Areader",
                Route::Denied,
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/app%1B%5B2J",
                Route::Denied,
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/%252e%252e",
                Route::Denied,
            ),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/app%20reader",
                Route::Denied,
            ),
            (
                Method::GET,
                &format!(
                    "/latest/meta-data/iam/security-credentials/{}",
                    "r".repeat(65)
                ),
                Route::Denied,
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

    #[test]
    fn long_paths_are_resolved_as_short_ones_and_roles_borrowed_when_not_escaped() {
        // More segments at a time than are kept on the stack: the same resolution.
        let deep =
            |n: usize, tail: &str| format!("/latest{}{}{tail}", "/x".repeat(n), "/..".repeat(n));
        for n in [0, 1, 15, 16, 17, 40] {
            let path = deep(n, "/meta-data/iam/info");
            assert_eq!(route(&Method::GET, &path, None), Route::Info, "{path}");
            let path = deep(n, "/meta-data/iam/security-credentials/app");
            assert_eq!(route(&Method::GET, &path, None), creds("app"), "{path}");
            // Popping past the root stays at the root.
            let path = format!("{}/latest/meta-data/iam/info", "/..".repeat(n + 20));
            assert_eq!(route(&Method::GET, &path, None), Route::Info, "{path}");
        }
        let long = "/s".repeat(40);
        let segments = normalise(&long);
        assert_eq!(segments.len(), 40);
        assert!(segments.iter().all(|s| *s == "s"));
        // Only a decoded path makes the role owned.
        let plain = route(
            &Method::GET,
            "/latest/meta-data/iam/security-credentials/app",
            None,
        );
        assert!(matches!(
            plain,
            Route::Credentials(Cow::Borrowed("app"), Document::Legacy)
        ));
        let escaped = route(
            &Method::GET,
            "/latest/meta-data/iam/security-credentials/%61pp",
            None,
        );
        assert!(matches!(&escaped, Route::Credentials(Cow::Owned(role), _) if role == "app"));
        assert_eq!(plain, escaped.clone().into_owned());
    }

    #[test]
    fn a_path_without_escapes_is_decoded_as_the_decoder_would() {
        for path in [
            "/latest/meta-data/iam/security-credentials/app",
            "/latest/meta-data/é/ü",
            "/latest/api/token",
            "/a%2e%2E/b",
            "/%ff%fe/x",
            "%",
            "",
        ] {
            let decoded = decode(path);
            assert_eq!(
                decoded,
                percent_decode_str(path).decode_utf8_lossy(),
                "{path}"
            );
            if !path.contains('%') {
                assert!(matches!(decoded, Cow::Borrowed(_)), "{path}");
            }
        }
    }

    #[test]
    fn encoded_delimiters_never_reach_the_node_as_a_blocked_path() {
        // Under the most permissive allow-lists, a decoded `?` or `#` would end the path
        // when the upstream URI is built: `user-data%23` would be sent as `user-data`.
        // Segments with such bytes are refused, whatever the allow-list says.
        let everything = allow_list(".*").expect("compiles");
        let identity = allow_list("/latest/dynamic/instance-identity/.*").expect("compiles");
        let proxy = |p: &str| Route::Proxy(p.to_string());
        let cases: &[(&Regex, &str, Route)] = &[
            // The reported paths.
            (&everything, "/latest/user-data%23", Route::Denied),
            (&everything, "/latest/user-data%3F", Route::Denied),
            (&everything, "/latest/user-data%3f", Route::Denied),
            (
                &identity,
                "/latest/dynamic/instance-identity/pkcs7%3F",
                Route::Denied,
            ),
            (
                &identity,
                "/latest/dynamic/instance-identity/signature%23",
                Route::Denied,
            ),
            (
                &identity,
                "/latest/dynamic/instance-identity/rsa2048%3Fx",
                Route::Denied,
            ),
            (&everything, "/latest/meta-data/iam%3F", Route::Denied),
            (&everything, "/latest/meta-data/iam%23/info", Route::Denied),
            (&everything, "/latest/meta-data/ami-id%3F", Route::Denied),
            (
                &everything,
                "/latest/meta-data/ami-id%23frag",
                Route::Denied,
            ),
            // `%25` decodes (once) to a literal `%`: the node would decode it again.
            (&everything, "/latest/user-data%25", Route::Denied),
            (&everything, "/latest/user-data%2523", Route::Denied),
            (&everything, "/latest/meta-data/ami-id%2523", Route::Denied),
            (&everything, "/latest/%2575ser-data", Route::Denied),
            // Control bytes: NUL, CR/LF (a second request line), tab.
            (&everything, "/latest/user-data%00", Route::Denied),
            (&everything, "/latest/meta-data/ami-id%00", Route::Denied),
            (
                &everything,
                "/latest/meta-data/ami-id%0D%0AX:%20y",
                Route::Denied,
            ),
            (&everything, "/latest/meta-data/ami-id%09", Route::Denied),
            (&everything, "/latest/meta-data/ami-id%7F", Route::Denied),
            // Not ASCII, or not UTF-8 at all.
            (&everything, "/latest/meta-data/ami-id%C3%A9", Route::Denied),
            (&everything, "/latest/meta-data/ami-id%FF", Route::Denied),
            // Nothing else outside what instance metadata paths are made of.
            (&everything, "/latest/meta-data/ami-id%20", Route::Denied),
            (&everything, "/latest/user-data;x", Route::Denied),
            (&everything, "/latest/meta-data/ami-id%22", Route::Denied),
            // `%2F` is a slash like any other: normalised first, then checked.
            (&everything, "/latest%2Fuser-data", Route::Denied),
            (
                &everything,
                "/latest/meta-data%2F..%2F..%2Flatest%2Fuser-data",
                Route::Denied,
            ),
            (
                &identity,
                "/latest/dynamic%2Finstance-identity%2Fpkcs7",
                Route::Denied,
            ),
            (
                &everything,
                "/latest/meta-data%2Fami-id",
                proxy("/latest/meta-data/ami-id"),
            ),
            (
                &identity,
                "/latest/dynamic/instance-identity%2Fdocument",
                proxy("/latest/dynamic/instance-identity/document"),
            ),
            // The hard-block list does not depend on letter case.
            (&everything, "/latest/User-Data", Route::Denied),
            (&everything, "/latest/META-DATA/iam/info", Route::Denied),
            (
                &identity,
                "/latest/dynamic/instance-identity/PKCS7",
                Route::Denied,
            ),
            // What instance metadata paths really look like still passes.
            (
                &everything,
                "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/subnet-id",
                proxy("/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/subnet-id"),
            ),
            (
                &everything,
                "/latest/meta-data/tags/instance/team@a+b=c,d_e.f-g",
                proxy("/latest/meta-data/tags/instance/team@a+b=c,d_e.f-g"),
            ),
            (
                &everything,
                "/latest/meta-data/placement/availability-zone",
                proxy("/latest/meta-data/placement/availability-zone"),
            ),
        ];
        for (allow, path, want) in cases {
            assert_eq!(&route(&Method::GET, path, Some(allow)), want, "GET {path}");
        }
    }

    #[test]
    fn a_proxied_path_is_exactly_what_the_node_receives() {
        // The allow-list and the hard-block list judge the path the agent sends: parsed as
        // the upstream URI, it must come back whole, with no query and nothing dropped.
        let everything = allow_list(".*").expect("compiles");
        let mut tried = 0;
        for byte in 0u8..=255 {
            for template in [
                "/latest/meta-data/ami-id%{:02X}",
                "/latest/meta-data/a%{:02X}b",
            ] {
                let raw = template.replace("{:02X}", &format!("{byte:02X}"));
                tried += 1;
                let Route::Proxy(path) = route(&Method::GET, &raw, Some(&everything)) else {
                    continue;
                };
                let uri: http::Uri = format!("http://169.254.169.254{path}")
                    .parse()
                    .unwrap_or_else(|e| panic!("{raw} → {path}: not a URI: {e}"));
                assert_eq!(uri.path(), path, "{raw}");
                assert_eq!(uri.query(), None, "{raw}");
                assert!(
                    path.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"/-._~:@+=,".contains(&b)),
                    "{raw} → {path}"
                );
            }
        }
        assert_eq!(tried, 512);
    }

    /// The allow-list docs/migrating.md recommends to kube2iam users passes what SDKs read
    /// and still nothing the hard-block list keeps.
    #[test]
    fn the_documented_passthrough_list_passes_what_sdks_read_and_nothing_blocked() {
        let doc = include_str!("../../docs/migrating.md");
        let source = doc
            .split("--allow-route-regexp='")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .expect("docs/migrating.md recommends an allow-list");
        let allow = allow_list(source).expect("compiles");
        for path in [
            "/latest/meta-data/placement/region",
            "/latest/meta-data/placement/availability-zone",
            "/latest/meta-data/placement/availability-zone-id",
            "/latest/dynamic/instance-identity/document",
        ] {
            assert_eq!(
                route(&Method::GET, path, Some(&allow)),
                Route::Proxy(path.to_string()),
                "{path}"
            );
        }
        for path in [
            "/latest/user-data",
            "/latest/meta-data/iam/security-credentials/node-role",
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/dynamic/instance-identity/signature",
            "/latest/meta-data/placement/region/../../iam/info",
            "/latest/meta-data/instance-id",
        ] {
            assert!(
                !matches!(route(&Method::GET, path, Some(&allow)), Route::Proxy(_)),
                "{path}"
            );
        }
    }
}
