//! Event-loop coalescing: while a runtime thread is busy, it waits a few microseconds
//! (`--coalesce-us`, default 20) before it sleeps in epoll, so the events that arrive in that
//! window are handled in one batch. This is a NIC's interrupt moderation, done by the event loop:
//! fewer epoll calls and sleeps here, and the writes of a batch leave together, so the processes
//! on the other ends (backends, clients) are woken once for several requests instead of once
//! for each.
//!
//! The wait is a spin. Two cheaper forms were measured and not kept: a timed sleep (on these
//! virtual machines it wakes tens of microseconds late and unevenly: no steady gain), and a spin
//! that polls for events (busy polling: it ends at the first event, so it batches little; +0% and
//! +19% in two rounds where the plain wait gave +9% and +32%). A spin costs CPU, so
//! it is done only while the thread is loaded: busy for at least half of its last measuring
//! window (about a millisecond), the spins not counted as busy. And the spins of one window add
//! up to at most a fifth of it, so coalescing never costs more than that share of a core. An
//! idle or lightly loaded worker sleeps at once, as before, and pays two clock reads per sleep.
//!
//! Only a worker with one runtime thread (`--threads 1`, one event loop as HAProxy's `nbthread
//! 1` or an NGINX worker process) coalesces. In a multi-thread runtime a thread about to park
//! has no work while another may, and if they share a core the spin takes it from the one that
//! has: with two threads on one core, HTTP/2 lost 6-30% in three rounds while HTTP/1.1 gained.

use std::cell::Cell;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// The span over which a thread's load is measured.
const WINDOW: Duration = Duration::from_millis(1);
/// The most a thread spins in one window.
const SPIN_BUDGET: Duration = Duration::from_micros(200);

/// How many times a thread waited before sleeping (`sluice_worker_event_loop_waits_total`).
pub static WAITS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// One runtime thread's recent load, from when it wakes up and when it goes to sleep.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// When the thread last woke up (or started).
    woke: Instant,
    /// Start of the current measuring window.
    window_start: Instant,
    /// Time the thread ran tasks in the current window.
    busy: Duration,
    /// Time it spun in the current window.
    spun: Duration,
    /// Whether the last complete window was at least half busy.
    loaded: bool,
}

impl Load {
    pub fn new(now: Instant) -> Load {
        Load {
            woke: now,
            window_start: now,
            busy: Duration::ZERO,
            spun: Duration::ZERO,
            loaded: false,
        }
    }

    /// The thread woke up.
    pub fn woke(&mut self, now: Instant) {
        self.woke = now;
    }

    /// The thread is about to sleep: counts the time since it woke as busy and says whether it
    /// is loaded (then it should wait before sleeping). A window closes at the first sleep after
    /// it spans [`WINDOW`]; a long busy or idle stretch is one window.
    pub fn going_to_sleep(&mut self, now: Instant) -> bool {
        self.busy += now.saturating_duration_since(self.woke);
        let span = now.saturating_duration_since(self.window_start);
        if span >= WINDOW {
            self.loaded = self.busy * 2 >= span;
            self.window_start = now;
            self.busy = Duration::ZERO;
            self.spun = Duration::ZERO;
        }
        self.loaded
    }

    /// How long to wait before sleeping, at most `wait`: nothing unless the thread is loaded, and
    /// no more than what is left of the window's [`SPIN_BUDGET`]. Call after
    /// [`Load::going_to_sleep`].
    pub fn wait(&mut self, wait: Duration) -> Duration {
        if !self.loaded {
            return Duration::ZERO;
        }
        let wait = wait.min(SPIN_BUDGET.saturating_sub(self.spun));
        self.spun += wait;
        wait
    }
}

thread_local! {
    static LOAD: Cell<Option<Load>> = const { Cell::new(None) };
}

/// Apply `f` to this thread's [`Load`] (made on first use).
fn with_load<T>(now: Instant, f: impl FnOnce(&mut Load) -> T) -> T {
    LOAD.with(|cell| {
        let mut load = cell.get().unwrap_or_else(|| Load::new(now));
        let out = f(&mut load);
        cell.set(Some(load));
        out
    })
}

