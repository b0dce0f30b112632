//! What each consumer group has done with each queue: which offsets are acked, which are out
//! on a lease (and until when), and where a pull consumer said it is. Pure data: no I/O.
//!
//! Every change is an [`Op`]. The broker journals each op in the commit log before it tells
//! the client, and recovery replays the ops written after the last snapshot, so the state
//! after a crash is the state the clients were told about.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::offsets::{DoneOffsets, Leases};

/// One message handed out and not yet acked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Deliveries so far, this one included (the first delivery is 1).
    pub attempt: u32,
    /// Changes at every delivery and lease change.
    pub epoch: u64,
    /// The epoch of the delivery this lease belongs to; 0 in leases journaled before it was
    /// kept. Every handle issued since, the delivery's own and each lease change's, acts on
    /// the lease: a client that lost the reply to a lease change still holds a good one.
    #[serde(default)]
    pub delivered_epoch: u64,
    /// When the message may be delivered again.
    pub visible_at_ms: i64,
    /// For a push consumer's auto-renewed lease: the broker extends it until this time (0:
    /// never) while `owner` stays connected.
    #[serde(default)]
    pub renew_until_ms: i64,
    /// The client id that received the message on an auto-renewed lease.
    #[serde(default)]
    pub owner: String,
}

impl Lease {
    /// Whether a receipt handle with `epoch` was issued for this delivery.
    pub fn issued(&self, epoch: u64) -> bool {
        if self.delivered_epoch == 0 {
            return epoch == self.epoch;
        }
        (self.delivered_epoch..=self.epoch).contains(&epoch)
    }
}

/// One queue as one group sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Every offset below this is done: acked, dead-lettered or filtered out.
    pub floor: u64,
    /// Done offsets at or above `floor` (acks arrive out of order).
    pub done: DoneOffsets,
    pub leases: Leases,
    /// Offsets below this were looked at for new messages; not kept across restarts, where
    /// scanning resumes at `floor` and skips what is done or leased.
    #[serde(skip)]
    pub scanned: u64,
    /// FIFO groups only: offsets scanned while their message group had a message out, per
    /// message group in offset order. Each goes out once the one before it is finished.
    /// Not kept either: the rescan from `floor` after a restart finds them again.
    #[serde(skip)]
    pub waiting: HashMap<String, VecDeque<u64>>,
}

impl QueueState {
    pub fn starting_at(offset: u64) -> QueueState {
        QueueState {
            floor: offset,
            scanned: offset,
            ..QueueState::default()
        }
    }

    pub fn is_done(&self, offset: u64) -> bool {
        offset < self.floor || self.done.contains(offset)
    }

    pub fn mark_done(&mut self, offset: u64) {
        if offset < self.floor {
            return;
        }
        self.leases.remove(offset);
        if offset == self.floor {
            self.floor = self.done.take_run(offset + 1);
        } else {
            self.done.insert(offset);
        }
        self.scanned = self.scanned.max(self.floor);
    }

    /// Finishes everything below `min`: retention deleted it, so nothing is left to deliver.
    pub fn skip_below(&mut self, min: u64) {
        if self.floor >= min {
            return;
        }
        self.floor = self.done.take_run(min);
        self.leases.drop_below(min);
        self.scanned = self.scanned.max(self.floor);
    }

    /// Forgets what waits behind each message group and scans again from `floor`, as a
    /// restart does: the rescan skips what is done or leased and queues the rest again.
    pub fn rescan_waiting(&mut self) {
        self.waiting.clear();
        self.scanned = self.floor;
    }

    /// The next offset of a message never looked at.
    pub fn next_unscanned(&self) -> u64 {
        self.scanned.max(self.floor)
    }
}

/// A change to the state, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Messages handed out on new leases: `(queue id, offset, attempt)`, all with one epoch
    /// and one visibility time.
    Deliver {
        group: String,
        topic: String,
        #[serde(with = "runs")]
        messages: Vec<(u32, u64, u32)>,
        epoch: u64,
        visible_at_ms: i64,
        #[serde(default)]
        renew_until_ms: i64,
        #[serde(default)]
        owner: String,
    },
    /// A lease moved to a new visibility time: a new epoch for ChangeInvisibleDuration, the
    /// same one when the broker renews it for a push consumer.
    Renew {
        group: String,
        topic: String,
        queue_id: u32,
        offset: u64,
        epoch: u64,
        visible_at_ms: i64,
        #[serde(default)]
        renew_until_ms: i64,
    },
    /// Messages finished: acked or dead-lettered.
    Done {
        group: String,
        topic: String,
        #[serde(with = "runs")]
        messages: Vec<(u32, u64)>,
    },
    /// An operator moved the group's position in a queue (`ResetOffset`): everything from
    /// `offset` on is to be delivered, nothing below it; leases end.
    Reset {
        group: String,
        topic: String,
        queue_id: u32,
        offset: u64,
    },
    /// A pull consumer's committed offset (UpdateOffset).
    PullOffset {
        group: String,
        topic: String,
        queue_id: u32,
        offset: u64,
    },
}

