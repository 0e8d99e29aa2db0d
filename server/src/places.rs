//! Places to read admission reviews' bodies in, shared so that slow senders cannot keep the
//! API server's reviews out.
//!
//! The webhook's port answers anyone who reaches it, so a body's place is bounded: [`Places`]
//! holds `total` at once, `per_address` from one address. An honest body (the API server's)
//! arrives whole at once; a body still arriving after [`SLOW`] is a slow sender's. When every
//! place is taken, a new review takes the place of the body that has been arriving longest,
//! if it has been arriving for [`SLOW`] at least: that body's reader is told
//! ([`PlaceHeld::pushed_out`]) and gives up. So senders of slow bodies, from however many
//! addresses, delay a review by [`SLOW`] at most; without this, 4 addresses holding 4 places
//! each kept every review out for as long as they kept at it.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a body may have been arriving before a new review may take its place.
pub const SLOW: Duration = Duration::from_millis(100);

/// The places, and who holds them.
#[derive(Debug)]
pub struct Places {
    per_address: usize,
    total: usize,
    held: Mutex<Held>,
    given_back: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Held {
    next_id: u64,
    places: Vec<Holder>,
}

#[derive(Debug)]
struct Holder {
    id: u64,
    peer: IpAddr,
    /// When its body began to arrive; `None` once it has arrived (never pushed out).
    arriving_since: Option<Instant>,
    push_out: CancellationToken,
}

/// What a review waiting for a place should do next.
enum Try {
    Taken(u64, CancellationToken),
    /// Wait until a place is given back, or until this instant (when the oldest body still
    /// arriving becomes slow).
    Wait(Option<Instant>),
}

impl Places {
    pub fn new(per_address: usize, total: usize) -> Places {
        Places {
            per_address,
            total,
            held: Mutex::new(Held::default()),
            given_back: tokio::sync::Notify::new(),
        }
    }

    /// A place for a body from `peer`, waited for as long as the caller likes.
    pub async fn take(&self, peer: IpAddr) -> PlaceHeld<'_> {
        loop {
            let given_back = self.given_back.notified();
            let mut given_back = std::pin::pin!(given_back);
            given_back.as_mut().enable();
            let until = match self.try_take(peer, Instant::now()) {
                Try::Taken(id, pushed_out) => {
                    return PlaceHeld {
                        places: self,
                        id,
                        pushed_out,
                    };
                }
                Try::Wait(until) => until,
            };
            match until {
                Some(until) => {
                    tokio::select! {
                        () = given_back => {}
                        () = tokio::time::sleep_until(until) => {}
                    }
                }
                None => given_back.await,
            }
        }
    }

    fn try_take(&self, peer: IpAddr, now: Instant) -> Try {
        let peer = peer.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let from_peer = held.places.iter().filter(|h| h.peer == peer).count();
        if from_peer >= self.per_address {
            // The address's own places are given back by their own readers' deadlines.
            return Try::Wait(None);
        }
        if held.places.len() >= self.total {
            let oldest = held
                .places
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.arriving_since.map(|since| (since, i)))
                .min();
            match oldest {
                Some((since, i)) if since + SLOW <= now => {
                    let pushed = held.places.swap_remove(i);
                    pushed.push_out.cancel();
                }
                Some((since, _)) => return Try::Wait(Some(since + SLOW)),
                None => return Try::Wait(None),
            }
        }
        held.next_id += 1;
        let id = held.next_id;
        let push_out = CancellationToken::new();
        held.places.push(Holder {
            id,
            peer,
            arriving_since: Some(now),
            push_out: push_out.clone(),
        });
        Try::Taken(id, push_out)
    }

    fn give_back(&self, id: u64) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.places.retain(|h| h.id != id);
        drop(held);
        self.given_back.notify_waiters();
    }

    fn arrived(&self, id: u64) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match held.places.iter_mut().find(|h| h.id == id) {
            Some(holder) => {
                holder.arriving_since = None;
                true
            }
            None => false,
        }
    }
}

/// A place held, given back when dropped.
#[derive(Debug)]
pub struct PlaceHeld<'a> {
    places: &'a Places,
    id: u64,
    pushed_out: CancellationToken,
}

impl PlaceHeld<'_> {
    /// Completes when a new review has taken this place: its body was too slow.
    pub async fn pushed_out(&self) {
        self.pushed_out.cancelled().await;
    }

    /// The body has arrived whole: the place is no longer given to anyone else. False if it
    /// was given to another review first (the body arrived as it was pushed out).
    #[must_use]
    pub fn arrived(&self) -> bool {
        self.places.arrived(self.id)
    }
}

impl Drop for PlaceHeld<'_> {
    fn drop(&mut self) {
        self.places.give_back(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_new_review_takes_the_place_of_the_slowest_body_once_it_is_slow() {
        let places = Places::new(2, 3);
        let (a, b, api) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 10]),
        );
        let first = places.take(a).await;
        tokio::time::advance(Duration::from_millis(10)).await;
        let second = places.take(b).await;
        let third = places.take(b).await;
        // An address at its own bound waits, whatever the others do.
        assert!(matches!(
            places.try_take(b, Instant::now()),
            Try::Wait(None)
        ));
        // All taken, none slow yet: a new review waits until the oldest is.
        let began = Instant::now();
        let fourth = places.take(api).await;
        assert_eq!(began.elapsed(), SLOW - Duration::from_millis(10));
        // The oldest was pushed out; the others were not.
        tokio::time::timeout(Duration::ZERO, first.pushed_out())
            .await
            .expect("pushed out");
        assert!(
            tokio::time::timeout(Duration::ZERO, second.pushed_out())
                .await
                .is_err()
        );
        drop(first);
        // A body that has arrived is never pushed out: with the others arrived too, a new
        // review waits for a place to be given back.
        for held in [&second, &third, &fourth] {
            assert!(held.arrived());
        }
        tokio::time::advance(SLOW * 10).await;
        assert!(matches!(
            places.try_take(a, Instant::now()),
            Try::Wait(None)
        ));
        let waiting = places.take(a);
        let mut waiting = std::pin::pin!(waiting);
        let still = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
        assert!(still.is_err(), "no place while all are held");
        drop(third);
        let _place = tokio::time::timeout(Duration::ZERO, &mut waiting)
            .await
            .expect("a place given back is taken at once");
        drop((second, fourth));
    }
}
