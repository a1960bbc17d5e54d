//! Settings of the global allocator (mimalloc) that binaries apply at start.
//!
//! mimalloc hands freed memory back to the OS 10 ms after it is freed. A model's activation,
//! im2col and attention buffers are freed and reallocated on every layer and step, so every
//! forward page-faults them back in: the kernel zeroing pages was 17% of an SD-1.5 UNet forward
//! (perf), and a purge delay of 10 s made that forward 1.6x faster (10.1 -> 6.2 s, AMD EPYC,
//! 2 threads). Its options are read from the environment at start-up only, and setting them
//! in-process takes `unsafe`, which this workspace forbids: so a binary re-executes itself once
//! with the option in its environment. An operator's own `MIMALLOC_PURGE_DELAY` wins.

/// Serving: memory unused for 30 s goes back to the OS (after a large one-off request), while
/// buffers reused within a generation (even a 15 s SD-1.5 batch) stay mapped.
pub const SERVING_PURGE_DELAY_MS: i64 = 30_000;

/// The process's peak resident set (`VmHWM`) in MiB, one decimal; `None` off Linux. What the
/// benchmarks report beside their timings.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

/// Re-executes the current program with `MIMALLOC_PURGE_DELAY=delay_ms` (-1: never purge) unless
/// the variable is set already; returns only if that is so, or the exec failed. Call it first
/// in `main`, before any thread exists.
pub fn set_purge_delay(delay_ms: i64) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let error = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("MIMALLOC_PURGE_DELAY", delay_ms.to_string())
            .env("MIMALLOC_ARENA_EAGER_COMMIT", "1")
            .exec();
        // Only reached when the exec failed: run as we are.
        eprintln!(
            "note: could not re-execute with MIMALLOC_PURGE_DELAY={delay_ms} ({error}); continuing"
        );
    }
}
