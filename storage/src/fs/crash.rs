//! A file system whose power can be cut, for power-loss tests.
//!
//! Writes go to real files (most of the store writes through mappings, which no seam can
//! intercept), so the files always hold what was *written*. What was made *durable* is kept
//! apart: each fsync, msync or directory sync copies what it covers into an image of the tree,
//! keyed by inode and birth time so that renames and removals need no bookkeeping of their
//! own (and a new file that reuses a removed one's inode is not taken for it). After
//! [`CrashFileSystem::cut`], every sync fails and the image stops changing; the store under test
//! fail-stops. [`CrashFileSystem::write_image`] then writes what a machine would find after the
//! power came back: every durable byte and directory entry, and, chosen at random, some of what
//! was written and never synced, torn at sector boundaries (a disk writes sectors whole, in any
//! order, and the kernel writes dirty pages back whenever it likes).
//!
//! Lengths follow Linux: a data sync makes a file's size durable along with its bytes; a file
//! whose name was synced but whose data never was comes back empty.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use memmap2::MmapRaw;

use super::{DiskUsage, FileSystem, RealFileSystem};

/// The unit the image stores bytes in; pages of zeros are not stored.
const PAGE: u64 = 4096;
/// The unit a disk writes whole: what a torn write is made of.
const SECTOR: u64 = 512;

/// A [`FileSystem`] over one directory tree that records what each sync made durable.
pub struct CrashFileSystem {
    root: PathBuf,
    state: Mutex<State>,
}

struct State {
    cut: bool,
    /// Syncs still allowed before the power goes; `None` while no cut is armed.
    syncs_before_cut: Option<u64>,
    syncs: u64,
    root: FileId,
    files: HashMap<FileId, FileImage>,
    dirs: HashMap<FileId, Listing>,
}

type Listing = BTreeMap<OsString, Entry>;

/// A file's inode number and birth time (nanoseconds since the epoch; 0 where the file system
/// keeps none): an inode number alone is reused once its file is removed.
type FileId = (u64, u128);

fn file_id(meta: &fs::Metadata) -> FileId {
    let born = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    (meta.ino(), born)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    id: FileId,
    is_dir: bool,
}

/// A file's durable bytes: its length and its pages that are not all zeros.
#[derive(Default, Clone)]
struct FileImage {
    len: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl CrashFileSystem {
    /// Takes everything under `root` (which must exist) as durable.
    pub fn new(root: &Path) -> io::Result<CrashFileSystem> {
        let root_id = file_id(&fs::metadata(root)?);
        let mut state = State {
            cut: false,
            syncs_before_cut: None,
            syncs: 0,
            root: root_id,
            files: HashMap::new(),
            dirs: HashMap::new(),
        };
        record_tree(&mut state, root)?;
        Ok(CrashFileSystem {
            root: root.to_owned(),
            state: Mutex::new(state),
        })
    }

    /// Cuts the power now: nothing more becomes durable and every later sync fails.
    pub fn cut(&self) {
        self.lock().cut = true;
    }

    /// Cuts the power at the `n`-th sync from now (1 is the next one), which fails.
    pub fn cut_at_sync(&self, n: u64) {
        self.lock().syncs_before_cut = Some(n.saturating_sub(1));
    }

    /// Whether the power has been cut.
    pub fn is_cut(&self) -> bool {
        self.lock().cut
    }

    /// The syncs that succeeded so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Writes into `to` (created if missing, and expected empty) the tree as it would be after
    /// a power cut now. With `tear` set, the random choices of what unsynced data survives
    /// follow that seed; without it only durable data survives.
    pub fn write_image(&self, to: &Path, tear: Option<u64>) -> io::Result<()> {
        let state = self.lock();
        let mut image = ImageWriter {
            state: &state,
            coin: tear.map(Coin::new),
        };
        fs::create_dir_all(to)?;
        image.write_dir(state.root, Some(&self.root), to)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a sync, or fails it if the power is (or now goes) off.
    fn begin_sync(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut state = self.lock();
        match state.syncs_before_cut {
            Some(0) => {
                state.cut = true;
                state.syncs_before_cut = None;
            }
            Some(n) => state.syncs_before_cut = Some(n - 1),
            None => {}
        }
        if state.cut {
            return Err(io::Error::other("power cut"));
        }
        state.syncs += 1;
        Ok(state)
    }
}

impl FileSystem for CrashFileSystem {
    fn sync_mapped_range(
        &self,
        path: &Path,
        map: &MmapRaw,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        let mut state = self.begin_sync()?;
        RealFileSystem.sync_mapped_range(path, map, offset, len)?;
        let meta = fs::metadata(path)?;
        let image = state.files.entry(file_id(&meta)).or_default();
        image.set_len(meta.len());
        // The mapping and the file share the page cache: read the synced pages from the file.
        let file = File::open(path)?;
        let end = ((offset + len) as u64).min(meta.len());
        let mut buf = vec![0u8; PAGE as usize];
        let mut page = offset as u64 / PAGE;
        while page * PAGE < end {
            let want = (meta.len() - page * PAGE).min(PAGE) as usize;
            file.read_exact_at(&mut buf[..want], page * PAGE)?;
            image.set_page(page, &buf[..want]);
            page += 1;
        }
        Ok(())
    }

    fn sync_file_data(&self, file: &File) -> io::Result<()> {
        let mut state = self.begin_sync()?;
        RealFileSystem.sync_file_data(file)?;
        let id = file_id(&file.metadata()?);
        // The descriptor may be write-only (an append-only file): read through a new one.
        let readable = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        let image = FileImage::read(&readable)?;
        state.files.insert(id, image);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.begin_sync()?;
        RealFileSystem.sync_dir(dir)?;
        let id = file_id(&fs::metadata(dir)?);
        let listing = list(dir)?;
        state.dirs.insert(id, listing);
        Ok(())
    }

    fn disk_usage(&self, path: &Path) -> io::Result<DiskUsage> {
        RealFileSystem.disk_usage(path)
    }
}

/// Records every file and directory under `dir` as durable.
fn record_tree(state: &mut State, dir: &Path) -> io::Result<()> {
    let listing = list(dir)?;
    for (name, entry) in &listing {
        let path = dir.join(name);
        if entry.is_dir {
            record_tree(state, &path)?;
        } else {
            state
                .files
                .insert(entry.id, FileImage::read(&File::open(&path)?)?);
        }
    }
    state.dirs.insert(file_id(&fs::metadata(dir)?), listing);
    Ok(())
}

fn list(dir: &Path) -> io::Result<Listing> {
    let mut listing = Listing::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        listing.insert(
            entry.file_name(),
            Entry {
                id: file_id(&meta),
                is_dir: meta.is_dir(),
            },
        );
    }
    Ok(listing)
}

impl FileImage {
    fn read(file: &File) -> io::Result<FileImage> {
        let len = file.metadata()?.len();
        let mut image = FileImage {
            len,
            pages: BTreeMap::new(),
        };
        let mut buf = vec![0u8; PAGE as usize];
        let mut page = 0;
        while page * PAGE < len {
            let want = (len - page * PAGE).min(PAGE) as usize;
            file.read_exact_at(&mut buf[..want], page * PAGE)?;
            image.set_page(page, &buf[..want]);
            page += 1;
        }
        Ok(image)
    }

