//! The two per-offset sets of a queue's state, shaped for how a queue's offsets move:
//! deliveries lease offsets at the end, acks finish them mostly near the front, and acks
//! out of order leave gaps just above the floor. Ordered trees did the same work at about a
//! thousand instructions per delivered message.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::state::Lease;

/// Offsets finished out of order, one bit each, in 64-bit words from `base` (a multiple of
/// 64). Serialized as the list of offsets, as the snapshot has always held them.
#[derive(Clone, Default)]
pub struct DoneOffsets {
    base: u64,
    words: VecDeque<u64>,
    len: usize,
}

/// The widest span of done offsets a snapshot may hold: a bitmap of 512 MiB.
const MAX_DONE_SPAN: u64 = 1 << 32;

impl DoneOffsets {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, offset: u64) -> bool {
        let Some(bit) = offset.checked_sub(self.base) else {
            return false;
        };
        usize::try_from(bit / 64)
            .ok()
            .and_then(|word| self.words.get(word))
            .is_some_and(|word| word >> (bit % 64) & 1 == 1)
    }

    pub fn insert(&mut self, offset: u64) {
        let start = offset & !63;
        if self.words.is_empty() {
            self.base = start;
        }
        while start < self.base {
            self.words.push_front(0);
            self.base -= 64;
        }
        let bit = offset - self.base;
        // The span is bounded by the queue's messages above the floor, which all exist.
        let word = (bit / 64) as usize;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let mask = 1 << (bit % 64);
        if self.words[word] & mask == 0 {
            self.words[word] |= mask;
            self.len += 1;
        }
    }

    /// Takes out the run of offsets that starts at `from` and returns the first offset past
    /// it; everything below that offset is dropped too.
    pub fn take_run(&mut self, from: u64) -> u64 {
        let mut next = from;
        while let Some(bit) = next.checked_sub(self.base) {
            let Some(&word) = usize::try_from(bit / 64)
                .ok()
                .and_then(|word| self.words.get(word))
            else {
                break;
            };
            let ones = u64::from((word >> (bit % 64)).trailing_ones());
            next += ones;
            if bit % 64 + ones < 64 {
                break;
            }
        }
        self.drop_below(next);
        next
    }

    /// Forgets every offset below `min`.
    fn drop_below(&mut self, min: u64) {
        while self.base.saturating_add(64) <= min {
            let Some(word) = self.words.pop_front() else {
                break;
            };
            self.len -= word.count_ones() as usize;
            self.base += 64;
        }
        if let Some(front) = self.words.front_mut()
            && min > self.base
        {
            let below = !(u64::MAX << (min - self.base));
            self.len -= (*front & below).count_ones() as usize;
            *front &= !below;
        }
        if self.len == 0 {
            self.words.clear();
        }
    }

    /// The offsets, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(move |(i, &word)| {
            let base = self.base + 64 * i as u64;
            (0..64)
                .filter(move |bit| word >> bit & 1 == 1)
                .map(move |bit| base + bit)
        })
    }
}

impl PartialEq for DoneOffsets {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for DoneOffsets {}

impl fmt::Debug for DoneOffsets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Serialize for DoneOffsets {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for DoneOffsets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let offsets = Vec::<u64>::deserialize(d)?;
        let (Some(&low), Some(&high)) = (offsets.iter().min(), offsets.iter().max()) else {
            return Ok(DoneOffsets::default());
        };
        if high - low >= MAX_DONE_SPAN {
            return Err(D::Error::custom(format!(
                "done offsets span {low}..={high}, wider than {MAX_DONE_SPAN}"
            )));
        }
        let mut done = DoneOffsets::default();
        for offset in offsets {
            done.insert(offset);
        }
        Ok(done)
    }
}

/// A queue's leases by offset, in a deque sorted by offset. A finished lease leaves a hole,
/// dropped once it reaches either end, or all at once when holes outnumber leases.
/// Serialized as a map from offset to lease.
#[derive(Clone, Default)]
pub struct Leases {
    slots: VecDeque<(u64, Option<Lease>)>,
    len: usize,
}

impl Leases {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot(&self, offset: u64) -> Result<usize, usize> {
        let (Some((first, _)), Some((last, _))) = (self.slots.front(), self.slots.back()) else {
            return Err(0);
        };
        if offset > *last {
            return Err(self.slots.len());
        }
        // Offsets are mostly leased one after another: first look where the offset would be
        // if none were missing.
        if let Some(guess) = offset
            .checked_sub(*first)
            .and_then(|i| usize::try_from(i).ok())
            && self.slots.get(guess).is_some_and(|(o, _)| *o == offset)
        {
            return Ok(guess);
        }
        self.slots.binary_search_by_key(&offset, |(o, _)| *o)
    }

    pub fn get(&self, offset: u64) -> Option<&Lease> {
        let i = self.slot(offset).ok()?;
        self.slots[i].1.as_ref()
    }

    pub fn get_mut(&mut self, offset: u64) -> Option<&mut Lease> {
        let i = self.slot(offset).ok()?;
        self.slots[i].1.as_mut()
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.get(offset).is_some()
    }

    /// Leases `offset`, replacing the lease it had. Most offsets go at the end; one below
    /// the last lease (a FIFO group's waiting message, a rescan after a restart) shifts the
    /// shorter side of the deque.
    pub fn insert(&mut self, offset: u64, lease: Lease) {
        match self.slot(offset) {
            Ok(i) => {
                if self.slots[i].1.replace(lease).is_none() {
                    self.len += 1;
                }
            }
            Err(i) => {
                self.slots.insert(i, (offset, Some(lease)));
                self.len += 1;
            }
        }
    }

    pub fn remove(&mut self, offset: u64) -> Option<Lease> {
        let i = self.slot(offset).ok()?;
        let lease = self.slots[i].1.take()?;
        self.len -= 1;
        self.drop_holes();
        Some(lease)
    }

