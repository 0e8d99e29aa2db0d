//! Which server replica owns which credential key: rendezvous (highest random weight)
//! hashing of the key's digest over the ready replicas' names.
//!
//! Agents and replicas compute it alike: a replica prefetches and refreshes only the keys it
//! owns, and an agent sends a pod's GetCredentials first to the owner of the pod's key
//! (`PodState.credential_key`). When a replica comes or goes, only the keys it owned (or
//! wins) move; every other key stays where it was. The hash is fixed (FNV-1a, then a
//! 64-bit finaliser), not the standard library's seeded one: every process must agree.

/// The digest of a credential key, from its parts in order (the server's `CacheKey`): each
/// part is length-prefixed, so no two different lists of parts run together alike.
pub fn key_digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut hash = FNV_OFFSET;
    for part in parts {
        hash = fnv(hash, &(part.len() as u64).to_le_bytes());
        hash = fnv(hash, part);
    }
    // 0 means "no key" on the wire.
    mix(hash).max(1)
}

/// The digest of an STS session's key (`PodState.credential_key`): the role, the external
/// ID, the session name, the tags and whether they are transitive. Pods whose sessions have
/// one digest share credentials.
pub fn credential_key(
    role_arn: &str,
    external_id: Option<&str>,
    session_name: &str,
    tags: &[(String, String)],
    transitive_tags: bool,
) -> u64 {
    let flags = [u8::from(external_id.is_some()), u8::from(transitive_tags)];
    let mut parts: Vec<&[u8]> = vec![
        role_arn.as_bytes(),
        &flags,
        external_id.unwrap_or("").as_bytes(),
        session_name.as_bytes(),
    ];
    for (key, value) in tags {
        parts.push(key.as_bytes());
        parts.push(value.as_bytes());
    }
    key_digest(parts)
}

/// The replica's weight for `key`: the highest weight owns it.
pub fn weight(replica: &str, key: u64) -> u64 {
    mix(fnv(FNV_OFFSET, replica.as_bytes()) ^ mix(key))
}

/// The owner of `key` among `replicas` (ties, which need equal names, go to the first).
pub fn owner<'a>(key: u64, replicas: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(u64, &str)> = None;
    for replica in replicas {
        let w = weight(replica, key);
        if best.is_none_or(|(top, _)| w > top) {
            best = Some((w, replica));
        }
    }
    best.map(|(_, replica)| replica)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// A 64-bit finaliser (splitmix64's): spreads FNV's weak low bits over the whole word.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(|i| key_digest([format!("arn:aws:iam::1:role/r{i}").as_bytes()]))
    }

    #[test]
    fn digests_are_fixed_and_tell_parts_apart() {
        // Fixed across processes and releases: agents and servers of one cluster agree.
        assert_eq!(
            key_digest([b"a".as_slice(), b"bc"]),
            key_digest([b"a".as_slice(), b"bc"])
        );
        assert_ne!(
            key_digest([b"a".as_slice(), b"bc"]),
            key_digest([b"ab".as_slice(), b"c"])
        );
        assert_ne!(
            key_digest([b"a".as_slice()]),
            key_digest([b"a".as_slice(), b""])
        );
        assert_ne!(key_digest([b"".as_slice()]), 0);
    }

    #[test]
    fn keys_spread_evenly_over_replicas() {
        let replicas = ["podiam-server-0", "podiam-server-1", "podiam-server-2"];
        let mut counts = [0usize; 3];
        for key in keys(30_000) {
            let who = owner(key, replicas).expect("an owner");
            counts[replicas
                .iter()
                .position(|r| *r == who)
                .expect("one of them")] += 1;
        }
        for count in counts {
            assert!(
                (9_000..11_000).contains(&count),
                "uneven spread: {counts:?}"
            );
        }
    }

    #[test]
    fn a_replica_leaving_moves_only_its_own_keys_and_one_coming_takes_only_its_share() {
        let three = ["a", "b", "c"];
        let two = ["a", "b"];
        let four = ["a", "b", "c", "d"];
        let mut moved_to_d = 0;
        for key in keys(10_000) {
            let before = owner(key, three).expect("an owner");
            let after = owner(key, two).expect("an owner");
            if before != "c" {
                assert_eq!(before, after, "a key of a surviving replica moved");
            }
            let grown = owner(key, four).expect("an owner");
            if grown != before {
                assert_eq!(grown, "d", "a key moved between replicas that stayed");
                moved_to_d += 1;
            }
        }
        assert!(
            (2_000..3_000).contains(&moved_to_d),
            "{moved_to_d} keys to the new replica"
        );
    }

    #[test]
    fn the_order_of_replicas_does_not_matter() {
        for key in keys(1_000) {
            assert_eq!(owner(key, ["x", "y", "z"]), owner(key, ["z", "x", "y"]));
        }
        assert_eq!(owner(7, std::iter::empty()), None);
    }
}
