//! The gRPC service: find the pod behind an IP, decide its role, hand out credentials.
//!
//! [`Refusal`] lists every way a request is refused, and [`Refusal::status`] is the one place
//! that turns a refusal into a gRPC status (with its [`Reason`] for the agent). Refusals are
//! the pods' business, logged at debug; credentials issued get one audit line each, never the
//! secret.

use std::net::IpAddr;
use std::sync::Arc;

use podiam_proto::Reason;
use podiam_proto::v1::{
    Credentials, GetCredentialsRequest, GetCredentialsResponse, GetPodRoleRequest,
    GetPodRoleResponse, HealthRequest, HealthResponse, PodRef, podiam_server::Podiam,
};
use tonic::{Request, Response, Status};

use crate::index::{Lookup, PodRecord};
use crate::policy::{self, Role, Verdict};
use crate::sts::{CacheKey, CredentialCache, StsError};
use crate::watch::Cluster;

/// Every way a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0:?} is not an IP address")]
    BadIp(String),
    #[error("server not ready: the pod and namespace caches have not synced yet")]
    NotReady,
    #[error("no pod known with IP {0}")]
    UnknownPod(String),
    #[error("IP {ip} is claimed by several live pods ({}); refusing all", pods.join(", "))]
    AmbiguousPod { ip: String, pods: Vec<String> },
    #[error("pod {0} has no {role} annotation", role = policy::ROLE_ANNOTATION)]
    NoRole(String),
    #[error("pod {pod}: {error}")]
    InvalidRole {
        pod: String,
        error: policy::RoleError,
    },
    #[error("role {role} is not permitted in namespace {namespace}: {why}")]
    NotPermitted {
        role: String,
        namespace: String,
        why: String,
    },
    #[error("pod {pod} has role {actual}, not {asked}")]
    WrongRole {
        pod: String,
        asked: String,
        actual: String,
    },
    #[error("{0}")]
    Sts(#[from] StsError),
}

impl Refusal {
    /// The one mapping from refusals to gRPC statuses.
    pub fn status(&self) -> Status {
        let reason = match self {
            Refusal::BadIp(_) => return Status::invalid_argument(self.to_string()),
            Refusal::NotReady => Reason::NotReady,
            Refusal::UnknownPod(_) => Reason::UnknownPod,
            Refusal::AmbiguousPod { .. } => Reason::AmbiguousPod,
            Refusal::NoRole(_) => Reason::NoRole,
            Refusal::InvalidRole { .. } => Reason::InvalidRole,
            Refusal::NotPermitted { .. } => Reason::RoleNotPermitted,
            Refusal::WrongRole { .. } => Reason::WrongRole,
            Refusal::Sts(StsError::Refused { .. }) => Reason::StsRefused,
            Refusal::Sts(StsError::Unavailable(_)) => Reason::StsUnavailable,
        };
        reason.status(self.to_string())
    }
}

/// A pod and the role it may have.
#[derive(Debug)]
struct Decision {
    pod: Arc<PodRecord>,
    role: Role,
}

/// Settings the service needs besides the cluster view and the cache.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    pub base_arn: Option<String>,
    pub default_session_name: String,
}

/// The podiam gRPC service.
#[derive(Debug)]
pub struct PodiamService {
    cluster: Arc<Cluster>,
    cache: Arc<CredentialCache>,
    settings: ServiceSettings,
}

impl PodiamService {
    pub fn new(
        cluster: Arc<Cluster>,
        cache: Arc<CredentialCache>,
        settings: ServiceSettings,
    ) -> Self {
        PodiamService {
            cluster,
            cache,
            settings,
        }
    }

