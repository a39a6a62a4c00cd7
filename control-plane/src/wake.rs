//! Wake-ups that say what woke a task.
//!
//! A connection's task polls several things: its socket, its keepalive
//! timer, shutdown and each of its agent sessions. It gives each its own
//! waker, a [`Source`], and then polls only what was woken: an ack that
//! arrives wakes its session, not the timer and the other sessions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};

/// The task's side: its waker, and whether anything was woken. A wake
/// while the task is `running` does not schedule it again (h2 wakes a
/// connection for every frame a session queues): the task sees the flag
/// and goes round once more instead.
#[derive(Default)]
pub(crate) struct Wakes {
    pub(crate) task: TaskWaker,
    pub(crate) running: AtomicBool,
    /// Something was woken since the task last looked.
    pub(crate) any: AtomicBool,
}

/// A task's own waker, as the things it polls wake it (and, for an agent's
/// session, as a relabel wakes it): registered when it changes (for a
/// task's whole life it does not) and woken by reference.
/// futures' `AtomicWaker` takes the waker out on every wake, so that each
/// poll after a wake-up registered a clone of it again.
#[derive(Default)]
pub(crate) struct TaskWaker(Mutex<Option<Waker>>);

impl TaskWaker {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(&self, waker: &Waker) {
        let mut slot = self.slot();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    pub(crate) fn wake(&self) {
        if let Some(waker) = &*self.slot() {
            waker.wake_by_ref();
        }
    }
}

/// One thing a task polls, with its own waker.
pub(crate) struct Source {
    flag: Arc<Flag>,
    waker: Waker,
}

pub(crate) struct Flag {
    pub(crate) woken: AtomicBool,
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
    pub(crate) fn new(wakes: &Arc<Wakes>) -> Source {
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
    pub(crate) fn again(&self) {
        self.flag.woken.store(true, Ordering::SeqCst);
    }

    /// Whether it was woken, clearing the flag.
    pub(crate) fn take(&self) -> bool {
        self.flag.woken.swap(false, Ordering::SeqCst)
    }

    pub(crate) fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }

    pub(crate) fn waker(&self) -> Waker {
        self.waker.clone()
    }
}

/// Wakers that stay registered: a ring wakes each once, and a woken
/// waiter is not signed up again for the next (as a `watch`'s waiters are,
/// one by one, after every change). For what the whole fleet follows,
/// where a change wakes every session.
#[derive(Default)]
pub(crate) struct Bell {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

/// A registration; dropping it signs off.
pub(crate) struct Ring {
    bell: Arc<Bell>,
    slot: usize,
}

impl Bell {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `waker` is woken at every ring until the registration is dropped.
    pub(crate) fn register(self: &Arc<Self>, waker: Waker) -> Ring {
        let mut slots = self.slots();
        let slot = match slots.free.pop() {
            Some(slot) => {
                slots.wakers[slot] = Some(waker);
                slot
            }
            None => {
                slots.wakers.push(Some(waker));
                slots.wakers.len() - 1
            }
        };
        Ring {
            bell: self.clone(),
            slot,
        }
    }

    #[cfg(test)]
    pub(crate) fn ring(&self) {
        let mut next = 0;
        while let Some(after) = self.ring_part(next, usize::MAX) {
            next = after;
        }
    }

    /// Wakes up to `count` registrations from slot `from` on; returns
    /// where to go on, or `None` once every slot was rung. A registration
    /// made meanwhile in a slot already passed was made after the change,
    /// and a session reads what is current when it registers.
    pub(crate) fn ring_part(&self, from: usize, count: usize) -> Option<usize> {
        let slots = self.slots();
        let end = from.saturating_add(count).min(slots.wakers.len());
        for waker in slots.wakers[from.min(end)..end].iter().flatten() {
            waker.wake_by_ref();
        }
        (end < slots.wakers.len()).then_some(end)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let mut slots = self.bell.slots();
        slots.wakers[self.slot] = None;
        slots.free.push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// `n` wakers that count their wake-ups, registered on `bell`.
    fn registered(bell: &Arc<Bell>, n: usize) -> (Vec<Arc<Count>>, Vec<Ring>) {
        let counts: Vec<Arc<Count>> = (0..n)
            .map(|_| Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        let rings = counts
            .iter()
            .map(|c| bell.register(Waker::from(c.clone())))
            .collect();
        (counts, rings)
    }

    fn woken(counts: &[Arc<Count>]) -> Vec<usize> {
        counts.iter().map(|c| c.0.load(Ordering::SeqCst)).collect()
    }

    #[test]
    fn a_ring_wakes_each_registered_waker_until_it_signs_off() {
        let bell = Arc::new(Bell::default());
        let (counts, mut rings) = registered(&bell, 3);
        bell.ring();
        bell.ring();
        assert!(counts.iter().all(|c| c.0.load(Ordering::SeqCst) == 2));
        // The second signs off; a newcomer takes its slot.
        drop(rings.remove(1));
        let late = Arc::new(Count(AtomicUsize::new(0)));
        let _late = bell.register(Waker::from(late.clone()));
        bell.ring();
        assert_eq!(woken(&counts), [3, 2, 3]);
        assert_eq!(late.0.load(Ordering::SeqCst), 1);
        assert_eq!(bell.slots().wakers.len(), 3);
    }

    #[test]
    fn a_ring_in_parts_wakes_each_registration_once_and_says_where_to_go_on() {
        let bell = Arc::new(Bell::default());
        let (counts, mut rings) = registered(&bell, 5);
        assert_eq!(bell.ring_part(0, 2), Some(2));
        assert_eq!(woken(&counts), [1, 1, 0, 0, 0]);
        // One signs off between parts: its slot is passed over.
        drop(rings.remove(2));
        assert_eq!(bell.ring_part(2, 2), Some(4));
        assert_eq!(bell.ring_part(4, 2), None);
        assert_eq!(woken(&counts), [1, 1, 0, 1, 1]);
        // Past the end: nothing, and done.
        assert_eq!(bell.ring_part(9, 2), None);
        assert_eq!(woken(&counts), [1, 1, 0, 1, 1]);
    }

    #[test]
    fn a_task_waker_wakes_the_waker_last_registered() {
        let task = TaskWaker::default();
        task.wake();
        let first = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(first.clone());
        task.register(&waker);
        task.register(&waker.clone());
        task.wake();
        task.wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 2);
        // Polled from another task: that one is woken from now on.
        let second = Arc::new(Count(AtomicUsize::new(0)));
        task.register(&Waker::from(second.clone()));
        task.wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 2);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        task.register(&waker);
        task.wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 3);
    }
}
