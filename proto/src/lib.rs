//! The wire contract between podiam's agent and server.
//!
//! - [`v1`]: the gRPC service generated from `proto/podiam.proto` at build time.
//! - [`Reason`]: why the server refused a request or a pod, and its one conversion to and
//!   from the wire's [`v1::Reason`]: a [`v1::Refusal`] in a gRPC status's details, an enum
//!   field in node streams and explanations. The agent maps refusals to HTTP answers without
//!   parsing text.
//! - [`valid_role_name`]: the shape of a role name on the wire (the agent's routes and the
//!   server's GetCredentials both check it).
//! - [`parse_ip`]: the one way an address on the wire becomes an [`IpAddr`].
//! - [`owner`]: which server replica owns which credential key (rendezvous hashing), computed
//!   alike by agents and replicas.
//!
//! What the daemons run on (TLS, the accept loops, logging) is `podiam-runtime`.

pub mod owner;

/// The generated gRPC contract (`podiam.v1`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("podiam.v1");
}

use std::fmt;
use std::net::IpAddr;

use prost::Message;

impl fmt::Debug for v1::Credentials {
    /// Redacts the secret key and session token; the access key id is not a secret and helps
    /// when correlating with CloudTrail.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration_unix", &self.expiration_unix)
            .field("issued_unix", &self.issued_unix)
            .field("role_arn", &self.role_arn)
            .field("valid_for_ms", &self.valid_for_ms)
            .finish()
    }
}

impl fmt::Debug for v1::GetCredentialsRequest {
    /// Redacts the pod's token (whether there is one is shown).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token: &dyn fmt::Debug = if self.pod_token.is_empty() {
            &""
        } else {
            &"<redacted>"
        };
        f.debug_struct("GetCredentialsRequest")
            .field("ip", &self.ip)
            .field("role_name", &self.role_name)
            .field("node_name", &self.node_name)
            .field("pod_token", token)
            .finish()
    }
}

/// IAM's longest role name.
pub const MAX_ROLE_NAME: usize = 64;

/// Whether `name` can be a role's name — the last segment of its ARN, what EC2 lists under
/// `iam/security-credentials/` and what `GetCredentialsRequest.role_name` carries: 1 to
/// [`MAX_ROLE_NAME`] of IAM's name characters `A-Z a-z 0-9 + = , . @ _ -`, and not `.` or
/// `..` (`podiam_policy` refuses those in any segment of a role). A pod asking for anything
/// else is asking for no role at all, and neither side passes it on or logs it.
pub fn valid_role_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ROLE_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
}

/// The metadata key under which servers also write a refusal's [`Reason`] name, for agents
/// of the previous release while a cluster is upgraded. Nothing reads it; to be removed in
/// the release after this one.
pub const LEGACY_REASON_METADATA_KEY: &str = "podiam-reason";

/// The metadata key under which a server marks an [`Reason::StsUnavailable`] refusal as STS
/// throttling (the account's AssumeRole rate spent): another replica would only add to it,
/// so agents do not ask one, as they do when a replica cannot reach STS.
pub const STS_THROTTLED_METADATA_KEY: &str = "podiam-sts-throttled";

/// Whether `status` carries [`STS_THROTTLED_METADATA_KEY`].
pub fn sts_throttled(status: &tonic::Status) -> bool {
    status.metadata().contains_key(STS_THROTTLED_METADATA_KEY)
}

