//! Response deadlines without a new timer per request. A tokio timer made for each request is
//! filed in the timer wheel under a lock when first polled and taken out under the lock again
//! when dropped: 2.2% of the instructions per HTTP/2 request (`bench/instructions`). A client
//! connection instead keeps the timers of its finished requests ([`Timers`]) and reuses them:
//! moving a filed timer's deadline later is one atomic exchange in tokio, and the wheel re-files
//! it only when the old deadline comes. So a connection's timer goes through the lock about once per
//! timeout period instead of twice per request.
//!
//! A kept timer whose old deadline passes while it waits for reuse wakes the connection's task
//! once for nothing; that is the whole cost of keeping it.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Most timers a connection keeps (an HTTP/2 connection runs up to its stream limit at once; an
/// HTTP/1.1 one needs one).
const KEPT: usize = 16;

/// The deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

/// A connection's spare timers.
#[derive(Default)]
pub struct Timers {
    spare: Mutex<Vec<Pin<Box<Sleep>>>>,
}

impl Timers {
    /// Run `f` for at most `timeout`.
    pub async fn timeout<F: Future>(&self, timeout: Duration, f: F) -> Result<F::Output, TimedOut> {
        self.timeout_at(Instant::now() + timeout, f).await
    }

    /// Run `f` until `deadline` at most: for a caller that has just read the clock anyway (to
    /// time the exchange), so the request path reads it once instead of twice.
    pub async fn timeout_at<F: Future>(
        &self,
        deadline: Instant,
        f: F,
    ) -> Result<F::Output, TimedOut> {
        let mut lease = Lease {
            timers: self,
            sleep: Some(self.take(deadline)),
        };
        let mut f = pin!(f);
        poll_fn(|cx| {
            if let Poll::Ready(out) = f.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            match lease.sleep.as_mut().map(|sleep| sleep.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(TimedOut)),
                _ => Poll::Pending,
            }
        })
        .await
    }

    /// A timer set to `deadline`: a kept one if there is one.
    fn take(&self, deadline: Instant) -> Pin<Box<Sleep>> {
        let kept = self
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match kept {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// How many timers are kept (for tests).
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A timer in use; back to the connection's spares when the request is done, however it ends.
struct Lease<'a> {
    timers: &'a Timers,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            let mut spare = self
                .timers
                .spare
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if spare.len() < KEPT {
                spare.push(sleep);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_quick_future_finishes_and_its_timer_is_kept_for_the_next() {
        let timers = Timers::default();
        let out = timers.timeout(Duration::from_secs(1), async { 7 }).await;
        assert_eq!(out, Ok(7));
        assert_eq!(timers.kept(), 1);
        // The kept timer is reused, with the new deadline: a slow future times out after the
        // new timeout, not at the old deadline.
        tokio::time::advance(Duration::from_millis(900)).await;
        let start = Instant::now();
        let out = timers
            .timeout(
                Duration::from_secs(1),
                tokio::time::sleep(Duration::from_secs(5)),
            )
            .await;
        assert_eq!(out, Err(TimedOut));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(timers.kept(), 1, "reused, not a second one");
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_that_ends_before_the_deadline_is_not_cut_short() {
        let timers = Timers::default();
        // Several rounds on the same timer, each ending just before its deadline.
        for _ in 0..5 {
            let out = timers
                .timeout(Duration::from_secs(1), async {
                    tokio::time::sleep(Duration::from_millis(999)).await;
                    "done"
                })
                .await;
            assert_eq!(out, Ok("done"));
        }
        assert_eq!(timers.kept(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_each_get_a_timer_and_at_most_the_cap_are_kept() {
        let timers = Timers::default();
        let runs = (0..KEPT + 4).map(|i| {
            timers.timeout(Duration::from_secs(1), async move {
                tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
                i
            })
        });
        let outs = futures_util::future::join_all(runs).await;
        assert!(outs.iter().enumerate().all(|(i, o)| *o == Ok(i)));
        assert_eq!(timers.kept(), KEPT);
        // A request dropped midway gives its timer back too.
        let timers = Timers::default();
        {
            let mut pending =
                pin!(timers.timeout(Duration::from_secs(1), std::future::pending::<()>()));
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            assert!(pending.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(timers.kept(), 1);
    }
}
