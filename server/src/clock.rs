//! Wall-clock time as the API and the files report it: seconds since the Unix epoch.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch of `t` (0 for a time before it).
pub(crate) fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now_seconds() -> f64 {
    unix_seconds(SystemTime::now())
}
