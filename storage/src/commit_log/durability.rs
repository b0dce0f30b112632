//! Who waits for which position to become durable, and the future that lets an async caller
//! await it without storage depending on an async runtime.
//!
//! The flusher publishes the durable position here after each flush; every waiter whose record
//! ends at or below it is released at once, so one fsync answers all of them (group commit).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::error::{Error, Result};
use crate::pos::LogPos;

#[derive(Debug, Default)]
pub(crate) struct DurabilityWatch {
    state: Mutex<WatchState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct WatchState {
    durable: u64,
    /// Set once when a flush fails: the log is read-only from then on.
    failure: Option<String>,
    /// Bumped by every truncation; a waiter remembers the generation it started in.
    generation: u64,
    /// `(generation, from)` of each truncation: waiters from an earlier generation for bytes
    /// past `from` lost their records. Truncations are rare (one per lost election).
    truncations: Vec<(u64, u64)>,
    wakers: Vec<(Waiter, Waker)>,
}

/// What a waiter waits for: every byte below `end`, as of `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiter {
    end: u64,
    generation: u64,
}

impl WatchState {
    fn outcome(&self, waiter: Waiter) -> Option<Result<()>> {
        let end = waiter.end;
        if let Some((_, from)) = self
            .truncations
            .iter()
            .find(|(g, from)| *g > waiter.generation && end > *from)
        {
            return Some(Err(Error::Truncated {
                from: LogPos(*from),
            }));
        }
        if self.durable >= end {
            return Some(Ok(()));
        }
        self.failure.as_ref().map(|reason| {
            Err(Error::Poisoned {
                reason: reason.clone(),
            })
        })
    }
}

impl DurabilityWatch {
    pub(crate) fn new(durable: LogPos) -> DurabilityWatch {
        DurabilityWatch {
            state: Mutex::new(WatchState {
                durable: durable.0,
                ..WatchState::default()
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WatchState> {
        // A panic while holding this lock cannot leave the state inconsistent: every update is
        // a single assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Publishes a new durable position and releases the waiters it covers.
    pub(crate) fn advance(&self, durable: LogPos) {
        let ready = {
            let mut state = self.lock();
            state.durable = state.durable.max(durable.0);
            take_ready(&mut state)
        };
        self.changed.notify_all();
        ready.into_iter().for_each(Waker::wake);
    }

    /// Records a failed flush: every current and future waiter gets `Error::Poisoned`.
    pub(crate) fn fail(&self, reason: String) {
        let wakers = {
            let mut state = self.lock();
            state.failure.get_or_insert(reason);
            std::mem::take(&mut state.wakers)
        };
        self.changed.notify_all();
        wakers.into_iter().for_each(|(_, waker)| waker.wake());
    }

    /// Records that the suffix from `from` was removed: waiters beyond it get `Error::Truncated`.
    pub(crate) fn truncate(&self, from: LogPos) {
        let ready = {
            let mut state = self.lock();
            state.durable = state.durable.min(from.0);
            state.generation += 1;
            let generation = state.generation;
            state.truncations.push((generation, from.0));
            take_ready(&mut state)
        };
        self.changed.notify_all();
        ready.into_iter().for_each(Waker::wake);
    }

    fn waiter(&self, end: LogPos) -> Waiter {
        Waiter {
            end: end.0,
            generation: self.lock().generation,
        }
    }

    /// Blocks until every byte below `waiter.end` is durable.
    fn wait(&self, waiter: Waiter) -> Result<()> {
        let mut state = self.lock();
        loop {
            if let Some(outcome) = state.outcome(waiter) {
                return outcome;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

fn take_ready(state: &mut WatchState) -> Vec<Waker> {
    let mut ready = Vec::new();
    let mut i = 0;
    while i < state.wakers.len() {
        if state.outcome(state.wakers[i].0).is_some() {
            ready.push(state.wakers.swap_remove(i).1);
        } else {
            i += 1;
        }
    }
    ready
}

/// Resolves when every byte of the log below `end` is durable, or with the error that makes
/// that impossible. Runtime-agnostic: it only uses the task's `Waker`.
#[derive(Debug)]
pub struct Durable {
    watch: Arc<DurabilityWatch>,
    waiter: Waiter,
}

impl Durable {
    pub(crate) fn new(watch: Arc<DurabilityWatch>, end: LogPos) -> Durable {
        let waiter = watch.waiter(end);
        Durable { watch, waiter }
    }

    /// Blocks the calling thread instead of awaiting.
    pub fn wait(self) -> Result<()> {
        self.watch.wait(self.waiter)
    }
}

impl Future for Durable {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let waiter = self.waiter;
        let mut state = self.watch.lock();
        if let Some(outcome) = state.outcome(waiter) {
            return Poll::Ready(outcome);
        }
        let known = state
            .wakers
            .iter()
            .any(|(w, waker)| *w == waiter && waker.will_wake(cx.waker()));
        if !known {
            state.wakers.push((waiter, cx.waker().clone()));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn future_resolves_only_after_the_position_is_durable() {
        let watch = Arc::new(DurabilityWatch::new(LogPos(0)));
        let flag = Arc::new(Flag(false.into()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = Durable::new(watch.clone(), LogPos(100));
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        watch.advance(LogPos(99));
        assert!(!flag.0.load(std::sync::atomic::Ordering::SeqCst));
        watch.advance(LogPos(100));
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
        assert!(matches!(
            Pin::new(&mut fut).poll(&mut cx),
            Poll::Ready(Ok(()))
        ));
    }

    #[test]
    fn truncation_fails_earlier_waiters_past_the_cut_only() {
        let watch = Arc::new(DurabilityWatch::new(LogPos(0)));
        let before = Durable::new(watch.clone(), LogPos(50));
        watch.truncate(LogPos(20));
        assert!(matches!(before.wait(), Err(Error::Truncated { .. })));
        let after = Durable::new(watch.clone(), LogPos(50));
        watch.advance(LogPos(50));
        assert!(after.wait().is_ok());
    }

    #[test]
    fn failure_releases_waiters_with_an_error() {
        let watch = Arc::new(DurabilityWatch::new(LogPos(0)));
        let waiter = Durable::new(watch.clone(), LogPos(10));
        let waiter = std::thread::spawn(move || waiter.wait());
        watch.fail("fsync: EIO".into());
        assert!(matches!(
            waiter.join().unwrap(),
            Err(Error::Poisoned { .. })
        ));
        // Bytes that were durable before the failure stay durable.
        assert!(Durable::new(watch.clone(), LogPos(0)).wait().is_ok());
    }
}
