//! What podiam's daemons run on, apart from the wire contract (`podiam-proto`).
//!
//! - [`serve`]: the HTTP/1 accept loop with limits that every podiam listener shares.
//! - [`telemetry`]: the logging set-up, duration flags and signal handling both binaries
//!   share, and `Escaped` for logging text a caller chose.
//! - [`tls`]: loading and checking the CA, certificate and key PEM files, and the rustls
//!   configurations built from them: the server asks for a client certificate from the CA,
//!   the agent verifies the server name.
//! - [`rotate`]: those configurations kept current as the files change on disk.
//! - [`accept`]: the server's TLS accept loop; [`connect`]: the agent's TLS dialler;
//!   [`reading`]: the bounds on gRPC calls whose requests are still arriving.
//! - [`net`]: where connections come from ([`net::Listener`]) and go to ([`net::Dialer`]):
//!   TCP for the daemons, and with the feature `test-util`, [`memory`]: an in-memory
//!   network for in-process tests on paused time.
//! - [`clock`]: the wall clock's one reading, [`clock::now_unix`].
//! - [`jwt`]: the one spelling of a JWT that agents and servers take from a pod or an agent.

pub mod accept;
pub mod clock;
pub mod connect;
pub mod jwt;
#[cfg(any(test, feature = "test-util"))]
pub mod memory;
pub mod net;
pub mod reading;
pub mod rotate;
pub mod serve;
pub mod telemetry;
pub mod tls;