impl Op {
    /// The group the op changes: each group's state is its own.
    pub fn group(&self) -> &str {
        match self {
            Op::Deliver { group, .. }
            | Op::Renew { group, .. }
            | Op::Done { group, .. }
            | Op::Reset { group, .. }
            | Op::PullOffset { group, .. } => group,
        }
    }
}

pub type QueueKey = (String, String, u32);

/// Queue `queue_id` of `queues`, created by `start` when new.
fn queue_in(
    queues: &mut BTreeMap<u32, QueueState>,
    queue_id: u32,
    start: impl FnOnce() -> u64,
) -> &mut QueueState {
    queues
        .entry(queue_id)
        .or_insert_with(|| QueueState::starting_at(start()))
}

/// The state of consumer groups: the broker keeps one per group.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ConsumerState {
    /// group → topic → queue id → state.
    pub groups: BTreeMap<String, BTreeMap<String, BTreeMap<u32, QueueState>>>,
    #[serde(with = "pull_offsets")]
    pub pull_offsets: HashMap<QueueKey, u64>,
    /// The highest epoch handed out; the next is above it.
    pub epoch: u64,
    /// The queue offset of the last journaled op this state includes.
    pub last_op: Option<u64>,
}

impl ConsumerState {
    pub fn queue(&self, group: &str, topic: &str, queue_id: u32) -> Option<&QueueState> {
        self.queues(group, topic)?.get(&queue_id)
    }

    /// The group's queues of `topic`, by queue id; nothing is created.
    pub fn queues(&self, group: &str, topic: &str) -> Option<&BTreeMap<u32, QueueState>> {
        self.groups.get(group)?.get(topic)
    }

    /// The queue's state when the group has one; nothing is created.
    pub fn queue_if_held(
        &mut self,
        group: &str,
        topic: &str,
        queue_id: u32,
    ) -> Option<&mut QueueState> {
        self.groups
            .get_mut(group)?
            .get_mut(topic)?
            .get_mut(&queue_id)
    }

    /// The queue's state, created by `start` (the group's first offset) when new.
    pub fn queue_mut(
        &mut self,
        group: &str,
        topic: &str,
        queue_id: u32,
        start: impl FnOnce() -> u64,
    ) -> &mut QueueState {
        queue_in(self.queues_mut(group, topic), queue_id, start)
    }

    /// The group's queues of `topic`, created when new. Ops look them up once for all their
    /// messages: the names are copied into the keys of a new entry.
    fn queues_mut(&mut self, group: &str, topic: &str) -> &mut BTreeMap<u32, QueueState> {
        self.groups
            .entry(group.to_owned())
            .or_default()
            .entry(topic.to_owned())
            .or_default()
    }

    /// Applies an op. Ops are applied once each, in log order: recovery skips those a group's
    /// state already includes (`last_op`).
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Deliver {
                group,
                topic,
                messages,
                epoch,
                visible_at_ms,
                renew_until_ms,
                owner,
            } => {
                let queues = self.queues_mut(group, topic);
                for &(queue_id, offset, attempt) in messages {
                    let queue = queue_in(queues, queue_id, || offset);
                    if !queue.is_done(offset) {
                        queue.leases.insert(
                            offset,
                            Lease {
                                attempt,
                                epoch: *epoch,
                                delivered_epoch: *epoch,
                                visible_at_ms: *visible_at_ms,
                                renew_until_ms: *renew_until_ms,
                                owner: owner.clone(),
                            },
                        );
                    }
                }
                self.epoch = self.epoch.max(*epoch);
            }
            Op::Renew {
                group,
                topic,
                queue_id,
                offset,
                epoch,
                visible_at_ms,
                renew_until_ms,
            } => {
                let queue = self.queue_mut(group, topic, *queue_id, || *offset);
                if let Some(lease) = queue.leases.get_mut(*offset) {
                    lease.epoch = *epoch;
                    lease.visible_at_ms = *visible_at_ms;
                    lease.renew_until_ms = *renew_until_ms;
                }
                self.epoch = self.epoch.max(*epoch);
            }
            Op::Done {
                group,
                topic,
                messages,
            } => {
                let queues = self.queues_mut(group, topic);
                for &(queue_id, offset) in messages {
                    queue_in(queues, queue_id, || offset).mark_done(offset);
                }
            }
            Op::Reset {
                group,
                topic,
                queue_id,
                offset,
            } => {
                *self.queue_mut(group, topic, *queue_id, || *offset) =
                    QueueState::starting_at(*offset);
                self.pull_offsets
                    .insert((group.clone(), topic.clone(), *queue_id), *offset);
            }
            Op::PullOffset {
                group,
                topic,
                queue_id,
                offset,
            } => {
                self.pull_offsets
                    .insert((group.clone(), topic.clone(), *queue_id), *offset);
            }
        }
    }
}

