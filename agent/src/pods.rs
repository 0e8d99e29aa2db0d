//! The pod table: this node's pods and their decisions, as the server streams them
//! (`WatchNode`), by address: every address of a pod (both of a dual-stack pod's) finds it.
//!
//! With the table synced, the agent answers role listings, binds tokens to pod UIDs and
//! refuses revoked pods without a server call. Every change reports the UIDs whose
//! decision changed, so the credential cache drops them at once (revocation within the
//! stream's latency, milliseconds). Until the table is synced — at start, or after the
//! stream broke — the agent falls back to asking the servers per request.
//!
//! [`PodTable`] is shared between the stream that writes it and the requests that read it;
//! the rules for applying changes are the pure `Entries` inside, tested on their own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::decision::PodDecision;

/// What the table knows of an address.
#[derive(Debug, Clone, PartialEq)]
pub enum Known {
    /// The table is synced and a pod has this IP.
    Pod(Arc<PodDecision>),
    /// The table is synced and no pod has this IP (yet).
    Nobody,
    /// The table is not synced: only the servers can say.
    Unsynced,
}

/// This node's pods by address, with a signal for those waiting on a pod to appear.
#[derive(Debug)]
pub struct PodTable {
    entries: RwLock<Entries>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for PodTable {
    fn default() -> Self {
        PodTable {
            entries: RwLock::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl PodTable {
    /// Applies `f` to the entries and wakes waiters.
    fn update<T>(&self, f: impl FnOnce(&mut Entries) -> T) -> T {
        let result = f(&mut self.entries.write().unwrap_or_else(|e| e.into_inner()));
        self.changes.send_modify(|generation| *generation += 1);
        result
    }

    /// Records the pod at `ips`; returns its UID if its decision changed (or it is new).
    pub fn upsert(&self, ips: Vec<IpAddr>, decision: PodDecision) -> Option<String> {
        self.update(|e| e.upsert(ips, decision))
    }

    /// Forgets the pod with `uid`.
    pub fn remove(&self, uid: &str) {
        self.update(|e| e.remove(uid));
    }

    /// Replaces every pod with a fresh snapshot and marks the table synced; returns the UIDs
    /// whose decision changed or that are gone.
    pub fn replace(&self, snapshot: Vec<(Vec<IpAddr>, PodDecision)>) -> Vec<String> {
        self.update(|e| e.replace(snapshot))
    }

    /// Whether the table lists the pod with `uid`.
    pub fn has(&self, uid: &str) -> bool {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.ips_of.contains_key(uid)
    }

    /// Every pod's addresses.
    pub fn addresses(&self) -> Vec<Vec<IpAddr>> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.ips_of.values().cloned().collect()
    }

    /// A receiver told of every change to the table.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The stream broke: the table may go stale, so stop answering from it.
    pub fn unsync(&self) {
        self.update(|e| e.synced = false);
    }

    /// What the table knows of `ip` now.
    pub fn known(&self, ip: IpAddr) -> Known {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match (entries.synced, entries.lookup(ip)) {
            (false, _) => Known::Unsynced,
            (true, Some(decision)) => Known::Pod(Arc::clone(decision)),
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

/// The pure part: pods by address, with the rules for applying changes.
#[derive(Debug, Default)]
struct Entries {
    by_ip: HashMap<IpAddr, Arc<PodDecision>>,
    ips_of: HashMap<String, Vec<IpAddr>>,
    synced: bool,
}

impl Entries {
    /// Records the pod at `ips`; returns the UID if its decision or addresses changed (or
    /// it is new).
    fn upsert(&mut self, ips: Vec<IpAddr>, decision: PodDecision) -> Option<String> {
        let uid = decision.pod.uid.clone();
        let previous = self.remove(&uid);
        // Another pod listed at one of these IPs loses it: the server has judged the newer
        // state.
        for ip in &ips {
            if let Some(other) = self.by_ip.get(ip).map(|d| d.pod.uid.clone())
                && other != uid
                && let Some(others) = self.ips_of.get_mut(&other)
            {
                others.retain(|o| o != ip);
                if others.is_empty() {
                    self.ips_of.remove(&other);
                }
            }
        }
        let changed = previous
            .as_ref()
            .map(|(ips, d)| (ips.as_slice(), d.as_ref()))
            != Some((ips.as_slice(), &decision));
        let decision = Arc::new(decision);
        for ip in &ips {
            self.by_ip.insert(*ip, Arc::clone(&decision));
        }
        self.ips_of.insert(uid.clone(), ips);
        changed.then_some(uid)
    }

    /// Forgets the pod with `uid`, returning its addresses and decision.
    fn remove(&mut self, uid: &str) -> Option<(Vec<IpAddr>, Arc<PodDecision>)> {
        let ips = self.ips_of.remove(uid)?;
        let mut decision = None;
        for ip in &ips {
            if self.by_ip.get(ip).is_some_and(|d| d.pod.uid == uid) {
                decision = self.by_ip.remove(ip);
            }
        }
        decision.map(|decision| (ips, decision))
    }

    /// The addresses and decision of the pod with `uid`.
    fn entry(&self, uid: &str) -> Option<(&[IpAddr], &PodDecision)> {
        let ips = self.ips_of.get(uid)?;
        let decision = self.by_ip.get(ips.first()?)?;
        Some((ips.as_slice(), decision.as_ref()))
    }

    /// Replaces every pod with `snapshot` and marks the table synced; returns the UIDs whose
    /// decision or addresses changed, that are new, or that are gone.
    fn replace(&mut self, snapshot: Vec<(Vec<IpAddr>, PodDecision)>) -> Vec<String> {
        let old = std::mem::take(self);
        for (ips, decision) in snapshot {
            self.upsert(ips, decision);
        }
        self.synced = true;
        let mut changed: Vec<String> = old
            .ips_of
            .keys()
            .filter(|uid| old.entry(uid) != self.entry(uid))
            .cloned()
            .collect();
        changed.extend(
            self.ips_of
                .keys()
                .filter(|uid| !old.ips_of.contains_key(*uid))
                .cloned(),
        );
        changed
    }

    /// The pod at `ip`, whether or not the table is synced.
    fn lookup(&self, ip: IpAddr) -> Option<&Arc<PodDecision>> {
        self.by_ip.get(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{PodId, Refusal, Role};
    use podiam_proto::Reason;

    fn pod(uid: &str, ip: &str, role: &str) -> (IpAddr, PodDecision) {
        let decision = PodDecision {
            pod: PodId {
                namespace: "ns".into(),
                name: format!("pod-{uid}"),
                uid: uid.into(),
            },
            verdict: Ok(Role {
                name: role.into(),
                arn: format!("arn:aws:iam::123456789012:role/{role}"),
                credential_key: 0,
            }),
            by_address: None,
        };
        (self::ip(ip), decision)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn upsert(entries: &mut Entries, (ip, decision): (IpAddr, PodDecision)) -> Option<String> {
        entries.upsert(vec![ip], decision)
    }

    fn one(pods: Vec<(IpAddr, PodDecision)>) -> Vec<(Vec<IpAddr>, PodDecision)> {
        pods.into_iter().map(|(ip, d)| (vec![ip], d)).collect()
    }

    fn uid_at(entries: &Entries, address: &str) -> Option<String> {
        entries.lookup(ip(address)).map(|d| d.pod.uid.clone())
    }

    #[test]
    fn changes_report_the_uids_whose_decision_changed() {
        let mut entries = Entries::default();
        assert_eq!(
            entries.replace(one(vec![pod("a", "10.0.0.1", "app")])),
            vec!["a"]
        );
        assert!(entries.synced);
        // The same decision again changes nothing.
        assert_eq!(upsert(&mut entries, pod("a", "10.0.0.1", "app")), None);
        // A revoked role is a change.
        let (address, mut revoked) = pod("a", "10.0.0.1", "");
        revoked.verdict = Err(Refusal {
            reason: Reason::NoRole,
            message: "no role".into(),
        });
        assert_eq!(entries.upsert(vec![address], revoked), Some("a".into()));
        assert_eq!(
            entries
                .lookup(ip("10.0.0.1"))
                .expect("known")
                .role()
                .map_err(|r| r.reason),
            Err(Reason::NoRole)
        );
        // Deleted.
        assert!(entries.remove("a").is_some());
        assert_eq!(uid_at(&entries, "10.0.0.1"), None);
        // IP reused by a new pod.
        upsert(&mut entries, pod("b", "10.0.0.1", "app"));
        assert_eq!(uid_at(&entries, "10.0.0.1").as_deref(), Some("b"));
        // A pod moving IP is a change, and leaves nothing behind.
        assert_eq!(
            upsert(&mut entries, pod("b", "10.0.0.2", "app")),
            Some("b".into())
        );
        assert_eq!(uid_at(&entries, "10.0.0.1"), None);
    }

    #[test]
    fn a_dual_stack_pod_is_found_by_each_address() {
        let mut entries = Entries::default();
        let (v4, decision) = pod("a", "10.0.0.1", "app");
        let v6 = ip("fd00:77::2");
        assert_eq!(
            entries.upsert(vec![v4, v6], decision.clone()),
            Some("a".into())
        );
        assert_eq!(uid_at(&entries, "10.0.0.1").as_deref(), Some("a"));
        assert_eq!(uid_at(&entries, "fd00:77::2").as_deref(), Some("a"));
        assert_eq!(entries.upsert(vec![v4, v6], decision.clone()), None);
        // Its v6 address given to another pod: that pod has it, a keeps its v4 one.
        upsert(&mut entries, pod("b", "fd00:77::2", "app"));
        assert_eq!(uid_at(&entries, "fd00:77::2").as_deref(), Some("b"));
        assert_eq!(uid_at(&entries, "10.0.0.1").as_deref(), Some("a"));
        // Gone: both addresses with it.
        assert_eq!(entries.upsert(vec![v4, v6], decision), Some("a".into()));
        assert!(entries.remove("a").is_some());
        assert_eq!(uid_at(&entries, "10.0.0.1"), None);
        assert_eq!(uid_at(&entries, "fd00:77::2"), None);
    }

    #[test]
    fn a_new_snapshot_reports_what_differs_from_the_old_table() {
        let mut entries = Entries::default();
        entries.replace(one(vec![
            pod("a", "10.0.0.1", "app"),
            pod("b", "10.0.0.2", "app"),
        ]));
        entries.synced = false;
        let mut changed = entries.replace(one(vec![
            pod("a", "10.0.0.1", "app"),
            pod("b", "10.0.0.2", "other"),
            pod("c", "10.0.0.3", "app"),
        ]));
        changed.sort();
        assert_eq!(changed, vec!["b", "c"]);
        let mut changed = entries.replace(one(vec![pod("c", "10.0.0.3", "app")]));
        changed.sort();
        assert_eq!(
            changed,
            vec!["a", "b"],
            "pods gone from the snapshot are dropped"
        );
        assert_eq!(uid_at(&entries, "10.0.0.1"), None);
    }

    #[tokio::test]
    async fn waiting_for_an_unknown_pod_ends_when_it_appears_or_at_the_deadline() {
        let table = Arc::new(PodTable::default());
        assert_eq!(table.known(ip("10.0.0.1")), Known::Unsynced);
        table.replace(Vec::new());
        let waiter = {
            let table = Arc::clone(&table);
            tokio::spawn(async move {
                table
                    .wait_known(ip("10.0.0.1"), Duration::from_secs(30))
                    .await
            })
        };
        tokio::task::yield_now().await;
        let (address, decision) = pod("a", "10.0.0.1", "app");
        table.upsert(vec![address], decision);
        assert!(matches!(waiter.await.expect("joins"), Known::Pod(_)));
        let nobody = table
            .wait_known(ip("10.0.0.9"), Duration::from_millis(50))
            .await;
        assert_eq!(nobody, Known::Nobody);
        table.unsync();
        assert_eq!(table.known(ip("10.0.0.1")), Known::Unsynced);
    }
}
