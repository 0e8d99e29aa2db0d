//! The emulator's error type and its one mapping to the apiserver's wire form: a
//! `kind: Status` object with the matching HTTP status code.

use std::path::PathBuf;

use serde_json::{Value, json};

/// Everything that can go wrong in the emulator, both for in-process callers and on the wire.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// Binding the listening socket failed.
    #[error("binding the emulator's listener")]
    Bind(#[source] std::io::Error),
    /// Writing the kubeconfig file failed.
    #[error("writing the kubeconfig {}", path.display())]
    WriteKubeconfig {
        /// Where the kubeconfig was to be written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The object (or the namespace it would live in) does not exist.
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        /// Plural resource name, e.g. `pods`.
        resource: &'static str,
        /// Object name.
        name: String,
    },
    /// A create named an object that already exists.
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        /// Plural resource name.
        resource: &'static str,
        /// Object name.
        name: String,
    },
    /// An optimistic-concurrency or precondition check failed.
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {reason}")]
    Conflict {
        /// Plural resource name.
        resource: &'static str,
        /// Object name.
        name: String,
        /// Why, in the apiserver's words.
        reason: String,
    },
    /// The object is not valid (including patches that cannot be applied).
    #[error("{kind} \"{name}\" is invalid: {message}")]
    Invalid {
        /// The object's kind, e.g. `Pod`.
        kind: &'static str,
        /// Object name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// A resourceVersion or continue token is older than the retained history.
    #[error("{0}")]
    Expired(String),
    /// The request's Content-Type is not one the emulator understands.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The path exists but does not support the method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The path does not name anything the emulator serves.
    #[error("the server could not find the requested resource")]
    UnknownPath,
    /// The request's credentials are not valid (unknown or expired token).
    #[error("Unauthorized")]
    Unauthorized,
    /// RBAC denied the request. `message` is the whole apiserver message
    /// (`pods is forbidden: User "alice" cannot list resource "pods" …`).
    #[error("{message}")]
    Forbidden {
        /// The message.
        message: String,
        /// The object's name ("" for collections).
        name: String,
        /// The API group.
        group: String,
        /// The resource (plural) or "" for non-resource paths.
        resource: String,
    },
    /// A part of the server is (made) unavailable.
    #[error("{0}")]
    ServiceUnavailable(String),
    /// Setting up the emulator's TLS certificate or configuration failed.
    #[error("setting up TLS: {0}")]
    Tls(String),
    /// Something failed inside the server, e.g. calling an admission webhook
    /// (`failed calling webhook "NAME": why`); the apiserver's `NewInternalError`.
    #[error("Internal error occurred: {0}")]
    Internal(String),
    /// An admission webhook denied the request: its own status code (at least 400), reason
    /// (may be empty) and message (`admission webhook "NAME" denied the request: …`).
    #[error("{message}")]
    Denied {
        /// The HTTP status code.
        code: u16,
        /// The Status `reason` the webhook gave ("" for none).
        reason: String,
        /// The whole message.
        message: String,
    },
}

impl EmulatorError {
    /// The HTTP status code and `reason` of the apiserver's Status for this error.
    pub fn code_and_reason(&self) -> (u16, &'static str) {
        match self {
            EmulatorError::NotFound { .. } | EmulatorError::UnknownPath => (404, "NotFound"),
            EmulatorError::AlreadyExists { .. } => (409, "AlreadyExists"),
            EmulatorError::Conflict { .. } => (409, "Conflict"),
            EmulatorError::Invalid { .. } => (422, "Invalid"),
            EmulatorError::BadRequest(_) => (400, "BadRequest"),
            EmulatorError::Expired(_) => (410, "Expired"),
            EmulatorError::UnsupportedMediaType(_) => (415, "UnsupportedMediaType"),
            EmulatorError::MethodNotAllowed(_) => (405, "MethodNotAllowed"),
            EmulatorError::Unauthorized => (401, "Unauthorized"),
            EmulatorError::Forbidden { .. } => (403, "Forbidden"),
            EmulatorError::ServiceUnavailable(_) => (503, "ServiceUnavailable"),
            // The webhook's own reason replaces this one in the Status.
            EmulatorError::Denied { code, .. } => (*code, ""),
            EmulatorError::Bind(_)
            | EmulatorError::WriteKubeconfig { .. }
            | EmulatorError::Tls(_)
            | EmulatorError::Internal(_) => (500, "InternalError"),
        }
    }

