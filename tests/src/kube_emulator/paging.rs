//! List pagination: the opaque `continue` token and page selection. Pure functions.
//!
//! A token records the resourceVersion of the first page and the key (namespace, name) of
//! the last object returned, base64url-encoded JSON like the apiserver's own tokens. The
//! next page is served from the current state, starting after that key (the apiserver
//! serves it from an etcd snapshot at the token's revision; the emulator keeps no
//! snapshots, so a page may reflect writes made after the first page). A token whose
//! resourceVersion has fallen out of the retained history is answered with 410 Expired, as
//! the apiserver does after compaction.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// The decoded `continue` token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContinueToken {
    /// The resourceVersion of the list's first page.
    pub resource_version: u64,
    /// Namespace of the last object returned ("" for cluster-scoped).
    pub namespace: String,
    /// Name of the last object returned.
    pub name: String,
}

/// A token that is not one the emulator issued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("continue key is not valid: {0}")]
pub struct BadContinueToken(pub String);

const TOKEN_VERSION: &str = "podiam.emulator/v1";

impl ContinueToken {
    /// The opaque string form.
    pub fn encode(&self) -> String {
        let body = json!({
            "v": TOKEN_VERSION,
            "rv": self.resource_version,
            "ns": self.namespace,
            "name": self.name,
        });
        URL_SAFE_NO_PAD.encode(body.to_string())
    }

    /// Parses a token produced by [`ContinueToken::encode`].
    pub fn decode(text: &str) -> Result<ContinueToken, BadContinueToken> {
        let bad = |why: &str| BadContinueToken(why.to_string());
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|_| bad("not base64"))?;
        let body: Value = serde_json::from_slice(&bytes).map_err(|_| bad("not JSON"))?;
        if body["v"] != TOKEN_VERSION {
            return Err(bad("unknown version"));
        }
        Ok(ContinueToken {
            resource_version: body["rv"]
                .as_u64()
                .ok_or_else(|| bad("no resourceVersion"))?,
            namespace: body["ns"]
                .as_str()
                .ok_or_else(|| bad("no namespace"))?
                .to_string(),
            name: body["name"]
                .as_str()
                .ok_or_else(|| bad("no name"))?
                .to_string(),
        })
    }
}

/// One page cut from a sorted, filtered list of keyed items.
#[derive(Debug, PartialEq, Eq)]
pub struct Page<T> {
    /// The items on this page.
    pub items: Vec<T>,
    /// The token for the next page, if there are more items.
    pub continue_token: Option<ContinueToken>,
    /// How many items follow this page.
    pub remaining: usize,
}

/// Cuts the page that follows `after` (exclusive) from `items`, which must be sorted by
/// key. `limit` of `None` or 0 means no limit. `list_rv` is stamped into the next token.
///
/// `items` is consumed lazily: only the page's items are kept (the caller can pass borrowed
/// objects and clone just those), and the items after the page are only counted when
/// `count_rest` is set, so walking a long list page by page stays linear.
pub fn paginate<'k, T>(
    items: impl IntoIterator<Item = (&'k (String, String), T)>,
    after: Option<&ContinueToken>,
    limit: Option<usize>,
    list_rv: u64,
    count_rest: bool,
) -> Page<T> {
    let last = after.map(|token| (token.namespace.clone(), token.name.clone()));
    let mut rest = items
        .into_iter()
        .filter(|(key, _)| last.as_ref().is_none_or(|last| *key > last));
    let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let mut page: Vec<(&(String, String), T)> = rest.by_ref().take(limit).collect();
    let Some(first_after) = rest.next() else {
        return Page {
            items: page.into_iter().map(|(_, item)| item).collect(),
            continue_token: None,
            remaining: 0,
        };
    };
    drop(first_after);
    let remaining = if count_rest { 1 + rest.count() } else { 1 };
    let continue_token = page.last().map(|((namespace, name), _)| ContinueToken {
        resource_version: list_rv,
        namespace: namespace.clone(),
        name: name.clone(),
    });
    Page {
        items: page.drain(..).map(|(_, item)| item).collect(),
        continue_token,
        remaining,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<((String, String), usize)> {
        (0..n)
            .map(|i| (("ns".to_string(), format!("p{i}")), i))
            .collect()
    }

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let token = ContinueToken {
            resource_version: 42,
            namespace: "team-a".into(),
            name: "web".into(),
        };
        assert_eq!(ContinueToken::decode(&token.encode()), Ok(token));
        for garbage in ["", "!!!", "eyJ2IjoxfQ", "bm90IGpzb24"] {
            assert!(ContinueToken::decode(garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn pages_walk_the_whole_list() {
        let cases = [
            (5, Some(2), vec![2, 2, 1]),
            (4, Some(2), vec![2, 2]),
            (3, None, vec![3]),
        ];
        for (n, limit, want_sizes) in cases {
            let mut sizes = Vec::new();
            let mut seen = Vec::new();
            let mut token = None;
            loop {
                let page = paginate(
                    items(n).iter().map(|(k, v)| (k, *v)),
                    token.as_ref(),
                    limit,
                    7,
                    true,
                );
                sizes.push(page.items.len());
                seen.extend(page.items.iter().copied());
                assert_eq!(page.remaining, n - seen.len());
                match page.continue_token {
                    Some(next) => {
                        assert_eq!(next.resource_version, 7);
                        token = Some(next);
                    }
                    None => break,
                }
            }
            assert_eq!(sizes, want_sizes, "n={n} limit={limit:?}");
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn limit_zero_means_unlimited() {
        let page = paginate(
            items(3).iter().map(|(k, v)| (k, *v)),
            None,
            Some(0),
            1,
            true,
        );
        assert_eq!(page.items, vec![0, 1, 2]);
        assert_eq!(page.continue_token, None);
    }
}
