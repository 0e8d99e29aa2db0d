//! Each pod's credentials, kept on the node so that a hit needs no call to the server.
//!
//! Keyed by (pod UID, role ARN): a pod never receives another pod's entry, and a new pod on
//! a reused IP starts empty. Entries are served while they have at least `min_remaining`
//! left — the same floor the server serves with — so the agent asks again exactly when the
//! server would refresh. Misses on one key collapse into one server call. The pod table
//! drops a pod's entries ([`CredentialCache::forget`]) the moment its decision changes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podiam_proto::v1::Credentials;
use tokio::sync::Mutex as AsyncMutex;

type Key = (String, String);
type Slot = Arc<AsyncMutex<Option<Credentials>>>;

/// Credentials per (pod UID, role ARN).
#[derive(Debug)]
pub struct CredentialCache {
    slots: Mutex<HashMap<Key, Slot>>,
    min_remaining: Duration,
}

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    Server,
}

impl CredentialCache {
    pub fn new(min_remaining: Duration) -> CredentialCache {
        CredentialCache {
            slots: Mutex::new(HashMap::new()),
            min_remaining,
        }
    }

    /// The cached credentials for (uid, role ARN) if they have enough life left at
    /// `now_unix`, else the result of `fetch` (stored when it succeeds).
    pub async fn get<E, F>(
        &self,
        uid: &str,
        role_arn: &str,
        now_unix: i64,
        fetch: F,
    ) -> Result<(Credentials, Source), E>
    where
        F: Future<Output = Result<Credentials, E>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let key = (uid.to_string(), role_arn.to_string());
            Arc::clone(slots.entry(key).or_default())
        };
        let mut entry = slot.lock().await;
        if let Some(credentials) = entry.as_ref()
            && credentials.expiration_unix - now_unix >= self.min_remaining.as_secs() as i64
        {
            return Ok((credentials.clone(), Source::Cache));
        }
        let credentials = fetch.await?;
        *entry = Some(credentials.clone());
        Ok((credentials, Source::Server))
    }

    /// Drops every entry of the pod with `uid`.
    pub fn forget(&self, uid: &str) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(owner, _), _| owner != uid);
    }

    /// Number of cached keys.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(id: &str, expiration_unix: i64) -> Credentials {
        Credentials {
            access_key_id: id.into(),
            expiration_unix,
            ..Credentials::default()
        }
    }

    const FLOOR: Duration = Duration::from_secs(1800);

    #[tokio::test]
    async fn hits_need_no_fetch_until_the_floor() {
        let cache = CredentialCache::new(FLOOR);
        let fetch = |id: &'static str| async move { Ok::<_, ()>(creds(id, 3600)) };
        assert_eq!(
            cache.get("a", "r", 0, fetch("1")).await,
            Ok((creds("1", 3600), Source::Server))
        );
        assert_eq!(
            cache.get("a", "r", 1800, fetch("2")).await,
            Ok((creds("1", 3600), Source::Cache))
        );
        // Below the floor: fetched again.
        assert_eq!(
            cache.get("a", "r", 1801, fetch("3")).await,
            Ok((creds("3", 3600), Source::Server))
        );
        // Another pod, another role: separate entries.
        assert_eq!(
            cache.get("b", "r", 0, fetch("4")).await.map(|r| r.1),
            Ok(Source::Server)
        );
        assert_eq!(
            cache.get("a", "r2", 0, fetch("5")).await.map(|r| r.1),
            Ok(Source::Server)
        );
        assert_eq!(cache.len(), 3);
    }

    #[tokio::test]
    async fn forgetting_a_pod_drops_its_entries_only() {
        let cache = CredentialCache::new(FLOOR);
        let fetch = |id: &'static str| async move { Ok::<_, ()>(creds(id, 3600)) };
        cache.get("a", "r", 0, fetch("1")).await.expect("fetched");
        cache.get("a", "r2", 0, fetch("2")).await.expect("fetched");
        cache.get("b", "r", 0, fetch("3")).await.expect("fetched");
        cache.forget("a");
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.get("a", "r", 0, fetch("4")).await.map(|r| r.1),
            Ok(Source::Server)
        );
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache = CredentialCache::new(FLOOR);
        assert_eq!(
            cache
                .get("a", "r", 0, async { Err::<Credentials, _>("down") })
                .await,
            Err("down")
        );
        let ok = cache
            .get("a", "r", 0, async { Ok::<_, &str>(creds("1", 3600)) })
            .await;
        assert_eq!(ok.map(|r| r.1), Ok(Source::Server));
    }
}