    /// The `kind: Status` object the apiserver would answer with.
    pub fn to_status(&self) -> Value {
        let (code, reason) = self.code_and_reason();
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": reason,
            "code": code,
        });
        let details = match self {
            EmulatorError::NotFound { resource, name }
            | EmulatorError::AlreadyExists { resource, name }
            | EmulatorError::Conflict { resource, name, .. } => {
                Some(json!({"name": name, "kind": resource}))
            }
            EmulatorError::Invalid {
                kind,
                name,
                message,
            } => Some(json!({"name": name, "kind": kind, "causes": [invalid_cause(message)]})),
            EmulatorError::Forbidden {
                name,
                group,
                resource,
                ..
            } => {
                let mut details = serde_json::Map::new();
                for (key, value) in [("name", name), ("group", group), ("kind", resource)] {
                    if !value.is_empty() {
                        details.insert(key.into(), json!(value));
                    }
                }
                Some(Value::Object(details))
            }
            EmulatorError::Internal(cause) => Some(json!({"causes": [{"message": cause}]})),
            _ => None,
        };
        if let EmulatorError::Denied { reason, .. } = self {
            // The webhook's reason, or none at all (`omitempty`), as the apiserver sends it.
            status["reason"] = json!(reason);
            if reason.is_empty()
                && let Some(fields) = status.as_object_mut()
            {
                fields.remove("reason");
            }
        }
        if let Some(details) = details {
            status["details"] = details;
        }
        status
    }
}

/// A `StatusCause` for an Invalid message: `field.path: what is wrong` becomes
/// `{field, message}` (kubectl prints `The Kind "name" is invalid: field: message` from
/// the causes, not from the message); other messages are a cause without a field.
fn invalid_cause(message: &str) -> Value {
    match message.split_once(": ") {
        Some((field, rest)) if !field.is_empty() && !field.contains(' ') => {
            json!({"reason": "FieldValueInvalid", "field": field, "message": rest})
        }
        _ => json!({"message": message}),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_apiserver_statuses() {
        let cases = [
            (
                EmulatorError::NotFound {
                    resource: "pods",
                    name: "web".into(),
                },
                404,
                "NotFound",
                "pods \"web\" not found",
            ),
            (
                EmulatorError::AlreadyExists {
                    resource: "namespaces",
                    name: "a".into(),
                },
                409,
                "AlreadyExists",
                "namespaces \"a\" already exists",
            ),
            (
                EmulatorError::Conflict {
                    resource: "pods",
                    name: "web".into(),
                    reason: "the object has been modified".into(),
                },
                409,
                "Conflict",
                "Operation cannot be fulfilled on pods \"web\": the object has been modified",
            ),
            (
                EmulatorError::Expired("too old".into()),
                410,
                "Expired",
                "too old",
            ),
            (
                EmulatorError::BadRequest("bad".into()),
                400,
                "BadRequest",
                "bad",
            ),
            (
                EmulatorError::Unauthorized,
                401,
                "Unauthorized",
                "Unauthorized",
            ),
            (
                EmulatorError::Forbidden {
                    message: "pods is forbidden: User \"alice\" cannot list resource \"pods\""
                        .into(),
                    name: String::new(),
                    group: String::new(),
                    resource: "pods".into(),
                },
                403,
                "Forbidden",
                "pods is forbidden: User \"alice\" cannot list resource \"pods\"",
            ),
            (
                EmulatorError::ServiceUnavailable("down".into()),
                503,
                "ServiceUnavailable",
                "down",
            ),
        ];
        let invalid = EmulatorError::Invalid {
            kind: "RoleBinding",
            name: "b".into(),
            message: "roleRef: Invalid value: cannot be changed".into(),
        };
        assert_eq!(
            invalid.to_status()["details"]["causes"],
            json!([{"reason": "FieldValueInvalid", "field": "roleRef",
                    "message": "Invalid value: cannot be changed"}])
        );
        for (error, code, reason, message) in cases {
            let status = error.to_status();
            assert_eq!(status["code"], code);
            assert_eq!(status["reason"], reason);
            assert_eq!(status["message"], message);
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["status"], "Failure");
        }
    }

    #[test]
    fn webhook_errors_map_to_apiserver_statuses() {
        let internal =
            EmulatorError::Internal("failed calling webhook \"w.x.y\": refused".into()).to_status();
        assert_eq!(internal["code"], 500);
        assert_eq!(internal["reason"], "InternalError");
        assert_eq!(
            internal["message"],
            "Internal error occurred: failed calling webhook \"w.x.y\": refused"
        );
        assert_eq!(
            internal["details"]["causes"],
            json!([{"message": "failed calling webhook \"w.x.y\": refused"}])
        );
        let denied = EmulatorError::Denied {
            code: 403,
            reason: "Forbidden".into(),
            message: "admission webhook \"w.x.y\" denied the request: no".into(),
        }
        .to_status();
        assert_eq!(denied["code"], 403);
        assert_eq!(denied["reason"], "Forbidden");
        assert_eq!(
            denied["message"],
            "admission webhook \"w.x.y\" denied the request: no"
        );
        let unexplained = EmulatorError::Denied {
            code: 400,
            reason: String::new(),
            message: "admission webhook \"w.x.y\" denied the request without explanation".into(),
        }
        .to_status();
        assert_eq!(unexplained["code"], 400);
        assert!(unexplained.get("reason").is_none(), "{unexplained}");
    }
}