/// An op's messages as the journal holds them: runs of consecutive offsets in one queue with
/// one attempt, `[queue id, first offset, (attempt,) count]`, so that a receive of 512
/// messages is a few runs rather than 512 entries. An entry without a count, as journals
/// held them before, is a run of one.
mod runs {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Error, SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};

    /// A message of an op: a queue id, an offset and, for a delivery, its attempt.
    pub(super) trait Entry: Copy {
        /// How many numbers follow the queue id and offset.
        const EXTRA: usize;
        fn queue_offset(&self) -> (u32, u64);
        fn extra(&self) -> Option<u32>;
        fn new(queue_id: u32, offset: u64, extra: Option<u32>) -> Self;
    }

    impl Entry for (u32, u64) {
        const EXTRA: usize = 0;
        fn queue_offset(&self) -> (u32, u64) {
            *self
        }
        fn extra(&self) -> Option<u32> {
            None
        }
        fn new(queue_id: u32, offset: u64, _: Option<u32>) -> Self {
            (queue_id, offset)
        }
    }

    impl Entry for (u32, u64, u32) {
        const EXTRA: usize = 1;
        fn queue_offset(&self) -> (u32, u64) {
            (self.0, self.1)
        }
        fn extra(&self) -> Option<u32> {
            Some(self.2)
        }
        fn new(queue_id: u32, offset: u64, extra: Option<u32>) -> Self {
            (queue_id, offset, extra.unwrap_or_default())
        }
    }

    /// The longest run read back: longer than any op writes.
    const MAX_RUN: u64 = 1 << 20;

    pub(super) fn serialize<E: Entry, S: Serializer>(
        messages: &[E],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        let mut entries = messages.iter().peekable();
        while let Some(first) = entries.next() {
            let (queue_id, offset) = first.queue_offset();
            let mut count = 1;
            while let Some(next) = entries.peek() {
                if next.queue_offset() != (queue_id, offset + count)
                    || next.extra() != first.extra()
                {
                    break;
                }
                entries.next();
                count += 1;
            }
            match first.extra() {
                None => seq.serialize_element(&(queue_id, offset, count))?,
                Some(extra) => seq.serialize_element(&(queue_id, offset, extra, count))?,
            }
        }
        seq.end()
    }

    pub(super) fn deserialize<'de, E: Entry, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<E>, D::Error> {
        d.deserialize_seq(RunsVisitor(PhantomData))
    }

    struct RunsVisitor<E>(PhantomData<E>);

    impl<'de, E: Entry> Visitor<'de> for RunsVisitor<E> {
        type Value = Vec<E>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of runs of messages")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<E>, A::Error> {
            let mut messages = Vec::new();
            while let Some(run) = seq.next_element::<Vec<u64>>()? {
                let number = |i: usize, what: &str| {
                    run.get(i)
                        .copied()
                        .ok_or_else(|| A::Error::custom(format!("a run without its {what}")))
                };
                let queue_id = u32::try_from(number(0, "queue id")?)
                    .map_err(|_| A::Error::custom("a run's queue id is over u32"))?;
                let offset = number(1, "offset")?;
                let extra = match E::EXTRA {
                    0 => None,
                    _ => Some(
                        u32::try_from(number(2, "attempt")?)
                            .map_err(|_| A::Error::custom("a run's attempt is over u32"))?,
                    ),
                };
                let count = match run.len() - 2 - E::EXTRA {
                    0 => 1,
                    1 => number(2 + E::EXTRA, "count")?,
                    _ => return Err(A::Error::custom("a run with too many numbers")),
                };
                if !(1..=MAX_RUN).contains(&count) {
                    return Err(A::Error::custom(format!("a run of {count} messages")));
                }
                let end = offset
                    .checked_add(count)
                    .ok_or_else(|| A::Error::custom("a run past the last offset"))?;
                messages.extend((offset..end).map(|offset| E::new(queue_id, offset, extra)));
            }
            Ok(messages)
        }
    }
}

