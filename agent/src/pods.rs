//! The pods on this node and their decisions, as the server streams them (`WatchNode`).
//!
//! With the table synced, the agent answers role listings, binds tokens to pod UIDs and
//! refuses revoked pods without a server call. Every change reports the UIDs whose
//! decision changed, so the credential cache drops them at once (revocation within the
//! stream's latency, milliseconds). Until the table is synced — at start, or after the
//! stream broke — the agent falls back to asking the server per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use podiam_proto::v1::PodState;

/// The pure part: pods by IP, with the rules for applying changes.
#[derive(Debug, Default)]
pub struct Table {
    by_ip: HashMap<IpAddr, Arc<PodState>>,
    ip_of: HashMap<String, IpAddr>,
    synced: bool,
}

fn uid(state: &PodState) -> &str {
    state.pod.as_ref().map_or("", |p| p.uid.as_str())
}

impl Table {
    /// Records a pod's new state; returns the UID if its decision changed (or it is new).
    pub fn upsert(&mut self, state: PodState) -> Option<String> {
        let Ok(ip) = podiam_proto::parse_ip(&state.ip) else {
            return None;
        };
        let uid = uid(&state).to_string();
        let previous = self.remove(&uid);
        // Another pod listed at this IP is replaced: the server has judged the newer state.
        if let Some(other) = self.by_ip.get(&ip).map(|s| uid_owned(s))
            && other != uid
        {
            self.ip_of.remove(&other);
        }
        let changed = previous.as_deref() != Some(&state);
        self.ip_of.insert(uid.clone(), ip);
        self.by_ip.insert(ip, Arc::new(state));
        changed.then_some(uid)
    }

    /// Forgets the pod with `uid`, returning its last state.
    pub fn remove(&mut self, uid: &str) -> Option<Arc<PodState>> {
        let ip = self.ip_of.remove(uid)?;
        match self.by_ip.get(&ip) {
            Some(state) if self::uid(state) == uid => self.by_ip.remove(&ip),
            _ => None,
        }
    }

