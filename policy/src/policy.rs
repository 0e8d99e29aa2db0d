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
//! - Rules are compiled ASCII-only, since ARNs are ASCII (role resolution refuses anything
//!   else): `\w` is `[0-9A-Za-z_]`, `\d` `[0-9]`, `\s` ASCII blanks, `(?i)` folds ASCII case,
//!   `.` any byte but a newline, so every rule decides every role as Unicode matching would.
//!   Compiled with Unicode classes, `\w{20}|n1` took 1.1 MiB (and as much again of match
//!   cache per thread); ASCII-only it takes 7 KiB. A pattern with non-ASCII text, or that asks
//!   for Unicode classes back with `(?u)`, is invalid. A rule compiling to more than
//!   [`MAX_COMPILED_RULE`] is invalid too, and all rules together share a budget kept by the
//!   namespace index (`index::COMPILED_RULES_BUDGET`).

use regex_automata::meta;
use regex_automata::nfa::thompson::WhichCaptures;
use regex_syntax::hir::{Class, Hir, HirKind, Look};

/// The annotation on a pod naming its role.
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// The optional annotation on a pod carrying the STS external ID.
pub const EXTERNAL_ID_ANNOTATION: &str = "iam.amazonaws.com/external-id";
/// The optional annotation on a pod naming its STS session.
pub const SESSION_NAME_ANNOTATION: &str = "iam.amazonaws.com/session-name";
/// The annotation on a namespace holding the permitted-roles regex.
pub const PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";
/// The annotation on a namespace naming the role of its pods that have neither a role of
/// their own nor one from their ServiceAccount.
pub const DEFAULT_ROLE_ANNOTATION: &str = "iam.amazonaws.com/default-role";

/// The label on a namespace that opts it into the container-credentials endpoint: the
/// admission webhook gives its pods their token and the SDKs' variables when it is
/// `enabled` or [`TOKEN_REQUIRED`].
pub const POD_IDENTITY_LABEL: &str = "podiam.io/pod-identity";
/// The value of [`POD_IDENTITY_LABEL`] that opts a namespace in.
pub const POD_IDENTITY_ENABLED: &str = "enabled";
/// The value of [`POD_IDENTITY_LABEL`] that also keeps the namespace's pods' roles off the
/// metadata endpoint: given only with the pod's token, never by its address alone.
pub const TOKEN_REQUIRED: &str = "required";

/// kube2iam's namespace annotation (a JSON list of roles or globs). podiam does not read it;
/// a namespace that has it and no [`PERMITTED_ANNOTATION`] is told so in its refusals.
pub const KUBE2IAM_ALLOWED_ROLES_ANNOTATION: &str = "iam.amazonaws.com/allowed-roles";

/// The longest permitted-roles regex accepted, in bytes.
pub const MAX_REGEX_LEN: usize = 4096;
/// The most memory one compiled rule may take (its automata, as the regex engine counts
/// them): 128 KiB. The longest plain rule, 4096 characters listing some 80 full role ARNs,
/// compiles to 80 KiB; `(app|web|db)-[a-z0-9-]{1,40}` to 20 KiB; `\w{20}|n1` to 7 KiB. What
/// goes over is a counted repetition of a repetition (`(\w{100}){100}`: 1.1 MiB).
pub const MAX_COMPILED_RULE: usize = 128 << 10;
/// What one compiled rule holds besides its automata, as measured: 1000 rules of 7 KiB
/// reported took 15 KiB each of resident memory (the regex's shared parts, its cache pool,
/// allocator rounding). The budget counts it per rule.
const RULE_OVERHEAD: usize = 8 << 10;
/// The most a rule's lazy DFA may cache per matching thread. An ARN is at most 2048 bytes and
/// an ASCII rule's states are small, so a match rarely needs more than a few KiB; a full
/// cache is cleared and reused (regex's default, 2 MiB per rule per thread, is what made
/// Unicode rules cost as much again once matched).
const RULE_MATCH_CACHE: usize = 64 << 10;
/// How large the automata of one rule may grow while it is being compiled, before it is
/// given up: building an NFA goes through larger intermediate forms than the one it keeps
/// (the 4096-character list of ARNs passes 128 KiB on the way to its 80), and the limit
/// also bounds the time a hostile pattern can cost.
const COMPILING_LIMIT: usize = 4 * MAX_COMPILED_RULE;