/// JSON maps need string keys; pull offsets are stored as a list.
mod pull_offsets {
    use super::QueueKey;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::HashMap;

    pub(super) fn serialize<S: Serializer>(
        map: &HashMap<QueueKey, u64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut list: Vec<(&QueueKey, &u64)> = map.iter().collect();
        list.sort();
        list.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<HashMap<QueueKey, u64>, D::Error> {
        let list: Vec<(QueueKey, u64)> = Vec::deserialize(d)?;
        Ok(list.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_takes_every_handle_of_its_delivery_and_no_older_one() {
        let mut state = ConsumerState::default();
        state.apply(&deliver(&[5], 10));
        let lease = |state: &ConsumerState| {
            state
                .queue("g", "t", 0)
                .unwrap()
                .leases
                .get(5)
                .unwrap()
                .clone()
        };
        state.apply(&Op::Renew {
            group: "g".into(),
            topic: "t".into(),
            queue_id: 0,
            offset: 5,
            epoch: 12,
            visible_at_ms: 200,
            renew_until_ms: 0,
        });
        let renewed = lease(&state);
        assert!(renewed.issued(10) && renewed.issued(12));
        assert!(!renewed.issued(9) && !renewed.issued(13));
        // A lease journaled before deliveries were kept takes its current handle only.
        let old = Lease {
            delivered_epoch: 0,
            ..renewed
        };
        assert!(old.issued(12) && !old.issued(10));
    }

    #[test]
    fn a_reset_moves_the_floor_and_ends_leases_in_either_direction() {
        let mut state = ConsumerState::default();
        state.apply(&deliver(&[0, 1, 2, 3], 1));
        state.apply(&Op::Done {
            group: "g".into(),
            topic: "t".into(),
            messages: vec![(0, 0), (0, 1)],
        });
        let reset = |offset| Op::Reset {
            group: "g".into(),
            topic: "t".into(),
            queue_id: 0,
            offset,
        };
        state.apply(&reset(1));
        let queue = state.queue("g", "t", 0).unwrap();
        assert_eq!((queue.floor, queue.next_unscanned()), (1, 1));
        assert!(queue.leases.is_empty() && queue.done.is_empty());
        assert!(
            !queue.is_done(1),
            "acked before, delivered again after the reset"
        );
        state.apply(&reset(10));
        assert!(state.queue("g", "t", 0).unwrap().is_done(9));
        assert_eq!(state.pull_offsets[&("g".to_owned(), "t".to_owned(), 0)], 10);
    }

    fn deliver(offsets: &[u64], epoch: u64) -> Op {
        Op::Deliver {
            group: "g".into(),
            topic: "t".into(),
            messages: offsets.iter().map(|&o| (0, o, 1)).collect(),
            epoch,
            visible_at_ms: 100,
            renew_until_ms: 0,
            owner: String::new(),
        }
    }

    fn done(offsets: &[u64]) -> Op {
        Op::Done {
            group: "g".into(),
            topic: "t".into(),
            messages: offsets.iter().map(|&o| (0, o)).collect(),
        }
    }

    #[test]
    fn out_of_order_acks_advance_the_floor_when_the_gap_closes() {
        let mut state = ConsumerState::default();
        state.queue_mut("g", "t", 0, || 10);
        state.apply(&deliver(&[10, 11, 12], 1));
        state.apply(&done(&[12, 11]));
        let q = state.queue("g", "t", 0).unwrap();
        assert_eq!(q.floor, 10);
        assert_eq!(q.leases.len(), 1);
        state.apply(&done(&[10]));
        let q = state.queue("g", "t", 0).unwrap();
        assert_eq!((q.floor, q.done.len(), q.leases.len()), (13, 0, 0));
    }

    proptest::proptest! {
        #[test]
        fn acks_in_any_order_leave_the_floor_at_the_first_unacked_offset(
            acks in proptest::collection::vec(0u64..40, 0..60)
        ) {
            let mut queue = QueueState::starting_at(0);
            let mut acked = std::collections::BTreeSet::new();
            for offset in acks {
                queue.mark_done(offset);
                acked.insert(offset);
                let floor = (0..).find(|o| !acked.contains(o)).unwrap();
                proptest::prop_assert_eq!(queue.floor, floor);
                proptest::prop_assert!(queue.done.iter().eq(acked.range(floor..).copied()));
            }
        }
    }

    #[test]
    fn retention_moves_the_floor_past_deleted_offsets() {
        let mut state = ConsumerState::default();
        state.queue_mut("g", "t", 0, || 0);
        state.apply(&deliver(&[0, 5], 1));
        state.apply(&done(&[6]));
        let q = state
            .groups
            .get_mut("g")
            .unwrap()
            .get_mut("t")
            .unwrap()
            .get_mut(&0)
            .unwrap();
        q.skip_below(5);
        assert_eq!(q.floor, 5);
        assert_eq!(q.leases.offsets().collect::<Vec<_>>(), vec![5]);
        q.mark_done(5);
        assert_eq!((q.floor, q.done.len()), (7, 0));
    }

    #[test]
    fn replaying_ops_is_harmless() {
        let ops = [
            deliver(&[0, 1], 1),
            done(&[0]),
            deliver(&[1], 2),
            done(&[1]),
        ];
        let mut once = ConsumerState::default();
        for op in &ops {
            once.apply(op);
        }
        let mut twice = ConsumerState::default();
        for op in ops.iter().chain(ops.iter()) {
            twice.apply(op);
        }
        assert_eq!(once.queue("g", "t", 0), twice.queue("g", "t", 0));
        assert_eq!(twice.queue("g", "t", 0).unwrap().floor, 2);
    }

    #[test]
    fn journaled_messages_are_runs_and_older_lists_still_read() {
        let delivery = |messages| Op::Deliver {
            group: "g".into(),
            topic: "t".into(),
            messages,
            epoch: 3,
            visible_at_ms: 100,
            renew_until_ms: 0,
            owner: String::new(),
        };
        let runs = delivery(vec![
            (0, 5, 1),
            (0, 6, 1),
            (0, 7, 1),
            (1, 8, 1),
            (0, 8, 2),
            (0, 9, 2),
        ]);
        let json = serde_json::to_string(&runs).unwrap();
        assert!(
            json.contains(r#""messages":[[0,5,1,3],[1,8,1,1],[0,8,2,2]]"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Op>(&json).unwrap(), runs);
        let finished = done(&[1, 2, 4]);
        let json = serde_json::to_string(&finished).unwrap();
        assert!(json.contains(r#""messages":[[0,1,2],[0,4,1]]"#), "{json}");
        assert_eq!(serde_json::from_str::<Op>(&json).unwrap(), finished);

        let older = r#"{"Deliver":{"group":"g","topic":"t","messages":[[0,5,1],[0,6,2]],
            "epoch":3,"visible_at_ms":100}}"#;
        assert_eq!(
            serde_json::from_str::<Op>(older).unwrap(),
            delivery(vec![(0, 5, 1), (0, 6, 2)])
        );
        let older = r#"{"Done":{"group":"g","topic":"t","messages":[[0,1],[0,2]]}}"#;
        assert_eq!(serde_json::from_str::<Op>(older).unwrap(), done(&[1, 2]));

        for (messages, why) in [
            ("[[0]]", "without its offset"),
            ("[[0,1,2,3]]", "too many numbers"),
            ("[[0,1,0]]", "a run of 0 messages"),
            ("[[0,1,2000000]]", "a run of 2000000 messages"),
            ("[[4294967296,1]]", "queue id is over u32"),
            ("[[0,18446744073709551615,2]]", "past the last offset"),
        ] {
            let json = format!(r#"{{"Done":{{"group":"g","topic":"t","messages":{messages}}}}}"#);
            let error = serde_json::from_str::<Op>(&json).unwrap_err().to_string();
            assert!(error.contains(why), "{messages}: {error}");
        }
    }

    #[test]
    fn the_snapshot_round_trips_through_json() {
        let mut state = ConsumerState::default();
        state.apply(&deliver(&[5, 6], 9));
        state.apply(&Op::PullOffset {
            group: "g".into(),
            topic: "t".into(),
            queue_id: 2,
            offset: 40,
        });
        state.last_op = Some(3);
        let json = serde_json::to_vec(&state).unwrap();
        let back: ConsumerState = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            back.queue("g", "t", 0).unwrap().leases,
            state.queue("g", "t", 0).unwrap().leases
        );
        assert_eq!(back.pull_offsets, state.pull_offsets);
        assert_eq!((back.epoch, back.last_op), (9, Some(3)));
    }
}