    /// Sets the length; bytes past it are gone, as a cut file's are.
    fn set_len(&mut self, len: u64) {
        self.len = len;
        self.pages.split_off(&len.div_ceil(PAGE));
        if !len.is_multiple_of(PAGE)
            && let Some(last) = self.pages.get_mut(&(len / PAGE))
        {
            last[(len % PAGE) as usize..].fill(0);
        }
    }

    fn set_page(&mut self, page: u64, bytes: &[u8]) {
        if bytes.iter().all(|&b| b == 0) {
            self.pages.remove(&page);
        } else {
            let mut stored = vec![0u8; PAGE as usize];
            stored[..bytes.len()].copy_from_slice(bytes);
            self.pages.insert(page, stored.into_boxed_slice());
        }
    }

    /// Bytes `[from, from + out.len())`, zeros where nothing was stored.
    fn read_into(&self, from: u64, out: &mut [u8]) {
        out.fill(0);
        let to = from + out.len() as u64;
        for (&page, bytes) in self.pages.range(from / PAGE..to.div_ceil(PAGE)) {
            let start = (page * PAGE).max(from);
            let stop = (page * PAGE + PAGE).min(to);
            if start < stop {
                out[(start - from) as usize..(stop - from) as usize].copy_from_slice(
                    &bytes[(start - page * PAGE) as usize..(stop - page * PAGE) as usize],
                );
            }
        }
    }
}

struct ImageWriter<'a> {
    state: &'a State,
    coin: Option<Coin>,
}

impl ImageWriter<'_> {
    /// Writes directory `id` to `to`; `live` is where it still is in the written tree.
    fn write_dir(&mut self, id: FileId, live: Option<&Path>, to: &Path) -> io::Result<()> {
        let durable = self.state.dirs.get(&id).cloned().unwrap_or_default();
        let current = match live {
            Some(path) if self.coin.is_some() => list(path).ok(),
            _ => None,
        };
        let listing = match current {
            Some(current) if current != durable && self.flip() => current,
            _ => durable,
        };
        for (name, entry) in listing {
            let target = to.join(&name);
            let live = live
                .map(|dir| dir.join(&name))
                .filter(|path| fs::symlink_metadata(path).is_ok_and(|m| file_id(&m) == entry.id));
            if entry.is_dir {
                fs::create_dir(&target)?;
                self.write_dir(entry.id, live.as_deref(), &target)?;
            } else {
                self.write_file(entry.id, live.as_deref(), &target)?;
            }
        }
        Ok(())
    }

    fn write_file(&mut self, id: FileId, live: Option<&Path>, to: &Path) -> io::Result<()> {
        let durable = self.state.files.get(&id).cloned().unwrap_or_default();
        let written = match live {
            Some(path) if self.coin.is_some() => Some(FileImage::read(&File::open(path)?)?),
            _ => None,
        };
        let out = File::create(to)?;
        let Some(written) = written else {
            out.set_len(durable.len)?;
            for (&page, bytes) in &durable.pages {
                let len = (durable.len - page * PAGE).min(PAGE) as usize;
                out.write_all_at(&bytes[..len], page * PAGE)?;
            }
            return Ok(());
        };
        let len = if written.len != durable.len && self.flip() {
            written.len
        } else {
            durable.len
        };
        out.set_len(len)?;
        let mut old = vec![0u8; SECTOR as usize];
        let mut new = vec![0u8; SECTOR as usize];
        let mut sector = 0;
        while sector < len {
            let want = (len - sector).min(SECTOR) as usize;
            durable.read_into(sector, &mut old[..want]);
            written.read_into(sector, &mut new[..want]);
            let bytes = if old[..want] != new[..want] && self.flip() {
                &new[..want]
            } else {
                &old[..want]
            };
            if bytes.iter().any(|&b| b != 0) {
                out.write_all_at(bytes, sector)?;
            }
            sector += SECTOR;
        }
        Ok(())
    }

    fn flip(&mut self) -> bool {
        self.coin.as_mut().is_some_and(Coin::flip)
    }
}

