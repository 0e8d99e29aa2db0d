//! Addresses the servers placed on another node, remembered for a few seconds.
//!
//! Every node's metadata port is on the node's address, where any pod of the cluster can
//! reach it. A request from a pod of another node is not in this node's table; the agent
//! waits for the table (a new pod's address may be a moment behind) and then asks the
//! servers, who answer `other-node`. Without a memory of that answer, one pod looping over
//! every node's port would cost the servers a call per request and node. With it, the same
//! address is refused after the table's wait with no call, for [`REMEMBERED_FOR`]; a pod of
//! this node that takes the address over is answered from the table as soon as the table
//! has it (the wait ends then), since only addresses the table does not know are looked up
//! here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long an address the servers placed on another node is refused without asking.
pub const REMEMBERED_FOR: Duration = Duration::from_secs(10);
/// Addresses remembered at once; beyond it, more are asked about as before.
pub const CAPACITY: usize = 4096;

/// The addresses the servers placed on another node, with when they did.
#[derive(Debug, Default)]
pub struct Elsewhere {
    placed: Mutex<HashMap<IpAddr, Instant>>,
}

impl Elsewhere {
    /// The servers placed `ip` on another node at `now`.
    pub fn remember(&self, ip: IpAddr, now: Instant) {
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        if placed.len() >= CAPACITY && !placed.contains_key(&ip) {
            placed.retain(|_, at| now.saturating_duration_since(*at) < REMEMBERED_FOR);
            if placed.len() >= CAPACITY {
                return;
            }
        }
        placed.insert(ip, now);
    }

    /// Whether the servers placed `ip` on another node less than [`REMEMBERED_FOR`] before
    /// `now`.
    pub fn recent(&self, ip: IpAddr, now: Instant) -> bool {
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        match placed.get(&ip) {
            Some(at) if now.saturating_duration_since(*at) < REMEMBERED_FOR => true,
            Some(_) => {
                placed.remove(&ip);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_remembered_for_a_while_and_the_memory_is_bounded() {
        let elsewhere = Elsewhere::default();
        let t0 = Instant::now();
        let ip = IpAddr::from([10, 2, 0, 1]);
        assert!(!elsewhere.recent(ip, t0));
        elsewhere.remember(ip, t0);
        assert!(elsewhere.recent(ip, t0 + REMEMBERED_FOR / 2));
        assert!(!elsewhere.recent(ip, t0 + REMEMBERED_FOR));
        // Full: the expired make room; while none has expired, more are not remembered.
        for i in 0..CAPACITY as u32 {
            elsewhere.remember(IpAddr::from(i.to_be_bytes()), t0);
        }
        let late = IpAddr::from([10, 3, 0, 1]);
        elsewhere.remember(late, t0 + Duration::from_secs(1));
        assert!(!elsewhere.recent(late, t0 + Duration::from_secs(1)));
        elsewhere.remember(late, t0 + REMEMBERED_FOR);
        assert!(elsewhere.recent(late, t0 + REMEMBERED_FOR));
    }
}
