//! Gives the memory the allocator holds on to back to the OS once the proxy has gone
//! quiet after a burst.
//!
//! glibc's malloc keeps what a burst of work freed in its arenas and returns by itself
//! only the top of each heap: after 1,000 connections opened at once, several MiB stay
//! resident for as long as the process lives, although nothing uses them. Once a second,
//! on a blocking thread, this task reads the process's resident memory; only when it has
//! grown by at least [`WORTH_TRIMMING`] since the last trim does it read the allocator's
//! counters, and when those have not moved for a whole second (the burst is over) it
//! asks glibc to release the free pages inside its arenas (`malloc_trim`). The resident
//! memory after the trim is the new reference, so a trim that could give little back,
//! or memory that is really in use, does not bring another one. Nothing runs on the
//! request path, and a busy proxy, whose counters move every second, is never trimmed.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// How often resident memory is looked at.
const EVERY: Duration = Duration::from_secs(1);

/// Growth of resident memory, and free bytes in the arenas, below which a trim is not
/// worth its page faults later.
const WORTH_TRIMMING: usize = 512 * 1024;

/// How far the allocator's counters may move in a second that still counts as quiet.
/// An idle process is not still: glibc counts the blocks each thread keeps in its own
/// cache as in use, and those drift by a few hundred bytes a second as this task's
/// work moves between threads. A request in flight holds tens of KiB.
const QUIET_DRIFT: usize = 16 * 1024;

/// The allocator's counters that tell activity and reclaimable memory apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes handed out and not freed.
    pub in_use: usize,
    /// Bytes freed but kept in the arenas.
    pub free: usize,
}

/// Decides, one second at a time, when a trim is due.
#[derive(Debug, Default)]
pub struct Quiet {
    /// Resident bytes after the last trim (or the lowest seen since): growth is counted
    /// from here.
    reference: Option<usize>,
    /// The allocator's counters a second ago, while resident memory is up.
    last: Option<Usage>,
}

impl Quiet {
    /// This second's resident memory; true when the allocator's counters are worth
    /// reading ([`Quiet::observe`]).
    pub fn grown(&mut self, resident: usize) -> bool {
        let reference = *self.reference.get_or_insert(resident);
        if resident < reference {
            self.reference = Some(resident);
        }
        let grown = resident >= reference.saturating_add(WORTH_TRIMMING);
        if !grown {
            self.last = None;
        }
        grown
    }

    /// This second's counters, read because resident memory is up; true when memory
    /// should be given back now: the counters have barely moved for a second.
    pub fn observe(&mut self, now: Usage) -> bool {
        let quiet = self.last.is_some_and(|last| {
            last.in_use.abs_diff(now.in_use) < QUIET_DRIFT
                && last.free.abs_diff(now.free) < QUIET_DRIFT
        });
        self.last = Some(now);
        quiet && now.free >= WORTH_TRIMMING
    }

    /// After a trim: resident memory now is the new reference.
    pub fn trimmed(&mut self, resident: usize) {
        self.reference = Some(resident);
        self.last = None;
    }
}

/// Runs until `stop`: looks at resident memory every second and trims when [`Quiet`]
/// says so. Does nothing where the allocator is not glibc's.
pub async fn give_back_when_quiet(stop: CancellationToken) {
    if !allocator::AVAILABLE {
        return;
    }
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut quiet = Quiet::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // Reading /proc and the allocator's counters (which take each arena's lock
        // while they count), and malloc_trim (which walks every arena and makes a
        // system call per free run of pages): none of it for the event loop.
        let step = tokio::task::spawn_blocking(move || {
            let trimmed = one_second(&mut quiet);
            (quiet, trimmed)
        })
        .await;
        // An error: the runtime is shutting down.
        let Ok((state, trimmed)) = step else {
            return;
        };
        quiet = state;
        if let Some((before, after)) = trimmed {
            tracing::debug!(
                resident_kib_before = before / 1024,
                resident_kib_after = after / 1024,
                released = after < before,
                "gave freed memory back to the OS"
            );
        }
    }
}

