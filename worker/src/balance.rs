//! Choosing a server: smooth weighted round robin (as NGINX does it) and least requests.
//!
//! The choice is a pure function over the servers' weights, the balancer's running state and a
//! predicate saying which servers may be used now (enabled, not seen down, not just tried);
//! the [`Balancer`] wraps it with the state each backend keeps between requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sluice_shared::{Backend, Balance};

/// One step of smooth weighted round robin: every usable server gains its weight, the highest
/// wins and pays back the total. Over any window of `sum(weights)` picks each server is chosen
/// exactly `weight` times, spread out evenly.
pub fn swrr_pick(
    weights: &[u32],
    current: &mut [i64],
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, &w) in weights.iter().enumerate() {
        if !usable(i) {
            continue;
        }
        current[i] += i64::from(w);
        total += i64::from(w);
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    if let Some(b) = best {
        current[b] -= total;
    }
    best
}

/// The usable server with the fewest requests in flight (ties: the lowest index).
pub fn least_pick(in_flight: &[usize], usable: impl Fn(usize) -> bool) -> Option<usize> {
    (0..in_flight.len())
        .filter(|&i| usable(i))
        .min_by_key(|&i| in_flight[i])
}

/// Balancing state of one backend.
#[derive(Debug)]
pub struct Balancer {
    policy: Balance,
    weights: Vec<u32>,
    enabled: Vec<bool>,
    current: Mutex<Vec<i64>>,
    in_flight: Arc<Vec<AtomicUsize>>,
}

/// A chosen server; while held it counts as a request in flight.
#[derive(Debug)]
pub struct Pick {
    pub index: usize,
    in_flight: Arc<Vec<AtomicUsize>>,
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.in_flight[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    pub fn new(backend: &Backend) -> Balancer {
        let n = backend.servers.len();
        Balancer {
            policy: backend.balance,
            weights: backend
                .servers
                .iter()
                .map(|s| u32::from(s.weight))
                .collect(),
            enabled: backend.servers.iter().map(|s| s.enabled).collect(),
            current: Mutex::new(vec![0; n]),
            in_flight: Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect()),
        }
    }

    /// Choose a server among the enabled ones for which `usable` holds.
    pub fn pick(&self, usable: impl Fn(usize) -> bool) -> Option<Pick> {
        let ok = |i: usize| self.enabled[i] && usable(i);
        let index = match self.policy {
            Balance::RoundRobin => {
                let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                swrr_pick(&self.weights, &mut current, ok)?
            }
            Balance::LeastRequests => {
                let counts: Vec<usize> = self
                    .in_flight
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect();
                least_pick(&counts, ok)?
            }
        };
        self.in_flight[index].fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            index,
            in_flight: self.in_flight.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(weights: &[u32], n: usize, usable: impl Fn(usize) -> bool + Copy) -> Vec<usize> {
        let mut cur = vec![0; weights.len()];
        (0..n)
            .map(|_| swrr_pick(weights, &mut cur, usable).unwrap())
            .collect()
    }

    #[test]
    fn equal_weights_alternate_exactly() {
        assert_eq!(run(&[1, 1], 6, |_| true), [0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn weights_are_smooth_like_nginx() {
        // NGINX's documented example: weights 5,1,1 give a a b a c a a.
        assert_eq!(run(&[5, 1, 1], 7, |_| true), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn unusable_servers_are_skipped_and_none_usable_is_none() {
        assert_eq!(run(&[1, 1, 1], 4, |i| i != 1), [0, 2, 0, 2]);
        let mut cur = vec![0; 2];
        assert_eq!(swrr_pick(&[1, 1], &mut cur, |_| false), None);
    }

    #[test]
    fn least_requests_prefers_the_idlest() {
        assert_eq!(least_pick(&[3, 1, 2], |_| true), Some(1));
        assert_eq!(least_pick(&[3, 1, 2], |i| i != 1), Some(2));
        assert_eq!(least_pick(&[], |_| true), None);
    }
}
