//! `kubectl iam migrate`: what each namespace's kube2iam or kiam policy becomes under podiam.
//!
//! - kube2iam's `iam.amazonaws.com/allowed-roles` is a JSON list of globs (its default,
//!   `--namespace-restriction-format=glob`: `*` matches anything) or of regexes
//!   (`=regexp`). kube2iam put its base role ARN in front of every entry that is not an ARN
//!   before matching, globs against the whole ARN, regexes anywhere in it: an entry `app-*`
//!   meant roles of its own account only. podiam reads only `iam.amazonaws.com/permitted`,
//!   one regex that must match the whole role ARN or the path/name under its base ARN: the
//!   list becomes an alternation of the entries. A glob's `*` becomes `[^:]*` in a name (a
//!   path/name has no `:`, so such an entry never matches another account's ARN) and `.*` in
//!   an ARN; everything else is literal. A regex `R` that is an ARN becomes `.*(?:R).*`;
//!   one that is not becomes the servers' base ARN followed by `(?:R).*`, so the base ARN
//!   must be known (`--base-role-arn`, or read from the server pods). Each regex is checked
//!   on its own first, so that one cannot close the group around it.
//! - kiam's `iam.amazonaws.com/permitted` is the same annotation, but kiam compiled it as
//!   `^REGEX$`, so a top-level `|` split it: `a|b` matched what starts with `a` or ends with
//!   `b`. Such a regex is reported with what it meant to kiam; nothing is written for it, as
//!   the whole-role reading is usually what its author meant.
//!
//! `--write` writes the converted `permitted` of namespaces that have `allowed-roles` and no
//! `permitted` yet (the servers' own check first), and nothing else.

use k8s_openapi::api::core::v1::Namespace;
use podiam_policy::policy::{KUBE2IAM_ALLOWED_ROLES_ANNOTATION, PERMITTED_ANNOTATION};
use serde_json::json;

use crate::annotate::check_regex;
use crate::base_arn::{self, BaseArn};
use crate::cli::{Kube2iamFormat, MigrateArgs, Output};
use crate::cluster::{AsRead, Cluster, annotation};
use crate::error::Error;
use crate::table::{Escaped, json_text};

/// What podiam makes of one namespace's old policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub namespace: String,
    /// What the namespace has: the kube2iam list, or the kiam-era regex.
    pub found: String,
    /// The `permitted` regex podiam needs (or has).
    pub permitted: String,
    /// What to do, or why nothing.
    pub note: String,
    /// Whether `--write` writes `permitted` for it.
    pub writable: bool,
    /// The namespace as it was read: `--write` writes only if it is unchanged since.
    pub resource_version: Option<String>,
}

/// `text` as a regex matching itself: the characters that mean something outside a class
/// escaped, the rest (`-`, `/`, `:`) left readable.
fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A kube2iam glob as a regex: everything literal but `*`, which is `.*` in an ARN and
/// `[^:]*` in a name under the base ARN (never reaching into another account's ARN).
fn glob_regex(glob: &str) -> String {
    let star = if glob.starts_with("arn:") {
        ".*"
    } else {
        "[^:]*"
    };
    glob.split('*').map(literal).collect::<Vec<_>>().join(star)
}

/// A kube2iam regex as a whole-role one: matched anywhere in an ARN, or after the base ARN
/// (`base`, needed) for a name.
fn regexp_regex(entry: &str, base: Option<&str>) -> Result<String, String> {
    check_regex(entry)?;
    if entry.starts_with("arn:") {
        return Ok(format!(".*(?:{entry}).*"));
    }
    match base {
        Some(base) => Ok(format!("{}(?:{entry}).*", literal(base))),
        None => Err(format!(
            "kube2iam matched {entry:?} after its base role ARN, which is not known here \
             (--base-role-arn)"
        )),
    }
}