/// A namespace's permitted-roles rule, compiled once per annotation value.
#[derive(Clone, Debug)]
pub enum Permitted {
    /// No annotation, or an empty one: nothing is permitted.
    Nothing,
    /// The annotation does not compile, or is over a limit: nothing is permitted, and we say
    /// why.
    Invalid { source: String, error: String },
    /// A compiled, whole-match regex and the text it came from.
    Regex { source: String, regex: meta::Regex },
}

impl Permitted {
    /// Compiles the annotation value (or its absence) into a rule. A regex longer than
    /// [`MAX_REGEX_LEN`], with non-ASCII text or Unicode classes, or compiling to more than
    /// [`MAX_COMPILED_RULE`] is invalid: one namespace's annotation must not be able to
    /// exhaust the server's memory.
    pub fn compile(annotation: Option<&str>) -> Permitted {
        let source = match annotation.map(str::trim) {
            None | Some("") => return Permitted::Nothing,
            Some(s) => s,
        };
        match compile_rule(source) {
            Ok(regex) => Permitted::Regex {
                source: source.to_string(),
                regex,
            },
            Err(error) => Permitted::Invalid {
                source: source.to_string(),
                error,
            },
        }
    }

    /// The memory this rule holds, as the namespace index's budget counts it: a compiled
    /// regex's automata, its text and [`RULE_OVERHEAD`]; nothing for the others.
    pub fn cost(&self) -> usize {
        match self {
            Permitted::Regex { source, regex } => {
                regex.memory_usage() + source.len() + RULE_OVERHEAD
            }
            Permitted::Nothing | Permitted::Invalid { .. } => 0,
        }
    }
}

/// The regex crate's errors span several lines; one line is enough in a reply.
fn one_line(error: impl std::fmt::Display) -> String {
    error
        .to_string()
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string()
}

/// `source` compiled to match whole ASCII haystacks, within [`MAX_COMPILED_RULE`].
fn compile_rule(source: &str) -> Result<meta::Regex, String> {
    if source.len() > MAX_REGEX_LEN {
        return Err(format!(
            "{} characters long; at most {MAX_REGEX_LEN} are accepted",
            source.len()
        ));
    }
    if !source.is_ascii() {
        return Err("it contains non-ASCII characters, which no role ARN has".into());
    }
    // Without Unicode, and matching bytes (`.` is then any byte but a newline, which a
    // Unicode-less `Regex` over `str` would refuse); ARNs are ASCII, so nothing differs.
    let hir = regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .build()
        .parse(source)
        .map_err(one_line)?;
    if uses_unicode(&hir) {
        return Err("(?u) asks for Unicode classes, which no role ARN needs".into());
    }
    // The whole haystack, whatever `source` says: `^(?:…)$` built from the parsed pattern,
    // not from text, so an unbalanced `a)|(b` cannot turn it into "starts with a".
    let whole = Hir::concat(vec![Hir::look(Look::Start), hir, Hir::look(Look::End)]);
    let config = meta::Config::new()
        .which_captures(WhichCaptures::None)
        .nfa_size_limit(Some(COMPILING_LIMIT))
        .onepass_size_limit(Some(MAX_COMPILED_RULE))
        .dfa_size_limit(Some(MAX_COMPILED_RULE))
        .hybrid_cache_capacity(RULE_MATCH_CACHE);
    let regex = meta::Builder::new()
        .configure(config)
        .build_from_hir(&whole)
        .map_err(|e| {
            if e.size_limit().is_some() {
                format!(
                    "it compiles to more than {} KiB; at most that is accepted",
                    MAX_COMPILED_RULE >> 10
                )
            } else {
                one_line(e)
            }
        })?;
    if regex.memory_usage() > MAX_COMPILED_RULE {
        return Err(format!(
            "it compiles to {} KiB; at most {} KiB are accepted",
            regex.memory_usage().div_ceil(1024),
            MAX_COMPILED_RULE >> 10
        ));
    }
    Ok(regex)
}

