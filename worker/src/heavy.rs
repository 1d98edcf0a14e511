//! One heavy step per turn of the event loop. A full TLS handshake's first flight (key
//! exchange and signature) costs the worker about 0.2 ms of CPU, a request on an established
//! connection a few microseconds. When many clients connect at once, tokio runs their
//! handshakes back to back in the order they came, and a request that arrives meanwhile on a
//! connection already open (or on one whose handshake just finished) waits behind all of them:
//! 50 simultaneous connections put 10 ms of handshakes in front of it.
//!
//! [`gate`] lets one such step run per poll of the I/O driver: the others wait for the next
//! turn, and the light work that became ready in between is queued before them. This is what
//! HAProxy does with its "heavy" tasklet class (SSL handshakes run a bounded number per
//! scheduler loop). A burst of new connections is not slowed when the worker has nothing else
//! to do (each turn is then one non-blocking `epoll_wait`), and under load it shares the event
//! loop instead of taking it.
//!
//! The turn is per thread and applies only in a current-thread runtime (`--threads 1`, the
//! single event loop). In a multi-thread runtime, idle threads steal the light work anyway, and
//! a task woken on one thread may run on another, which this bookkeeping does not follow; there
//! the gate lets everything through.
//!
//! How the turn ends: a step that takes the turn registers a waker with tokio's "deferred" list
//! (by polling `yield_now` once with it); the scheduler wakes that list right after it next
//! polls the I/O driver, after queueing the tasks the driver made ready. That waker reopens the
//! turn and wakes the oldest waiting step, which therefore runs after those tasks.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Wake, Waker};

use tokio::runtime::{Handle, RuntimeFlavor};

thread_local! {
    static GATE: Gate = Gate::default();
}

/// This thread's turn and the steps waiting for it, oldest first.
#[derive(Default)]
struct Gate {
    /// A step ran since the driver was last polled (a reopening is deferred).
    taken: Cell<bool>,
    waiting: RefCell<VecDeque<(u64, Waker)>>,
    next_id: Cell<u64>,
}

enum Retry {
    Go,
    Wait(u64),
}

/// Reopens the turn of the thread it is woken on.
struct Reopen;

impl Wake for Reopen {
    fn wake(self: Arc<Self>) {
        GATE.with(Gate::reopen);
    }
}

impl Gate {
    /// Take the turn if it is free; the reopening is then deferred to the next driver poll.
    fn take(&self) -> bool {
        if self.taken.get() {
            return false;
        }
        self.taken.set(true);
        static REOPEN: LazyLock<Waker> = LazyLock::new(|| Waker::from(Arc::new(Reopen)));
        // `yield_now`'s first poll hands the waker to the scheduler's deferred list (or, outside
        // a runtime, wakes it at once: no gating then).
        let mut cx = Context::from_waker(&REOPEN);
        let _ = std::pin::pin!(tokio::task::yield_now()).poll(&mut cx);
        true
    }

    fn reopen(&self) {
        self.taken.set(false);
        self.wake_next();
    }

    fn wake_next(&self) {
        let next = self.waiting.borrow_mut().pop_front();
        if let Some((_, waker)) = next {
            waker.wake();
        }
    }

    /// Whether step `id` is still queued; if so its waker is brought up to date.
    fn still_queued(&self, id: u64, waker: &Waker) -> bool {
        let mut waiting = self.waiting.borrow_mut();
        match waiting.iter_mut().find(|(i, _)| *i == id) {
            Some((_, w)) => {
                w.clone_from(waker);
                true
            }
            None => false,
        }
    }

    fn queue(&self, waker: &Waker, front: bool) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let mut waiting = self.waiting.borrow_mut();
        if front {
            waiting.push_front((id, waker.clone()));
        } else {
            waiting.push_back((id, waker.clone()));
        }
        id
    }

    /// A waiting step is polled: still in the queue (a poll for some other reason: wait on),
    /// or woken for its turn: take it, or, if a newcomer took it in between, wait first in
    /// line for the next one.
    fn retry(&self, id: u64, waker: &Waker) -> Retry {
        if self.still_queued(id, waker) {
            Retry::Wait(id)
        } else if self.take() {
            Retry::Go
        } else {
            Retry::Wait(self.queue(waker, true))
        }
    }

    /// Step `id` is dropped before it ran: take it out of the queue, or, if it had already been
    /// woken for a turn it will never use, wake the next one.
    fn leave(&self, id: u64) {
        let removed = {
            let mut waiting = self.waiting.borrow_mut();
            match waiting.iter().position(|(i, _)| *i == id) {
                Some(at) => waiting.remove(at).is_some(),
                None => false,
            }
        };
        if !removed && !self.taken.get() {
            self.wake_next();
        }
    }
}

/// `step`'s first poll, the heavy one, waits for this thread's turn; later polls go straight
/// through.
pub fn gate<F: Future + Unpin>(step: F) -> Heavy<F> {
    Heavy {
        step,
        state: State::New,
    }
}

/// The future of [`gate`].
pub struct Heavy<F> {
    step: F,
    state: State,
}

