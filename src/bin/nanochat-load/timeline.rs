//! A fan-out run second by second: how many deliveries each second of sending produced and
//! how late the worst of them was. A whole-run histogram says that some delivery took a
//! second; the timeline says when, so it can be set beside the server's log (maintenance,
//! checkpoints) and the machine's.

/// One second of sends, counted by when each message was scheduled to be sent.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
struct Slot {
    deliveries: u64,
    max_us: u64,
    over_50ms: u64,
    over_200ms: u64,
}

/// Per-second counts, kept by each reader and added together at the end.
#[derive(Default, Debug)]
pub struct Timeline {
    slots: Vec<Slot>,
}

impl Timeline {
    /// A delivery of a message sent `sent_us` after the measurement began, `latency_us` late.
    pub fn record(&mut self, sent_us: u64, latency_us: u64) {
        let second = (sent_us / 1_000_000) as usize;
        if self.slots.len() <= second {
            self.slots.resize(second + 1, Slot::default());
        }
        let slot = &mut self.slots[second];
        slot.deliveries += 1;
        slot.max_us = slot.max_us.max(latency_us);
        slot.over_50ms += u64::from(latency_us > 50_000);
        slot.over_200ms += u64::from(latency_us > 200_000);
    }

    pub fn add(&mut self, other: &Timeline) {
        if self.slots.len() < other.slots.len() {
            self.slots.resize(other.slots.len(), Slot::default());
        }
        for (mine, theirs) in self.slots.iter_mut().zip(&other.slots) {
            mine.deliveries += theirs.deliveries;
            mine.max_us = mine.max_us.max(theirs.max_us);
            mine.over_50ms += theirs.over_50ms;
            mine.over_200ms += theirs.over_200ms;
        }
    }

    /// `[second, deliveries, worst ms, deliveries over 50 ms, over 200 ms]` per second.
    pub fn to_json(&self) -> serde_json::Value {
        self.slots
            .iter()
            .enumerate()
            .map(|(s, slot)| {
                serde_json::json!([
                    s,
                    slot.deliveries,
                    slot.max_us as f64 / 1000.0,
                    slot.over_50ms,
                    slot.over_200ms
                ])
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_land_in_the_second_they_were_sent_and_merge_by_second() {
        let mut a = Timeline::default();
        a.record(10, 1_000);
        a.record(999_999, 60_000);
        a.record(2_500_000, 300_000);
        let mut b = Timeline::default();
        b.record(1_000_000, 5_000);
        b.record(1_000, 80_000);
        a.add(&b);
        assert_eq!(
            a.to_json(),
            serde_json::json!([[0, 3, 80.0, 2, 0], [1, 1, 5.0, 0, 0], [2, 1, 300.0, 1, 1]])
        );
        // Adding a longer timeline to a shorter one keeps every second of both.
        let mut short = Timeline::default();
        short.add(&a);
        assert_eq!(short.to_json(), a.to_json());
    }
}