/// Whether a parsed pattern has classes with non-ASCII members, or Unicode word boundaries:
/// what only `(?u)` brings back. (Classes of ASCII characters may come out as Unicode
/// classes: `a|b` is made `[ab]`.)
fn uses_unicode(hir: &Hir) -> bool {
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => class.ranges().iter().any(|r| !r.end().is_ascii()),
        HirKind::Look(look) => matches!(
            look,
            Look::WordUnicode
                | Look::WordUnicodeNegate
                | Look::WordStartUnicode
                | Look::WordEndUnicode
                | Look::WordStartHalfUnicode
                | Look::WordEndHalfUnicode
        ),
        HirKind::Repetition(repetition) => uses_unicode(&repetition.sub),
        HirKind::Capture(capture) => uses_unicode(&capture.sub),
        HirKind::Concat(all) | HirKind::Alternation(all) => all.iter().any(uses_unicode),
        HirKind::Empty | HirKind::Literal(_) | HirKind::Class(Class::Bytes(_)) => false,
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

/// Why a role annotation could not be resolved. Each quotes the annotation, cut to its first
/// [`QUOTED`] characters: the text is a tenant's (up to 256 KiB), and the message is kept for
/// every pod it applies to, sent to agents and answered to the pods.
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

/// How much of a refused annotation its error quotes, in characters.
pub const QUOTED: usize = 64;

/// `text` as an error quotes it: whole up to [`QUOTED`] characters, else its beginning, `…`
/// and its length.
pub fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTED) {
        None => text.to_string(),
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
    }
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

/// Longest partition taken: AWS's are a dozen characters at most.
const MAX_PARTITION: usize = 32;

