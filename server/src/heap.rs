//! The server's heap: jemalloc (the binary's global allocator, see `main.rs`) told to give
//! freed memory back to the kernel when it matters.
//!
//! jemalloc keeps freed pages ("dirty") for up to ten seconds in case they are wanted again,
//! and decays them only while the process allocates, unless its background thread does it.
//! A relist builds a whole new index beside the old one (tens of MiB at 100k pods) and then
//! drops the old: left to decay, that memory stays resident for seconds after every relist,
//! or longer on an idle server. So [`enable_background_purging`] starts jemalloc's
//! background thread once (steady decay, even when idle), and [`release_freed`] purges every
//! arena at once after a relist.
//!
//! Both go through jemalloc's control interface only. When jemalloc is not the global
//! allocator (the library in tests), they act on jemalloc's own empty arenas: harmless.

use tikv_jemalloc_ctl::{Access, AsName};

/// What the heap holds, in bytes, as of the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapFigures {
    /// Allocated by the server and not freed.
    pub allocated: u64,
    /// In pages the kernel backs: allocated, plus what jemalloc keeps (freed pages not yet
    /// purged, its own metadata, fragmentation).
    pub resident: u64,
}

/// The heap's figures now (jemalloc's statistics refreshed first); none if jemalloc cannot
/// say.
pub fn figures() -> Option<HeapFigures> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    Some(HeapFigures {
        allocated: tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64,
        resident: tikv_jemalloc_ctl::stats::resident::read().ok()? as u64,
    })
}

/// Starts jemalloc's background purging thread (one: the server is small). Returns why not,
/// when it could not.
pub fn enable_background_purging() -> Result<(), String> {
    tikv_jemalloc_ctl::max_background_threads::write(1)
        .and_then(|()| tikv_jemalloc_ctl::background_thread::write(true))
        .map_err(|e| format!("jemalloc's background thread: {e}"))
}

/// Returns every arena's freed pages to the kernel now; how many arenas were purged.
///
/// jemalloc purges an arena's unused pages at once when its decay time is set to zero; each
/// arena's time is then set back to what it was, so later frees decay as before.
pub fn release_freed() -> usize {
    let Ok(arenas) = tikv_jemalloc_ctl::arenas::narenas::read() else {
        return 0;
    };
    let mut purged = 0;
    for arena in 0..arenas {
        let mut all = true;
        for kind in ["dirty", "muzzy"] {
            let key = format!("arena.{arena}.{kind}_decay_ms\0");
            // An arena not in use yet has no state to read: nothing to purge.
            let Ok(was) = Access::<isize>::read(key.name()) else {
                all = false;
                break;
            };
            if was != 0 {
                let zeroed = key.name().write(0isize);
                let restored = key.name().write(was);
                all &= zeroed.is_ok() && restored.is_ok();
            }
        }
        purged += usize::from(all);
    }
    purged
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decay times are set back after a purge: later frees decay as configured.
    #[test]
    fn a_purge_leaves_the_decay_times_as_they_were() {
        let read = |key: &str| Access::<isize>::read(key.name()).expect("reads");
        let before = read("arena.0.dirty_decay_ms\0");
        assert!(release_freed() >= 1, "arena 0 always exists");
        assert_eq!(read("arena.0.dirty_decay_ms\0"), before);
    }
}
