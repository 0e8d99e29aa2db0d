//! Who may have which role: role resolution and the namespace's permitted regex.
//!
//! Pure functions over plain data, no I/O; every rule of PRODUCT.md is a table test below.
//!
//! - A pod's `iam.amazonaws.com/role` names a role by name (`app-reader`), by path and name
//!   (`team/app-reader`) or by full ARN. Names and paths are placed under the base ARN
//!   (`arn:aws:iam::ACCOUNT:role/`). Names and path segments are held to IAM's name
//!   characters and lengths, and a `.`, `..` or empty segment is refused: `team-b/../admin`
//!   is no role under `team-b/` (nor `admin`), whatever STS would make of it.
//! - The namespace's `iam.amazonaws.com/permitted` is a regular expression that must match
//!   the WHOLE role: it is compiled as `^(?:…)$` (kiam's `^…$` turns `a|b` into "starts with
//!   a, or ends with b"). It is tried against the full ARN and, for roles under the base ARN,
//!   against the path/name below it. No annotation, an empty one or an invalid one permits
//!   nothing; an invalid one is reported as such.

use regex::Regex;

/// The annotation on a pod naming its role.
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// The optional annotation on a pod carrying the STS external ID.
pub const EXTERNAL_ID_ANNOTATION: &str = "iam.amazonaws.com/external-id";
/// The optional annotation on a pod naming its STS session.
pub const SESSION_NAME_ANNOTATION: &str = "iam.amazonaws.com/session-name";
/// The annotation on a namespace holding the permitted-roles regex.
pub const PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";

/// The longest permitted-roles regex accepted, in bytes.
pub const MAX_REGEX_LEN: usize = 4096;
/// The most memory one compiled permitted-roles regex may take, in bytes.
pub const MAX_COMPILED_REGEX: usize = 1 << 20;

/// A namespace's permitted-roles rule, compiled once per annotation value.
#[derive(Clone, Debug)]
pub enum Permitted {
    /// No annotation, or an empty one: nothing is permitted.
    Nothing,
    /// The annotation does not compile: nothing is permitted, and we say why.
    Invalid { source: String, error: String },
    /// A compiled, whole-match regex and the text it came from.
    Regex { source: String, regex: Regex },
}

impl Permitted {
    /// Compiles the annotation value (or its absence) into a rule. A regex longer than
    /// [`MAX_REGEX_LEN`] or compiling to more than [`MAX_COMPILED_REGEX`] bytes is invalid:
    /// one namespace's annotation must not be able to exhaust the server's memory.
    pub fn compile(annotation: Option<&str>) -> Permitted {
        let source = match annotation.map(str::trim) {
            None | Some("") => return Permitted::Nothing,
            Some(s) => s,
        };
        if source.len() > MAX_REGEX_LEN {
            return Permitted::Invalid {
                source: source.to_string(),
                error: format!(
                    "{} characters long; at most {MAX_REGEX_LEN} are accepted",
                    source.len()
                ),
            };
        }
        let built = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(MAX_COMPILED_REGEX)
            .dfa_size_limit(MAX_COMPILED_REGEX)
            .build();
        match built {
            Ok(regex) => Permitted::Regex {
                source: source.to_string(),
                regex,
            },
            Err(e) => Permitted::Invalid {
                source: source.to_string(),
                // The regex crate's errors span several lines; one line is enough in a reply.
                error: e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            },
        }
    }
}

/// A role resolved to its ARN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// `arn:aws:iam::ACCOUNT:role/PATH/NAME`.
    pub arn: String,
    /// The part after `role/` when the role lies under the base ARN (path and name).
    pub under_base: Option<String>,
    /// The role's name: the ARN's last segment, which EC2 lists under
    /// `iam/security-credentials/`.
    pub name: String,
}

/// Why a role annotation could not be resolved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error(
        "role {0:?} is not an IAM role ARN (arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME, where the path and name follow IAM's rules)"
    )]
    MalformedArn(String),
    #[error(
        "role {0:?} is not a valid role name or path/name (a name is 1 to 64 of A-Z a-z 0-9 + = , . @ _ -; path segments are the same, never empty, `.` or `..`)"
    )]
    MalformedName(String),
    #[error("role {0:?} is a name, but the server has no base role ARN to place it under")]
    NoBaseArn(String),
}

