//! The STS budget: how many AssumeRole calls one replica may start, and in what order.
//!
//! STS allows an account a few hundred AssumeRole calls a second in a region, shared with
//! everything else in the account. A cluster start, or a deployment of thousands of pods
//! with per-pod sessions, must not spend it in one burst. The budget lets at most `rate`
//! calls start in any [`WINDOW`] (a sliding window: a burst of `rate` at once is allowed,
//! then calls wait for the oldest to age out), so no second ever sees more than `rate`.
//!
//! Callers wait in [`Priority`] order: a pod's own request first (never queued behind
//! upkeep), then refreshes of credentials in use, then prefetches for pods that have not
//! asked yet. Within a priority, callers are served one *tenant* at a time in turn (a pod's
//! request is its namespace's; all upkeep is one tenant), each tenant's callers first come,
//! first served: a namespace that makes thousands of keys at once (per-pod session names,
//! annotations changed in a loop) waits behind its own calls, and another namespace's pod
//! asking meanwhile goes next, not after them. Upkeep may use only four fifths of the rate:
//! the rest is kept for pods' requests, so that a pod asking in the middle of a burst of
//! prefetches finds a place at once instead of waiting for the window to move. When STS
//! answers "throttled" anyway (the account's rate is spent elsewhere),
//! [`Budget::throttled`] pauses refreshes and prefetches for a jittered back-off; pods'
//! requests still go, each key backing off on its own in the cache.
//!
//! Time is tokio's, so tests run minutes of budget in paused time.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The window `rate` counts calls in: a second, and a tenth to spare for the way to STS (a
/// call that waited in a busy runtime must not land in the same second as the one a whole
/// window after it).
pub const WINDOW: Duration = Duration::from_millis(1_100);

/// Who is waiting for a call, first first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Priority {
    /// A pod's request (an agent's GetCredentials on a cache miss).
    Request = 0,
    /// Credentials in use, past their refresh point.
    Refresh = 1,
    /// Credentials no pod has asked for yet.
    Prefetch = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Request, Priority::Refresh, Priority::Prefetch];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Request => "request",
            Priority::Refresh => "refresh",
            Priority::Prefetch => "prefetch",
        }
    }
}

/// Calls that had to wait for the budget, by priority (`podiam_server_sts_budget_waits_total`).
#[derive(Clone, Debug, Default)]
pub struct BudgetCounters {
    pub waits: [Counter; 3],
    /// Pauses of upkeep after STS throttled a call.
    pub pauses: Counter,
}

/// At most `rate` STS calls in any [`WINDOW`], handed out by priority.
#[derive(Debug)]
pub struct Budget {
    /// 0: no limit.
    rate: usize,
    state: Mutex<State>,
    changed: Notify,
    counters: BudgetCounters,
}

#[derive(Debug)]
struct State {
    /// When the calls of the last window started, oldest first.
    starts: VecDeque<Instant>,
    /// Callers waiting, per priority.
    waiting: [usize; 3],
    /// Who goes next, per priority.
    lines: [Line; 3],
    /// The next caller's ticket.
    next_ticket: u64,
    /// Upkeep waits until then after a throttled call.
    paused_until: Option<Instant>,
    /// Throttled calls in a row, for the pause's growth.
    throttled_in_a_row: u32,
}

/// The callers waiting at one priority: the tenants in turn, and each tenant's callers in
/// the order they came (by ticket).
#[derive(Debug, Default)]
struct Line {
    /// Tenants with callers waiting; the front one's first caller is next.
    tenants: VecDeque<Arc<str>>,
    callers: HashMap<Arc<str>, VecDeque<u64>>,
}

impl Line {
    fn join(&mut self, tenant: &Arc<str>, ticket: u64) {
        let callers = self.callers.entry(Arc::clone(tenant)).or_insert_with(|| {
            self.tenants.push_back(Arc::clone(tenant));
            VecDeque::new()
        });
        callers.push_back(ticket);
    }

    fn is_next(&self, tenant: &str, ticket: u64) -> bool {
        self.tenants.front().is_some_and(|front| &**front == tenant)
            && self.callers.get(tenant).and_then(|callers| callers.front()) == Some(&ticket)
    }

    /// The next caller goes: its tenant goes to the back of the turn if it has more waiting.
    fn served(&mut self) {
        let Some(tenant) = self.tenants.pop_front() else {
            return;
        };
        let more = self.callers.get_mut(&tenant).is_some_and(|callers| {
            callers.pop_front();
            !callers.is_empty()
        });
        if more {
            self.tenants.push_back(tenant);
        } else {
            self.callers.remove(&tenant);
        }
    }

