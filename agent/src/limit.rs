//! Token buckets per peer address: how often one address may do something that costs others
//! (a TokenReview at the API server, a request to the node's metadata service).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// A bucket per address, each holding up to `burst` and refilled at `rate` a second.
/// Bounded: at `max_addresses`, full buckets (the same as none) are dropped to make room, and
/// with none full a new address is refused.
#[derive(Debug)]
pub struct PerAddress {
    buckets: Mutex<HashMap<IpAddr, (f64, tokio::time::Instant)>>,
    rate: f64,
    burst: f64,
    max_addresses: usize,
}

impl PerAddress {
    pub fn new(rate: f64, burst: f64, max_addresses: usize) -> PerAddress {
        PerAddress {
            buckets: Mutex::default(),
            rate,
            burst,
            max_addresses,
        }
    }

    /// Takes one from `peer`'s bucket; false when it is empty.
    pub fn allow(&self, peer: IpAddr) -> bool {
        let now = tokio::time::Instant::now();
        let refill = |elapsed: Duration| elapsed.as_secs_f64() * self.rate;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= self.max_addresses && !buckets.contains_key(&peer) {
            buckets.retain(|_, (tokens, at)| *tokens + refill(now - *at) < self.burst);
            if buckets.len() >= self.max_addresses {
                return false;
            }
        }
        let (tokens, at) = buckets.entry(peer).or_insert((self.burst, now));
        *tokens = (*tokens + refill(now - *at)).min(self.burst);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }

    /// Gives back what [`PerAddress::allow`] took from `peer` for something then not done.
    pub fn refund(&self, peer: IpAddr) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((tokens, _)) = buckets.get_mut(&peer) {
            *tokens = (*tokens + 1.0).min(self.burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_address_has_its_burst_then_the_rate() {
        let limit = PerAddress::new(2.0, 8.0, 16);
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let burst = (0..20).take_while(|_| limit.allow(a)).count();
        assert_eq!(burst, 8);
        assert!(limit.allow(b), "another address has its own bucket");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(limit.allow(a), "refilled at the rate");
        assert!(!limit.allow(a));
    }

    #[tokio::test(start_paused = true)]
    async fn addresses_are_bounded_and_full_buckets_make_room() {
        let limit = PerAddress::new(1.0, 2.0, 2);
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        assert!(limit.allow(ip(1)));
        assert!(limit.allow(ip(2)));
        assert!(!limit.allow(ip(3)), "no room: both buckets in use");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(limit.allow(ip(3)), "refilled buckets are dropped for it");
    }
}
