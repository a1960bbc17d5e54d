//! The threads the server cannot serve without (the model thread, the learning plugin's).
//!
//! A panic on one of them used to go unnoticed: health stayed SERVING while every request
//! failed, or training silently stopped. Supervised threads report a panic instead: a log line,
//! `imagegen_thread_panics_total{thread}`, and a fatal signal on which the server turns health
//! NOT_SERVING and stops with an error, so the process exits non-zero and is restarted.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::watch;

/// Spawns supervised threads; [`Supervisor::fatal`] says why the server must stop.
#[derive(Debug, Clone)]
pub(crate) struct Supervisor {
    fatal: Arc<watch::Sender<Option<String>>>,
    panics: prometheus::IntCounterVec,
}

impl Supervisor {
    /// A supervisor counting panics in `panics` (labelled by thread).
    pub(crate) fn new(panics: prometheus::IntCounterVec) -> Self {
        Self {
            fatal: Arc::new(watch::channel(None).0),
            panics,
        }
    }

    /// Receives the first fatal failure (`None` while all is well).
    pub(crate) fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    /// Runs `body` on a thread named `name`; a panic in it is reported, not swallowed.
    pub(crate) fn spawn(
        &self,
        name: &str,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let (fatal, panics, thread) = (self.fatal.clone(), self.panics.clone(), name.to_string());
        std::thread::Builder::new()
            .name(thread.clone())
            .spawn(move || {
                if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(body)) {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".into());
                    tracing::error!(%thread, %message, "thread panicked: the server stops");
                    panics.with_label_values(&[thread.as_str()]).inc();
                    fatal.send_if_modified(|f| {
                        f.get_or_insert_with(|| format!("the {thread} thread panicked: {message}"));
                        true
                    });
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(prometheus::Opts::new("p", "p"), &["thread"]).unwrap()
    }

    #[test]
    fn a_panic_is_counted_and_reported_as_fatal() {
        let panics = counter();
        let supervisor = Supervisor::new(panics.clone());
        let fatal = supervisor.fatal();
        supervisor.spawn("ok", || {}).unwrap().join().unwrap();
        assert!(fatal.borrow().is_none());
        supervisor
            .spawn("model", || panic!("out of memory"))
            .unwrap()
            .join()
            .unwrap();
        let reason = fatal.borrow().clone().unwrap();
        assert!(
            reason.contains("model") && reason.contains("out of memory"),
            "{reason}"
        );
        assert_eq!(panics.with_label_values(&["model"]).get(), 1);
        assert_eq!(panics.with_label_values(&["ok"]).get(), 0);
    }
}
