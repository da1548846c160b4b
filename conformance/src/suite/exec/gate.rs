//! Admission by memory: cases running at once (`--jobs N`) together stay
//! within the memory budget. Each case holds its estimated bytes
//! ([`catalogue::size::estimate`]) while it runs; a case waits until the
//! cases in flight leave room for it. A case is never kept waiting when
//! nothing else runs (its own estimate was checked against the budget when
//! it was built), so the gate cannot deadlock.

use super::catalogue;
use crate::types::CaseSpec;
use std::sync::{Condvar, Mutex};

/// Bytes in use by the cases in flight, against a budget.
pub struct MemoryGate {
    budget: u64,
    state: Mutex<(u64, usize)>,
    freed: Condvar,
}

/// What one running case holds; released on drop.
pub struct Ticket<'a> {
    gate: &'a MemoryGate,
    bytes: u64,
}

impl MemoryGate {
    /// A gate admitting cases up to `budget` bytes in all.
    pub fn new(budget: u64) -> MemoryGate {
        MemoryGate {
            budget,
            state: Mutex::new((0, 0)),
            freed: Condvar::new(),
        }
    }

    /// Waits until `bytes` fit next to the cases in flight (or none is in
    /// flight), then holds them until the ticket is dropped.
    pub fn enter(&self, bytes: u64) -> Ticket<'_> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.1 > 0 && st.0.saturating_add(bytes) > self.budget {
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.0 = st.0.saturating_add(bytes);
        st.1 += 1;
        Ticket { gate: self, bytes }
    }

    /// What the case of `spec` holds: its estimate (0 when it is sized by
    /// files, whose sizes the builder checks itself).
    pub fn enter_case(&self, spec: &CaseSpec) -> Ticket<'_> {
        self.enter(catalogue::size::estimate(spec).unwrap_or(0))
    }

    /// Bytes held by the cases in flight.
    pub fn in_use(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(self.bytes);
        st.1 = st.1.saturating_sub(1);
        self.gate.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn cases_in_flight_stay_within_the_budget() {
        let gate = MemoryGate::new(10);
        let peak = AtomicU64::new(0);
        std::thread::scope(|s| {
            for bytes in [6u64, 6, 3, 4, 10, 1, 7] {
                let (gate, peak) = (&gate, &peak);
                s.spawn(move || {
                    let _t = gate.enter(bytes);
                    peak.fetch_max(gate.in_use(), Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                });
            }
        });
        let p = peak.load(Ordering::SeqCst);
        assert!((6..=10).contains(&p), "peak {p}");
        assert_eq!(gate.in_use(), 0);
    }

    #[test]
    fn a_case_alone_is_admitted_even_beyond_the_budget() {
        let gate = MemoryGate::new(4);
        let t = gate.enter(9);
        assert_eq!(gate.in_use(), 9);
        drop(t);
        assert_eq!(gate.in_use(), 0);
    }
}
