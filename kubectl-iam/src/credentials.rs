//! The user's own Kubernetes credentials, carried to podiam's servers.
//!
//! `explain` and `status` with `--server` are *operator calls*: each carries
//! `authorization: Bearer TOKEN`, TOKEN being the bearer token the current kubeconfig user
//! (`--kubeconfig`, `--context`) sends the API server. The server checks it with a
//! TokenReview and asks the API, with a SubjectAccessReview, whether that user may see what
//! the call shows. So nobody needs a podiam key to ask, and nobody learns through podiam
//! more than their RBAC lets them read.
//!
//! The token is obtained exactly as the plugin's own Kubernetes client obtains it, by kube's
//! credential layer ([`ConfigExt::auth_layer`]): a `token`, a `tokenFile`, an exec credential
//! plugin (`aws eks get-token`, `kubelogin`, … run as kubectl runs it, its `status.token`
//! used), an auth provider; in a pod, the service account's token. kube exposes no "give me
//! the token" call, so [`bearer_token`] puts that layer in front of a service that only keeps
//! the `Authorization` header the layer added to an empty request. [`pin`] then gives the
//! plugin's Kubernetes client the same token, so a credential plugin runs once per command,
//! as with kubectl.
//!
//! A user that authenticates with a client certificate (or a username and password) has no
//! token to hand on: [`CredentialError::NoBearerToken`] says so and how to get one.
//!
//! The token is a [`BearerToken`]: no `Display`, a `Debug` that redacts, sensitive metadata
//! on the wire. Errors quote a failing credential plugin's stderr, never its stdout (where
//! credentials are written). Nothing here logs.
//!
//! kubeconfig impersonation (`as:`) applies to the plugin's API requests only: the servers
//! authorise the user the token itself belongs to.

use std::future::Ready;
use std::task::{Context, Poll};

use http::HeaderValue;
use kube::Config;
use kube::client::{AuthError, ConfigExt};
use kube::config::AuthInfo;
use tonic::metadata::{Ascii, MetadataValue};
use tower_layer::Layer;
use tower_service::Service;

/// A bearer token of the user's. Never displayed; `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    /// A token given as is (tests of the calls that carry it).
    #[cfg(test)]
    pub(crate) fn for_tests(token: &str) -> BearerToken {
        BearerToken(token.to_string())
    }

    /// The `authorization` metadata value for gRPC calls, marked sensitive. The token came out
    /// of a valid HTTP header, so it is visible ASCII; `None` only if it somehow is not.
    pub fn authorization(&self) -> Option<MetadataValue<Ascii>> {
        let mut value = MetadataValue::try_from(format!("Bearer {}", self.0)).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

/// Why the user's token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The kubeconfig user's credentials are not a bearer token.
    #[error(
        "explain and status with --server are operator calls, made with your own Kubernetes \
         credentials, and those must be a bearer token: the kubeconfig user {has}. Use a \
         context whose user has a token, a tokenFile or an exec credential plugin (such as \
         `aws eks get-token`), or a ServiceAccount's token: `kubectl create token NAME -n \
         NAMESPACE` for a ServiceAccount bound to the podiam-operator ClusterRole, set with \
         `kubectl config set-credentials USER --token=…`"
    )]
    NoBearerToken {
        /// What the user has instead, as the end of a sentence.
        has: &'static str,
    },
    /// The token could not be read or made (a token file, a credential plugin).
    #[error("getting your Kubernetes credentials: {0}")]
    Failed(String),
}

/// What a kubeconfig user authenticates with, when it is not a bearer token: the end of
/// "the kubeconfig user …".
fn what_it_has(auth: &AuthInfo) -> &'static str {
    if auth.username.is_some() || auth.password.is_some() {
        "has a username and password"
    } else if auth.exec.is_some() {
        "has a credential plugin that gives a client certificate"
    } else if auth.client_certificate.is_some() || auth.client_certificate_data.is_some() {
        "has only a client certificate"
    } else {
        "has no credentials"
    }
}