/// Why the server refused to name a pod's role or hand out its credentials.
///
/// Each reason becomes its own HTTP status and message at the agent, so an operator reading a
/// pod's error knows which step failed. On the wire it is [`v1::Reason`], converted here and
/// nowhere else: [`Reason::to_wire`], [`Reason::from_wire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No live pod has this IP (yet): the start-up race, or a request from outside any pod.
    UnknownPod,
    /// Two live pods claim the IP, or it belongs to a host-network pod: nobody gets a role.
    AmbiguousPod,
    /// The pod has no `iam.amazonaws.com/role` annotation.
    NoRole,
    /// The pod's namespace does not permit the pod's role.
    RoleNotPermitted,
    /// The pod asked for a role other than its own.
    WrongRole,
    /// The role annotation is not a usable role name or ARN.
    InvalidRole,
    /// STS refused to assume the role (AccessDenied and the like).
    StsRefused,
    /// STS could not be reached or failed (throttling, 5xx, timeouts).
    StsUnavailable,
    /// The server is not ready (its caches have not synced yet).
    NotReady,
    /// The address is no pod of the asking agent's node (node binding).
    OtherNode,
    /// The asking agent did not prove which node it runs on: no token, a token the API
    /// does not accept, or one that is not an agent's.
    AgentUnauthenticated,
    /// The agent's token could not be checked now (the API's TokenReview is unavailable).
    IdentityUnavailable,
    /// The pod's own token (container-credentials endpoint) does not prove the pod at the
    /// address: not accepted by the API for podiam's audience, bound to no pod, or bound to
    /// another pod.
    PodTokenRefused,
    /// The pod's namespace is labelled `podiam.io/pod-identity=required`: its role is given
    /// on the container-credentials endpoint with its token only, never by address alone.
    TokenRequired,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 14] = [
        Reason::UnknownPod,
        Reason::AmbiguousPod,
        Reason::NoRole,
        Reason::RoleNotPermitted,
        Reason::WrongRole,
        Reason::InvalidRole,
        Reason::StsRefused,
        Reason::StsUnavailable,
        Reason::NotReady,
        Reason::OtherNode,
        Reason::AgentUnauthenticated,
        Reason::IdentityUnavailable,
        Reason::PodTokenRefused,
        Reason::TokenRequired,
    ];

    /// The stable name pods and operators read: in the agent's answers, Events and
    /// explanations.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownPod => "unknown-pod",
            Reason::AmbiguousPod => "ambiguous-pod",
            Reason::NoRole => "no-role",
            Reason::RoleNotPermitted => "role-not-permitted",
            Reason::WrongRole => "wrong-role",
            Reason::InvalidRole => "invalid-role",
            Reason::StsRefused => "sts-refused",
            Reason::StsUnavailable => "sts-unavailable",
            Reason::NotReady => "not-ready",
            Reason::OtherNode => "other-node",
            Reason::AgentUnauthenticated => "agent-unauthenticated",
            Reason::IdentityUnavailable => "identity-unavailable",
            Reason::PodTokenRefused => "pod-token-refused",
            Reason::TokenRequired => "token-required",
        }
    }

    /// The reason as the wire carries it.
    pub fn to_wire(self) -> v1::Reason {
        match self {
            Reason::UnknownPod => v1::Reason::UnknownPod,
            Reason::AmbiguousPod => v1::Reason::AmbiguousPod,
            Reason::NoRole => v1::Reason::NoRole,
            Reason::RoleNotPermitted => v1::Reason::RoleNotPermitted,
            Reason::WrongRole => v1::Reason::WrongRole,
            Reason::InvalidRole => v1::Reason::InvalidRole,
            Reason::StsRefused => v1::Reason::StsRefused,
            Reason::StsUnavailable => v1::Reason::StsUnavailable,
            Reason::NotReady => v1::Reason::NotReady,
            Reason::OtherNode => v1::Reason::OtherNode,
            Reason::AgentUnauthenticated => v1::Reason::AgentUnauthenticated,
            Reason::IdentityUnavailable => v1::Reason::IdentityUnavailable,
            Reason::PodTokenRefused => v1::Reason::PodTokenRefused,
            Reason::TokenRequired => v1::Reason::TokenRequired,
        }
    }

    /// The reason a wire value (an enum field as decoded) names; `None` for
    /// `REASON_UNSPECIFIED` and for a value this build does not know (a newer writer's):
    /// the reader decides how such a refusal fails closed.
    pub fn from_wire(value: i32) -> Option<Reason> {
        Some(match v1::Reason::try_from(value).ok()? {
            v1::Reason::Unspecified => return None,
            v1::Reason::UnknownPod => Reason::UnknownPod,
            v1::Reason::AmbiguousPod => Reason::AmbiguousPod,
            v1::Reason::NoRole => Reason::NoRole,
            v1::Reason::RoleNotPermitted => Reason::RoleNotPermitted,
            v1::Reason::WrongRole => Reason::WrongRole,
            v1::Reason::InvalidRole => Reason::InvalidRole,
            v1::Reason::StsRefused => Reason::StsRefused,
            v1::Reason::StsUnavailable => Reason::StsUnavailable,
            v1::Reason::NotReady => Reason::NotReady,
            v1::Reason::OtherNode => Reason::OtherNode,
            v1::Reason::AgentUnauthenticated => Reason::AgentUnauthenticated,
            v1::Reason::IdentityUnavailable => Reason::IdentityUnavailable,
            v1::Reason::PodTokenRefused => Reason::PodTokenRefused,
            v1::Reason::TokenRequired => Reason::TokenRequired,
        })
    }

    /// The gRPC code a refusal of this kind travels with.
    pub fn code(self) -> tonic::Code {
        match self {
            Reason::UnknownPod => tonic::Code::NotFound,
            Reason::AmbiguousPod
            | Reason::RoleNotPermitted
            | Reason::StsRefused
            | Reason::OtherNode
            | Reason::TokenRequired => tonic::Code::PermissionDenied,
            Reason::NoRole | Reason::WrongRole | Reason::InvalidRole => {
                tonic::Code::FailedPrecondition
            }
            Reason::StsUnavailable | Reason::NotReady | Reason::IdentityUnavailable => {
                tonic::Code::Unavailable
            }
            Reason::AgentUnauthenticated | Reason::PodTokenRefused => tonic::Code::Unauthenticated,
        }
    }

    /// A gRPC status carrying this reason (as a [`v1::Refusal`] in its details) and a
    /// one-line message for the pod.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        let details = v1::Refusal {
            reason: self.to_wire().into(),
        };
        let mut status =
            tonic::Status::with_details(self.code(), message, details.encode_to_vec().into());
        status.metadata_mut().insert(
            LEGACY_REASON_METADATA_KEY,
            tonic::metadata::MetadataValue::from_static(self.as_str()),
        );
        status
    }

    /// The reason a status carries, if it came from a podiam server and names a reason this
    /// build knows; `None` otherwise (the status is then judged by its code).
    pub fn of(status: &tonic::Status) -> Option<Reason> {
        if status.details().is_empty() {
            return None;
        }
        let refusal = v1::Refusal::decode(status.details()).ok()?;
        Reason::from_wire(refusal.reason)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address on the wire that is not one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidIp {
    /// The text, cut to 64 characters.
    pub text: String,
}

impl fmt::Display for InvalidIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not an IP address", self.text)
    }
}