/// kube2iam's `allowed-roles` value as one podiam regex, or why it cannot be. `base`: the
/// servers' base role ARN, if known (regexes that are not ARNs need it).
pub fn from_kube2iam(
    value: &str,
    format: Kube2iamFormat,
    base: Option<&str>,
) -> Result<String, String> {
    let entries: Vec<String> = serde_json::from_str(value).map_err(|e| {
        format!("{KUBE2IAM_ALLOWED_ROLES_ANNOTATION} is not a JSON list of strings ({e})")
    })?;
    let entries: Vec<String> = entries
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .map(|entry| match format {
            Kube2iamFormat::Glob => Ok(glob_regex(entry)),
            Kube2iamFormat::Regexp => regexp_regex(entry, base),
        })
        .collect::<Result<_, _>>()?;
    if entries.is_empty() {
        return Err(format!("{KUBE2IAM_ALLOWED_ROLES_ANNOTATION} lists no role"));
    }
    let regex = entries.join("|");
    check_regex(&regex)?;
    Ok(regex)
}

/// The top-level alternatives of `regex` (split at `|` outside groups, classes and escapes).
fn top_level_alternatives(regex: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut in_class, mut escaped, mut start) = (0usize, false, false, 0);
    for (i, c) in regex.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '[' if !in_class => in_class = true,
            ']' if in_class => in_class = false,
            '(' if !in_class => depth += 1,
            ')' if !in_class => depth = depth.saturating_sub(1),
            '|' if !in_class && depth == 0 => {
                parts.push(&regex[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&regex[start..]);
    parts
}

/// What kiam's `^REGEX$` matched, as a whole-role regex: `None` when it is the same.
pub fn kiam_meaning(regex: &str) -> Option<String> {
    let parts = top_level_alternatives(regex.trim());
    if parts.len() < 2 {
        return None;
    }
    let last = parts.len() - 1;
    let meaning: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, part)| match i {
            0 => format!("(?:{part}).*"),
            i if i == last => format!(".*(?:{part})"),
            _ => format!(".*(?:{part}).*"),
        })
        .collect();
    Some(meaning.join("|"))
}

/// The plan for one namespace, if it has an old policy to look at (`base`: the servers' base
/// role ARN, if known).
pub fn plan(namespace: &Namespace, format: Kube2iamFormat, base: Option<&str>) -> Option<Plan> {
    let name = namespace.metadata.name.clone()?;
    let resource_version = namespace.metadata.resource_version.clone();
    let permitted = annotation(&namespace.metadata, PERMITTED_ANNOTATION).map(str::trim);
    let allowed = annotation(&namespace.metadata, KUBE2IAM_ALLOWED_ROLES_ANNOTATION);
    match (permitted, allowed) {
        (Some(permitted), allowed) => {
            let found = match allowed {
                Some(list) => format!("{PERMITTED_ANNOTATION} {permitted:?} (and {list})"),
                None => format!("{PERMITTED_ANNOTATION} {permitted:?}"),
            };
            let note = match kiam_meaning(permitted) {
                Some(meaning) => format!(
                    "kiam read it as ^{permitted}$, which is {meaning:?} here; podiam matches the whole role. Change it only if you meant kiam's reading"
                ),
                None => "the same under podiam".to_string(),
            };
            Some(Plan {
                namespace: name,
                found,
                permitted: permitted.to_string(),
                note,
                writable: false,
                resource_version,
            })
        }
        (None, Some(list)) => Some(match from_kube2iam(list, format, base) {
            Ok(regex) => Plan {
                namespace: name,
                found: format!("{KUBE2IAM_ALLOWED_ROLES_ANNOTATION} {list}"),
                permitted: regex,
                note: "write it with --write (nothing is permitted until then)".to_string(),
                writable: true,
                resource_version,
            },
            Err(why) => Plan {
                namespace: name,
                found: format!("{KUBE2IAM_ALLOWED_ROLES_ANNOTATION} {list}"),
                permitted: String::new(),
                note: format!("{why}: write {PERMITTED_ANNOTATION} yourself"),
                writable: false,
                resource_version,
            },
        }),
        (None, None) => None,
    }
}

