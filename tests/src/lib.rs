//! podiam's end-to-end harness, shared by the test suites, the local demo and the benchmark
//! (the `podiam-bench` crate).
//!
//! - [`kube_emulator`]: an in-process Kubernetes API (core/v1 pods, namespaces, events) that
//!   speaks the real list/watch/patch protocol well enough for `kubectl` and kube-rs.
//! - [`netns`]: network namespaces as nodes and pods (veth pairs, addresses, routes).
//! - [`bridge`]: loopback forwarders from inside a namespace to the root namespace.
//! - [`help`]: the flags and environment variables a command's `--help` lists.
//! - [`moto`]: moto's STS server on a free loopback port.
//! - [`sts_proxy`]: a recording, fault-injecting proxy between the server and moto.
//! - [`plugin`]: the `kubectl-iam` binary run as a user runs it.
//! - [`process`]: child processes that die with their owner, with their logs kept.
//! - [`sdk_load`]: steady load from long-lived SDK clients (botocore, the JS, Rust and Go
//!   SDKs) in pods, counting what they saw.
//! - [`world`]: a whole podiam installation (emulator, moto, server replicas, node, pods,
//!   agent) and the faults a test can inflict on it.

pub mod bridge;
pub mod dockerfile;
pub mod fixtures;
pub mod help;
pub mod identity;
pub mod kube_emulator;
pub mod moto;
pub mod netns;
pub mod plugin;
pub mod process;
pub mod sdk_load;
pub mod sts_proxy;
pub mod world;
