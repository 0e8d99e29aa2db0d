//! What the admission webhook reads of an AdmissionReview, and nothing more.
//!
//! The webhook's port answers anyone who reaches it, so a review's body is whatever its
//! sender likes, up to 3 MiB. It is read straight into these types, borrowing its strings
//! from the body: every field the webhook does not use is skipped unread, the annotations are
//! kept as their raw text until the one the webhook needs is looked up, and the lists of
//! volumes, environment variables and mounts are walked for the names the webhook looks for
//! without being kept. A review costs little more than its body, however it is made up (a
//! generic JSON tree costs up to about 16 times a body of small items), and the containers
//! the webhook would patch are counted before anything is built for them
//! ([`MAX_CONTAINERS`]).

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The name of the token volume the webhook adds.
pub const VOLUME: &str = "podiam-pod-token";
/// Where containers find it.
pub const MOUNT_PATH: &str = "/var/run/secrets/podiam.io/serviceaccount";

/// Most containers (init containers included) a pod the webhook patches may have: the patch
/// takes a few hundred bytes per container, so a review of a million empty containers (3
/// MiB) would otherwise be answered with a patch of gigabytes. Pods have a handful; one
/// beyond this is answered as a bad request and admitted unchanged (`failurePolicy:
/// Ignore`).
pub const MAX_CONTAINERS: usize = 1024;

/// The two variables the webhook sets in every container: the endpoint's URL and the token
/// file's path.
pub const VARIABLES: [&str; 2] = [
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
];

/// A string, borrowed from the body unless it has escapes.
#[derive(Deserialize)]
pub struct Text<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl Text<'_> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The text of an optional string field.
pub fn text<'s>(field: &'s Option<Text>) -> Option<&'s str> {
    field.as_ref().map(Text::as_str)
}

/// The types that hold a review's text (a pod's annotations and spec may carry secrets)
/// show none of it in their `Debug`: nothing of a review can reach a log that way.
macro_rules! opaque_debug {
    ($($type:ident),*) => {$(
        impl fmt::Debug for $type<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($type)).finish_non_exhaustive()
            }
        }
    )*};
}

opaque_debug!(Text, Review, Request, Kind, Pod, Metadata);

/// An AdmissionReview, as far as the webhook reads it.
#[derive(Deserialize)]
pub struct Review<'a> {
    #[serde(borrow)]
    pub request: Option<Request<'a>>,
}

/// Its `request`.
#[derive(Deserialize)]
pub struct Request<'a> {
    #[serde(borrow)]
    pub uid: Option<Text<'a>>,
    #[serde(borrow)]
    pub kind: Option<Kind<'a>>,
    #[serde(borrow)]
    pub operation: Option<Text<'a>>,
    #[serde(borrow)]
    pub namespace: Option<Text<'a>>,
    /// Read further only for a pod's creation ([`Pod`]).
    #[serde(borrow)]
    pub object: Option<&'a RawValue>,
}

/// The request's `kind`.
#[derive(Deserialize)]
pub struct Kind<'a> {
    #[serde(borrow)]
    pub group: Option<Text<'a>>,
    #[serde(borrow)]
    pub kind: Option<Text<'a>>,
}

/// The pod being created.
#[derive(Default, Deserialize)]
#[serde(default)]
pub struct Pod<'a> {
    #[serde(borrow)]
    pub metadata: Option<Metadata<'a>>,
    pub spec: Option<Spec>,
}

/// Its `metadata`.
#[derive(Default, Deserialize)]
#[serde(default)]
pub struct Metadata<'a> {
    #[serde(borrow)]
    pub namespace: Option<Text<'a>>,
    /// Kept as text: only one annotation is ever looked up ([`annotation`]).
    #[serde(borrow)]
    pub annotations: Option<&'a RawValue>,
}

/// Its `spec`: what the webhook needs to know of it, the lists already walked.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Spec {
    pub host_network: Option<bool>,
    pub service_account_name: Option<String>,
    pub volumes: Option<Volumes>,
    pub init_containers: Option<Containers>,
    pub containers: Option<Containers>,
}

/// The values of annotations `keys` in `annotations` (a JSON object of strings), each if it
/// is there, in one pass; the others are skipped unread.
pub fn annotations<'a, const N: usize>(
    annotations: &'a RawValue,
    keys: [&str; N],
) -> Result<[Option<Cow<'a, str>>; N], serde_json::Error> {
    let mut text = serde_json::Deserializer::from_str(annotations.get());
    Entries(keys).deserialize(&mut text)
}

/// Looks up entries of a JSON object of strings.
struct Entries<'k, const N: usize>([&'k str; N]);