/// IAM's longest role name.
const MAX_ROLE_NAME: usize = 64;
/// IAM's longest instance profile name.
const MAX_INSTANCE_PROFILE_NAME: usize = 128;
/// IAM's longest path, its leading and trailing slashes included.
const MAX_PATH: usize = 512;

/// Checks a base ARN: `arn:PARTITION:iam::ACCOUNT:role/` with an optional path, ending in `/`.
pub fn valid_base_arn(base: &str) -> bool {
    base.ends_with('/') && parse_role_arn(&format!("{base}x")).is_some()
}

/// Checks a full role ARN: `arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME`.
pub fn valid_role_arn(arn: &str) -> bool {
    parse_role_arn(arn).is_some()
}

/// The base ARN (`arn:PARTITION:iam::ACCOUNT:role/`) of the account an instance profile
/// (`arn:PARTITION:iam::ACCOUNT:instance-profile/[PATH/]NAME`) belongs to.
pub fn base_arn_of_instance_profile(profile_arn: &str) -> Option<String> {
    let rest = profile_arn.strip_prefix("arn:")?;
    let mut parts = rest.splitn(5, ':');
    let (partition, service, region, account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    let base = format!("arn:{partition}:iam::{account}:role/");
    let ok = service == "iam"
        && region.is_empty()
        && resource
            .strip_prefix("instance-profile/")
            .is_some_and(|p| valid_path_name(p, MAX_INSTANCE_PROFILE_NAME))
        && valid_base_arn(&base);
    ok.then_some(base)
}

/// Splits an IAM role ARN into (account prefix up to `role/`, path/name), if it is one.
fn parse_role_arn(arn: &str) -> Option<(&str, &str)> {
    let rest = arn.strip_prefix("arn:")?;
    let mut parts = rest.splitn(5, ':');
    let partition = parts.next()?;
    let service = parts.next()?;
    let region = parts.next()?;
    let account = parts.next()?;
    let resource = parts.next()?;
    let path_name = resource.strip_prefix("role/")?;
    let ok = valid_partition(partition)
        && service == "iam"
        && region.is_empty()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && valid_path_name(path_name, MAX_ROLE_NAME);
    ok.then(|| arn.split_at(arn.len() - path_name.len()))
}

/// AWS partitions: `aws`, and `aws-` with lowercase letters, digits and dashes (`aws-cn`,
/// `aws-us-gov`, `aws-iso-b`…).
fn valid_partition(partition: &str) -> bool {
    partition == "aws"
        || partition.strip_prefix("aws-").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A character of IAM names, `[\w+=,.@-]` in ASCII.
fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b)
}

/// One segment of a path or a name: IAM's name characters, and never empty, `.` or `..`,
/// whatever IAM itself would accept in a path. A dot segment is how `team-b/../admin`
/// would pass a `team-b/.*` rule and name a role outside `team-b/`; an empty one makes a
/// different ARN of the same words.
fn valid_segment(segment: &str) -> bool {
    !segment.is_empty() && segment != "." && segment != ".." && segment.bytes().all(name_byte)
}

/// What follows `role/` (or `instance-profile/`) in an ARN: `[PATH/]NAME`, the name at most
/// `max_name` characters, the path (with its leading and trailing slashes) at most
/// [`MAX_PATH`]. Path segments are held to the name's characters, stricter than IAM's
/// printable ASCII.
fn valid_path_name(path_name: &str, max_name: usize) -> bool {
    let (path, name) = match path_name.rsplit_once('/') {
        Some((path, name)) => (Some(path), name),
        None => (None, path_name),
    };
    let path_ok =
        path.is_none_or(|path| path.len() + 2 <= MAX_PATH && path.split('/').all(valid_segment));
    path_ok && name.len() <= max_name && valid_segment(name)
}

/// Resolves a role annotation against an optional base ARN (`arn:aws:iam::123456789012:role/`).
pub fn resolve_role(annotation: &str, base_arn: Option<&str>) -> Result<Role, RoleError> {
    let annotation = annotation.trim();
    if annotation.starts_with("arn:") {
        let (_, path_name) =
            parse_role_arn(annotation).ok_or_else(|| RoleError::MalformedArn(annotation.into()))?;
        let under_base = base_arn
            .and_then(|base| annotation.strip_prefix(base))
            .map(str::to_string);
        return Ok(Role {
            arn: annotation.to_string(),
            under_base,
            name: last_segment(path_name),
        });
    }
    // `/team/app` spells the path with IAM's leading slash; one slash, not several.
    let path_name = annotation.strip_prefix('/').unwrap_or(annotation);
    if !valid_path_name(path_name, MAX_ROLE_NAME) {
        return Err(RoleError::MalformedName(annotation.into()));
    }
    let base = base_arn.ok_or_else(|| RoleError::NoBaseArn(annotation.into()))?;
    Ok(Role {
        arn: format!("{base}{path_name}"),
        under_base: Some(path_name.to_string()),
        name: last_segment(path_name),
    })
}