/// One look: resident memory, then the counters if it is up, then the trim if due.
/// Returns resident bytes before and after a trim, if one was made.
fn one_second(quiet: &mut Quiet) -> Option<(usize, usize)> {
    let before = allocator::resident()?;
    if !quiet.grown(before) || !quiet.observe(allocator::usage()) {
        return None;
    }
    allocator::trim();
    let after = allocator::resident().unwrap_or(before);
    quiet.trimmed(after);
    Some((before, after))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod allocator {
    use super::Usage;

    pub const AVAILABLE: bool = true;

    /// glibc's counters, all arenas (each arena's lock is held while it is counted).
    /// `mallinfo2` needs glibc 2.33 or later.
    pub fn usage() -> Usage {
        // SAFETY: mallinfo2 has no preconditions; it returns a plain struct by value.
        let info = unsafe { libc::mallinfo2() };
        Usage {
            in_use: info.uordblks,
            free: info.fordblks,
        }
    }

    /// Resident anonymous and file-backed bytes not shared (`/proc/self/statm`'s
    /// resident minus shared pages), or `None` when it cannot be read.
    pub fn resident() -> Option<usize> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let mut fields = statm.split_ascii_whitespace().skip(1);
        let resident: usize = fields.next()?.parse().ok()?;
        let shared: usize = fields.next()?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        resident.checked_sub(shared)?.checked_mul(page)
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
    pub const AVAILABLE: bool = false;

    pub fn usage() -> Usage {
        Usage { in_use: 0, free: 0 }
    }

    pub fn resident() -> Option<usize> {
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

    /// Drives `q` for one second the way `one_second` does; true when it would trim.
    fn second(q: &mut Quiet, resident: usize, counters: Usage) -> bool {
        q.grown(resident) && q.observe(counters)
    }

    #[test]
    fn trims_once_after_a_burst_goes_quiet() {
        let mut q = Quiet::default();
        assert!(!second(&mut q, 10 * MIB, usage(2 * MIB, MIB)));
        // A burst: resident memory up, the counters moving.
        assert!(!second(&mut q, 20 * MIB, usage(9 * MIB, 2 * MIB)));
        assert!(!second(&mut q, 22 * MIB, usage(4 * MIB, 9 * MIB)));
        // The first quiet second trims, also when the counters drift a little.
        assert!(second(
            &mut q,
            22 * MIB,
            usage(4 * MIB + 900, 9 * MIB - 900)
        ));
        q.trimmed(15 * MIB);
        // The trim's own small traffic, a health check now and then: no more trims,
        // however much stays counted as free.
        for i in 0..100 {
            assert!(!second(
                &mut q,
                15 * MIB + i * 1024,
                usage(4 * MIB + i, 9 * MIB)
            ));
        }
        // Another burst, quiet again: another trim.
        assert!(!second(&mut q, 24 * MIB, usage(6 * MIB, 8 * MIB)));
        assert!(second(&mut q, 24 * MIB, usage(6 * MIB, 8 * MIB)));
    }

    #[test]
    fn a_trim_that_gives_little_back_is_not_repeated() {
        let mut q = Quiet::default();
        assert!(!second(&mut q, 10 * MIB, usage(MIB, MIB)));
        assert!(!second(&mut q, 30 * MIB, usage(20 * MIB, MIB)));
        assert!(second(&mut q, 30 * MIB, usage(20 * MIB, MIB)));
        // Nearly all of it was in use: the reference moves up with it.
        q.trimmed(29 * MIB);
        for _ in 0..10 {
            assert!(!second(&mut q, 29 * MIB, usage(20 * MIB, MIB)));
        }
    }

    #[test]
    fn a_busy_process_is_never_trimmed() {
        let mut q = Quiet::default();
        assert!(!second(&mut q, 10 * MIB, usage(MIB, MIB)));
        for s in 0..100 {
            assert!(!second(
                &mut q,
                40 * MIB,
                usage(10 * MIB + QUIET_DRIFT * (1 + s % 3), 5 * MIB + s)
            ));
        }
    }

    #[test]
    fn little_free_memory_is_not_worth_a_trim() {
        let mut q = Quiet::default();
        assert!(!second(&mut q, 10 * MIB, usage(MIB, 0)));
        assert!(!second(&mut q, 20 * MIB, usage(MIB, WORTH_TRIMMING - 1)));
        assert!(!second(&mut q, 20 * MIB, usage(MIB, WORTH_TRIMMING - 1)));
        assert!(second(&mut q, 20 * MIB, usage(MIB, WORTH_TRIMMING)));
    }

    #[test]
    fn shrinking_moves_the_reference_down() {
        let mut q = Quiet::default();
        assert!(!q.grown(20 * MIB));
        assert!(!q.grown(12 * MIB));
        // Growth counts from the lower level.
        assert!(q.grown(13 * MIB));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_counters_and_resident_memory_see_memory_freed_and_trim_runs() {
        let before = allocator::usage();
        assert!(allocator::resident().is_some_and(|r| r > 0));
        // 16 MiB against margins of 6, as other tests allocate and free meanwhile.
        let mut blocks: Vec<Vec<u8>> = (0..16 * 1024).map(|i| vec![i as u8; 1024]).collect();
        let held = allocator::usage();
        assert!(held.in_use >= before.in_use + 6 * MIB);
        // Every other block, so the holes cannot merge into the heap's top and leave.
        let mut i = 0;
        blocks.retain(|_| {
            i += 1;
            i % 2 == 0
        });
        let freed = allocator::usage();
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