impl<'de, const N: usize> DeserializeSeed<'de> for Entries<'_, N> {
    type Value = [Option<Cow<'de, str>>; N];

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for Entries<'_, N> {
    type Value = [Option<Cow<'de, str>>; N];

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of strings")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut found: [Option<Cow<'de, str>>; N] = std::array::from_fn(|_| None);
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match self.0.iter().position(|k| *k == key.as_str()) {
                Some(i) => found[i] = Some(map.next_value::<Text<'de>>()?.0),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

/// An item of a list that the webhook knows by its `name` (and a mount by its `mountPath`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Named<'a> {
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    value: Option<Text<'a>>,
    #[serde(borrow)]
    mount_path: Option<Text<'a>>,
}

impl Named<'_> {
    fn is(&self, name: &str) -> bool {
        self.name.as_ref().is_some_and(|n| n.as_str() == name)
    }
}

/// Walks a JSON list of [`Named`] items, calling `each` on every one and keeping none.
fn walk<'de, A: SeqAccess<'de>>(mut seq: A, mut each: impl FnMut(&Named)) -> Result<(), A::Error> {
    while let Some(item) = seq.next_element::<Named<'de>>()? {
        each(&item);
    }
    Ok(())
}

/// A pod's `volumes`: whether one is the webhook's.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Volumes {
    pub has_ours: bool,
}

/// The other variables by which a container names a credentials endpoint of its own: one
/// that sets any of them, or either of [`VARIABLES`], is set up by its owner.
pub const OWNERS_VARIABLES: [&str; 2] = [
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
];

/// The values the webhook gives [`VARIABLES`]: the endpoint's URLs (over IPv4 or IPv6),
/// and the token file in its volume.
pub const ENDPOINT_URLS: [&str; 2] = [
    "http://169.254.170.23/v1/credentials",
    "http://[fd00:ec2::23]/v1/credentials",
];
pub const TOKEN_PATH: &str = "/var/run/secrets/podiam.io/serviceaccount/token";

/// A container's `env`: which of the webhook's two variables it sets already, whether to
/// values of its own, and whether it sets one of [`OWNERS_VARIABLES`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Env {
    pub has: [bool; 2],
    /// One of [`VARIABLES`] is set to something else than the webhook sets.
    pub elsewhere: bool,
    pub owners: bool,
}

impl Env {
    /// Whether the container names a credentials endpoint or token of its own: given the
    /// pod's token, its SDK would send it there.
    pub fn names_its_own_endpoint(&self) -> bool {
        self.owners || self.elsewhere
    }
}

/// A container's `volumeMounts`: whether the webhook's volume is mounted, or something is
/// mounted at its path.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Mounts {
    pub ours: bool,
}

/// One container: whether it has an `env` and a `volumeMounts` list, and what they hold.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Container {
    pub env: Option<Env>,
    pub volume_mounts: Option<Mounts>,
}

/// A list of containers: each one's [`Container`], and how many there were in all. Past
/// [`MAX_CONTAINERS`] they are counted but not kept.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Containers {
    pub kept: Vec<Container>,
    pub count: usize,
}

/// A visitor of a list, yielding `T`.
struct ListOf<T>(std::marker::PhantomData<T>);

macro_rules! list {
    ($type:ty, $expecting:literal, |$seq:ident| $body:block) => {
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_seq(ListOf::<$type>(std::marker::PhantomData))
            }
        }

        impl<'de> Visitor<'de> for ListOf<$type> {
            type Value = $type;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str($expecting)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, $seq: A) -> Result<$type, A::Error> {
                $body
            }
        }
    };
}

list!(Volumes, "a list of volumes", |seq| {
    let mut volumes = Volumes::default();
    walk(seq, |v| volumes.has_ours |= v.is(VOLUME))?;
    Ok(volumes)
});

list!(Env, "a list of environment variables", |seq| {
    let mut env = Env::default();
    walk(seq, |var| {
        for ((has, name), ours) in env
            .has
            .iter_mut()
            .zip(VARIABLES)
            .zip([&ENDPOINT_URLS[..], &[TOKEN_PATH][..]])
        {
            if var.is(name) {
                *has = true;
                let value = var.value.as_ref().map_or("", |v| v.as_str());
                env.elsewhere |= !ours.contains(&value);
            }
        }
        env.owners |= OWNERS_VARIABLES.iter().any(|name| var.is(name));
    })?;
    Ok(env)
});

list!(Mounts, "a list of volume mounts", |seq| {
    let mut mounts = Mounts::default();
    walk(seq, |m| {
        let at_path = m
            .mount_path
            .as_ref()
            .is_some_and(|p| p.as_str() == MOUNT_PATH);
        mounts.ours |= m.is(VOLUME) || at_path;
    })?;
    Ok(mounts)
});