/// `migrate [--write]`.
pub async fn run(
    cluster: &Cluster,
    podiam_namespace: &str,
    args: &MigrateArgs,
) -> Result<(), Error> {
    // Only regexes need it: globs keep to the base ARN's account by themselves.
    let base = match args.kube2iam_format {
        Kube2iamFormat::Glob => None,
        Kube2iamFormat::Regexp => {
            match base_arn::discover(
                cluster,
                podiam_namespace,
                args.base.base_role_arn.as_deref(),
            )
            .await?
            {
                BaseArn::Known { arn, .. } => Some(arn),
                BaseArn::Unknown(_) => None,
            }
        }
    };
    let mut plans: Vec<Plan> = cluster
        .list_namespaces()
        .await?
        .iter()
        .filter_map(|ns| plan(ns, args.kube2iam_format, base.as_deref()))
        .collect();
    plans.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    let written = if args.write {
        write(cluster, &mut plans).await?
    } else {
        Vec::new()
    };
    match args.output {
        Output::Json => {
            let rows: Vec<_> = plans
                .iter()
                .map(|p| {
                    json!({
                        "namespace": p.namespace,
                        "found": p.found,
                        "permitted": p.permitted,
                        "note": p.note,
                        "written": written.contains(&p.namespace),
                    })
                })
                .collect();
            let report = json!({ "namespaces": rows });
            println!("{}", json_text(&report, false).map_err(Error::Json)?);
        }
        Output::Text => {
            if plans.is_empty() {
                println!(
                    "no namespace has {PERMITTED_ANNOTATION} or {KUBE2IAM_ALLOWED_ROLES_ANNOTATION}"
                );
            }
            for p in &plans {
                let state = if written.contains(&p.namespace) {
                    "written"
                } else {
                    &p.note
                };
                println!("{}:", p.namespace);
                println!("  found:     {}", Escaped(&p.found));
                println!("  permitted: {:?}", p.permitted);
                println!("  {}", Escaped(state));
            }
        }
    }
    none_changed(&plans)
}

/// An error naming the namespaces [`write`] found changed since they were read, if any.
fn none_changed(plans: &[Plan]) -> Result<(), Error> {
    let changed: Vec<&str> = plans
        .iter()
        .filter(|p| p.note == CHANGED)
        .map(|p| p.namespace.as_str())
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "not written, as they changed while migrate ran: {}; run it again",
        changed.join(", ")
    )))
}

/// The note of a namespace that changed between the list and the write.
pub const CHANGED: &str = "changed since it was read: not written (run migrate again)";

