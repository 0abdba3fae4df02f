//! Byte storage under an image: positioned reads and writes, flush, size, and QEMU-compatible locks.

use crate::error::{Error, ErrorKind, Result};
use crate::write_gate::WriteGate;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// One step of [`Storage::write_back`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writeback {
    /// Start sending the range's completed writes to the device; do not wait.
    Start,
    /// Wait until what was already sent of the range has reached the device; send nothing.
    ///
    /// Sending the range again and waiting for all of it (Linux's data-integrity writeback)
    /// would also write, and wait for, every page that guest writes dirtied again since the
    /// start. In a stream under guest load that made the job's waits 0.38-0.76 s of a
    /// 1.3-1.7 s stream, against 0.06-0.35 s (bench/results/serve-2026-11-27-await-started.md).
    AwaitStarted,
}

/// Where an image's bytes live. Implementations must be safe to use from many threads at once.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end read as zeroes.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// [`read_at`](Self::read_at) if every byte is in memory already (a file's page cache),
    /// without waiting for the device; `false` when it would have to wait (then `buf` holds
    /// nothing useful). Lets a caller that must not block answer most reads itself.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8]) -> Result<bool> {
        Ok(false)
    }
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Starts the writeback of `[offset, offset + len)` (`len` 0: to the end), or waits for
    /// it, as `step` says. Not a flush: nothing is durable before [`flush`](Self::flush) (the
    /// device may cache, the metadata is not written). It lets a long copy overlap its
    /// writeback, and keep no more than it chooses ahead of the device.
    fn write_back(&self, _offset: u64, _len: u64, _step: Writeback) -> Result<()> {
        Ok(())
    }
    /// Current size in bytes.
    fn len(&self) -> Result<u64>;
    /// Whether the storage holds no bytes at all.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends.
    fn set_len(&self, len: u64) -> Result<()>;
    /// Allocates `[offset, offset + len)` for writes to come, without changing the size or
    /// what reads return, if the storage can; returns whether it did. Space reserved past the
    /// end is given back when the storage is closed.
    fn reserve(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }
    /// Deallocates a range so that it reads as zeroes, if the storage can; returns whether it did.
    fn punch_hole(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }
    /// From `offset`, whether the bytes are data (true) or a hole (false), and where that run
    /// ends. `None` when the storage cannot tell (then everything counts as data).
    fn data_or_hole(&self, _offset: u64) -> Result<Option<(bool, u64)>> {
        Ok(None)
    }
    /// The file name, for messages and for resolving relative backing names.
    fn path(&self) -> &Path;
}

/// A regular file, accessed with pread/pwrite; writes pass its [`WriteGate`].
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writes: WriteGate,
    /// Whether space was [reserved](Storage::reserve): then closing gives back what is
    /// reserved past the end.
    reserved: AtomicBool,
}

impl FileStorage {
    /// Opens `path`; `writable` selects O_RDWR.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("Could not stat '{}'", path.display()), e))?;
        if meta.is_dir() {
            return Err(Error::invalid(format!(
                "'{}' is a directory, not an image",
                path.display()
            )));
        }
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writes: WriteGate::default(),
            reserved: AtomicBool::new(false),
        })
    }

    /// Creates (or truncates) `path` for writing.
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(format!("Could not create '{}'", path.display()), e))?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writes: WriteGate::default(),
            reserved: AtomicBool::new(false),
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for FileStorage {
    /// Gives back the space reserved past the end: Linux frees a file's blocks past its end
    /// when it is truncated to its own length. Nobody writes any more, so the length read here
    /// is the final one. A failure only leaves the blocks allocated: nothing to report.
    fn drop(&mut self) {
        if self.reserved.load(Ordering::Relaxed) {
            let _ = self
                .file
                .metadata()
                .and_then(|meta| self.file.set_len(meta.len()));
        }
    }
}