list!(Containers, "a list of containers", |seq| {
    let mut seq = seq;
    let mut containers = Containers::default();
    while let Some(container) = seq.next_element::<Container>()? {
        if containers.count < MAX_CONTAINERS {
            containers.kept.push(container);
        }
        containers.count += 1;
    }
    Ok(containers)
});

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: &str) -> Pod<'_> {
        serde_json::from_str(json).expect("a pod")
    }

    #[test]
    fn escaped_strings_are_read_as_the_api_server_means_them() {
        // Go's encoder writes <, > and & as \u003c, \u003e and \u0026.
        let text = r#"{"metadata": {"namespace": "team\u002da", "annotations": {
            "other": "a\u0026b", "iam.amazonaws.com/r\u006fle": "app\u0026x"}},
            "spec": {"serviceAccountName": "w\u0065b", "volumes": [{"name": "podiam\u002dpod-token"}],
            "containers": [{"env": [{"name": "AWS_CONTAINER_CREDENTIALS_FULL\u005fURI"}],
                            "volumeMounts": [{"name": "x", "mountPath": "/var/run/secrets/podiam.io/serviceaccount"}]}]}}"#;
        let pod = pod(text);
        let metadata = pod.metadata.as_ref().expect("metadata");
        assert_eq!(text_of(&metadata.namespace), Some("team-a"));
        let annotations = metadata.annotations.expect("annotations");
        let [role, missing, other] =
            super::annotations(annotations, ["iam.amazonaws.com/role", "missing", "other"])
                .expect("read");
        assert_eq!(role.as_deref(), Some("app&x"));
        assert_eq!(missing, None);
        assert_eq!(other.as_deref(), Some("a&b"));
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        assert_eq!(spec.volumes, Some(Volumes { has_ours: true }));
        let containers = spec.containers.expect("containers");
        assert_eq!(containers.count, 1);
        assert_eq!(
            containers.kept,
            [Container {
                env: Some(Env {
                    has: [true, false],
                    elsewhere: true,
                    owners: false,
                }),
                volume_mounts: Some(Mounts { ours: true }),
            }]
        );
    }

    fn text_of<'s>(field: &'s Option<Text>) -> Option<&'s str> {
        text(field)
    }

    #[test]
    fn absent_and_null_lists_are_told_from_empty_ones() {
        let spec = pod(
            r#"{"spec": {"volumes": null, "containers": [{}, {"env": [], "volumeMounts": null}]}}"#,
        )
        .spec
        .expect("spec");
        assert_eq!(spec.volumes, None);
        assert_eq!(spec.init_containers, None);
        let kept = spec.containers.expect("containers").kept;
        assert_eq!(kept[0], Container::default());
        assert_eq!(kept[1].env, Some(Env::default()));
        assert_eq!(kept[1].volume_mounts, None);
    }

    #[test]
    fn containers_past_the_most_are_counted_not_kept() {
        let list = vec!["{}"; MAX_CONTAINERS + 5].join(",");
        let spec = pod(&format!(r#"{{"spec": {{"containers": [{list}]}}}}"#))
            .spec
            .expect("spec");
        let containers = spec.containers.expect("containers");
        assert_eq!(containers.count, MAX_CONTAINERS + 5);
        assert_eq!(containers.kept.len(), MAX_CONTAINERS);
    }

    #[test]
    fn a_reviews_text_never_shows_in_debug() {
        let body = r#"{"request": {"uid": "u-secret", "object": {"metadata": {"annotations":
            {"token": "very-secret"}}, "spec": {"containers": [{"env": [{"name": "P",
            "value": "very-secret"}]}]}}}}"#;
        let review: Review = serde_json::from_str(body).expect("a review");
        let pod: Pod = serde_json::from_str(
            review
                .request
                .as_ref()
                .and_then(|r| r.object)
                .expect("object")
                .get(),
        )
        .expect("a pod");
        for shown in [format!("{review:?}"), format!("{pod:?}")] {
            assert!(!shown.contains("secret"), "{shown}");
        }
    }

    #[test]
    fn what_is_not_a_pods_shape_is_refused() {
        for bad in [
            r#"{"spec": {"containers": "x"}}"#,
            r#"{"spec": {"containers": [{"env": {"name": "x"}}]}}"#,
            r#"{"spec": {"hostNetwork": "yes"}}"#,
        ] {
            assert!(serde_json::from_str::<Pod>(bad).is_err(), "{bad}");
        }
        let annotations: &RawValue = serde_json::from_str(r#"{"a": 1}"#).expect("raw");
        assert!(super::annotations(annotations, ["a"]).is_err());
    }
}
