//! The agent's proof of which node it runs on: its projected ServiceAccount token.
//!
//! The kubelet writes the token (audience `podiam`, short-lived) into the agent's pod and
//! replaces it before it expires. [`AgentToken`] reads the file at start and again every
//! [`TOKEN_RELOAD_INTERVAL`], and [`Authorize`] puts the current token in the
//! `authorization` metadata of every call to the servers. The servers check it with a
//! TokenReview and answer only about pods on the node of the pod the token is bound to; the
//! node name the agent sends is only its claim.
//!
//! The token is a secret: it is never logged, and [`AgentToken`]'s `Debug` hides it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};

/// How often the token file is read again. The kubelet replaces a projected token at 80% of
/// its life (48 minutes for the DaemonSet's hour) and the old one stays valid until it
/// expires, so a new token is picked up long before the old one stops working.
pub const TOKEN_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Longest token accepted from the file (projected tokens are around 1 KiB).
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no token")]
    Empty { path: PathBuf },
    #[error("{path} does not hold a token (too long, or not printable ASCII)")]
    Malformed { path: PathBuf },
}

/// The current token, re-read from its file.
pub struct AgentToken {
    path: Option<PathBuf>,
    current: RwLock<Option<MetadataValue<Ascii>>>,
}

impl std::fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentToken")
            .field("path", &self.path)
            .field("loaded", &self.loaded())
            .finish()
    }
}

/// The `authorization` value for a token: `Bearer TOKEN`, if the token is usable.
fn header(token: &str) -> Option<MetadataValue<Ascii>> {
    let token = token.trim();
    let printable = token.bytes().all(|b| b.is_ascii_graphic());
    if token.is_empty() || token.len() > MAX_TOKEN_LEN || !printable {
        return None;
    }
    let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().ok()?;
    value.set_sensitive(true);
    Some(value)
}

impl AgentToken {
    /// A token read from `path` (nothing read yet: see [`AgentToken::reload`]).
    pub fn from_file(path: &Path) -> AgentToken {
        AgentToken {
            path: Some(path.to_path_buf()),
            current: RwLock::new(None),
        }
    }

    /// No token at all: calls carry none (for clients that are not agents).
    pub fn none() -> AgentToken {
        AgentToken {
            path: None,
            current: RwLock::new(None),
        }
    }

    /// A fixed token (tests).
    pub fn fixed(token: &str) -> AgentToken {
        AgentToken {
            path: None,
            current: RwLock::new(header(token)),
        }
    }

    /// Whether a token is loaded.
    pub fn loaded(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn value(&self) -> Option<MetadataValue<Ascii>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the file again; `Ok(true)` when the token changed. A file that cannot be used
    /// leaves the last good token in place (it may still be valid).
    pub fn reload(&self) -> Result<bool, TokenFileError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.clone(),
            source,
        })?;
        if text.trim().is_empty() {
            return Err(TokenFileError::Empty { path: path.clone() });
        }
        let value =
            header(&text).ok_or_else(|| TokenFileError::Malformed { path: path.clone() })?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let changed = current.as_ref() != Some(&value);
        *current = Some(value);
        Ok(changed)
    }

    /// Reads the file every [`TOKEN_RELOAD_INTERVAL`] until `shutdown`.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TOKEN_RELOAD_INTERVAL) => {}
            }
            match self.reload() {
                Ok(changed) => {
                    if changed || failing {
                        tracing::info!(path = ?self.path, "agent token (re)loaded");
                    }
                    failing = false;
                }
                Err(error) => {
                    // Said once per failing spell, not every interval.
                    if !failing {
                        tracing::error!(%error, "cannot read the agent's token; servers will refuse this agent once the last one expires");
                    }
                    failing = true;
                }
            }
        }
    }
}

/// Puts the agent's current token on every call.
#[derive(Clone, Debug)]
pub struct Authorize(pub Arc<AgentToken>);

impl tonic::service::Interceptor for Authorize {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = self.0.value() {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn authorization(token: &AgentToken) -> Option<String> {
        let mut interceptor = Authorize(Arc::new(AgentToken {
            path: None,
            current: RwLock::new(token.value()),
        }));
        let request = interceptor.call(tonic::Request::new(())).expect("call");
        request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().expect("ascii").to_string())
    }

    #[test]
    fn the_token_is_read_trimmed_and_re_read_when_it_changes() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        let token = AgentToken::from_file(&path);
        assert!(token.reload().is_err(), "no file yet");
        assert_eq!(authorization(&token), None);
        std::fs::write(&path, "abc.def.ghi\n").expect("write");
        assert!(token.reload().expect("read"));
        assert_eq!(authorization(&token).as_deref(), Some("Bearer abc.def.ghi"));
        assert!(!token.reload().expect("read"), "unchanged");
        std::fs::write(&path, "second").expect("write");
        assert!(token.reload().expect("read"));
        assert_eq!(authorization(&token).as_deref(), Some("Bearer second"));
        // A broken file keeps the last good token.
        std::fs::write(&path, "").expect("write");
        assert!(matches!(token.reload(), Err(TokenFileError::Empty { .. })));
        std::fs::write(&path, "two words").expect("write");
        assert!(matches!(
            token.reload(),
            Err(TokenFileError::Malformed { .. })
        ));
        assert_eq!(authorization(&token).as_deref(), Some("Bearer second"));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let token = Arc::new(AgentToken::fixed("very-secret-token"));
        assert!(token.loaded());
        let shown = format!("{token:?} {:?}", Authorize(Arc::clone(&token)));
        assert!(!shown.contains("very-secret"), "{shown}");
    }
}