impl Storage for FileStorage {
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            let at = (offset + done as u64) as libc::off_t;
            // SAFETY: one iovec over `rest`, which lives and is exclusively borrowed for the
            // call. RWF_NOWAIT: fail with EAGAIN rather than wait for the device.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
            match n {
                0 => {
                    buf[done..].fill(0);
                    break;
                }
                n if n > 0 => done += n as usize,
                _ => {
                    let error = std::io::Error::last_os_error();
                    match error.raw_os_error() {
                        Some(libc::EINTR) => {}
                        // Not cached (EAGAIN), or no RWF_NOWAIT here (EOPNOTSUPP): wait.
                        Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL) => return Ok(false),
                        _ => {
                            return Err(Error::io(
                                format!("Read of '{}' at {offset} failed", self.path.display()),
                                error,
                            ))
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("Read of '{}' at {offset} failed", self.path.display()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.writes
            .write(offset, buf, |at, bytes| self.file.write_all_at(bytes, at))
            .map_err(|e| {
                Error::io(
                    format!("Write to '{}' at {offset} failed", self.path.display()),
                    e,
                )
            })
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("Flush of '{}' failed", self.path.display()), e))
    }

    fn write_back(&self, offset: u64, len: u64, step: Writeback) -> Result<()> {
        let flags = match step {
            Writeback::Start => libc::SYNC_FILE_RANGE_WRITE,
            // WAIT_BEFORE alone waits for the writeback under way in the range and starts none.
            Writeback::AwaitStarted => libc::SYNC_FILE_RANGE_WAIT_BEFORE,
        };
        let (Ok(offset), Ok(len)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return Err(Error::invalid(format!(
                "Writeback range {offset}+{len} of '{}' is out of range",
                self.path.display()
            )));
        };
        // SAFETY: plain syscall on a descriptor we own, with integer arguments only.
        let rc = unsafe { libc::sync_file_range(self.file.as_raw_fd(), offset, len, flags) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            return Err(Error::io(
                format!("Writeback of '{}' failed", self.path.display()),
                error,
            ));
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(format!("Could not stat '{}'", self.path.display()), e))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io(format!("Could not resize '{}'", self.path.display()), e))
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<bool> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Ok(false);
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by self.file.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        // Refused (not supported here, no space): writes allocate as they go, as without it,
        // and a real lack of space shows up on them.
        if rc != 0 {
            return Ok(false);
        }
        self.reserved.store(true, Ordering::Relaxed);
        Ok(true)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by self.file.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        Ok(rc == 0)
    }

    fn data_or_hole(&self, offset: u64) -> Result<Option<(bool, u64)>> {
        let fd = self.file.as_raw_fd();
        let size = self.len()?;
        if offset >= size {
            return Ok(Some((false, u64::MAX)));
        }
        // SAFETY: lseek takes integers only; pread/pwrite ignore the file position it moves.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                // ENXIO: no data after offset, the rest of the file is a hole.
                Some(libc::ENXIO) => Ok(Some((false, size))),
                _ => Ok(None),
            };
        }
        let data = data as u64;
        if data > offset {
            return Ok(Some((false, data)));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Ok(None);
        }
        Ok(Some((true, (hole as u64).max(offset + 1))))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// The permissions QEMU expresses as lock bytes (block/file-posix.c, `BLK_PERM_*` bit numbers).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
enum Permission {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

const ALL_PERMISSIONS: [Permission; 4] = [
    Permission::ConsistentRead,
    Permission::Write,
    Permission::WriteUnchanged,
    Permission::Resize,
];

/// QEMU locks byte `RAW_LOCK_PERM_BASE + bit` for each permission it holds...
const RAW_LOCK_PERM_BASE: u64 = 100;
/// ...and byte `RAW_LOCK_SHARED_BASE + bit` for each permission it does not share with others.
const RAW_LOCK_SHARED_BASE: u64 = 200;

/// How an image is opened, in QEMU's permission terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Reader that lets others write (like `qemu-img info -U`): takes no lock.
    None,
    /// Reader that forbids writers (backing images, `qemu-img` reads).
    SharedRead,
    /// Writer: holds read+write, shares only reads and unchanged writes (like a running VM).
    Write,
}

