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
//! asked yet. Upkeep may use only four fifths of the rate: the rest is kept for pods'
//! requests, so that a pod asking in the middle of a burst of prefetches finds a place at
//! once instead of waiting for the window to move. When STS answers "throttled" anyway (the account's rate is spent elsewhere),
//! [`Budget::throttled`] pauses refreshes and prefetches for a jittered back-off; pods'
//! requests still go, each key backing off on its own in the cache.
//!
//! Time is tokio's, so tests run minutes of budget in paused time.

use std::collections::VecDeque;
use std::sync::Mutex;
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
    /// Upkeep waits until then after a throttled call.
    paused_until: Option<Instant>,
    /// Throttled calls in a row, for the pause's growth.
    throttled_in_a_row: u32,
}

/// What a waiting caller does next.
enum Turn {
    Go,
    /// Sleep until then, or until the state changes.
    WaitUntil(Instant),
    /// A caller of higher priority is waiting: wait for the state to change.
    WaitForChange,
}

impl Budget {
    /// A budget of `rate` calls per second (0: unlimited).
    pub fn new(rate: usize, counters: BudgetCounters) -> Budget {
        Budget {
            rate,
            state: Mutex::new(State {
                starts: VecDeque::with_capacity(rate.min(4096)),
                waiting: [0; 3],
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

    /// Waits until a call of `priority` may start, and counts it as started. Cancel-safe: a
    /// caller that gives up while waiting takes nothing.
    pub async fn acquire(&self, priority: Priority) {
        if self.rate == 0 {
            return;
        }
        let _waiting = Waiting::new(self, priority);
        let mut counted = false;
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let turn = self.turn(priority);
            if !matches!(turn, Turn::Go) && !counted {
                counted = true;
                self.counters.waits[priority as usize].inc();
            }
            match turn {
                Turn::Go => return,
                Turn::WaitUntil(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
                Turn::WaitForChange => changed.await,
            }
        }
    }

    fn turn(&self, priority: Priority) -> Turn {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while state
            .starts
            .front()
            .is_some_and(|&start| now.duration_since(start) >= WINDOW)
        {
            state.starts.pop_front();
        }
        if state.waiting[..priority as usize].iter().any(|&n| n > 0) {
            return Turn::WaitForChange;
        }
        // Upkeep leaves a fifth of the rate to pods' requests.
        let cap = match priority {
            Priority::Request => self.rate,
            Priority::Refresh | Priority::Prefetch => self.rate - self.rate / 5,
        };
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

/// One caller counted as waiting at its priority until dropped.
struct Waiting<'a> {
    budget: &'a Budget,
    priority: Priority,
}

impl<'a> Waiting<'a> {
    fn new(budget: &'a Budget, priority: Priority) -> Waiting<'a> {
        budget
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting[priority as usize] += 1;
        Waiting { budget, priority }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.budget
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting[self.priority as usize] -= 1;
        // Callers of lower priority may go now, or see the call just started.
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
        (0..n)
            .map(|_| {
                let budget = Arc::clone(budget);
                let log = Arc::clone(log);
                tokio::spawn(async move {
                    budget.acquire(priority).await;
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
        budget.acquire(Priority::Request).await;
        budget.acquire(Priority::Request).await;
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
        budget.acquire(Priority::Prefetch).await;
        budget.acquire(Priority::Prefetch).await;
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
    async fn throttling_pauses_upkeep_but_not_pods_requests() {
        let budget = Arc::new(Budget::new(100, BudgetCounters::default()));
        let started = Instant::now();
        budget.throttled();
        budget.acquire(Priority::Request).await;
        assert_eq!(
            Instant::now(),
            started,
            "a pod's request waited for the pause"
        );
        budget.acquire(Priority::Refresh).await;
        let paused = Instant::now().duration_since(started);
        assert!(
            (Duration::from_millis(500)..=Duration::from_secs(1)).contains(&paused),
            "{paused:?}"
        );
        // A second throttle in a row pauses longer (1 to 2 s); a success resets it.
        budget.throttled();
        let again = Instant::now();
        budget.acquire(Priority::Prefetch).await;
        assert!(Instant::now().duration_since(again) >= Duration::from_secs(1));
        budget.succeeded();
        budget.throttled();
        let reset = Instant::now();
        budget.acquire(Priority::Prefetch).await;
        assert!(Instant::now().duration_since(reset) <= Duration::from_secs(1));
        assert_eq!(budget.counters.pauses.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_takes_nothing_and_blocks_nobody() {
        let budget = Arc::new(Budget::new(1, BudgetCounters::default()));
        budget.acquire(Priority::Request).await;
        // A request that gives up while waiting must not keep prefetches waiting behind it.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), budget.acquire(Priority::Request))
                .await;
        assert!(gave_up.is_err());
        let started = Instant::now();
        budget.acquire(Priority::Prefetch).await;
        assert!(Instant::now().duration_since(started) <= WINDOW);
        assert_eq!(
            budget.state.lock().expect("not poisoned").waiting,
            [0, 0, 0]
        );
    }

    #[tokio::test]
    async fn no_rate_is_no_limit() {
        let budget = Budget::new(0, BudgetCounters::default());
        for _ in 0..10_000 {
            budget.acquire(Priority::Prefetch).await;
        }
        assert_eq!(budget.counters.waits[2].get(), 0);
    }
}
