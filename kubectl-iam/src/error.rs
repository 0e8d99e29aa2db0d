//! The plugin's errors, and the one mapping from an error to an exit code.

use std::path::PathBuf;

/// Everything that makes a command fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line is wrong in a way clap cannot see (exit 2, like clap's own errors).
    #[error("{0}")]
    Usage(String),
    /// No kubeconfig could be read (and no in-cluster service account stood in for one).
    #[error("reading the kubeconfig{}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Kubeconfig {
        path: Option<PathBuf>,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The Kubernetes client could not be built from the configuration.
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    /// The API server answered with an error status.
    #[error("{what}: {message}")]
    ApiRefused { what: String, message: String },
    /// The API server could not be reached, or its answer not read.
    #[error("{what}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// A named object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The `--tls-ca` file cannot be used.
    #[error("loading the servers' CA (--tls-ca)")]
    Tls(#[source] podiam_runtime::tls::TlsError),
    /// The user's Kubernetes credentials give no bearer token for the servers (or none could
    /// be had). Says what to do; never holds the token.
    #[error("{0}")]
    Credentials(crate::credentials::CredentialError),
    /// A server refused the caller (gRPC `Unauthenticated` or `PermissionDenied`): its
    /// message, as is — it names the permission missing.
    #[error("{0}")]
    ServerRefused(String),
    /// A request the plugin will not carry out (an invalid regex, a malformed role): nothing
    /// was written.
    #[error("{0}")]
    Refused(String),
    /// `status`: no server replica is ready.
    #[error("no podiam server replica is ready: {0}")]
    NotReady(String),
    /// `-o json` could not be written.
    #[error("writing JSON")]
    Json(#[source] serde_json::Error),
}

impl Error {
    /// The process's exit code: 2 for usage mistakes, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }

    /// The error and its causes on one line, each cause once (some errors print their
    /// source in their own message as well).
    pub fn one_line(&self) -> String {
        let mut line = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = cause.source();
        }
        line.replace('\n', " ")
    }
}

/// An API error for `what`: a missing object, a refusal with the API's own message, or a
/// transport failure.
pub fn api_error(what: impl Into<String>, error: kube::Error) -> Error {
    let what = what.into();
    match error {
        kube::Error::Api(status) if status.code == 404 => Error::NotFound(what),
        kube::Error::Api(status) => Error::ApiRefused {
            what,
            message: if status.message.is_empty() {
                format!("{} {}", status.code, status.reason)
            } else {
                status.message.clone()
            },
        },
        source => Error::Api { what, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_mistakes_exit_2_and_failures_1() {
        assert_eq!(Error::Usage("x".into()).exit_code(), 2);
        assert_eq!(Error::Refused("x".into()).exit_code(), 1);
        assert_eq!(Error::NotReady("x".into()).exit_code(), 1);
    }

    #[test]
    fn one_line_lists_each_cause_once() {
        let error = Error::Tls(podiam_runtime::tls::TlsError::Config("bad\nkey".into()));
        assert_eq!(
            error.one_line(),
            "loading the servers' CA (--tls-ca): building the TLS configuration: bad key"
        );
    }

    #[test]
    fn api_errors_keep_the_apis_message() {
        let status = |code: u16, message: &str| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                message: message.into(),
                reason: "Forbidden".into(),
                ..Default::default()
            }))
        };
        assert!(matches!(
            api_error("pod a/b", status(404, "not found")),
            Error::NotFound(what) if what == "pod a/b"
        ));
        assert_eq!(
            api_error("patching pod a/b", status(403, "pods \"b\" is forbidden")).to_string(),
            "patching pod a/b: pods \"b\" is forbidden"
        );
    }
}
