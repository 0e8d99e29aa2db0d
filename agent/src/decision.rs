//! What the servers say, in the agent's own types, converted from the wire once, here:
//!
//! - a node stream's [`PodState`] becomes a [`PodDecision`] (the pod, and its [`Role`] or the
//!   servers' [`Refusal`]) keyed by a parsed address ([`PodDecision::from_state`]);
//! - a failed call's `tonic::Status` becomes a [`ServerError`] (`From<tonic::Status>`).
//!
//! Everything past this module — the pod table, the request path, the failover — works with
//! these types and never reads a wire field again. Refusals the agent makes itself (an
//! address no pod of this node has, a role not the pod's own) are not here: they are
//! [`crate::http::AgentRefusal`], kept apart from the servers' word.

use std::fmt;
use std::net::IpAddr;

use podiam_proto::Reason;
use podiam_proto::v1::PodState;

/// A pod, as the servers name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl fmt::Display for PodId {
    /// `namespace/name`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The role a pod may have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// The last path segment, as EC2 lists it under `iam/security-credentials/`.
    pub name: String,
    /// The ARN the servers assume.
    pub arn: String,
    /// The digest of the STS session its credentials come from
    /// (`PodState.credential_key`): the replica that owns it is asked first. 0: unknown.
    pub credential_key: u64,
}

/// The servers' refusal of a pod: why, and the one-line message the pod gets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    /// A refusal whose reason is a wire value: one this agent does not know (a newer
    /// server's), or none at all, still refuses — as a role not permitted (403), the
    /// servers' own message kept.
    fn from_wire(reason: i32, message: String) -> Refusal {
        Refusal {
            reason: Reason::from_wire(reason).unwrap_or(Reason::RoleNotPermitted),
            message,
        }
    }
}

/// A pod of this node and the servers' decision for it: what the node table holds per
/// address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDecision {
    pub pod: PodId,
    /// The role it may have, or why not.
    pub verdict: Result<Role, Refusal>,
    /// Set when the role is the pod's with its token only (its namespace requires it): the
    /// refusal a request that proves the pod by its address alone gets, the metadata
    /// endpoint's.
    pub by_address: Option<Refusal>,
}

/// Why a node stream's pod state cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadState {
    #[error("a pod state without a pod")]
    NoPod,
    #[error("pod {pod}: {error}")]
    BadIp {
        pod: PodId,
        error: podiam_proto::InvalidIp,
    },
}

impl PodDecision {
    /// The one conversion of a node stream's state: its address parsed
    /// ([`podiam_proto::parse_ip`]) and its decision read. A pod may have its role only
    /// when the state names one and no refusal, or names one with
    /// [`Reason::TokenRequired`] (then with its token only); anything else refuses.
    pub fn from_state(state: PodState) -> Result<(Vec<IpAddr>, PodDecision), BadState> {
        let pod = state.pod.ok_or(BadState::NoPod)?;
        let pod = PodId {
            namespace: pod.namespace,
            name: pod.name,
            uid: pod.uid,
        };
        let mut ips = Vec::with_capacity(1 + state.more_ips.len());
        for text in std::iter::once(&state.ip).chain(&state.more_ips) {
            match podiam_proto::parse_ip(text) {
                Ok(ip) => ips.push(ip),
                Err(error) => return Err(BadState::BadIp { pod, error }),
            }
        }
        let token_required = Reason::from_wire(state.refusal_reason) == Some(Reason::TokenRequired);
        let permitted = (state.refusal_reason == i32::from(podiam_proto::v1::Reason::Unspecified)
            || token_required)
            && !state.role_name.is_empty();
        let by_address = (permitted && token_required).then(|| Refusal {
            reason: Reason::TokenRequired,
            message: state.refusal_message.clone(),
        });
        let verdict = if permitted {
            Ok(Role {
                name: state.role_name,
                arn: state.role_arn,
                credential_key: state.credential_key,
            })
        } else {
            Err(Refusal::from_wire(
                state.refusal_reason,
                state.refusal_message,
            ))
        };
        Ok((
            ips,
            PodDecision {
                pod,
                verdict,
                by_address,
            },
        ))
    }

    /// The pod's role, or the servers' refusal of it.
    pub fn role(&self) -> Result<&Role, &Refusal> {
        self.verdict.as_ref()
    }

    /// The pod's role for a request that proves the pod by its address alone (the metadata
    /// endpoint), or the servers' refusal of it.
    pub fn role_by_address(&self) -> Result<&Role, &Refusal> {
        match &self.by_address {
            Some(refusal) => Err(refusal),
            None => self.role(),
        }
    }
}

/// Why a call to the servers gave no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// The servers refused, saying why.
    #[error("{0}")]
    Refused(Refusal),
    /// No server could be reached, or none answered in time.
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// A server answered with an error podiam does not define.
    #[error("server error: {0}")]
    Other(String),
}

