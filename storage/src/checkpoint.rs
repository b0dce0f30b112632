//! The checkpoint: how far every derived structure is durable, so recovery starts there.
//!
//! Two 64-byte slots, 512 bytes apart, each with a sequence number and a CRC. A write goes to
//! the slot not holding the newest valid checkpoint and is fdatasync'ed; a torn write damages
//! only that slot, and the other one still holds the previous checkpoint.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{IoContext, Result};
use crate::fs::FileSystem;
use crate::pos::LogPos;
use crate::record::{get_u32, get_u64};

const MAGIC: u32 = u32::from_le_bytes(*b"FQC1");
const VERSION: u8 = 1;
const SLOT_LEN: usize = 64;
const SLOT_STRIDE: u64 = 512;

/// What a checkpoint promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Every record below this was dispatched and its consume-queue and index entries are
    /// durable. In `sync` mode the records themselves are durable too; in `async` mode the log
    /// may be durable only up to `log_end`, and recovery cuts derived data back to the log's
    /// valid end if an operating-system crash lost the rest.
    pub dispatched: LogPos,
    /// The durable end of the commit log when the checkpoint was taken (flushed first for a
    /// clean checkpoint).
    pub log_end: LogPos,
    /// Written by a clean shutdown; cleared by the first checkpoint after opening.
    pub clean: bool,
    pub timestamp_ms: i64,
}

pub(crate) struct CheckpointFile {
    path: PathBuf,
    file: File,
    fs: Arc<dyn FileSystem>,
    seq: u64,
}

impl CheckpointFile {
    /// Opens the checkpoint file and returns the newest valid checkpoint (a default, dirty
    /// one if there is none).
    pub(crate) fn open(
        path: &Path,
        fs: Arc<dyn FileSystem>,
    ) -> Result<(CheckpointFile, Checkpoint)> {
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .at(path)?;
        if created && let Some(dir) = path.parent() {
            fs.sync_dir(dir).at(dir)?;
        }
        let mut newest: Option<(u64, Checkpoint)> = None;
        for slot in 0..2 {
            let mut buf = [0u8; SLOT_LEN];
            if file.read_exact_at(&mut buf, slot * SLOT_STRIDE).is_err() {
                continue;
            }
            if let Some((seq, checkpoint)) = decode(&buf)
                && newest.is_none_or(|(s, _)| seq > s)
            {
                newest = Some((seq, checkpoint));
            }
        }
        let (seq, checkpoint) = newest.unwrap_or_default();
        Ok((
            CheckpointFile {
                path: path.to_path_buf(),
                file,
                fs,
                seq,
            },
            checkpoint,
        ))
    }

    /// Writes and fdatasyncs a new checkpoint.
    pub(crate) fn write(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        let seq = self.seq + 1;
        let buf = encode(seq, checkpoint);
        self.file
            .write_all_at(&buf, (seq % 2) * SLOT_STRIDE)
            .at(&self.path)?;
        self.fs.sync_file_data(&self.file).at(&self.path)?;
        self.seq = seq;
        Ok(())
    }
}

fn encode(seq: u64, checkpoint: &Checkpoint) -> [u8; SLOT_LEN] {
    let mut buf = [0u8; SLOT_LEN];
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[4] = VERSION;
    buf[5] = u8::from(checkpoint.clean);
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&checkpoint.dispatched.0.to_le_bytes());
    buf[24..32].copy_from_slice(&checkpoint.log_end.0.to_le_bytes());
    buf[32..40].copy_from_slice(&checkpoint.timestamp_ms.to_le_bytes());
    let crc = crc32fast::hash(&buf[..60]);
    buf[60..64].copy_from_slice(&crc.to_le_bytes());
    buf
}

fn decode(buf: &[u8; SLOT_LEN]) -> Option<(u64, Checkpoint)> {
    if get_u32(buf, 0) != MAGIC
        || buf[4] != VERSION
        || crc32fast::hash(&buf[..60]) != get_u32(buf, 60)
    {
        return None;
    }
    Some((
        get_u64(buf, 8),
        Checkpoint {
            dispatched: LogPos(get_u64(buf, 16)),
            log_end: LogPos(get_u64(buf, 24)),
            clean: buf[5] == 1,
            timestamp_ms: get_u64(buf, 32).cast_signed(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::RealFileSystem;

    #[test]
    fn newest_valid_slot_wins_and_a_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        let (mut file, first) = CheckpointFile::open(&path, Arc::new(RealFileSystem)).unwrap();
        assert_eq!(first, Checkpoint::default());
        let a = Checkpoint {
            dispatched: LogPos(10),
            log_end: LogPos(20),
            clean: false,
            timestamp_ms: 1,
        };
        let b = Checkpoint {
            dispatched: LogPos(30),
            log_end: LogPos(40),
            clean: true,
            timestamp_ms: 2,
        };
        file.write(&a).unwrap();
        file.write(&b).unwrap();
        drop(file);
        let (_, read) = CheckpointFile::open(&path, Arc::new(RealFileSystem)).unwrap();
        assert_eq!(read, b);
        // Tear the newest slot (seq 2 lives in slot 0).
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&[0xFF; 8], 16).unwrap();
        let (_, read) = CheckpointFile::open(&path, Arc::new(RealFileSystem)).unwrap();
        assert_eq!(read, a);
    }
}