    /// A caller gave up: it is no longer in line.
    fn leave(&mut self, tenant: &str, ticket: u64) {
        let Some(callers) = self.callers.get_mut(tenant) else {
            return;
        };
        callers.retain(|&t| t != ticket);
        if callers.is_empty() {
            self.callers.remove(tenant);
            self.tenants.retain(|t| &**t != tenant);
        }
    }
}

/// The tenant all upkeep (refreshes, prefetches) is counted as.
pub const UPKEEP: &str = "";

/// What a waiting caller does next.
enum Turn {
    Go,
    /// Sleep until then, or until the state changes.
    WaitUntil(Instant),
    /// A caller of higher priority, or before this one in line, is waiting: wait for the
    /// state to change. `full`: no place is free either.
    WaitForChange {
        full: bool,
    },
}

impl Budget {
    /// A budget of `rate` calls per second (0: unlimited).
    pub fn new(rate: usize, counters: BudgetCounters) -> Budget {
        Budget {
            rate,
            state: Mutex::new(State {
                starts: VecDeque::with_capacity(rate.min(4096)),
                waiting: [0; 3],
                lines: Default::default(),
                next_ticket: 0,
                paused_until: None,
                throttled_in_a_row: 0,
            }),
            changed: Notify::new(),
            counters,
        }
    }

    /// Calls per second (0: unlimited).
    pub fn rate(&self) -> usize {
        self.rate
    }

    /// Waits until a call of `priority` for `tenant` may start, and counts it as started.
    /// Cancel-safe: a caller that gives up while waiting takes nothing.
    pub async fn acquire(&self, priority: Priority, tenant: &Arc<str>) {
        if self.rate == 0 {
            return;
        }
        let mut waiting = Waiting::new(self, priority, tenant);
        let mut counted = false;
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let turn = self.turn(&waiting);
            // A wait for a place, not a moment behind callers about to take free ones.
            let full = matches!(
                turn,
                Turn::WaitUntil(_) | Turn::WaitForChange { full: true }
            );
            if full && !counted {
                counted = true;
                self.counters.waits[priority as usize].inc();
            }
            match turn {
                Turn::Go => {
                    waiting.served = true;
                    return;
                }
                Turn::WaitUntil(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
                Turn::WaitForChange { .. } => changed.await,
            }
        }
    }

    fn turn(&self, caller: &Waiting<'_>) -> Turn {
        let priority = caller.priority;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while state
            .starts
            .front()
            .is_some_and(|&start| now.duration_since(start) >= WINDOW)
        {
            state.starts.pop_front();
        }
        // Upkeep leaves a fifth of the rate to pods' requests.
        let cap = match priority {
            Priority::Request => self.rate,
            Priority::Refresh | Priority::Prefetch => self.rate - self.rate / 5,
        };
        if state.waiting[..priority as usize].iter().any(|&n| n > 0)
            || !state.lines[priority as usize].is_next(&caller.tenant, caller.ticket)
        {
            return Turn::WaitForChange {
                full: state.starts.len() >= cap,
            };
        }
        let mut at = now;
        if state.starts.len() >= cap {
            // The start that must age out for one place to be free.
            if let Some(&start) = state.starts.get(state.starts.len() - cap) {
                at = start + WINDOW;
            }
        }
        if priority != Priority::Request
            && let Some(until) = state.paused_until
        {
            at = at.max(until);
        }
        if at <= now {
            state.starts.push_back(now);
            state.lines[priority as usize].served();
            Turn::Go
        } else {
            Turn::WaitUntil(at)
        }
    }

    /// STS throttled a call: upkeep pauses, for longer the more calls in a row were
    /// throttled (1 s doubling to a minute, half of it random so that replicas do not retry
    /// in step).
    pub fn throttled(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.throttled_in_a_row = state.throttled_in_a_row.saturating_add(1);
        let full = Duration::from_secs(1)
            .saturating_mul(1 << state.throttled_in_a_row.saturating_sub(1).min(6))
            .min(Duration::from_secs(60));
        let pause = full / 2 + (full / 2).mul_f64(fastrand::f64());
        let until = Instant::now() + pause;
        state.paused_until = Some(state.paused_until.map_or(until, |u| u.max(until)));
        self.counters.pauses.inc();
        tracing::warn!(
            ?pause,
            "STS throttled AssumeRole: pausing prefetches and refreshes"
        );
    }