/// A credential failure in words: a failing plugin's stderr (stdout is where credentials go,
/// so it is never quoted), kube's own message otherwise.
pub fn describe(error: &AuthError) -> String {
    match error {
        AuthError::AuthExecRun { cmd, out } => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = stderr.trim();
            if stderr.is_empty() {
                format!("the credential plugin {cmd} failed ({})", out.status)
            } else {
                format!(
                    "the credential plugin {cmd} failed ({}): {stderr}",
                    out.status
                )
            }
        }
        AuthError::AuthExecParse(_) => {
            "the credential plugin's output is not an ExecCredential".to_string()
        }
        AuthError::InvalidBearerToken(_) => {
            "the token is not a valid header value (a token file ending in a newline?)".to_string()
        }
        other => other.to_string(),
    }
}

fn failed(error: &kube::Error) -> CredentialError {
    CredentialError::Failed(match error {
        kube::Error::Auth(auth) => describe(auth),
        other => other.to_string(),
    })
}

/// The token in an `Authorization` header value, if it is a bearer one.
fn from_header(value: &HeaderValue) -> Option<BearerToken> {
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty())
        .then(|| BearerToken(token.to_string()))
}

/// Answers with the `Authorization` header of the request it is given (as the response's
/// body: kube's layers want an HTTP response); sends nothing anywhere.
#[derive(Clone, Copy, Debug)]
struct KeepAuthorization;

type Kept = http::Response<Option<HeaderValue>>;

/// The error type of kube's layers (both of its credential layers must agree on one).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<http::Request<String>> for KeepAuthorization {
    type Response = Kept;
    type Error = BoxError;
    type Future = Ready<Result<Kept, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<String>) -> Self::Future {
        let header = request.headers().get(http::header::AUTHORIZATION).cloned();
        std::future::ready(Ok(http::Response::new(header)))
    }
}

/// The bearer token `config`'s user would send the API server, obtained by kube's own
/// credential layer (a credential plugin runs here, off the runtime's threads).
pub async fn bearer_token(config: &Config) -> Result<BearerToken, CredentialError> {
    let no_token = || CredentialError::NoBearerToken {
        has: what_it_has(&config.auth_info),
    };
    let owned = config.clone();
    let layer = tokio::task::spawn_blocking(move || owned.auth_layer())
        .await
        .map_err(|e| CredentialError::Failed(format!("the credential task failed: {e}")))?
        .map_err(|e| failed(&e))?;
    // No layer: kube would authenticate with a client certificate, or not at all.
    let Some(layer) = layer else {
        return Err(no_token());
    };
    let mut service = layer.layer(KeepAuthorization);
    let header = async {
        std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
        service.call(http::Request::new(String::new())).await
    }
    .await
    .map_err(|error| match error.downcast::<AuthError>() {
        Ok(auth) => CredentialError::Failed(describe(&auth)),
        Err(other) => CredentialError::Failed(other.to_string()),
    })?;
    header
        .body()
        .as_ref()
        .and_then(from_header)
        .ok_or_else(no_token)
}

