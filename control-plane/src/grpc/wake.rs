//! Wake-ups that say what woke a task.
//!
//! A connection's task polls several things: its socket, its keepalive
//! timer, shutdown and each of its agent sessions. It gives each its own
//! waker, a [`Source`], and then polls only what was woken: an ack that
//! arrives wakes its session, not the timer and the other sessions.

use futures_util::task::AtomicWaker;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Wake, Waker};

/// The task's side: its waker, and whether anything was woken. A wake
/// while the task is `running` does not schedule it again (h2 wakes a
/// connection for every frame a session queues): the task sees the flag
/// and goes round once more instead.
#[derive(Default)]
pub(super) struct Wakes {
    pub(super) task: AtomicWaker,
    pub(super) running: AtomicBool,
    /// Something was woken since the task last looked.
    pub(super) any: AtomicBool,
}

/// One thing a task polls, with its own waker.
pub(super) struct Source {
    flag: Arc<Flag>,
    waker: Waker,
}

pub(super) struct Flag {
    pub(super) woken: AtomicBool,
    wakes: Arc<Wakes>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.wakes.any.store(true, Ordering::SeqCst);
        if !self.wakes.running.load(Ordering::SeqCst) {
            self.wakes.task.wake();
        }
    }
}

impl Source {
    /// Woken at first, so that it is polled once and registers.
    pub(super) fn new(wakes: &Arc<Wakes>) -> Source {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            wakes: wakes.clone(),
        });
        Source {
            waker: Waker::from(flag.clone()),
            flag,
        }
    }

    /// Marks it woken without waking the task: the task, running, will
    /// poll it again.
    pub(super) fn again(&self) {
        self.flag.woken.store(true, Ordering::SeqCst);
    }

    /// Whether it was woken, clearing the flag.
    pub(super) fn take(&self) -> bool {
        self.flag.woken.swap(false, Ordering::SeqCst)
    }

    pub(super) fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }

    pub(super) fn waker(&self) -> Waker {
        self.waker.clone()
    }
}