    /// Ends every lease below `min`.
    pub fn drop_below(&mut self, min: u64) {
        while let Some((offset, lease)) = self.slots.front() {
            if *offset >= min {
                break;
            }
            if lease.is_some() {
                self.len -= 1;
            }
            self.slots.pop_front();
        }
        self.drop_holes();
    }

    fn drop_holes(&mut self) {
        while self.slots.front().is_some_and(|(_, lease)| lease.is_none()) {
            self.slots.pop_front();
        }
        while self.slots.back().is_some_and(|(_, lease)| lease.is_none()) {
            self.slots.pop_back();
        }
        if self.slots.len() > 2 * self.len + 64 {
            self.slots.retain(|(_, lease)| lease.is_some());
        }
    }

    /// The leases in offset order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Lease)> {
        self.slots
            .iter()
            .filter_map(|(offset, lease)| Some((*offset, lease.as_ref()?)))
    }

    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter().map(|(offset, _)| offset)
    }

    pub fn values(&self) -> impl Iterator<Item = &Lease> {
        self.iter().map(|(_, lease)| lease)
    }

    /// The highest leased offset.
    pub fn last_offset(&self) -> Option<u64> {
        // Holes never stay at the back.
        self.slots.back().map(|(offset, _)| *offset)
    }
}

impl PartialEq for Leases {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for Leases {}

impl fmt::Debug for Leases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Leases {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Leases {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<u64, Lease>::deserialize(d)?;
        Ok(Leases {
            len: map.len(),
            slots: map.into_iter().map(|(o, l)| (o, Some(l))).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn lease(attempt: u32) -> Lease {
        Lease {
            attempt,
            epoch: 1,
            delivered_epoch: 1,
            visible_at_ms: 100,
            renew_until_ms: 0,
            owner: String::new(),
        }
    }

    #[derive(Debug, Clone)]
    enum DoneStep {
        Insert(u64),
        TakeRun(u64),
        DropBelow(u64),
    }

    #[derive(Debug, Clone)]
    enum LeaseStep {
        Insert(u64, u32),
        Remove(u64),
        DropBelow(u64),
    }

    proptest! {
        #[test]
        fn done_offsets_behave_as_an_ordered_set(
            steps in prop::collection::vec(prop_oneof![
                (0u64..300).prop_map(DoneStep::Insert),
                (0u64..300).prop_map(DoneStep::TakeRun),
                (0u64..300).prop_map(DoneStep::DropBelow),
            ], 0..200)
        ) {
            let (mut done, mut model) = (DoneOffsets::default(), BTreeSet::new());
            for step in steps {
                match step {
                    DoneStep::Insert(o) => {
                        done.insert(o);
                        model.insert(o);
                    }
                    DoneStep::TakeRun(from) => {
                        let mut next = from;
                        while model.contains(&next) {
                            next += 1;
                        }
                        model = model.split_off(&next);
                        prop_assert_eq!(done.take_run(from), next);
                    }
                    DoneStep::DropBelow(min) => {
                        done.drop_below(min);
                        model = model.split_off(&min);
                    }
                }
                prop_assert_eq!(done.len(), model.len());
                prop_assert!(done.iter().eq(model.iter().copied()));
                prop_assert!((0..300).all(|o| done.contains(o) == model.contains(&o)));
            }
            let json = serde_json::to_string(&done).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&model).unwrap());
            prop_assert_eq!(serde_json::from_str::<DoneOffsets>(&json).unwrap(), done);
        }

        #[test]
        fn leases_behave_as_an_ordered_map(
            steps in prop::collection::vec(prop_oneof![
                (0u64..200, 1u32..5).prop_map(|(o, a)| LeaseStep::Insert(o, a)),
                (0u64..200).prop_map(LeaseStep::Remove),
                (0u64..200).prop_map(LeaseStep::DropBelow),
            ], 0..300)
        ) {
            let (mut leases, mut model) = (Leases::default(), BTreeMap::new());
            for step in steps {
                match step {
                    LeaseStep::Insert(o, a) => {
                        leases.insert(o, lease(a));
                        model.insert(o, lease(a));
                    }
                    LeaseStep::Remove(o) => {
                        prop_assert_eq!(leases.remove(o), model.remove(&o));
                    }
                    LeaseStep::DropBelow(min) => {
                        leases.drop_below(min);
                        model = model.split_off(&min);
                    }
                }
                prop_assert_eq!(leases.len(), model.len());
                prop_assert!(leases.iter().eq(model.iter().map(|(o, l)| (*o, l))));
                prop_assert_eq!(leases.last_offset(), model.keys().next_back().copied());
                prop_assert!((0..200).all(|o| leases.get(o) == model.get(&o)));
            }
            let json = serde_json::to_string(&leases).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&model).unwrap());
            prop_assert_eq!(serde_json::from_str::<Leases>(&json).unwrap(), leases);
        }
    }

    #[test]
    fn a_snapshot_with_done_offsets_too_far_apart_is_refused() {
        let json = format!("[3, {}]", 3 + MAX_DONE_SPAN);
        let error = serde_json::from_str::<DoneOffsets>(&json).unwrap_err();
        assert!(error.to_string().contains("wider than"), "{error}");
    }

    #[test]
    fn holes_left_by_out_of_order_acks_do_not_pile_up() {
        let mut leases = Leases::default();
        for offset in 0..10_000 {
            leases.insert(offset, lease(1));
        }
        // The first lease stays out; every other one is acked.
        for offset in 1..10_000 {
            leases.remove(offset);
        }
        assert_eq!(leases.len(), 1);
        assert!(leases.slots.len() <= 2 * leases.len() + 64);
    }
}