fn last_segment(path_name: &str) -> String {
    path_name
        .rsplit('/')
        .next()
        .unwrap_or(path_name)
        .to_string()
}

/// The outcome of checking a role against its namespace's rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Permitted,
    /// The namespace has no (or an empty) permitted annotation.
    NothingPermitted,
    /// The namespace's regex does not compile.
    InvalidRegex {
        source: String,
        error: String,
    },
    /// The regex does not match the role.
    NotMatched {
        source: String,
    },
}

/// Whether `rule` permits `role`.
pub fn check(rule: &Permitted, role: &Role) -> Verdict {
    match rule {
        Permitted::Nothing => Verdict::NothingPermitted,
        Permitted::Invalid { source, error } => Verdict::InvalidRegex {
            source: source.clone(),
            error: error.clone(),
        },
        Permitted::Regex { source, regex } => {
            let matched = regex.is_match(&role.arn)
                || role
                    .under_base
                    .as_deref()
                    .is_some_and(|p| regex.is_match(p));
            if matched {
                Verdict::Permitted
            } else {
                Verdict::NotMatched {
                    source: source.clone(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    /// A role name one character over IAM's 64.
    static NAME_65: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| "n".repeat(65));
    /// A path one character over IAM's 512 (slashes included), then a name.
    static PATH_513: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("{}/{}/app", "p".repeat(255), "q".repeat(255)));

    #[test]
    fn names_and_paths_at_iams_limits_resolve() {
        let name = "n".repeat(64);
        let role = resolve_role(&name, Some(BASE)).expect("64 characters");
        assert_eq!(role.name, name);
        // "/" + 255 + "/" + 254 + "/" is 512.
        let path_name = format!("{}/{}/app", "p".repeat(255), "q".repeat(254));
        let role = resolve_role(&path_name, Some(BASE)).expect("a 512-character path");
        assert_eq!(role.under_base.as_deref(), Some(path_name.as_str()));
        for fine in ["a.b", "..a", "a..", ".a", "a_b+c=d,e@f-g", "team-b/app.v2"] {
            assert!(resolve_role(fine, Some(BASE)).is_ok(), "{fine:?}");
        }
    }

    #[test]
    fn dot_segments_never_escape_a_permitted_path() {
        let rule = Permitted::compile(Some("team-b/.*"));
        for annotation in [
            "team-b/../admin",
            "team-b/./admin",
            "team-b/../../admin",
            "/team-b/../admin",
            "arn:aws:iam::123456789012:role/team-b/../admin",
        ] {
            assert!(
                resolve_role(annotation, Some(BASE)).is_err(),
                "{annotation:?} must not resolve"
            );
        }
        let fine = resolve_role("team-b/app", Some(BASE)).expect("resolves");
        assert_eq!(check(&rule, &fine), Verdict::Permitted);
    }

    #[test]
    fn resolves_names_paths_and_arns() {
        /// (annotation, base ARN, Ok((arn, path under base, name)) or Err(()) for "refused")
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            Result<(&'a str, Option<&'a str>, &'a str), ()>,
        );
        let cases: &[Case] = &[
            (
                "app-reader",
                Some(BASE),
                Ok((
                    "arn:aws:iam::123456789012:role/app-reader",
                    Some("app-reader"),
                    "app-reader",
                )),
            ),
            (
                "/app-reader",
                Some(BASE),
                Ok((
                    "arn:aws:iam::123456789012:role/app-reader",
                    Some("app-reader"),
                    "app-reader",
                )),
            ),
            (
                "team/app",
                Some(BASE),
                Ok((
                    "arn:aws:iam::123456789012:role/team/app",
                    Some("team/app"),
                    "app",
                )),
            ),
            (
                "arn:aws:iam::123456789012:role/team/app",
                Some(BASE),
                Ok((
                    "arn:aws:iam::123456789012:role/team/app",
                    Some("team/app"),
                    "app",
                )),
            ),
            (
                "arn:aws:iam::999999999999:role/other",
                Some(BASE),
                Ok(("arn:aws:iam::999999999999:role/other", None, "other")),
            ),
            (
                "arn:aws:iam::123456789012:role/x",
                None,
                Ok(("arn:aws:iam::123456789012:role/x", None, "x")),
            ),
            ("app-reader", None, Err(())),
            ("arn:aws:s3:::bucket", Some(BASE), Err(())),
            ("arn:aws:iam::123:role/x", Some(BASE), Err(())),
            ("bad name", Some(BASE), Err(())),
            ("a//b", Some(BASE), Err(())),
            ("", Some(BASE), Err(())),
            // Dot segments never reach an ARN: `team-b/../admin` is not `admin`, nor a role
            // under `team-b/`.
            ("team-b/../admin", Some(BASE), Err(())),
            ("team-b/./admin", Some(BASE), Err(())),
            ("../admin", Some(BASE), Err(())),
            ("./admin", Some(BASE), Err(())),
            ("team-b/..", Some(BASE), Err(())),
            ("team-b/.", Some(BASE), Err(())),
            ("..", Some(BASE), Err(())),
            (".", Some(BASE), Err(())),
            (
                "arn:aws:iam::123456789012:role/team-b/../admin",
                Some(BASE),
                Err(()),
            ),
            (
                "arn:aws:iam::123456789012:role/team-b/./admin",
                Some(BASE),
                Err(()),
            ),
            ("arn:aws:iam::123456789012:role/..", Some(BASE), Err(())),
            // Empty segments: a trailing slash, a doubled one, a path with no name.
            ("team-b/", Some(BASE), Err(())),
            ("/team-b//admin", Some(BASE), Err(())),
            ("//admin", Some(BASE), Err(())),
            ("/", Some(BASE), Err(())),
            ("arn:aws:iam::123456789012:role/", Some(BASE), Err(())),
            ("arn:aws:iam::123456789012:role//admin", Some(BASE), Err(())),
            (
                "arn:aws:iam::123456789012:role/team-b/",
                Some(BASE),
                Err(()),
            ),
            // Characters IAM names cannot hold (non-ASCII, invisible, encoded, blanks).
            ("t\u{e9}am/app", Some(BASE), Err(())),
            ("app\u{200b}", Some(BASE), Err(())),
            ("app%2e%2e", Some(BASE), Err(())),
            ("team b/app", Some(BASE), Err(())),
            ("team\tb/app", Some(BASE), Err(())),
            ("team\\b/app", Some(BASE), Err(())),
            // Names are 1 to 64 characters; a path is at most 512 with its slashes.
            (NAME_65.as_str(), Some(BASE), Err(())),
            (PATH_513.as_str(), Some(BASE), Err(())),
            // Partitions are aws or aws-something, lowercase.
            ("arn:AWS:iam::123456789012:role/x", Some(BASE), Err(())),
            ("arn:a/ws:iam::123456789012:role/x", Some(BASE), Err(())),
            (
                "arn:aws-\u{e9}:iam::123456789012:role/x",
                Some(BASE),
                Err(()),
            ),
        ];
        for (annotation, base, want) in cases {
            let got = resolve_role(annotation, *base);
            match (got, want) {
                (Ok(role), Ok((arn, under, name))) => {
                    assert_eq!(role.arn, *arn, "{annotation}");
                    assert_eq!(role.under_base.as_deref(), *under, "{annotation}");
                    assert_eq!(role.name, *name, "{annotation}");
                }
                (Err(_), Err(())) => {}
                (got, want) => panic!("{annotation:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn permitted_regex_matches_the_whole_role() {
        let cases: &[(Option<&str>, &str, bool)] = &[
            (Some("app-.*"), "app-reader", true),
            (Some("app-.*"), "my-app-reader", false),
            (Some("app"), "app-reader", false),
            // kiam's ^a|b$ would let "a-anything" and "anything-b" through.
            (Some("a|b"), "a", true),
            (Some("a|b"), "b", true),
            (Some("a|b"), "a-admin", false),
            (Some("a|b"), "admin-b", false),
            (Some(".*"), "anything", true),
            (Some(""), "app-reader", false),
            (Some("   "), "app-reader", false),
            (None, "app-reader", false),
            (Some("app-("), "app-reader", false),
            (Some("team/.*"), "team/app", true),
            (
                Some("arn:aws:iam::123456789012:role/app-.*"),
                "app-reader",
                true,
            ),
            (
                Some("arn:aws:iam::999999999999:role/.*"),
                "arn:aws:iam::999999999999:role/x",
                true,
            ),
            // A cross-account role is only matched by its full ARN, never by its name.
            (Some("x"), "arn:aws:iam::999999999999:role/x", false),
            (Some(".*"), "arn:aws:iam::999999999999:role/x", true),
            // The user's own anchors are harmless inside ^(?:…)$.
            (Some("^app-.*$"), "app-reader", true),
            (Some("^app-.*$"), "xapp-reader", false),
            // Case matters (IAM role names are case-insensitive for uniqueness, but the
            // annotation is taken literally); the regex can opt out.
            (Some("app-.*"), "App-reader", false),
            (Some("(?i)app-.*"), "App-reader", true),
            // An unescaped dot matches any character; an escaped one only a dot.
            (Some(r"app\.reader"), "app.reader", true),
            (Some(r"app\.reader"), "app-reader", false),
            // Paths: the regex sees path/name under the base ARN.
            (Some("team/.*"), "other/app", false),
            (Some("app-.*"), "team/app-reader", false),
            (Some("(team/)?app-.*"), "team/app-reader", true),
            // A full ARN annotation under the base ARN is matched by its path/name too.
            (
                Some("app-.*"),
                "arn:aws:iam::123456789012:role/app-reader",
                true,
            ),
            // A prefix of the account is not the account.
            (
                Some("arn:aws:iam::12345678901.*"),
                "arn:aws:iam::999999999999:role/x",
                false,
            ),
            // Alternation of full ARNs, each whole.
            (
                Some("arn:aws:iam::999999999999:role/x|app-.*"),
                "arn:aws:iam::999999999999:role/x-admin",
                false,
            ),
        ];
        for (annotation, role, want) in cases {
            let rule = Permitted::compile(*annotation);
            let role = resolve_role(role, Some(BASE)).expect("test roles resolve");
            let verdict = check(&rule, &role);
            assert_eq!(
                verdict == Verdict::Permitted,
                *want,
                "{annotation:?} vs {role:?}: {verdict:?}"
            );
        }
    }

    #[test]
    fn an_invalid_regex_is_reported_as_such() {
        let rule = Permitted::compile(Some("app-("));
        let role = resolve_role("app-reader", Some(BASE)).expect("resolves");
        match check(&rule, &role) {
            Verdict::InvalidRegex { source, error } => {
                assert_eq!(source, "app-(");
                assert!(!error.is_empty() && !error.contains('\n'), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_regexes_permit_nothing() {
        let long = "a".repeat(MAX_REGEX_LEN + 1);
        assert!(matches!(
            Permitted::compile(Some(&long)),
            Permitted::Invalid { error, .. } if error.contains("at most")
        ));
        // Short to write, huge to compile: a counted repetition of a Unicode class.
        let explosive = r"(\w{100}){100}";
        assert!(matches!(
            Permitted::compile(Some(explosive)),
            Permitted::Invalid { .. }
        ));
    }

    #[test]
    fn base_arns_come_from_instance_profiles() {
        let cases = [
            (
                "arn:aws:iam::123456789012:instance-profile/nodes.k8s.local",
                Some("arn:aws:iam::123456789012:role/"),
            ),
            (
                "arn:aws-cn:iam::123456789012:instance-profile/team/nodes",
                Some("arn:aws-cn:iam::123456789012:role/"),
            ),
            ("arn:aws:iam::123456789012:role/nodes", None),
            ("arn:aws:iam::1234:instance-profile/nodes", None),
            ("arn:aws:iam::123456789012:instance-profile/", None),
            ("nonsense", None),
        ];
        for (profile, want) in cases {
            assert_eq!(
                base_arn_of_instance_profile(profile).as_deref(),
                want,
                "{profile}"
            );
        }
    }

    #[test]
    fn base_arns_are_checked() {
        assert!(valid_base_arn("arn:aws:iam::123456789012:role/"));
        assert!(valid_base_arn("arn:aws:iam::123456789012:role/team/"));
        assert!(!valid_base_arn("arn:aws:iam::123456789012:role"));
        assert!(!valid_base_arn("arn:aws:iam::12345:role/"));
        assert!(!valid_base_arn("nonsense/"));
    }
}