/// Takes QEMU-compatible open-file-description locks on `file`, or fails with `Busy` if another
/// process (QEMU or imgstream) holds a conflicting permission.
pub fn lock_image(file: &File, path: &Path, mode: LockMode) -> Result<()> {
    let (held, unshared): (&[Permission], &[Permission]) = match mode {
        LockMode::None => return Ok(()),
        LockMode::SharedRead => (
            &[Permission::ConsistentRead],
            &[Permission::Write, Permission::Resize],
        ),
        LockMode::Write => (
            &[
                Permission::ConsistentRead,
                Permission::Write,
                Permission::Resize,
            ],
            &[Permission::Write, Permission::Resize],
        ),
    };
    let fd = file.as_raw_fd();
    // Take our bytes first: OFD locks of one description never conflict with themselves, and
    // holding them before testing closes the window in which two openers both see no conflict.
    for perm in held {
        set_read_lock(fd, RAW_LOCK_PERM_BASE + *perm as u64, path)?;
    }
    for perm in unshared {
        set_read_lock(fd, RAW_LOCK_SHARED_BASE + *perm as u64, path)?;
    }
    for perm in held {
        if locked_by_other(fd, RAW_LOCK_SHARED_BASE + *perm as u64, path)? {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "Failed to get \"{}\" lock: is another process using the image [{}]?",
                    permission_name(*perm),
                    path.display()
                ),
            ));
        }
    }
    for perm in ALL_PERMISSIONS {
        let shared = !unshared.iter().any(|p| *p as u32 == perm as u32);
        if !shared && locked_by_other(fd, RAW_LOCK_PERM_BASE + perm as u64, path)? {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "Failed to get shared \"{}\" lock: is another process using the image [{}]?",
                    permission_name(perm),
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

fn permission_name(perm: Permission) -> &'static str {
    match perm {
        Permission::ConsistentRead => "consistent read",
        Permission::Write => "write",
        Permission::WriteUnchanged => "write unchanged",
        Permission::Resize => "resize",
    }
}

fn lock_struct(byte: u64, kind: i32) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

fn set_read_lock(fd: i32, byte: u64, path: &Path) -> Result<()> {
    let mut fl = lock_struct(byte, libc::F_RDLCK);
    // SAFETY: fcntl with F_OFD_SETLK reads the flock we own for the duration of the call.
    let rc = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(Error::new(
            ErrorKind::Busy,
            format!("Failed to lock byte {byte} of '{}': {err}", path.display()),
        ));
    }
    Ok(())
}