/// Writes the writable plans' `permitted`, each only if its namespace is as it was read (a
/// namespace that changed meanwhile, say someone wrote `permitted` or the list, is left
/// alone and its note says so); returns the namespaces written.
pub async fn write(cluster: &Cluster, plans: &mut [Plan]) -> Result<Vec<String>, Error> {
    let mut written = Vec::new();
    for plan in plans.iter_mut().filter(|p| p.writable) {
        let done = cluster
            .annotate_namespace_as_read(
                &plan.namespace,
                plan.resource_version.as_deref(),
                PERMITTED_ANNOTATION,
                &plan.permitted,
            )
            .await?;
        match done {
            AsRead::Written => written.push(plan.namespace.clone()),
            AsRead::Changed => plan.note = CHANGED.to_string(),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(regex: &str, role: &str) -> bool {
        regex::Regex::new(&format!("^(?:{regex})$"))
            .expect("compiles")
            .is_match(role)
    }

    #[test]
    fn namespaces_changed_since_they_were_read_fail_the_command_by_name() {
        let plan = |namespace: &str, note: &str| Plan {
            namespace: namespace.into(),
            found: String::new(),
            permitted: String::new(),
            note: note.into(),
            writable: true,
            resource_version: None,
        };
        assert!(none_changed(&[plan("a", "written"), plan("b", "the same under podiam")]).is_ok());
        let error = none_changed(&[plan("a", CHANGED), plan("b", "x"), plan("c", CHANGED)])
            .expect_err("changed");
        assert_eq!(error.exit_code(), 1);
        assert_eq!(
            error.to_string(),
            "not written, as they changed while migrate ran: a, c; run it again"
        );
    }

    #[test]
    fn kube2iam_globs_and_regexes_become_one_whole_role_regex() {
        let glob = from_kube2iam(
            r#"["app-reader", "team-a/*", "arn:aws:iam::1:role/x.y", "*-reader"]"#,
            Kube2iamFormat::Glob,
            None,
        )
        .expect("converts");
        assert_eq!(
            glob,
            r"app-reader|team-a/[^:]*|arn:aws:iam::1:role/x\.y|[^:]*-reader"
        );
        for (role, permitted) in [
            ("app-reader", true),
            ("app-reader2", false),
            ("team-a/anything/deep", true),
            ("arn:aws:iam::1:role/x.y", true),
            ("arn:aws:iam::1:role/xzy", false),
            ("db-reader", true),
            // kube2iam's `*-reader` meant its own account's roles, not another's.
            ("arn:aws:iam::999999999999:role/x-reader", false),
        ] {
            assert_eq!(matches(&glob, role), permitted, "{role}");
        }
        // As the servers judge it: another account's role is not permitted by a name glob.
        let rule = podiam_policy::policy::Permitted::compile(Some(&glob));
        let base = "arn:aws:iam::123456789012:role/";
        let role = |annotation: &str| {
            podiam_policy::policy::resolve_role(annotation, Some(base)).expect("a role")
        };
        use podiam_policy::policy::{Verdict, check};
        assert_eq!(check(&rule, &role("db-reader")), Verdict::Permitted);
        assert_ne!(
            check(&rule, &role("arn:aws:iam::999999999999:role/x-reader")),
            Verdict::Permitted
        );

        let regexp = from_kube2iam(r#"["app-", "reader$"]"#, Kube2iamFormat::Regexp, Some(base))
            .expect("converts");
        assert_eq!(
            regexp,
            r"arn:aws:iam::123456789012:role/(?:app-).*|arn:aws:iam::123456789012:role/(?:reader$).*"
        );
        for (role, permitted) in [
            ("arn:aws:iam::123456789012:role/app-x", true),
            ("arn:aws:iam::123456789012:role/reader", true),
            ("arn:aws:iam::123456789012:role/db-reader", false),
            ("arn:aws:iam::999999999999:role/app-x", false),
        ] {
            assert_eq!(matches(&regexp, role), permitted, "{role}");
        }
        // Without the base ARN a name regex cannot be converted; an ARN one can.
        assert!(from_kube2iam(r#"["app-"]"#, Kube2iamFormat::Regexp, None).is_err());
        assert_eq!(
            from_kube2iam(r#"["arn:aws:iam::1:role/a"]"#, Kube2iamFormat::Regexp, None),
            Ok(".*(?:arn:aws:iam::1:role/a).*".to_string())
        );
        assert!(from_kube2iam("app-reader", Kube2iamFormat::Glob, None).is_err());
        assert!(from_kube2iam("[]", Kube2iamFormat::Glob, None).is_err());
        assert!(from_kube2iam(r#"["("]"#, Kube2iamFormat::Regexp, Some(base)).is_err());
        // An entry cannot close the group around it.
        assert!(from_kube2iam(r#"["x)|(.*"]"#, Kube2iamFormat::Regexp, Some(base)).is_err());
    }

    #[test]
    fn kiams_unparenthesised_alternations_are_shown_for_what_they_matched() {
        assert_eq!(kiam_meaning("app-.*"), None);
        assert_eq!(kiam_meaning("(a|b)-x"), None);
        assert_eq!(kiam_meaning("[|]"), None);
        assert_eq!(kiam_meaning(r"a\|b"), None);
        let meaning = kiam_meaning("app-a|app-b").expect("differs");
        // kiam: ^app-a|app-b$, anything starting with app-a or ending with app-b.
        for (role, kiam) in [
            ("app-a", true),
            ("app-a-admin", true),
            ("x-app-b", true),
            ("app-c", false),
        ] {
            assert_eq!(matches(&meaning, role), kiam, "{role}");
        }
    }
}
