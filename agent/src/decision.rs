//! What the servers say, in the agent's own types, converted from the wire once, here: a
//! failed call's `tonic::Status` becomes a [`ServerError`].
//!
//! It sits apart from both its users — the failover ([`crate::replicas`]), which classifies
//! answers, and the calls and node stream ([`crate::servers`]) — so that neither imports
//! the other back.

use podiam_proto::Reason;

/// Why a call to the servers gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The server refused, saying why.
    #[error("{message}")]
    Refused { reason: Reason, message: String },
    /// The server could not be reached or did not answer in time.
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// The server answered with an error podiam does not define.
    #[error("server error: {0}")]
    Other(String),
}

impl From<tonic::Status> for ServerError {
    fn from(status: tonic::Status) -> Self {
        if let Some(reason) = Reason::of(&status) {
            return ServerError::Refused {
                reason,
                message: status.message().to_string(),
            };
        }
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                ServerError::Unavailable(status.message().to_string())
            }
            _ => ServerError::Other(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}