/// Make `builder`'s threads wait up to `wait` before sleeping while they are loaded; a zero
/// `wait` leaves the runtime as it is.
pub fn install(builder: &mut tokio::runtime::Builder, wait: Duration) {
    if wait.is_zero() {
        return;
    }
    builder.on_thread_unpark(|| {
        let now = Instant::now();
        with_load(now, |load| load.woke(now));
    });
    builder.on_thread_park(move || {
        let now = Instant::now();
        let wait = with_load(now, |load| {
            load.going_to_sleep(now);
            load.wait(wait)
        });
        if !wait.is_zero() {
            WAITS.inc();
            let until = now + wait;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Run `cycles` cycles of `busy` then `idle` from `start`; return whether the thread counted
    /// as loaded at the last sleep.
    fn run(load: &mut Load, start: Instant, cycles: u32, busy: Duration, idle: Duration) -> bool {
        let mut t = start;
        let mut loaded = false;
        for _ in 0..cycles {
            load.woke(t);
            t += busy;
            loaded = load.going_to_sleep(t);
            t += idle;
        }
        loaded
    }

    #[test]
    fn a_thread_busy_most_of_the_time_is_loaded() {
        let t0 = Instant::now();
        let mut load = Load::new(t0);
        assert!(run(&mut load, t0, 40, us(90), us(10)));
    }

    #[test]
    fn a_lightly_used_thread_is_not() {
        let t0 = Instant::now();
        let mut load = Load::new(t0);
        assert!(!run(&mut load, t0, 40, us(20), us(80)));
        // Half busy is loaded, just under half is not.
        let mut load = Load::new(t0);
        assert!(run(&mut load, t0, 40, us(50), us(50)));
        let mut load = Load::new(t0);
        assert!(!run(&mut load, t0, 40, us(45), us(55)));
    }

    #[test]
    fn the_state_changes_only_when_a_window_closes() {
        let t0 = Instant::now();
        let mut load = Load::new(t0);
        // Busy for a whole window: loaded from the sleep that closes it.
        assert!(run(&mut load, t0, 1, us(1_500), us(10)));
        // Idle stretches shorter than a window do not change it until the window closes...
        let t1 = t0 + us(1_510);
        assert!(run(&mut load, t1, 3, us(10), us(100)));
        // ...and a window that was mostly idle ends it.
        let t2 = t1 + us(330);
        assert!(!run(&mut load, t2, 10, us(10), us(100)));
    }

    #[test]
    fn the_waits_of_a_window_add_up_to_a_fifth_of_it_at_most() {
        let t0 = Instant::now();
        let mut load = Load::new(t0);
        let mut t = t0;
        assert!(run(&mut load, t, 1, us(1_000), us(0)));
        t += us(1_000);
        // Loaded: each sleep may wait 30 us until 200 us of the window are spent.
        let mut waits = Vec::new();
        for _ in 0..9 {
            load.woke(t);
            t += us(60);
            load.going_to_sleep(t);
            let w = load.wait(us(30));
            waits.push(w.as_micros());
            t += w;
        }
        assert_eq!(waits, [30, 30, 30, 30, 30, 30, 20, 0, 0]);
        // A new window (opened once the last one spans a millisecond) has a new budget.
        load.woke(t);
        t += us(400);
        assert!(load.going_to_sleep(t));
        assert_eq!(load.wait(us(30)), us(30));
        // An unloaded thread never waits.
        let mut idle = Load::new(t0);
        idle.woke(t0 + us(4_990));
        assert!(!idle.going_to_sleep(t0 + us(5_000)));
        assert_eq!(idle.wait(us(30)), Duration::ZERO);
    }

    #[test]
    fn a_long_sleep_makes_a_busy_thread_idle_at_its_next_sleep() {
        let t0 = Instant::now();
        let mut load = Load::new(t0);
        assert!(run(&mut load, t0, 40, us(90), us(10)));
        // One second asleep, then a short burst of work.
        let t1 = t0 + us(4_000) + Duration::from_secs(1);
        assert!(!run(&mut load, t1, 1, us(30), us(0)));
    }

    #[test]
    fn a_loaded_runtime_waits_before_sleeping_and_an_idle_one_does_not() {
        // A real current-thread runtime; the only one in these tests with the hooks, so the
        // global count moves only for it.
        let mut builder = tokio::runtime::Builder::new_current_thread();
        install(&mut builder, Duration::from_micros(50));
        let rt = builder.enable_all().build().expect("runtime");
        rt.block_on(async {
            // Idle: parks after a few microseconds of work, in windows that were mostly asleep.
            // (A thread preempted for a millisecond between waking and parking would look busy
            // for a window; on a loaded test machine that may happen once or twice.)
            let before = WAITS.get();
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let idle_waits = WAITS.get() - before;
            assert!(
                idle_waits <= 2,
                "an idle thread sleeps at once: {idle_waits} waits"
            );
            let before = WAITS.get();
            // Loaded: 3 ms of work between parks, so each park comes after a busy window.
            for _ in 0..3 {
                let busy = Instant::now();
                while busy.elapsed() < Duration::from_millis(3) {
                    std::hint::spin_loop();
                }
                tokio::time::sleep(Duration::from_micros(1)).await;
            }
            assert!(WAITS.get() >= before + 2, "a loaded thread waits first");
        });
        let text = crate::metrics::Metrics::default().render(true);
        assert!(
            text.contains(&format!(
                "sluice_worker_event_loop_waits_total {}",
                WAITS.get()
            )),
            "the count is a metric:\n{text}"
        );
    }
}