enum State {
    New,
    /// Waiting for a turn: queued, or woken and about to take it.
    Waiting(u64),
    /// The heavy poll happened (or the gate does not apply).
    Through,
}

fn single_event_loop() -> bool {
    Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread)
}

impl<F: Future + Unpin> Future for Heavy<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        match this.state {
            State::Through => {}
            State::New => {
                // (The queue's borrow ends before `take`, which may reopen at once, outside
                // a scheduler, and so touch the queue.)
                let go = !single_event_loop()
                    || GATE.with(|g| {
                        let first_in_line = g.waiting.borrow().is_empty();
                        first_in_line && g.take()
                    });
                if !go {
                    let id = GATE.with(|g| g.queue(cx.waker(), false));
                    this.state = State::Waiting(id);
                    return Poll::Pending;
                }
                this.state = State::Through;
            }
            State::Waiting(id) => match GATE.with(|g| g.retry(id, cx.waker())) {
                Retry::Go => this.state = State::Through,
                Retry::Wait(id) => {
                    this.state = State::Waiting(id);
                    return Poll::Pending;
                }
            },
        }
        Pin::new(&mut this.step).poll(cx)
    }
}

impl<F> Drop for Heavy<F> {
    fn drop(&mut self) {
        if let State::Waiting(id) = self.state {
            // A dropped step must not keep the others waiting. (`try_with`: a thread's
            // locals may be going away when its last tasks are dropped.)
            let _ = GATE.try_with(|g| g.leave(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Log = Arc<Mutex<Vec<String>>>;

    fn step(
        log: &Log,
        name: &str,
        then: impl FnOnce() + Send + 'static,
    ) -> impl Future<Output = ()> {
        let (log, name) = (log.clone(), name.to_owned());
        gate(Box::pin(async move {
            log.lock().unwrap().push(name);
            then();
        }))
    }

    #[tokio::test]
    async fn io_that_became_ready_runs_before_the_next_heavy_step() {
        let log: Log = Arc::default();
        let (mut writer, reader) = std::os::unix::net::UnixStream::pair().unwrap();
        reader.set_nonblocking(true).unwrap();
        let reader = tokio::net::UnixStream::from_std(reader).unwrap();
        let light = tokio::spawn({
            let log = log.clone();
            async move {
                reader.readable().await.unwrap();
                log.lock().unwrap().push("light".to_owned());
            }
        });
        tokio::task::yield_now().await; // the light task waits on its socket
        let steps: Vec<_> = (0..3)
            .map(|n| {
                let then: Box<dyn FnOnce() + Send> = if n == 0 {
                    // The first heavy step makes the light task's socket readable.
                    let mut w = writer.try_clone().unwrap();
                    Box::new(move || std::io::Write::write_all(&mut w, b"x").unwrap())
                } else {
                    Box::new(|| ())
                };
                tokio::spawn(step(&log, &format!("heavy{n}"), then))
            })
            .collect();
        for s in steps {
            s.await.unwrap();
        }
        light.await.unwrap();
        std::io::Write::flush(&mut writer).unwrap();
        // Ungated, the three heavy steps would run back to back and the light task after them.
        assert_eq!(
            *log.lock().unwrap(),
            ["heavy0", "light", "heavy1", "heavy2"]
        );
    }

    #[tokio::test]
    async fn a_step_dropped_while_waiting_does_not_hold_up_the_others() {
        let log: Log = Arc::default();
        let first = tokio::spawn(step(&log, "first", || ()));
        let dropped = tokio::spawn(step(&log, "dropped", || ()));
        let last = tokio::spawn(step(&log, "last", || ()));
        // Abort the second before its turn comes: in the first tick, before the driver poll
        // that reopens the turn, it is queued.
        dropped.abort();
        first.await.unwrap();
        assert!(dropped.await.unwrap_err().is_cancelled());
        tokio::time::timeout(std::time::Duration::from_secs(5), last)
            .await
            .expect("the step after a dropped one still gets its turn")
            .unwrap();
        assert_eq!(*log.lock().unwrap(), ["first", "last"]);
    }

    #[tokio::test]
    async fn a_step_woken_for_its_turn_and_then_dropped_passes_the_turn_on() {
        let gate = Gate::default();
        let waker = Waker::noop();
        assert!(gate.take());
        let a = gate.queue(waker, false);
        let b = gate.queue(waker, false);
        gate.reopen(); // wakes `a` (taken out of the queue)
        assert!(!gate.taken.get());
        gate.leave(a); // `a` is dropped without having used its turn
        assert_eq!(gate.waiting.borrow().len(), 0, "`b` was woken in its place");
        gate.leave(b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_multi_thread_runtime_is_not_gated() {
        let log: Log = Arc::default();
        // All four complete in their first poll, with no turn in between.
        for n in 0..4 {
            let mut s = std::pin::pin!(step(&log, &n.to_string(), || ()));
            assert!(s
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_ready());
        }
        assert_eq!(log.lock().unwrap().len(), 4);
    }
}
