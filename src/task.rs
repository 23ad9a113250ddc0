//! Progress and cancellation for long work (dataset generation, training, evaluation), shared
//! between the worker and whoever watches it: the CLI's progress bar or the GUI's widget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Inner {
    cancel: AtomicBool,
    done: AtomicU64,
    total: AtomicU64,
    message: Mutex<String>,
}

/// A handle on one piece of long work; clones share the state.
#[derive(Clone, Default)]
pub struct Task {
    inner: Arc<Inner>,
}

impl Task {
    /// A fresh task: nothing done, not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the worker to stop at its next check.
    pub fn cancel(&self) {
        self.inner.cancel.store(true, Ordering::Relaxed);
    }

    /// Whether [`Task::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.load(Ordering::Relaxed)
    }

    /// Sets the amount of work.
    pub fn set_total(&self, n: u64) {
        self.inner.total.store(n, Ordering::Relaxed);
    }

    /// Sets how much is done.
    pub fn set_done(&self, n: u64) {
        self.inner.done.store(n, Ordering::Relaxed);
    }

    /// Marks `n` more units done.
    pub fn inc(&self, n: u64) {
        self.inner.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the status line (e.g. the current loss).
    pub fn set_message(&self, m: impl Into<String>) {
        if let Ok(mut g) = self.inner.message.lock() {
            *g = m.into();
        }
    }

    /// `(done, total, message)`.
    pub fn progress(&self) -> (u64, u64, String) {
        let m = self
            .inner
            .message
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        (
            self.inner.done.load(Ordering::Relaxed),
            self.inner.total.load(Ordering::Relaxed),
            m,
        )
    }
}

/// The error long work returns when it was cancelled.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;