/// Makes `auth` authenticate with `token` alone (client certificate settings kept), so that
/// the Kubernetes client built from it sends the token already obtained instead of running
/// the credential plugin again. A command lasts seconds: a token good now stays good for it.
pub fn pin(auth: &mut AuthInfo, token: &BearerToken) {
    auth.auth_provider = None;
    auth.exec = None;
    auth.token_file = None;
    auth.username = None;
    auth.password = None;
    auth.token = Some(token.0.clone().into());
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use std::path::Path;

    /// A config whose one user is `user` (YAML, indented for the `user:` key).
    async fn config_with_user(user: &str) -> Config {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
             current-context: c\n\
             users:\n- name: u\n  user:\n{user}"
        );
        let kubeconfig = Kubeconfig::from_yaml(&yaml).expect("kubeconfig");
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("config")
    }

    /// An executable shell script at `dir/name`.
    fn script(dir: &Path, name: &str, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path.display().to_string()
    }

    fn exec_user(command: &str) -> String {
        format!(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      \
             command: {command}\n      interactiveMode: Never\n"
        )
    }

    const CREDENTIAL: &str = r#"printf '%s' '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"from-exec"}}'"#;

    #[tokio::test]
    async fn an_inline_token_is_used() {
        let config = config_with_user("    token: inline-token\n").await;
        let token = bearer_token(&config).await.expect("a token");
        assert_eq!(token, BearerToken("inline-token".into()));
        let value = token.authorization().expect("metadata");
        assert_eq!(value.to_str().expect("ascii"), "Bearer inline-token");
        assert!(value.is_sensitive());
    }

    #[tokio::test]
    async fn a_token_file_is_read() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("token");
        std::fs::write(&file, "file-token").expect("token file");
        let config = config_with_user(&format!("    tokenFile: {}\n", file.display())).await;
        let token = bearer_token(&config).await.expect("a token");
        assert_eq!(token, BearerToken("file-token".into()));
    }

    #[tokio::test]
    async fn an_exec_plugin_runs_once_and_its_token_is_used() {
        let dir = tempfile::tempdir().expect("dir");
        let runs = dir.path().join("runs");
        let command = script(
            dir.path(),
            "get-token",
            &format!("echo run >> {}\n{CREDENTIAL}", runs.display()),
        );
        let mut config = config_with_user(&exec_user(&command)).await;
        let token = bearer_token(&config).await.expect("a token");
        assert_eq!(token, BearerToken("from-exec".into()));
        // Pinned, the client's credentials are that token: the plugin does not run again.
        pin(&mut config.auth_info, &token);
        assert_eq!(bearer_token(&config).await.expect("pinned"), token);
        let count = std::fs::read_to_string(&runs)
            .expect("runs")
            .lines()
            .count();
        assert_eq!(count, 1);
    }

    #[tokio::test]
    async fn an_exec_token_with_an_expiry_is_used() {
        let dir = tempfile::tempdir().expect("dir");
        let command = script(
            dir.path(),
            "get-token",
            r#"printf '%s' '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"expiring","expirationTimestamp":"2999-01-01T00:00:00Z"}}'"#,
        );
        let config = config_with_user(&exec_user(&command)).await;
        let token = bearer_token(&config).await.expect("a token");
        assert_eq!(token, BearerToken("expiring".into()));
    }

    #[tokio::test]
    async fn a_failing_plugin_is_quoted_by_its_stderr_only() {
        let dir = tempfile::tempdir().expect("dir");
        let command = script(
            dir.path(),
            "get-token",
            "echo stdout-secret\necho 'the SSO session has expired' >&2\nexit 3",
        );
        let config = config_with_user(&exec_user(&command)).await;
        let error = bearer_token(&config).await.expect_err("fails");
        let message = error.to_string();
        assert!(matches!(error, CredentialError::Failed(_)), "{message}");
        assert!(message.contains("the SSO session has expired"), "{message}");
        assert!(message.contains("get-token"), "{message}");
        assert!(!message.contains("stdout-secret"), "{message}");
    }

    #[tokio::test]
    async fn a_client_certificate_alone_is_one_clear_error() {
        let config =
            config_with_user("    client-certificate-data: Y2VydA==\n    client-key-data: a2V5\n")
                .await;
        let error = bearer_token(&config).await.expect_err("no token");
        let message = error.to_string();
        assert!(
            matches!(
                error,
                CredentialError::NoBearerToken {
                    has: "has only a client certificate"
                }
            ),
            "{message}"
        );
        for want in [
            "must be a bearer token",
            "the kubeconfig user has only a client certificate",
            "exec credential plugin",
            "kubectl create token",
            "podiam-operator ClusterRole",
        ] {
            assert!(message.contains(want), "{want:?} in {message}");
        }
        assert!(!message.contains('\n'), "one line: {message}");
    }

    #[tokio::test]
    async fn other_credentials_say_what_the_user_has() {
        let basic = config_with_user("    username: alice\n    password: pw\n").await;
        assert!(matches!(
            bearer_token(&basic).await,
            Err(CredentialError::NoBearerToken {
                has: "has a username and password"
            })
        ));
        let none = config_with_user("    {}\n").await;
        assert!(matches!(
            bearer_token(&none).await,
            Err(CredentialError::NoBearerToken {
                has: "has no credentials"
            })
        ));
    }

    #[test]
    fn only_bearer_headers_give_a_token() {
        let token = |s: &str| from_header(&HeaderValue::from_str(s).expect("header"));
        assert_eq!(token("Bearer abc"), Some(BearerToken("abc".into())));
        assert_eq!(token("bearer  abc "), Some(BearerToken("abc".into())));
        assert_eq!(token("Basic YWxpY2U6cHc="), None);
        assert_eq!(token("Bearer "), None);
    }

    #[test]
    fn the_token_is_never_in_debug_output() {
        let token = BearerToken("very-secret".into());
        assert!(!format!("{token:?}").contains("very-secret"));
        let value = token.authorization().expect("metadata");
        assert!(!format!("{value:?}").contains("very-secret"));
    }
}
