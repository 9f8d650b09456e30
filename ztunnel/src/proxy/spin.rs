//! Adaptive busy polling for worker threads.
//!
//! Waking a parked thread costs tens of microseconds on a virtual machine (an IPI, a halted
//! vCPU brought back, a context switch), and a proxy pays it on every hop of every message.
//! After recent activity a worker therefore keeps polling its sockets without blocking for a
//! short window: a reply that arrives within the window is picked up without any wake-up.
//! With no activity the window closes and the thread sleeps in `epoll_wait` as usual, so an
//! idle node costs nothing.
//!
//! Mechanics: the data path bumps a thread-local counter ([`activity`]); Tokio's
//! `on_thread_park` hook ([`before_park`]) sees whether it moved, and while the window is
//! open wakes a parked no-op task, which makes the runtime poll I/O with a zero timeout
//! instead of blocking.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    static EVENTS: Cell<u64> = const { Cell::new(0) };
    static SEEN: Cell<u64> = const { Cell::new(0) };
    static UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
    static WINDOW: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    static SPINNER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Records that the data path did something on this thread.
#[inline]
pub fn activity() {
    EVENTS.with(|e| e.set(e.get().wrapping_add(1)));
}

/// Sets this thread's window (zero disables busy polling).
pub fn configure(window: Duration) {
    WINDOW.with(|w| w.set(window));
}

/// The `on_thread_park` hook: keeps the runtime from blocking while the window is open.
pub fn before_park() {
    let window = WINDOW.with(Cell::get);
    if window.is_zero() {
        return;
    }
    let events = EVENTS.with(Cell::get);
    let now = Instant::now();
    if SEEN.with(|s| s.replace(events)) != events {
        UNTIL.with(|u| u.set(Some(now + window)));
    }
    if UNTIL.with(Cell::get).is_some_and(|until| now < until) {
        SPINNER.with(|s| {
            if let Some(w) = s.borrow().as_ref() {
                w.wake_by_ref();
            }
        });
    }
}

/// A task that never finishes; waking it is how [`before_park`] keeps the runtime polling.
#[derive(Debug, Default)]
pub struct Spinner;

impl Future for Spinner {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        SPINNER.with(|s| {
            let mut slot = s.borrow_mut();
            if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *slot = Some(cx.waker().clone());
            }
        });
        Poll::Pending
    }
}