fn locked_by_other(fd: i32, byte: u64, path: &Path) -> Result<bool> {
    let mut fl = lock_struct(byte, libc::F_WRLCK);
    // SAFETY: fcntl with F_OFD_GETLK writes only into the flock we own.
    let rc = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(Error::io(
            format!("Failed to test lock byte {byte} of '{}'", path.display()),
            err,
        ));
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `file` in `[offset, offset + len)` that are dirty and under writeback, by
    /// Linux's cachestat(2) (Linux 6.5 and later).
    fn dirty_and_under_writeback(file: &File, offset: u64, len: u64) -> (u64, u64) {
        #[repr(C)]
        struct Range {
            offset: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct CacheStat {
            cached: u64,
            dirty: u64,
            writeback: u64,
            evicted: u64,
            recently_evicted: u64,
        }
        // The same number on every architecture (the unified syscall table).
        const SYS_CACHESTAT: libc::c_long = 451;
        let range = Range { offset, len };
        let mut stat = CacheStat::default();
        // SAFETY: cachestat reads `range` and writes `stat`, both ours and alive for the call.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut CacheStat,
                0,
            )
        };
        assert_eq!(
            rc,
            0,
            "cachestat(2) failed ({}); this test needs Linux 6.5 or later",
            std::io::Error::last_os_error()
        );
        (stat.dirty, stat.writeback)
    }

    #[test]
    fn awaiting_writeback_sends_nothing_and_starting_it_sends_the_whole_range() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = FileStorage::create(&dir.path().join("file")).expect("create");
        let len = 1 << 20;
        storage.write_at(0, &vec![0xa5; len]).expect("write");
        let len = len as u64;
        let (dirty, _) = dirty_and_under_writeback(storage.file(), 0, len);
        assert!(
            dirty > 0,
            "a new write leaves dirty pages in the page cache"
        );

        storage
            .write_back(0, len, Writeback::AwaitStarted)
            .expect("await");
        assert_eq!(
            dirty_and_under_writeback(storage.file(), 0, len),
            (dirty, 0),
            "awaiting sends no dirty page to the device"
        );

        storage.write_back(0, len, Writeback::Start).expect("start");
        storage
            .write_back(0, len, Writeback::AwaitStarted)
            .expect("await");
        assert_eq!(
            dirty_and_under_writeback(storage.file(), 0, len),
            (0, 0),
            "after a start, awaiting returns once the whole range has reached the device"
        );
    }

    #[test]
    fn cached_reads_answer_from_the_page_cache_and_give_up_when_the_device_is_needed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = FileStorage::create(&dir.path().join("file")).expect("create");
        let data: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
        storage.write_at(0, &data).expect("write");
        let mut buf = vec![0u8; 8192];
        assert!(storage.read_cached(4096, &mut buf).expect("read"));
        assert_eq!(buf, data[4096..12288]);
        // Past the end reads as zeroes, as read_at does.
        let mut tail = vec![1u8; 8192];
        assert!(storage.read_cached(60 << 10, &mut tail).expect("read"));
        assert_eq!(tail[..4096], data[60 << 10..]);
        assert!(tail[4096..].iter().all(|&b| b == 0));
        // Written out and dropped from the page cache, the bytes need the device.
        storage.flush().expect("flush");
        // SAFETY: plain syscall on an open descriptor.
        let dropped = unsafe {
            libc::posix_fadvise(storage.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
        };
        assert_eq!(dropped, 0);
        assert!(
            !storage.read_cached(4096, &mut buf).expect("read"),
            "a page-cache miss must not be waited for (needs a disk file system, not tmpfs)"
        );
        storage.read_at(4096, &mut buf).expect("read");
        assert_eq!(buf, data[4096..12288]);
    }

    #[test]
    fn reserved_space_past_the_end_is_allocated_invisible_and_given_back_at_close() {
        use std::os::unix::fs::MetadataExt;
        let allocated = |path: &Path| std::fs::metadata(path).expect("stat").blocks() * 512;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("file");
        let storage = FileStorage::create(&path).expect("create");
        let data = vec![0x5a; 64 << 10];
        storage.write_at(0, &data).expect("write");
        let reserve = 8 << 20;
        assert!(
            storage
                .reserve(data.len() as u64, reserve)
                .expect("reserve"),
            "this test needs a filesystem with fallocate (ext4, XFS, tmpfs)"
        );
        assert!(allocated(&path) >= reserve, "the blocks are allocated");
        assert_eq!(
            storage.len().expect("len"),
            data.len() as u64,
            "the size is unchanged"
        );
        let mut back = vec![0; 2 * data.len()];
        storage.read_at(0, &mut back).expect("read");
        assert_eq!(&back[..data.len()], &data[..]);
        assert!(
            back[data.len()..].iter().all(|&b| b == 0),
            "past the end reads zeroes"
        );

        drop(storage);
        assert!(
            allocated(&path) < reserve,
            "closing gives back what was reserved past the end"
        );
        assert_eq!(std::fs::read(&path).expect("read back"), data);
    }

    #[test]
    fn a_writeback_range_past_what_the_kernel_takes_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("file");
        let storage = FileStorage::create(&path).expect("create");
        let error = storage
            .write_back(u64::MAX, 1, Writeback::Start)
            .expect_err("an offset past i64 is refused");
        assert!(error.to_string().contains(&path.display().to_string()));
    }
}
