//! `SystemTime` to and from Unix time, the clock token endpoints, JWT claims, client
//! assertions and stored tokens (cache files, Redis values) count in. Nothing here
//! panics or wraps: times before the epoch read as 0, times too far to hold as `None`.

use std::time::{Duration, SystemTime};

/// Whole seconds since the Unix epoch (0 before it).
pub fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch (0 before it, `u64::MAX` beyond what it holds).
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time `ms` milliseconds after the epoch, when a `SystemTime` can hold it.
pub fn from_millis(ms: u64) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// The time `secs` (fractional) seconds after the epoch; `None` when `secs` is
/// negative, not finite, or too far for a `SystemTime`.
pub fn from_secs_f64(secs: f64) -> Option<SystemTime> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
}

/// The time `nanos` nanoseconds after the epoch; `None` when negative or too far.
pub fn from_nanos(nanos: i128) -> Option<SystemTime> {
    let secs = u64::try_from(nanos.div_euclid(1_000_000_000)).ok()?;
    let sub = u32::try_from(nanos.rem_euclid(1_000_000_000)).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_edges() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_250);
        assert_eq!(millis(t), 1_800_000_000_250);
        assert_eq!(secs(t), 1_800_000_000);
        assert_eq!(from_millis(millis(t)), Some(t));
        assert_eq!(from_secs_f64(1_800_000_000.25), Some(t));
        assert_eq!(from_nanos(1_800_000_000_250_000_000), Some(t));
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!((secs(before), millis(before)), (0, 0));
        assert_eq!(from_secs_f64(-1.0), None);
        assert_eq!(from_secs_f64(f64::NAN), None);
        assert_eq!(from_secs_f64(f64::INFINITY), None);
        assert_eq!(from_nanos(-1), None);
    }
}