    /// A call went through: throttling is over.
    pub fn succeeded(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.throttled_in_a_row = 0;
    }
}

/// One caller counted as waiting at its priority, and in its line, until dropped.
struct Waiting<'a> {
    budget: &'a Budget,
    priority: Priority,
    tenant: Arc<str>,
    ticket: u64,
    /// It went: the line has let it go already.
    served: bool,
}

impl<'a> Waiting<'a> {
    fn new(budget: &'a Budget, priority: Priority, tenant: &Arc<str>) -> Waiting<'a> {
        let mut state = budget.state.lock().unwrap_or_else(|e| e.into_inner());
        state.waiting[priority as usize] += 1;
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.lines[priority as usize].join(tenant, ticket);
        Waiting {
            budget,
            priority,
            tenant: Arc::clone(tenant),
            ticket,
            served: false,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        {
            let mut state = self.budget.state.lock().unwrap_or_else(|e| e.into_inner());
            state.waiting[self.priority as usize] -= 1;
            // Served callers have left already; one that gave up leaves now.
            if !self.served {
                state.lines[self.priority as usize].leave(&self.tenant, self.ticket);
            }
        }
        // The next in line, or callers of lower priority, may go now, or see the call just
        // started.
        self.budget.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Starts `n` callers at `priority` that record when they got through.
    fn callers(
        budget: &Arc<Budget>,
        priority: Priority,
        n: usize,
        log: &Arc<Mutex<Vec<(Priority, Instant)>>>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        tenants_callers(budget, priority, UPKEEP, n, log)
    }

    fn tenant(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    /// Starts `n` callers at `priority` for `tenant` that record when they got through.
    fn tenants_callers(
        budget: &Arc<Budget>,
        priority: Priority,
        tenant: &str,
        n: usize,
        log: &Arc<Mutex<Vec<(Priority, Instant)>>>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let budget = Arc::clone(budget);
                let log = Arc::clone(log);
                let tenant = self::tenant(tenant);
                tokio::spawn(async move {
                    budget.acquire(priority, &tenant).await;
                    log.lock()
                        .expect("not poisoned")
                        .push((priority, Instant::now()));
                })
            })
            .collect()
    }

    fn most_in_a_second(times: &[Instant]) -> usize {
        let mut times = times.to_vec();
        times.sort();
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|&&t| t.duration_since(times[i]) < Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn no_second_sees_more_than_the_rate_and_a_burst_goes_at_once() {
        let budget = Arc::new(Budget::new(5, BudgetCounters::default()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        for handle in callers(&budget, Priority::Request, 23, &log) {
            handle.await.expect("joins");
        }
        let times = times_of(&log);
        assert_eq!(times.len(), 23);
        assert_eq!(most_in_a_second(&times), 5);
        // The first five at once; then five per window.
        assert_eq!(times.iter().filter(|&&t| t == started).count(), 5);
        let last = *times.iter().max().expect("calls");
        assert_eq!(last.duration_since(started), WINDOW * 4);
        assert_eq!(budget.counters.waits[Priority::Request as usize].get(), 18);
    }

    fn times_of(log: &Mutex<Vec<(Priority, Instant)>>) -> Vec<Instant> {
        log.lock()
            .expect("not poisoned")
            .iter()
            .map(|(_, t)| *t)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn upkeep_leaves_a_fifth_of_the_rate_to_pods_requests() {
        let budget = Arc::new(Budget::new(10, BudgetCounters::default()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let prefetches = callers(&budget, Priority::Prefetch, 30, &log);
        tokio::task::yield_now().await;
        // Eight prefetches went at once; two requests still go at once after them.
        budget.acquire(Priority::Request, &tenant(UPKEEP)).await;
        budget.acquire(Priority::Request, &tenant(UPKEEP)).await;
        assert_eq!(Instant::now(), started);
        for handle in prefetches {
            handle.await.expect("joins");
        }
        let times = times_of(&log);
        assert_eq!(times.len(), 30);
        assert_eq!(times.iter().filter(|&&t| t == started).count(), 8);
        assert!(most_in_a_second(&times) <= 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pods_request_goes_before_refreshes_and_refreshes_before_prefetches() {
        let budget = Arc::new(Budget::new(2, BudgetCounters::default()));
        let log = Arc::new(Mutex::new(Vec::new()));
        // Spend the window, then queue prefetches, refreshes and, last, one request.
        budget.acquire(Priority::Prefetch, &tenant(UPKEEP)).await;
        budget.acquire(Priority::Prefetch, &tenant(UPKEEP)).await;
        let mut handles = callers(&budget, Priority::Prefetch, 4, &log);
        tokio::task::yield_now().await;
        handles.extend(callers(&budget, Priority::Refresh, 2, &log));
        tokio::task::yield_now().await;
        handles.extend(callers(&budget, Priority::Request, 1, &log));
        for handle in handles {
            handle.await.expect("joins");
        }
        let order: Vec<Priority> = log
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(p, _)| *p)
            .collect();
        use Priority::*;
        assert_eq!(
            order,
            [
                Request, Refresh, Refresh, Prefetch, Prefetch, Prefetch, Prefetch
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_namespace_with_many_calls_waiting_waits_behind_its_own_and_others_go_in_turn() {
        let budget = Arc::new(Budget::new(2, BudgetCounters::default()));
        let started = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let served = |tenant: &'static str| {
            let budget = Arc::clone(&budget);
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                budget
                    .acquire(Priority::Request, &self::tenant(tenant))
                    .await;
                log.lock().expect("not poisoned").push(tenant);
            })
        };
        // The window is spent; one namespace queues forty requests, then two others ask.
        budget.acquire(Priority::Request, &tenant("busy")).await;
        budget.acquire(Priority::Request, &tenant("busy")).await;
        let mut handles: Vec<_> = (0..40).map(|_| served("busy")).collect();
        tokio::task::yield_now().await;
        handles.push(served("quiet"));
        tokio::task::yield_now().await;
        handles.push(served("other"));
        for handle in handles {
            handle.await.expect("joins");
        }
        let order = log.lock().expect("not poisoned").clone();
        assert_eq!(order.len(), 42);
        // The busy namespace's first caller was next; then each namespace in turn.
        assert_eq!(order[..3], ["busy", "quiet", "other"]);
        assert!(order[3..].iter().all(|&t| t == "busy"));
        assert_eq!(Instant::now().duration_since(started), WINDOW * 21);
        let state = budget.state.lock().expect("not poisoned");
        assert!(state.lines[0].tenants.is_empty() && state.lines[0].callers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_pauses_upkeep_but_not_pods_requests() {
        let budget = Arc::new(Budget::new(100, BudgetCounters::default()));
        let started = Instant::now();
        budget.throttled();
        budget.acquire(Priority::Request, &tenant(UPKEEP)).await;
        assert_eq!(
            Instant::now(),
            started,
            "a pod's request waited for the pause"
        );
        budget.acquire(Priority::Refresh, &tenant(UPKEEP)).await;
        let paused = Instant::now().duration_since(started);
        assert!(
            (Duration::from_millis(500)..=Duration::from_secs(1)).contains(&paused),
            "{paused:?}"
        );
        // A second throttle in a row pauses longer (1 to 2 s); a success resets it.
        budget.throttled();
        let again = Instant::now();
        budget.acquire(Priority::Prefetch, &tenant(UPKEEP)).await;
        assert!(Instant::now().duration_since(again) >= Duration::from_secs(1));
        budget.succeeded();
        budget.throttled();
        let reset = Instant::now();
        budget.acquire(Priority::Prefetch, &tenant(UPKEEP)).await;
        assert!(Instant::now().duration_since(reset) <= Duration::from_secs(1));
        assert_eq!(budget.counters.pauses.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_takes_nothing_and_blocks_nobody() {
        let budget = Arc::new(Budget::new(1, BudgetCounters::default()));
        budget.acquire(Priority::Request, &tenant(UPKEEP)).await;
        // A request that gives up while waiting must not keep prefetches waiting behind it.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(10),
            budget.acquire(Priority::Request, &tenant(UPKEEP)),
        )
        .await;
        assert!(gave_up.is_err());
        let started = Instant::now();
        budget.acquire(Priority::Prefetch, &tenant(UPKEEP)).await;
        assert!(Instant::now().duration_since(started) <= WINDOW);
        let state = budget.state.lock().expect("not poisoned");
        assert_eq!(state.waiting, [0, 0, 0]);
        assert!(
            state
                .lines
                .iter()
                .all(|l| l.tenants.is_empty() && l.callers.is_empty())
        );
    }

    #[tokio::test]
    async fn no_rate_is_no_limit() {
        let budget = Budget::new(0, BudgetCounters::default());
        for _ in 0..10_000 {
            budget.acquire(Priority::Prefetch, &tenant(UPKEEP)).await;
        }
        assert_eq!(budget.counters.waits[2].get(), 0);
    }
}
