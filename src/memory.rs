//! Gives the memory the allocator holds on to back to the OS once the proxy has gone
//! quiet after a burst.
//!
//! glibc's malloc keeps what a burst of work freed in its arenas and returns by itself
//! only the top of each heap: after 1,000 connections opened at once, several MiB stay
//! resident for as long as the process lives, although nothing uses them. Once a second
//! this task reads the allocator's counters; when they have not moved for a whole second
//! after they last did, and enough is free, it asks glibc to release the free pages
//! inside its arenas (`malloc_trim`), on a blocking thread. Nothing runs on the request
//! path, and a busy proxy, whose counters move every second, is never trimmed.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// How often the allocator's counters are read.
const EVERY: Duration = Duration::from_secs(1);

/// Free bytes below which a trim is not worth its page faults later.
const WORTH_TRIMMING: usize = 512 * 1024;

/// The allocator's counters that tell activity and reclaimable memory apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes handed out and not freed.
    pub in_use: usize,
    /// Bytes freed but kept in the arenas.
    pub free: usize,
}

/// Decides, one reading at a time, when a trim is due: after a reading equal to the one
/// before (a quiet second), unless nothing changed since the last trim.
#[derive(Debug, Default)]
pub struct Quiet {
    last: Option<Usage>,
    trimmed_at: Option<Usage>,
}

impl Quiet {
    /// Takes this second's reading; true when memory should be given back now.
    pub fn observe(&mut self, now: Usage) -> bool {
        let quiet = self.last == Some(now);
        self.last = Some(now);
        // A trim leaves the free chunks counted as free (only their pages go back),
        // so the same reading after a trim means nothing new to give back.
        if quiet && self.trimmed_at != Some(now) && now.free >= WORTH_TRIMMING {
            self.trimmed_at = Some(now);
            return true;
        }
        false
    }
}

/// Runs until `stop`: reads the allocator's counters every second and trims when
/// [`Quiet`] says so. Does nothing where the allocator is not glibc's.
pub async fn give_back_when_quiet(stop: CancellationToken) {
    let Some(mut read) = allocator::reader() else {
        return;
    };
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut quiet = Quiet::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = read();
        if quiet.observe(now) {
            // malloc_trim walks every arena under its lock and makes a system call per
            // free run of pages: not for the event loop.
            let trimmed = tokio::task::spawn_blocking(allocator::trim).await;
            tracing::debug!(
                free_kib = now.free / 1024,
                released = trimmed.unwrap_or(false),
                "gave freed memory back to the OS"
            );
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod allocator {
    use super::Usage;

    /// Reads glibc's counters (all arenas; each arena's lock is held only for the count).
    pub fn reader() -> Option<impl FnMut() -> Usage> {
        Some(|| {
            // SAFETY: mallinfo2 has no preconditions; it returns a plain struct by value.
            let info = unsafe { libc::mallinfo2() };
            Usage {
                in_use: info.uordblks,
                free: info.fordblks,
            }
        })
    }

    /// Releases the free pages inside every arena; true if any memory went back.
    pub fn trim() -> bool {
        // SAFETY: malloc_trim has no preconditions; 0 keeps no extra padding at the top.
        unsafe { libc::malloc_trim(0) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod allocator {
    use super::Usage;

    /// Other allocators (musl's, macOS's) return memory by themselves.
    pub fn reader() -> Option<fn() -> Usage> {
        None
    }

    pub fn trim() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn usage(in_use: usize, free: usize) -> Usage {
        Usage { in_use, free }
    }

    #[test]
    fn trims_once_after_a_quiet_second_and_again_only_after_new_activity() {
        let mut q = Quiet::default();
        // A burst: the counters move every second.
        assert!(!q.observe(usage(10 * MIB, MIB)));
        assert!(!q.observe(usage(12 * MIB, 2 * MIB)));
        assert!(!q.observe(usage(4 * MIB, 9 * MIB)));
        // The first quiet second trims, later quiet seconds do not.
        assert!(q.observe(usage(4 * MIB, 9 * MIB)));
        assert!(!q.observe(usage(4 * MIB, 9 * MIB)));
        assert!(!q.observe(usage(4 * MIB, 9 * MIB)));
        // New activity, then quiet again: another trim.
        assert!(!q.observe(usage(5 * MIB, 8 * MIB)));
        assert!(q.observe(usage(5 * MIB, 8 * MIB)));
    }

    #[test]
    fn a_busy_process_is_never_trimmed() {
        let mut q = Quiet::default();
        for second in 0..100 {
            assert!(!q.observe(usage(10 * MIB + second % 7, 5 * MIB + second)));
        }
    }

    #[test]
    fn little_free_memory_is_not_worth_a_trim() {
        let mut q = Quiet::default();
        assert!(!q.observe(usage(MIB, WORTH_TRIMMING - 1)));
        assert!(!q.observe(usage(MIB, WORTH_TRIMMING - 1)));
        assert!(!q.observe(usage(MIB, WORTH_TRIMMING)));
        assert!(q.observe(usage(MIB, WORTH_TRIMMING)));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_counters_see_memory_freed_and_trim_runs() {
        let Some(mut read) = allocator::reader() else {
            panic!("glibc's counters are readable");
        };
        let before = read();
        // Many small blocks (below the mmap threshold), so they live in an arena.
        // 16 MiB against margins of 6, as other tests allocate and free meanwhile.
        let mut blocks: Vec<Vec<u8>> = (0..16 * 1024).map(|i| vec![i as u8; 1024]).collect();
        let held = read();
        assert!(held.in_use >= before.in_use + 6 * MIB);
        // Every other block, so the holes cannot merge into the heap's top and leave.
        let mut i = 0;
        blocks.retain(|_| {
            i += 1;
            i % 2 == 0
        });
        let freed = read();
        assert!(freed.free >= held.free + 6 * MIB);
        drop(blocks);
        // Whether pages go back depends on the arena's layout; it must only not fail.
        let _ = allocator::trim();
    }

    #[tokio::test]
    async fn stops_when_told() {
        let stop = CancellationToken::new();
        let task = tokio::spawn(give_back_when_quiet(stop.clone()));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stopped within 5 s")
            .expect("did not panic");
    }
}