impl From<tonic::Status> for ServerError {
    /// A status naming a [`Reason`] this agent knows is the servers' refusal; any other
    /// (also one naming a newer server's reason) is judged by its code.
    fn from(status: tonic::Status) -> Self {
        if let Some(reason) = Reason::of(&status) {
            return ServerError::Refused(Refusal {
                reason,
                message: status.message().to_string(),
            });
        }
        match status.code() {
            // ResourceExhausted with no reason: a replica shed the call, too many calls'
            // requests arriving at once or this node over its share of the replica
            // (`--agent-call-rate`); another replica may take it.
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted => {
                ServerError::Unavailable(status.message().to_string())
            }
            _ => ServerError::Other(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podiam_proto::v1::PodRef;

    fn state(ip: &str, role: &str, reason: i32) -> PodState {
        PodState {
            pod: Some(PodRef {
                namespace: "ns".into(),
                name: "pod-a".into(),
                uid: "a".into(),
            }),
            ip: ip.into(),
            role_name: role.into(),
            role_arn: if role.is_empty() {
                String::new()
            } else {
                format!("arn:aws:iam::123456789012:role/{role}")
            },
            refusal_reason: reason,
            refusal_message: if reason == 0 {
                String::new()
            } else {
                "why".into()
            },
            ..PodState::default()
        }
    }

    fn verdict(state: PodState) -> Result<String, (Reason, String)> {
        let (_, decision) = PodDecision::from_state(state).expect("a usable state");
        decision
            .verdict
            .map(|role| role.name)
            .map_err(|r| (r.reason, r.message))
    }

    #[test]
    fn a_pod_state_is_converted_once_into_a_decision() {
        let (ip, decision) = PodDecision::from_state(state("10.0.0.1", "app", 0)).expect("usable");
        assert_eq!(ip, [IpAddr::from([10, 0, 0, 1])]);
        assert_eq!(decision.pod.to_string(), "ns/pod-a");
        assert_eq!(decision.role().map(|r| r.name.as_str()), Ok("app"));
        // Every reason the servers name reaches the agent as itself.
        for reason in Reason::ALL {
            let wire = i32::from(reason.to_wire());
            assert_eq!(
                verdict(state("10.0.0.1", "", wire)),
                Err((reason, "why".into())),
                "{reason}"
            );
        }
        // IPv6 spellings are one address.
        let (ip, _) = PodDecision::from_state(state("FD00::0001", "app", 0)).expect("usable");
        assert_eq!(ip, ["fd00::1".parse::<IpAddr>().expect("ip")]);
        // A dual-stack pod: every address, and one that does not parse refuses the state.
        let dual = PodState {
            more_ips: vec!["fd00:77::2".into()],
            ..state("10.0.0.1", "app", 0)
        };
        let (ips, _) = PodDecision::from_state(dual.clone()).expect("usable");
        assert_eq!(
            ips,
            [
                IpAddr::from([10, 0, 0, 1]),
                "fd00:77::2".parse().expect("ip")
            ]
        );
        let bad = PodState {
            more_ips: vec!["fd00::zz".into()],
            ..dual
        };
        assert!(PodDecision::from_state(bad).is_err());
    }

    #[test]
    fn a_pod_whose_namespace_requires_its_token_has_its_role_for_its_token_only() {
        let wire = i32::from(Reason::TokenRequired.to_wire());
        let (_, decision) =
            PodDecision::from_state(state("10.0.0.1", "app", wire)).expect("usable");
        assert_eq!(decision.role().map(|r| r.name.as_str()), Ok("app"));
        let refused = decision.role_by_address().expect_err("not by address");
        assert_eq!(
            (refused.reason, refused.message.as_str()),
            (Reason::TokenRequired, "why")
        );
        // Without a role it is a plain refusal, both ways.
        let (_, bare) = PodDecision::from_state(state("10.0.0.1", "", wire)).expect("usable");
        assert!(bare.role().is_err() && bare.role_by_address().is_err());
        // Any other pod: the same role both ways.
        let (_, plain) = PodDecision::from_state(state("10.0.0.1", "app", 0)).expect("usable");
        assert_eq!(plain.role_by_address(), plain.role());
    }

    #[test]
    fn what_the_agent_cannot_read_refuses() {
        // A reason from a newer server: refused all the same (fail closed).
        assert_eq!(
            verdict(state("10.0.0.1", "", 9999)),
            Err((Reason::RoleNotPermitted, "why".into()))
        );
        // A refusal beside a role name (a newer server's mixed state): refused.
        assert!(verdict(state("10.0.0.1", "app", 9999)).is_err());
        // Neither a role nor a reason (an older server's refusal): refused.
        assert_eq!(
            verdict(state("10.0.0.1", "", 0)),
            Err((Reason::RoleNotPermitted, String::new()))
        );
        // No usable address, or no pod: not a decision at all.
        assert!(matches!(
            PodDecision::from_state(state("10.0.0", "app", 0)),
            Err(BadState::BadIp { .. })
        ));
        let no_pod = PodState {
            pod: None,
            ..state("10.0.0.1", "app", 0)
        };
        assert_eq!(PodDecision::from_state(no_pod), Err(BadState::NoPod));
    }

    #[test]
    fn statuses_become_server_errors() {
        for reason in Reason::ALL {
            assert_eq!(
                ServerError::from(reason.status("why")),
                ServerError::Refused(Refusal {
                    reason,
                    message: "why".into()
                })
            );
        }
        // A newer server's reason is no reason here: judged by its code, never a grant.
        let newer = tonic::Status::with_details(
            tonic::Code::PermissionDenied,
            "from the future",
            prost::Message::encode_to_vec(&podiam_proto::v1::Refusal { reason: 9999 }).into(),
        );
        assert!(matches!(ServerError::from(newer), ServerError::Other(_)));
        for status in [
            tonic::Status::unavailable("down"),
            tonic::Status::resource_exhausted("shed unread"),
        ] {
            assert!(matches!(
                ServerError::from(status),
                ServerError::Unavailable(_)
            ));
        }
        assert!(matches!(
            ServerError::from(tonic::Status::internal("boom")),
            ServerError::Other(_)
        ));
    }
}