/// A seeded coin (splitmix64), so a failing cut can be replayed from its seed.
struct Coin(u64);

impl Coin {
    fn new(seed: u64) -> Coin {
        Coin(seed)
    }

    fn flip(&mut self) -> bool {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) & 1 == 1
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn read(path: &Path) -> Vec<u8> {
        fs::read(path).unwrap()
    }

    #[test]
    fn only_synced_bytes_and_names_survive_a_cut_without_tearing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("old"), b"before").unwrap();
        let crash = CrashFileSystem::new(&root).unwrap();

        let mut synced = File::create(root.join("synced")).unwrap();
        synced.write_all(b"durable").unwrap();
        crash.sync_file_data(&synced).unwrap();
        crash.sync_dir(&root).unwrap();
        synced.write_all(b" and not").unwrap();
        let mut unnamed = File::create(root.join("unnamed")).unwrap();
        unnamed.write_all(b"data synced, name not").unwrap();
        crash.sync_file_data(&unnamed).unwrap();
        fs::write(root.join("old"), b"overwritten").unwrap();
        crash.cut();
        assert!(
            crash.sync_dir(&root).is_err(),
            "no sync succeeds after the cut"
        );

        let image = dir.path().join("image");
        crash.write_image(&image, None).unwrap();
        assert_eq!(read(&image.join("synced")), b"durable");
        assert_eq!(read(&image.join("old")), b"before");
        assert!(!image.join("unnamed").exists());
    }

    #[test]
    fn a_renamed_file_keeps_its_synced_bytes_and_a_name_without_synced_data_comes_back_empty() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        fs::create_dir(&root).unwrap();
        let crash = CrashFileSystem::new(&root).unwrap();
        let tmp = root.join("state.tmp");
        let file = File::create(&tmp).unwrap();
        file.write_all_at(b"v1", 0).unwrap();
        crash.sync_file_data(&file).unwrap();
        fs::rename(&tmp, root.join("state")).unwrap();
        fs::write(root.join("empty"), b"never synced").unwrap();
        crash.sync_dir(&root).unwrap();

        let image = dir.path().join("image");
        crash.write_image(&image, None).unwrap();
        assert_eq!(read(&image.join("state")), b"v1");
        assert_eq!(read(&image.join("empty")), b"");
        assert!(!image.join("state.tmp").exists());
    }

    #[test]
    fn the_nth_sync_fails_and_cuts_the_power() {
        let dir = tempfile::tempdir().unwrap();
        let crash = CrashFileSystem::new(dir.path()).unwrap();
        crash.cut_at_sync(2);
        crash.sync_dir(dir.path()).unwrap();
        assert!(!crash.is_cut());
        assert!(crash.sync_dir(dir.path()).is_err());
        assert!(crash.is_cut());
        assert_eq!(crash.syncs(), 1);
    }

    #[test]
    fn a_torn_image_mixes_whole_sectors_of_the_durable_and_written_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        fs::create_dir(&root).unwrap();
        let path = root.join("log");
        let file = File::create(&path).unwrap();
        file.write_all_at(&[1u8; 8 * SECTOR as usize], 0).unwrap();
        let crash = CrashFileSystem::new(&root).unwrap();
        file.write_all_at(&[2u8; 8 * SECTOR as usize], 0).unwrap();
        crash.cut();

        let mut seen = std::collections::HashSet::new();
        for seed in 0..16 {
            let image = dir.path().join(format!("image-{seed}"));
            crash.write_image(&image, Some(seed)).unwrap();
            let bytes = read(&image.join("log"));
            assert_eq!(bytes.len(), 8 * SECTOR as usize);
            for sector in bytes.chunks(SECTOR as usize) {
                assert!(
                    sector.iter().all(|&b| b == sector[0]),
                    "a sector is never split"
                );
                seen.insert(sector[0]);
            }
        }
        assert_eq!(seen, [1u8, 2].into(), "both versions of a sector occur");
    }
}