    /// Replaces the whole table with a fresh snapshot and marks it synced; returns the UIDs
    /// whose decision changed or that are gone.
    pub fn replace(&mut self, snapshot: Vec<PodState>) -> Vec<String> {
        let old = std::mem::take(self);
        for state in snapshot {
            self.upsert(state);
        }
        self.synced = true;
        let mut changed: Vec<String> = old
            .by_ip
            .values()
            .filter(|state| {
                let fresh = self
                    .ip_of
                    .get(self::uid(state))
                    .and_then(|ip| self.by_ip.get(ip));
                fresh.map(|f| f.as_ref()) != Some(state.as_ref())
            })
            .map(|state| uid_owned(state))
            .collect();
        changed.extend(
            self.by_ip
                .values()
                .filter(|s| !old.ip_of.contains_key(self::uid(s)))
                .map(|s| uid_owned(s)),
        );
        changed
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<PodState>> {
        self.by_ip.get(&ip).cloned()
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The stream broke: the table may go stale, so stop answering from it.
    pub fn unsync(&mut self) {
        self.synced = false;
    }
}

fn uid_owned(state: &PodState) -> String {
    uid(state).to_string()
}

/// What the table knows about an address.
#[derive(Debug, Clone, PartialEq)]
pub enum Known {
    /// The table is synced and a pod has this IP.
    Pod(Arc<PodState>),
    /// The table is synced and no pod has this IP (yet).
    Nobody,
    /// The table is not synced: ask the server.
    Unsynced,
}

/// The shared table, with a signal for those waiting on a pod to appear.
#[derive(Debug)]
pub struct PodTable {
    table: RwLock<Table>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for PodTable {
    fn default() -> Self {
        PodTable {
            table: RwLock::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl PodTable {
    /// Applies `f` to the table and wakes waiters.
    pub fn update<T>(&self, f: impl FnOnce(&mut Table) -> T) -> T {
        let result = f(&mut self.table.write().unwrap_or_else(|e| e.into_inner()));
        self.changes.send_modify(|generation| *generation += 1);
        result
    }

    pub fn known(&self, ip: IpAddr) -> Known {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        match (table.synced(), table.lookup(ip)) {
            (false, _) => Known::Unsynced,
            (true, Some(state)) => Known::Pod(state),
            (true, None) => Known::Nobody,
        }
    }

    /// Like [`PodTable::known`], but waits up to `within` for a pod to appear at `ip` (the
    /// start-up race: a pod's first request can beat its IP to the API).
    pub async fn wait_known(&self, ip: IpAddr, within: Duration) -> Known {
        let mut changes = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            changes.mark_unchanged();
            let known = self.known(ip);
            if known != Known::Nobody {
                return known;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return Known::Nobody,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podiam_proto::v1::PodRef;

    fn state(uid: &str, ip: &str, role: &str) -> PodState {
        PodState {
            pod: Some(PodRef {
                namespace: "ns".into(),
                name: format!("pod-{uid}"),
                uid: uid.into(),
            }),
            ip: ip.into(),
            role_name: role.into(),
            role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
            ..PodState::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn changes_report_the_uids_whose_decision_changed() {
        let mut table = Table::default();
        assert_eq!(
            table.replace(vec![state("a", "10.0.0.1", "app")]),
            vec!["a"]
        );
        assert!(table.synced());
        // The same state again changes nothing.
        assert_eq!(table.upsert(state("a", "10.0.0.1", "app")), None);
        // A revoked role is a change.
        let mut revoked = state("a", "10.0.0.1", "");
        revoked.refusal_reason = podiam_proto::Reason::NoRole.to_wire().into();
        assert_eq!(table.upsert(revoked), Some("a".into()));
        assert_eq!(
            table.lookup(ip("10.0.0.1")).expect("known").refusal_reason,
            i32::from(podiam_proto::Reason::NoRole.to_wire())
        );
        // Deleted.
        assert!(table.remove("a").is_some());
        assert!(table.lookup(ip("10.0.0.1")).is_none());
        // IP reused by a new pod.
        table.upsert(state("b", "10.0.0.1", "app"));
        assert_eq!(uid(&table.lookup(ip("10.0.0.1")).expect("b")), "b");
        // A pod moving IP leaves nothing behind.
        table.upsert(state("b", "10.0.0.2", "app"));
        assert!(table.lookup(ip("10.0.0.1")).is_none());
    }

    #[test]
    fn a_new_snapshot_reports_what_differs_from_the_old_table() {
        let mut table = Table::default();
        table.replace(vec![
            state("a", "10.0.0.1", "app"),
            state("b", "10.0.0.2", "app"),
        ]);
        table.unsync();
        let mut changed = table.replace(vec![
            state("a", "10.0.0.1", "app"),
            state("b", "10.0.0.2", "other"),
            state("c", "10.0.0.3", "app"),
        ]);
        changed.sort();
        assert_eq!(changed, vec!["b", "c"]);
        let mut changed = table.replace(vec![state("c", "10.0.0.3", "app")]);
        changed.sort();
        assert_eq!(
            changed,
            vec!["a", "b"],
            "pods gone from the snapshot are dropped"
        );
        assert!(table.lookup(ip("10.0.0.1")).is_none());
    }

    #[tokio::test]
    async fn waiting_for_an_unknown_pod_ends_when_it_appears_or_at_the_deadline() {
        let table = Arc::new(PodTable::default());
        assert_eq!(table.known(ip("10.0.0.1")), Known::Unsynced);
        table.update(|t| t.replace(Vec::new()));
        let waiter = {
            let table = Arc::clone(&table);
            tokio::spawn(async move {
                table
                    .wait_known(ip("10.0.0.1"), Duration::from_secs(30))
                    .await
            })
        };
        tokio::task::yield_now().await;
        table.update(|t| t.upsert(state("a", "10.0.0.1", "app")));
        assert!(matches!(waiter.await.expect("joins"), Known::Pod(_)));
        let nobody = table
            .wait_known(ip("10.0.0.9"), Duration::from_millis(50))
            .await;
        assert_eq!(nobody, Known::Nobody);
    }
}
