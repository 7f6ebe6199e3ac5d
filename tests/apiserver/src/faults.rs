//! Fault injection switches: cut watches, fail requests with a status code, stall the server.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Handle to the server's fault switches; cheap to clone, shared with the server.
///
/// Failures and stalls apply to resource requests (lists, watches, gets, writes), not to
/// discovery or the `/_test` control endpoints.
#[derive(Debug, Clone)]
pub struct Faults {
    inner: Arc<FaultState>,
}

#[derive(Debug)]
struct FaultState {
    /// Status code to answer with, and how many more times (`None`: until cleared).
    fail: Mutex<Option<(u16, Option<u32>)>>,
    /// While true, requests are accepted but not answered and open watches deliver nothing.
    stall: watch::Sender<bool>,
    /// Bumped to end every open watch stream.
    cut: watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            inner: Arc::new(FaultState {
                fail: Mutex::new(None),
                stall: watch::Sender::new(false),
                cut: watch::Sender::new(0),
            }),
        }
    }
}

impl Faults {
    /// Ends every open watch stream now (cleanly, as an apiserver closing its side would).
    pub fn cut_watches(&self) {
        self.inner.cut.send_modify(|n| *n += 1);
    }

    /// Answers the next `count` resource requests with `code` (410 or 500, say). A watch
    /// request failed with 410 gets HTTP 200 and an in-stream `ERROR` event, as the real
    /// server sends for an expired resourceVersion.
    pub fn fail_next(&self, count: u32, code: u16) {
        *self.inner.fail.lock().unwrap_or_else(|e| e.into_inner()) =
            (count > 0).then_some((code, Some(count)));
    }

    /// Answers every resource request with `code` until [`Faults::clear`].
    pub fn fail_all(&self, code: u16) {
        *self.inner.fail.lock().unwrap_or_else(|e| e.into_inner()) = Some((code, None));
    }

    /// Accepts requests but answers none, and holds back events on open watches, until
    /// [`Faults::unstall`] or [`Faults::clear`].
    pub fn stall(&self) {
        self.inner.stall.send_replace(true);
    }

    /// Ends a stall; held requests and watch events go out.
    pub fn unstall(&self) {
        self.inner.stall.send_replace(false);
    }

    /// Ends failures and stalls.
    pub fn clear(&self) {
        *self.inner.fail.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.unstall();
    }

    /// Whether the server is stalled.
    pub fn is_stalled(&self) -> bool {
        *self.inner.stall.borrow()
    }

    /// Takes one failure, if any is armed: the status code to answer with.
    pub(crate) fn take_failure(&self) -> Option<u16> {
        let mut fail = self.inner.fail.lock().unwrap_or_else(|e| e.into_inner());
        let (code, remaining) = (*fail)?;
        match remaining {
            None => {}
            Some(n) if n <= 1 => *fail = None,
            Some(n) => *fail = Some((code, Some(n - 1))),
        }
        Some(code)
    }

    pub(crate) fn stall_rx(&self) -> watch::Receiver<bool> {
        self.inner.stall.subscribe()
    }

    pub(crate) fn cut_rx(&self) -> watch::Receiver<u64> {
        self.inner.cut.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_next_counts_down() {
        let f = Faults::default();
        f.fail_next(2, 500);
        assert_eq!(f.take_failure(), Some(500));
        assert_eq!(f.take_failure(), Some(500));
        assert_eq!(f.take_failure(), None);
        f.fail_all(410);
        for _ in 0..5 {
            assert_eq!(f.take_failure(), Some(410));
        }
        f.clear();
        assert_eq!(f.take_failure(), None);
    }
}