impl std::error::Error for InvalidIp {}

/// A pod's address as text (a request's `ip`, a node stream's, a pod's `status.podIP`)
/// parsed into the one form every comparison uses: an [`IpAddr`] (so IPv6's several
/// spellings are one address), canonical (an IPv4-mapped IPv6 address is its IPv4 address,
/// as the agent sees a peer). Every edge parses with this, once.
pub fn parse_ip(text: &str) -> Result<IpAddr, InvalidIp> {
    text.parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| InvalidIp {
            text: text.chars().take(64).collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_survives_the_wire_enum_and_a_status() {
        for reason in Reason::ALL {
            let wire = i32::from(reason.to_wire());
            assert_eq!(Reason::from_wire(wire), Some(reason), "{reason}");
            let status = reason.status("why");
            assert_eq!(Reason::of(&status), Some(reason), "{reason}");
            assert_eq!(status.code(), reason.code());
            assert_eq!(status.message(), "why");
        }
        // Every wire value but the unspecified one is some reason: none is left out.
        let named: std::collections::HashSet<i32> =
            Reason::ALL.iter().map(|r| i32::from(r.to_wire())).collect();
        assert_eq!(named.len(), Reason::ALL.len());
        assert!(!named.contains(&i32::from(v1::Reason::Unspecified)));
    }

    #[test]
    fn a_status_survives_the_transport() {
        // What a client decodes from the trailers a server sends.
        for reason in Reason::ALL {
            let sent = reason.status("why");
            let mut headers = http::HeaderMap::new();
            sent.add_header(&mut headers).expect("encodes");
            let received = tonic::Status::from_header_map(&headers).expect("a status");
            assert_eq!(Reason::of(&received), Some(reason), "{reason}");
        }
    }

    #[test]
    fn role_names_follow_iam() {
        for good in ["app-reader", "a", "A.b@c,d=e+f_g-h", &"r".repeat(64), "..a"] {
            assert!(valid_role_name(good), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            &"r".repeat(65),
            "team/app",
            "app reader",
            "app\r\nreader",
            "app\u{1b}",
            "app:reader",
            "appé",
        ] {
            assert!(!valid_role_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn an_unknown_or_missing_reason_is_none() {
        assert_eq!(Reason::of(&tonic::Status::internal("boom")), None);
        assert_eq!(Reason::from_wire(0), None, "unspecified");
        // A newer server's reason: the reader cannot act on it and must fail closed.
        assert_eq!(Reason::from_wire(9999), None);
        let newer = v1::Refusal { reason: 9999 };
        let status = tonic::Status::with_details(
            tonic::Code::PermissionDenied,
            "a reason from the future",
            newer.encode_to_vec().into(),
        );
        assert_eq!(Reason::of(&status), None);
        let garbage =
            tonic::Status::with_details(tonic::Code::NotFound, "x", vec![0xff, 0xff].into());
        assert_eq!(Reason::of(&garbage), None);
    }

    #[test]
    fn addresses_parse_once_into_one_form() {
        let ip = |s: &str| parse_ip(s).expect(s);
        assert_eq!(ip("10.0.0.1"), IpAddr::from([10, 0, 0, 1]));
        // IPv6's spellings are one address, and an IPv4-mapped one is its IPv4 address.
        assert_eq!(ip("fd00::1"), ip("fd00:0:0:0:0:0:0:1"));
        assert_eq!(ip("FD00::0001"), ip("fd00::1"));
        assert_eq!(ip("::ffff:10.0.0.1"), ip("10.0.0.1"));
        for bad in [
            "",
            "10.0.0",
            "10.0.0.1:80",
            " 10.0.0.1",
            "pod",
            "10.0.0.256",
        ] {
            assert!(parse_ip(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(1000);
        let error = parse_ip(&long).expect_err("not an address");
        assert_eq!(error.text.len(), 64, "what is kept of a bad one is bounded");
    }

    #[test]
    fn credentials_debug_redacts_secrets() {
        let creds = v1::Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "very-secret-key".into(),
            session_token: "very-secret-token".into(),
            expiration_unix: 1,
            issued_unix: 0,
            role_arn: "arn:aws:iam::123456789012:role/x".into(),
            valid_for_ms: 0,
        };
        let shown = format!("{creds:?}");
        assert!(shown.contains("ASIAEXAMPLE"));
        assert!(!shown.contains("very-secret"), "{shown}");
        let request = v1::GetCredentialsRequest {
            ip: "10.0.0.1".into(),
            role_name: String::new(),
            node_name: "node-a".into(),
            pod_token: "eyJ.very-secret-pod-token.sig".into(),
        };
        let shown = format!("{request:?}");
        assert!(
            shown.contains("10.0.0.1") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(!shown.contains("very-secret"), "{shown}");
    }
}