    /// The pod behind `ip` and its permitted role.
    fn decide(&self, ip: &str) -> Result<Decision, Refusal> {
        let ip = ip
            .parse::<IpAddr>()
            .map_err(|_| Refusal::BadIp(ip.to_string()))?
            .to_string();
        if !self.cluster.synced() {
            return Err(Refusal::NotReady);
        }
        let lookup = self
            .cluster
            .pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .lookup(&ip);
        let pod = match lookup {
            Lookup::Found(pod) => pod,
            Lookup::Unknown => return Err(Refusal::UnknownPod(ip)),
            Lookup::Ambiguous(pods) => return Err(Refusal::AmbiguousPod { ip, pods }),
        };
        let pod_name = format!("{}/{}", pod.namespace, pod.name);
        let annotation = pod
            .role
            .as_deref()
            .ok_or_else(|| Refusal::NoRole(pod_name.clone()))?;
        let role = policy::resolve_role(annotation, self.settings.base_arn.as_deref()).map_err(
            |error| Refusal::InvalidRole {
                pod: pod_name,
                error,
            },
        )?;
        let rule = self
            .cluster
            .namespaces
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .rule(&pod.namespace);
        let why = match policy::check(&rule, &role) {
            Verdict::Permitted => return Ok(Decision { pod, role }),
            Verdict::NothingPermitted => {
                format!(
                    "the namespace has no {} annotation",
                    policy::PERMITTED_ANNOTATION
                )
            }
            Verdict::InvalidRegex { source, error } => {
                format!("its permitted regex {source:?} is invalid ({error})")
            }
            Verdict::NotMatched { source } => format!("it does not match {source:?}"),
        };
        Err(Refusal::NotPermitted {
            role: role.arn,
            namespace: pod.namespace.clone(),
            why,
        })
    }

    async fn credentials(
        &self,
        request: GetCredentialsRequest,
    ) -> Result<GetCredentialsResponse, Refusal> {
        let Decision { pod, role } = self.decide(&request.ip)?;
        if request.role_name != role.name {
            return Err(Refusal::WrongRole {
                pod: format!("{}/{}", pod.namespace, pod.name),
                asked: request.role_name,
                actual: role.name,
            });
        }
        let key = CacheKey {
            role_arn: role.arn.clone(),
            external_id: pod.external_id.clone(),
            session_name: pod
                .session_name
                .clone()
                .unwrap_or_else(|| self.settings.default_session_name.clone()),
        };
        let issued = self.cache.get(key.clone()).await?;
        tracing::info!(
            target: "podiam::audit",
            pod = %pod.name,
            namespace = %pod.namespace,
            role = %role.arn,
            session = %key.session_name,
            access_key_id = %issued.access_key_id,
            expiration = issued.expiration_unix,
            node = %request.node_name,
            "credentials issued"
        );
        Ok(GetCredentialsResponse {
            pod: Some(pod_ref(&pod)),
            credentials: Some(Credentials {
                access_key_id: issued.access_key_id,
                secret_access_key: issued.secret_access_key,
                session_token: issued.session_token,
                expiration_unix: issued.expiration_unix,
                issued_unix: issued.issued_unix,
                role_arn: role.arn,
            }),
        })
    }
}

fn pod_ref(pod: &PodRecord) -> PodRef {
    PodRef {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
    }
}

fn refuse(refusal: Refusal) -> Status {
    match &refusal {
        Refusal::Sts(StsError::Unavailable(_)) => tracing::warn!(%refusal, "refused"),
        _ => tracing::debug!(%refusal, "refused"),
    }
    refusal.status()
}

#[tonic::async_trait]
impl Podiam for PodiamService {
    async fn get_pod_role(
        &self,
        request: Request<GetPodRoleRequest>,
    ) -> Result<Response<GetPodRoleResponse>, Status> {
        let request = request.into_inner();
        let Decision { pod, role } = self.decide(&request.ip).map_err(refuse)?;
        Ok(Response::new(GetPodRoleResponse {
            pod: Some(pod_ref(&pod)),
            role_name: role.name,
            role_arn: role.arn,
        }))
    }

    async fn get_credentials(
        &self,
        request: Request<GetCredentialsRequest>,
    ) -> Result<Response<GetCredentialsResponse>, Status> {
        self.credentials(request.into_inner())
            .await
            .map(Response::new)
            .map_err(refuse)
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            synced: self.cluster.synced(),
        }))
    }
}
