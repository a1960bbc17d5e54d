//! The neutral training surface: what any learning plugin reports, and how the API asks it for
//! a round.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the trainer is doing, for `GetTrainingStatus`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingStatus {
    /// Whether training is on.
    pub enabled: bool,
    /// `idle`, `waiting`, `training`, `gating`.
    pub state: String,
    /// Rounds whose adapter went live.
    pub published: u64,
    /// Rounds whose adapter the gate refused.
    pub rejected: u64,
    /// Why the last round was rejected or skipped.
    pub last_reason: String,
    /// Pairs not yet trained on.
    pub pending_pairs: usize,
    /// The last generation published.
    pub last_generation: String,
    /// Wall time of the last round.
    pub last_round_seconds: f64,
}

/// Shared between the training plugin's thread and the API: status, and a trigger.
#[derive(Debug, Default)]
pub struct TrainingControl {
    status: Mutex<TrainingStatus>,
    triggered: Mutex<bool>,
    wake: Condvar,
}

impl TrainingControl {
    /// The current status.
    pub fn status(&self) -> TrainingStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Asks for a round now.
    pub fn trigger(&self) {
        if let Ok(mut t) = self.triggered.lock() {
            *t = true;
            self.wake.notify_all();
        }
    }

    /// Wakes the trainer (shutdown).
    pub fn wake(&self) {
        self.wake.notify_all();
    }

    /// Changes the status (the plugin's side).
    #[cfg_attr(not(feature = "d3po"), allow(dead_code))] // only plugins call it
    pub(crate) fn update(&self, f: impl FnOnce(&mut TrainingStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// Waits for a trigger or the interval; returns whether a trigger arrived (the plugin's side).
    #[cfg_attr(not(feature = "d3po"), allow(dead_code))] // only plugins call it
    pub(crate) fn wait(&self, interval: Duration, stop: &AtomicBool) -> bool {
        let Ok(mut triggered) = self.triggered.lock() else {
            return false;
        };
        let deadline = Instant::now() + interval;
        while !*triggered && !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match self.wake.wait_timeout(triggered, deadline - now) {
                Ok((guard, _)) => triggered = guard,
                Err(_) => return false,
            }
        }
        std::mem::take(&mut *triggered)
    }
}
