//! Finding the valid end of the log after a restart.
//!
//! Recovery trusts the checkpoint for everything before its position and checks every record
//! after it: magic, length and CRC. The first record that fails ends the log; the bytes after it
//! are discarded (a torn write from a crash, or corruption). The work is proportional to the
//! tail written since the last checkpoint, not to the size of the log.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use super::QueueOffsets;
use crate::error::{Error, IoContext, Result};
use crate::fs::FileSystem;
use crate::mapped_file::MappedFile as Segment;
use crate::pos::LogPos;
use crate::record::{self, DecodeError, RecordView};

/// What the scan found.
#[derive(Debug, Clone)]
pub(crate) struct ScanOutcome {
    /// Where the scan started.
    pub(crate) scanned_from: LogPos,
    /// Every byte below this is part of a valid record (or a segment's unused end).
    pub(crate) valid_end: LogPos,
    pub(crate) records_scanned: u64,
    /// The next queue offset per queue, as far as the scanned records tell.
    pub(crate) next_offsets: QueueOffsets,
    pub(crate) last_store_timestamp_ms: i64,
    /// Why the scan stopped before the end of the last segment, if a record was damaged
    /// (as opposed to never written).
    pub(crate) damage: Option<(LogPos, DecodeError)>,
}

/// Opens every segment file in `dir`, oldest first, and checks that they are contiguous.
/// Also returns the base of the first segment whose file was shorter than a segment: the
/// checkpoint cannot vouch for what such a file lost, so recovery re-checks it from its start.
pub(crate) fn open_segments(
    dir: &Path,
    segment_size: u64,
) -> Result<(VecDeque<Arc<Segment>>, Option<LogPos>)> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()) {
            let base: u64 = name.parse().map_err(|_| Error::Corrupt {
                path: entry.path(),
                offset: 0,
                reason: "segment name is not a position",
            })?;
            bases.push(base);
        }
    }
    bases.sort_unstable();
    let mut segments = VecDeque::with_capacity(bases.len());
    let mut first_short = None;
    for (i, base) in bases.iter().enumerate() {
        let path = dir.join(Segment::file_name(*base));
        if base % segment_size != 0 {
            return Err(Error::InvalidOption {
                field: "segment_size_bytes",
                reason: format!(
                    "{} does not start at a multiple of the configured segment size {segment_size}",
                    path.display()
                ),
            });
        }
        if i > 0 && bases[i - 1] + segment_size != *base {
            return Err(Error::Corrupt {
                path,
                offset: 0,
                reason: "a segment is missing before this one",
            });
        }
        let (segment, was_short) = Segment::open_checked(&path, *base, segment_size)?;
        if was_short && first_short.is_none() {
            first_short = Some(LogPos(*base));
        }
        segments.push_back(Arc::new(segment));
    }
    Ok((segments, first_short))
}

/// Checks records from `from` on and returns where the valid log ends.
pub(crate) fn scan(
    segments: &VecDeque<Arc<Segment>>,
    from: LogPos,
    segment_size: u64,
) -> ScanOutcome {
    let first = segments.front().map_or(0, |s| s.base());
    let last_end = segments.back().map_or(0, |s| s.base() + segment_size);
    let mut pos = LogPos(from.0.clamp(first, last_end));
    let mut outcome = ScanOutcome {
        scanned_from: pos,
        valid_end: pos,
        records_scanned: 0,
        next_offsets: QueueOffsets::new(),
        last_store_timestamp_ms: 0,
        damage: None,
    };
    let mut index = ((pos.0 - first) / segment_size) as usize;
    while let Some(segment) = segments.get(index) {
        let offset = (pos.0 - segment.base()) as usize;
        let bytes = segment.bytes(offset, segment.len());
        let next_segment = segment.base_pos().advance(segment_size);
        if bytes.len() < record::HEADER_LEN {
            // Too short for any record: the writer must have rolled here.
            pos = next_segment;
            outcome.valid_end = pos;
            index += 1;
            continue;
        }
        match RecordView::decode(bytes) {
            Ok(view) => {
                outcome.records_scanned += 1;
                outcome.last_store_timestamp_ms = view.store_timestamp_ms;
                let next = outcome
                    .next_offsets
                    .entry(view.topic.to_owned())
                    .or_default()
                    .entry(view.queue_id)
                    .or_insert(0);
                *next = (*next).max(view.queue_offset.0 + 1);
                pos = pos.advance(u64::from(view.len));
                outcome.valid_end = pos;
            }
            Err(DecodeError::EndOfSegment) => {
                pos = next_segment;
                outcome.valid_end = pos;
                index += 1;
            }
            Err(error) => {
                let never_written = error == DecodeError::BadMagic && bytes[..4] == [0; 4];
                if !never_written {
                    outcome.damage = Some((pos, error));
                }
                break;
            }
        }
    }
    outcome
}

/// Discards every byte from `valid_end` on: segments that start after it are deleted, and the
/// rest of the segment holding it is cut off and zero-extended. Each step is made durable.
pub(crate) fn discard_after(
    dir: &Path,
    segments: &mut VecDeque<Arc<Segment>>,
    valid_end: LogPos,
    fs: &dyn FileSystem,
) -> Result<()> {
    let mut removed = false;
    while segments.len() > 1 && segments.back().is_some_and(|s| s.base_pos() > valid_end) {
        if let Some(segment) = segments.pop_back() {
            std::fs::remove_file(segment.path()).at(segment.path())?;
            removed = true;
        }
    }
    if removed {
        fs.sync_dir(dir).at(dir)?;
    }
    if let Some(last) = segments.back() {
        let offset = valid_end.0.saturating_sub(last.base()) as usize;
        if offset < last.len() {
            last.discard_from(offset, fs)?;
        }
    }
    Ok(())
}