/// AWS partitions: `aws`, and `aws-` with lowercase letters, digits and dashes (`aws-cn`,
/// `aws-us-gov`, `aws-iso-b`…), [`MAX_PARTITION`] characters at most.
fn valid_partition(partition: &str) -> bool {
    partition == "aws"
        || partition.strip_prefix("aws-").is_some_and(|rest| {
            !rest.is_empty()
                && partition.len() <= MAX_PARTITION
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
        let (_, path_name) = parse_role_arn(annotation)
            .ok_or_else(|| RoleError::MalformedArn(quoted(annotation)))?;
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
        return Err(RoleError::MalformedName(quoted(annotation)));
    }
    let base = base_arn.ok_or_else(|| RoleError::NoBaseArn(quoted(annotation)))?;
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
            // A tenant's annotation may be 256 KiB, and a verdict is made for every pod of
            // the namespace at every pass: one longer than any rule is quoted, not copied.
            source: if source.len() > MAX_REGEX_LEN {
                quoted(source)
            } else {
                source.clone()
            },
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
    fn a_refused_role_is_quoted_short() {
        assert_eq!(quoted("short"), "short");
        let exactly = "r".repeat(QUOTED);
        assert_eq!(quoted(&exactly), exactly);
        let long = "é".repeat(QUOTED + 1);
        assert_eq!(
            quoted(&long),
            format!("{}… ({} bytes)", "é".repeat(QUOTED), long.len())
        );
        let huge = "\u{1}".repeat(256 << 10);
        for annotation in [
            huge.clone(),
            format!("arn:aws:iam::123456789012:role/{huge}"),
        ] {
            let refused = resolve_role(&annotation, None).expect_err("not a role");
            assert!(refused.to_string().len() < 1024, "{refused}");
        }
        let partition = format!("aws-{}", "a".repeat(MAX_PARTITION - 3));
        assert!(resolve_role(&format!("arn:{partition}:iam::123456789012:role/r"), None).is_err());
        let partition = &partition[..MAX_PARTITION];
        assert!(resolve_role(&format!("arn:{partition}:iam::123456789012:role/r"), None).is_ok());
    }

    #[test]
    fn names_and_paths_at_iams_limits_resolve() {
        let name = "n".repeat(64);
        let role = resolve_role(&name, Some(BASE)).expect("64 characters");
        assert!(podiam_proto::valid_role_name(&role.name));
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
                    // What the agent and the server accept as a role name on the wire.
                    assert!(podiam_proto::valid_role_name(&role.name), "{annotation}");
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
            // So does a leading wildcard (docs/security.md); `[^:]*` keeps to the base ARN.
            (
                Some(".*-reader"),
                "arn:aws:iam::999999999999:role/x-reader",
                true,
            ),
            (
                Some("[^:]*-reader"),
                "arn:aws:iam::999999999999:role/x-reader",
                false,
            ),
            (Some("[^:]*-reader"), "team/x-reader", true),
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
        // A tenant's 256 KiB annotation is quoted in each verdict, not copied whole.
        let huge = format!("app-({}", "x".repeat(256 * 1024));
        match check(&Permitted::compile(Some(&huge)), &role) {
            Verdict::InvalidRegex { source, .. } => assert!(source.len() < 200, "{source}"),
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
        // Short to write, huge to compile: counted repetitions of a counted repetition.
        for explosive in [r"(\w{100}){100}", r"(.{1,64}){64}"] {
            assert!(
                matches!(
                    Permitted::compile(Some(explosive)),
                    Permitted::Invalid { ref error, .. } if error.contains("KiB")
                ),
                "{explosive}"
            );
        }
    }

    #[test]
    fn rules_are_ascii_only_and_small() {
        // (pattern, valid, the role it is tried on, permitted)
        let cases: &[(&str, bool, &str, bool)] = &[
            // ASCII classes decide ASCII roles as Unicode ones would.
            (r"\w{20}|n1", true, "n1", true),
            (r"\w{20}|n1", true, "abcdefghijklmnopqrst", true),
            (r"\w{20}|n1", true, "abcdefghijklmnopqrs-", false),
            (r"app-\d+", true, "app-42", true),
            (r"(?i)APP-.*", true, "app-reader", true),
            (r"team/.+", true, "team/app", true),
            (r"[^/]+", true, "team/app", false),
            (r"\bapp\b.*", true, "app-reader", true),
            // (?u) over ASCII only changes nothing, and is accepted.
            (r"(?u)[a-z]+-reader", true, "app-reader", true),
            // Unicode asked back, or non-ASCII text: invalid.
            (r"(?u:\w{20})|n1", false, "n1", false),
            (r"(?u)\w+", false, "app", false),
            (r"(?u)\bapp.*", false, "app-reader", false),
            (r"(?u:\pL)+", false, "app", false),
            (r"(?ui)k8s-.*", false, "k8s-app", false),
            (r"\pL+", false, "app", false),
            ("caf\u{e9}-.*", false, "app", false),
            ("app-\u{200b}.*", false, "app-reader", false),
            // A byte that is not ASCII compiles, and matches no ARN.
            (r"app-\xE9|app-reader", true, "app-reader", true),
            // The whole role, even for a pattern that would close the group itself.
            (r"app)|(.*", false, "anything", false),
            (r"app-.*)|(?:x", false, "app-reader", false),
        ];
        for (pattern, valid, role, permitted) in cases {
            let rule = Permitted::compile(Some(pattern));
            assert_eq!(
                matches!(rule, Permitted::Regex { .. }),
                *valid,
                "{pattern:?}: {rule:?}"
            );
            let role = resolve_role(role, Some(BASE)).expect("test roles resolve");
            assert_eq!(
                check(&rule, &role) == Verdict::Permitted,
                *permitted,
                "{pattern:?} vs {role:?}"
            );
        }
        let error = |pattern: &str| match Permitted::compile(Some(pattern)) {
            Permitted::Invalid { error, .. } => error,
            other => panic!("{pattern:?}: {other:?}"),
        };
        assert!(error(r"(?u)\w").contains("Unicode"), "{}", error(r"(?u)\w"));
        assert!(error("caf\u{e9}").contains("non-ASCII"));

        // What issue 13 measured at 1.2 MiB a rule.
        let small = Permitted::compile(Some(r"\w{20}|n1"));
        assert!(small.cost() < 24 << 10, "{}", small.cost());
        // The longest plain rule there is: 4096 characters of full ARNs.
        let mut arns = String::new();
        for i in 0.. {
            let arn = format!("arn:aws:iam::123456789012:role/team-{i}/app-reader");
            if arns.len() + arn.len() + 1 > MAX_REGEX_LEN {
                break;
            }
            if !arns.is_empty() {
                arns.push('|');
            }
            arns.push_str(&arn);
        }
        let long = Permitted::compile(Some(&arns));
        assert!(matches!(long, Permitted::Regex { .. }), "{long:?}");
        assert!(long.cost() < MAX_COMPILED_RULE + RULE_OVERHEAD + MAX_REGEX_LEN);
        let role = resolve_role("team-3/app-reader", Some(BASE)).expect("resolves");
        assert_eq!(check(&long, &role), Verdict::Permitted);
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
