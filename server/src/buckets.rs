//! Token buckets, alone and one per key (a namespace's Events, a node's agent calls), in
//! bounded memory.

use std::collections::HashMap;

/// A token bucket: tokens, and when they were last refilled (ms).
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    pub tokens: f64,
    refilled_ms: i64,
}

impl Bucket {
    pub fn full(burst: u32) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            refilled_ms: 0,
        }
    }

    /// Refilled at `per_second` up to `burst` by `now_ms`: whether a token is there.
    pub fn refill(&mut self, now_ms: i64, burst: u32, per_second: f64) -> bool {
        let elapsed_s = (now_ms - self.refilled_ms).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed_s * per_second).min(f64::from(burst));
        self.refilled_ms = now_ms;
        self.tokens >= 1.0
    }
}

/// A bucket per key, each of `burst` refilled at `per_second`, for at most `most` keys: when
/// a new key finds them all taken, the buckets that are full again are forgotten (a full
/// bucket is what a new key gets), and a key that still finds no room is not limited.
#[derive(Debug)]
pub struct KeyedBuckets {
    burst: u32,
    per_second: f64,
    most: usize,
    buckets: HashMap<String, Bucket>,
}

impl KeyedBuckets {
    pub fn new(burst: u32, per_second: f64, most: usize) -> KeyedBuckets {
        KeyedBuckets {
            burst,
            per_second,
            most,
            buckets: HashMap::new(),
        }
    }

    /// Whether `key`'s bucket has a token at `now_ms` (none taken: see [`KeyedBuckets::take`]).
    pub fn has(&mut self, now_ms: i64, key: &str) -> bool {
        let (burst, per_second) = (self.burst, self.per_second);
        if let Some(bucket) = self.buckets.get_mut(key) {
            return bucket.refill(now_ms, burst, per_second);
        }
        if self.buckets.len() >= self.most {
            self.buckets.retain(|_, bucket| {
                bucket.refill(now_ms, burst, per_second);
                bucket.tokens < f64::from(burst)
            });
        }
        if self.buckets.len() < self.most {
            let mut bucket = Bucket::full(burst);
            bucket.refilled_ms = now_ms;
            self.buckets.insert(key.to_string(), bucket);
        }
        burst >= 1
    }

    /// Takes one of `key`'s tokens (after [`KeyedBuckets::has`] found one).
    pub fn take(&mut self, key: &str) {
        if let Some(bucket) = self.buckets.get_mut(key) {
            bucket.tokens -= 1.0;
        }
    }

    /// [`KeyedBuckets::has`], and the token taken if so.
    pub fn admit(&mut self, now_ms: i64, key: &str) -> bool {
        let has = self.has(now_ms, key);
        if has {
            self.take(key);
        }
        has
    }

    /// Keys with a bucket.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_burst_then_its_rate() {
        let mut buckets = KeyedBuckets::new(3, 2.0, 16);
        for _ in 0..3 {
            assert!(buckets.admit(1_000, "a"));
        }
        assert!(!buckets.admit(1_000, "a"), "the burst is spent");
        assert!(buckets.admit(1_000, "b"), "another key has its own");
        assert!(!buckets.admit(1_400, "a"), "0.8 of a token");
        assert!(buckets.admit(1_500, "a"), "a token in half a second");
        assert!(!buckets.admit(1_500, "a"));
        assert!(buckets.has(60_000, "a"));
        for _ in 0..3 {
            assert!(buckets.admit(60_000, "a"), "refilled to the burst, no more");
        }
        assert!(!buckets.admit(60_000, "a"));
    }

    #[test]
    fn keys_beyond_the_most_forget_full_buckets_first() {
        let mut buckets = KeyedBuckets::new(2, 1.0, 4);
        for key in ["a", "b", "c", "d"] {
            assert!(buckets.admit(0, key));
        }
        assert!(buckets.admit(0, "a"));
        assert!(!buckets.admit(0, "a"), "a's burst is spent");
        // All four are taken and none is full: a new key is not limited, nor kept.
        for _ in 0..5 {
            assert!(buckets.admit(0, "e"));
        }
        assert_eq!(buckets.len(), 4);
        // Later the refilled ones are forgotten for it; a's limit held meanwhile.
        assert!(!buckets.admit(500, "a"));
        assert!(buckets.admit(5_000, "e"));
        assert_eq!(buckets.len(), 1, "the full ones forgotten, e kept");
        assert!(buckets.admit(5_000, "e"));
        assert!(!buckets.admit(5_000, "e"));
    }
}
