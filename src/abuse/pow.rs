//! The proof-of-work requirement for room creation, and how it adapts to load.
//!
//! `pow.mode = adaptive` starts at `pow.base_bits` and watches two signals over each
//! adjustment interval: room creations and new connections on the whole server. When either
//! passes its threshold, the difficulty rises by two bits at once (expected work x4); it falls
//! by one bit only after `pow.calm_intervals` intervals in a row with both signals below *half*
//! their thresholds. Fast up, slow down, and a dead band between the two, so the requirement
//! does not flap between two levels on every request.
//!
//! The onion listener always requires work (at least `pow.base_bits`, even with `mode = off`):
//! there every client shares one address, so work is the only per-creation cost left.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::config::{PowMode, PowSettings};

/// The current requirement and the load signals that move it.
pub struct PowPolicy {
    mode: PowMode,
    base: u8,
    max: u8,
    raise_creations: u64,
    raise_connections: u64,
    calm_needed: u32,
    bits: AtomicU8,
    calm: AtomicU32,
    creations: AtomicU64,
    connections: AtomicU64,
}

impl PowPolicy {
    /// From `[pow]` settings.
    pub fn new(s: &PowSettings) -> Self {
        Self {
            mode: s.mode,
            base: s.base_bits,
            max: s.max_bits,
            raise_creations: u64::from(s.raise_creations_per_minute),
            raise_connections: u64::from(s.raise_connections_per_minute),
            calm_needed: s.calm_intervals,
            bits: AtomicU8::new(s.base_bits),
            calm: AtomicU32::new(0),
            creations: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        }
    }

    /// Leading zero bits a `create` needs now on a normal (`onion = false`) or onion listener.
    pub fn required(&self, onion: bool) -> u8 {
        let bits = match self.mode {
            PowMode::Off => 0,
            PowMode::On => self.base,
            PowMode::Adaptive => self.bits.load(Ordering::Relaxed),
        };
        if onion {
            bits.max(self.base.max(1))
        } else {
            bits
        }
    }

    /// Count a room creation.
    pub fn record_creation(&self) {
        self.creations.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a new connection.
    pub fn record_connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Move the difficulty after an interval of length `interval`; returns the new value.
    /// `cluster_creations`, when known, is the number of rooms created in that interval by
    /// every process sharing the database, so all of them see the same signal.
    pub fn adjust(&self, interval: Duration, cluster_creations: Option<u64>) -> u8 {
        let local_creations = self.creations.swap(0, Ordering::Relaxed);
        let creations = cluster_creations.unwrap_or(local_creations);
        let connections = self.connections.swap(0, Ordering::Relaxed);
        let per_minute = |n: u64| n.saturating_mul(60_000) / (interval.as_millis().max(1) as u64);
        let (cr, co) = (per_minute(creations), per_minute(connections));
        let bits = self.bits.load(Ordering::Relaxed);
        let new = if cr > self.raise_creations || co > self.raise_connections {
            self.calm.store(0, Ordering::Relaxed);
            bits.saturating_add(2).min(self.max)
        } else if cr * 2 < self.raise_creations && co * 2 < self.raise_connections {
            let calm = self.calm.fetch_add(1, Ordering::Relaxed) + 1;
            if calm >= self.calm_needed && bits > self.base {
                self.calm.store(0, Ordering::Relaxed);
                bits - 1
            } else {
                bits
            }
        } else {
            // The dead band: neither raise nor count towards calm.
            self.calm.store(0, Ordering::Relaxed);
            bits
        };
        self.bits.store(new, Ordering::Relaxed);
        new
    }
}

/// Adjust every `interval` while the server runs (adaptive mode only), publishing the gauge.
/// With Postgres the creation signal is counted in the database, so every node agrees.
pub async fn adjust_loop(
    policy: Arc<PowPolicy>,
    store: Arc<dyn crate::store::Store>,
    interval: Duration,
    gauge: prometheus::IntGauge,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let since = crate::store::now_ms() - interval.as_millis() as i64;
        let cluster = store.rooms_created_since(since).await.ok().flatten();
        policy.adjust(interval, cluster);
        gauge.set(i64::from(policy.required(false)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PowPolicy {
        PowPolicy::new(&PowSettings {
            mode: PowMode::Adaptive,
            base_bits: 10,
            max_bits: 16,
            raise_creations_per_minute: 60,
            raise_connections_per_minute: 600,
            calm_intervals: 3,
            ..PowSettings::default()
        })
    }

    #[test]
    fn difficulty_rises_fast_and_falls_slowly() {
        let p = policy();
        let minute = Duration::from_secs(60);
        assert_eq!(p.required(false), 10);
        for _ in 0..100 {
            p.record_creation();
        }
        assert_eq!(p.adjust(minute, None), 12);
        for _ in 0..100 {
            p.record_creation();
        }
        assert_eq!(p.adjust(minute, None), 14);
        for _ in 0..1000 {
            p.record_connection();
        }
        assert_eq!(p.adjust(minute, None), 16);
        for _ in 0..1000 {
            p.record_connection();
        }
        assert_eq!(p.adjust(minute, None), 16, "capped at max_bits");
        // Quiet: one bit down per three calm intervals.
        let seen: Vec<u8> = (0..9).map(|_| p.adjust(minute, None)).collect();
        assert_eq!(seen, vec![16, 16, 15, 15, 15, 14, 14, 14, 13]);
    }

    #[test]
    fn load_in_the_dead_band_neither_raises_nor_lowers() {
        let p = policy();
        let minute = Duration::from_secs(60);
        for _ in 0..100 {
            p.record_creation();
        }
        assert_eq!(p.adjust(minute, None), 12);
        for _ in 0..10 {
            // 40 per minute: below the threshold (60), above half of it (30).
            for _ in 0..40 {
                p.record_creation();
            }
            assert_eq!(p.adjust(minute, None), 12);
        }
    }

    #[test]
    fn a_cluster_wide_count_replaces_the_local_one() {
        let p = policy();
        let minute = Duration::from_secs(60);
        // This node created nothing, the cluster 100 rooms: the difficulty rises here too.
        assert_eq!(p.adjust(minute, Some(100)), 12);
    }

    #[test]
    fn modes_and_the_onion_listener() {
        let mut s = PowSettings {
            base_bits: 12,
            ..PowSettings::default()
        };
        s.mode = PowMode::Off;
        let off = PowPolicy::new(&s);
        assert_eq!(off.required(false), 0);
        assert_eq!(off.required(true), 12, "onion always needs work");
        s.mode = PowMode::On;
        assert_eq!(PowPolicy::new(&s).required(false), 12);
    }
}
