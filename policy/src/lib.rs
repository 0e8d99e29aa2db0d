//! podiam's decisions, as pure code over plain data: no I/O, no runtime, no socket. The
//! server runs them over the view its watches keep; `kubectl iam explain` runs the very same
//! code over what it read from the API itself, so the two never decide differently.
//!
//! - [`policy`]: role resolution and the namespace's permitted regex.
//! - [`index`]: the cluster view those decisions read: live pods by IP, by node and by UID
//!   (and running host-network pods, such as agents, by UID); namespaces' compiled rules.
//! - [`decision`]: which pod is behind an address and which role it may have, for a caller
//!   scoped to one node or to the cluster; what an agent's node stream carries; the
//!   explanation operators get; the node an agent's reviewed token proves; and every
//!   refusal with its wire reason.

pub mod decision;
pub mod index;
pub mod policy;
pub mod slim;
