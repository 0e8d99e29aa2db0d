//! `grant`, `revoke` and `permit`: podiam's annotations, set as `kubectl annotate` would
//! (a JSON merge patch of one key), after the checks the servers would make anyway.
//!
//! - `grant` refuses a role the servers could never resolve ([`policy::resolve_role`]), and
//!   warns — but grants — when the namespace does not permit the role ([`policy::check`]):
//!   the namespace may be about to permit it.
//! - `permit` refuses a regex the servers would treat as invalid, by compiling it exactly as
//!   they do ([`Permitted::compile`]: `^(?:…)$`, with their size limits).

use podiam_policy::policy::{
    self, PERMITTED_ANNOTATION, Permitted, ROLE_ANNOTATION, Role, Verdict,
};

use crate::base_arn::{self, BaseArn};
use crate::cli::{GrantArgs, NAMESPACE_KINDS, POD_KINDS, PermitArgs, RevokeArgs, object_name};
use crate::cluster::{Cluster, annotation};
use crate::error::Error;
use crate::table::Escaped;

/// Why `verdict` refuses `role`, in the servers' words; `None` when it permits it.
pub fn refusal(verdict: &Verdict) -> Option<String> {
    match verdict {
        Verdict::Permitted => None,
        Verdict::NothingPermitted => Some(format!("it has no {PERMITTED_ANNOTATION} annotation")),
        Verdict::InvalidRegex { source, error } => Some(format!(
            "its permitted regex {source:?} is invalid ({error})"
        )),
        Verdict::NotMatched { source } => Some(format!("the role does not match {source:?}")),
    }
}

/// `grant POD ROLE`.
pub async fn grant(
    cluster: &Cluster,
    podiam_namespace: &str,
    args: &GrantArgs,
) -> Result<(), Error> {
    let name = object_name(&args.pod, POD_KINDS).map_err(Error::Usage)?;
    let namespace = cluster.namespace.as_str();
    let role = args.role.trim();
    // The base ARN matters only for a role given by name or path.
    let base = if role.starts_with("arn:") && args.base.base_role_arn.is_none() {
        BaseArn::Unknown("not needed".into())
    } else {
        base_arn::discover(
            cluster,
            podiam_namespace,
            args.base.base_role_arn.as_deref(),
        )
        .await?
    };
    let resolved = policy::resolve_role(role, Some(base.for_deciding())).map_err(|error| {
        Error::Refused(format!("{error}; pod {namespace}/{name} was not changed"))
    })?;
    let pod = cluster
        .annotate_pod(namespace, name, ROLE_ANNOTATION, Some(role))
        .await?;
    println!("pod {namespace}/{name}: role {role} granted");
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        eprintln!(
            "warning: pod {namespace}/{name} uses the host network: podiam never gives such a \
             pod a role"
        );
    }
    warn_unless_permitted(cluster, namespace, &resolved, &base).await;
    Ok(())
}

/// Warns on stderr when `namespace` does not permit `role`.
async fn warn_unless_permitted(cluster: &Cluster, namespace: &str, role: &Role, base: &BaseArn) {
    let ns = match cluster.namespace(namespace).await {
        Ok(ns) => ns,
        Err(error) => {
            eprintln!(
                "warning: whether namespace {namespace} permits the role is unknown: {}",
                error.one_line()
            );
            return;
        }
    };
    let rule = Permitted::compile(
        ns.as_ref()
            .and_then(|ns| annotation(&ns.metadata, PERMITTED_ANNOTATION)),
    );
    let Some(why) = refusal(&policy::check(&rule, role)) else {
        return;
    };
    let role_name = role.under_base.as_deref().unwrap_or(&role.arn);
    eprintln!(
        "warning: namespace {namespace} does not permit role {role_name}: {why}; the pod gets \
         no credentials until it does (kubectl iam permit {namespace} REGEX)"
    );
    if let Some(note) = base.note_for(role_name) {
        eprintln!("warning: {note}");
    }
}

/// `revoke POD`.
pub async fn revoke(cluster: &Cluster, args: &RevokeArgs) -> Result<(), Error> {
    let name = object_name(&args.pod, POD_KINDS).map_err(Error::Usage)?;
    let namespace = cluster.namespace.as_str();
    let pod = cluster
        .pod(namespace, name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("pod {namespace}/{name}")))?;
    let Some(role) = annotation(&pod.metadata, ROLE_ANNOTATION).map(str::to_string) else {
        println!("pod {namespace}/{name} has no role: nothing to revoke");
        return Ok(());
    };
    cluster
        .annotate_pod(namespace, name, ROLE_ANNOTATION, None)
        .await?;
    // The annotation is the pod's namespace's tenants': printed safe for a terminal.
    let role = Escaped(&role);
    println!("pod {namespace}/{name}: role {role} revoked");
    Ok(())
}

/// Why `regex` cannot be a namespace's permitted regex, if it cannot.
pub fn check_regex(regex: &str) -> Result<(), String> {
    match Permitted::compile(Some(regex)) {
        Permitted::Regex { .. } => Ok(()),
        Permitted::Nothing => Err("an empty regex permits nothing".into()),
        Permitted::Invalid { error, .. } => Err(format!(
            "regex {:?} is invalid ({error}): the servers would permit nothing with it",
            regex.trim()
        )),
    }
}

/// `permit NAMESPACE REGEX`.
pub async fn permit(cluster: &Cluster, args: &PermitArgs) -> Result<(), Error> {
    let namespace = object_name(&args.namespace, NAMESPACE_KINDS).map_err(Error::Usage)?;
    check_regex(&args.regex)
        .map_err(|why| Error::Refused(format!("{why}; namespace {namespace} was not changed")))?;
    let regex = args.regex.trim();
    cluster
        .annotate_namespace(namespace, PERMITTED_ANNOTATION, Some(regex))
        .await?;
    println!(
        "namespace {namespace}: roles matching {regex:?} permitted (the whole role must match)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes_are_refused_by_the_servers_rules() {
        assert!(check_regex("app-.*").is_ok());
        assert!(check_regex("a|b").is_ok());
        assert!(check_regex(" (?i)app-.* ").is_ok());
        let invalid = check_regex("app-(").expect_err("unclosed group");
        assert!(invalid.contains("invalid"), "{invalid}");
        assert!(!invalid.contains('\n'), "{invalid}");
        assert!(check_regex("").is_err());
        assert!(check_regex("   ").is_err());
        // The servers' size limit.
        let long = "a".repeat(policy::MAX_REGEX_LEN + 1);
        assert!(check_regex(&long).is_err());
    }

    #[test]
    fn refusals_say_why() {
        let role = policy::resolve_role("db-admin", Some("arn:aws:iam::123456789012:role/"))
            .expect("a role");
        let why = |annotation: Option<&str>| {
            refusal(&policy::check(&Permitted::compile(annotation), &role))
        };
        assert_eq!(why(Some("db-.*")), None);
        assert_eq!(
            why(Some("app-.*")).as_deref(),
            Some("the role does not match \"app-.*\"")
        );
        assert_eq!(
            why(None).as_deref(),
            Some("it has no iam.amazonaws.com/permitted annotation")
        );
        assert!(why(Some("(")).is_some_and(|w| w.contains("invalid")));
    }
}
