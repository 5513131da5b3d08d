//! File-system helpers for the WAL and the snapshotter (etcd `client/pkg/fileutil`).
//!
//! This is the only module that talks to the operating system below `std::fs`:
//! `fallocate(2)` comes from `rustix` (a safe wrapper, so `unsafe_code = "forbid"` holds);
//! locking uses the stable `File::try_lock` (an `flock(2)` write lock on Linux).
//!
//! Why each helper exists:
//! - [`fsync_dir`]: creating, renaming or deleting a file changes the *directory*; until the
//!   directory itself is fsynced, a crash can forget the new name even if the file data is on disk.
//! - [`preallocate`]: a WAL segment is allocated to its full size up front so that appends
//!   overwrite allocated blocks and `fdatasync` does not also have to journal a growing file size.
//! - [`try_lock_file`]: two processes appending to one WAL would interleave records and destroy it;
//!   the lock turns that into a clean error. (etcd uses OFD `fcntl` locks on Linux; `flock` locks
//!   are independent of those, so a Go etcd and this port do not see each other's locks.)

use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::FallocateFlags;
use rustix::io::Errno;

/// Mode of directories we create (etcd `PrivateDirMode`): owner rwx, group rx.
pub const PRIVATE_DIR_MODE: u32 = 0o750;
/// Mode of files we create (etcd `PrivateFileMode`): owner rw only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Creates `path` and any missing parents with mode 0o750 (before the umask).
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(path)
}

/// Makes the directory entries of `dir` durable (after a create, rename or unlink in it).
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The parent directory of `path`, `.` for a bare relative name.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Allocates `size` bytes for `file` (the file length becomes at least `size`; new space reads
/// as zeros). Falls back to `ftruncate` where `fallocate` is not supported, as etcd does.
pub fn preallocate(file: &File, size: u64) -> io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(e) if e == Errno::OPNOTSUPP || e == Errno::INTR => {
            if file.metadata()?.len() < size {
                file.set_len(size)?;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Cuts `file` at `offset` and re-extends it to its former length, so everything from `offset`
/// on reads as zeros (etcd `ZeroToEnd`). The caller syncs.
pub fn zero_to_end(file: &File, offset: u64) -> io::Result<()> {
    let len = file.metadata()?.len();
    file.set_len(offset)?;
    if len > offset {
        preallocate(file, len)?;
    }
    Ok(())
}

/// Why [`try_lock_file`] failed.
#[derive(Debug)]
pub enum LockError {
    /// Another open file description (normally another process) holds the lock.
    WouldBlock,
    /// Opening or locking failed for another reason.
    Io(io::Error),
}

/// Opens `path` read-write (creating it with mode 0o600 if `create`) and takes an exclusive,
/// non-blocking lock on it. The lock lives as long as the returned `File`.
pub fn try_lock_file(path: &Path, create: bool) -> Result<File, LockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
        .map_err(LockError::Io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(LockError::WouldBlock),
        Err(TryLockError::Error(e)) => Err(LockError::Io(e)),
    }
}

/// Whether `path` exists (errors such as permission denied count as "exists", so that callers
/// never overwrite something they could not inspect).
pub fn exist(path: &Path) -> bool {
    !matches!(path.try_exists(), Ok(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn preallocate_extends_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = try_lock_file(&p, true).unwrap();
        f.write_all(b"abc").unwrap();
        preallocate(&f, 4096).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 4096);
        let data = std::fs::read(&p).unwrap();
        assert_eq!(&data[..3], b"abc");
        assert!(data[3..].iter().all(|&b| b == 0));
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn zero_to_end_keeps_length() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [7u8; 100]).unwrap();
        let f = try_lock_file(&p, false).unwrap();
        zero_to_end(&f, 40).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 100);
        assert!(data[..40].iter().all(|&b| b == 7));
        assert!(data[40..].iter().all(|&b| b == 0));
    }

    #[test]
    fn second_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let _held = try_lock_file(&p, true).unwrap();
        assert!(matches!(
            try_lock_file(&p, false),
            Err(LockError::WouldBlock)
        ));
    }

    #[test]
    fn dirs_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b");
        create_dir_all(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o750, 0, "mode {mode:o}");
        assert_eq!(parent_dir(Path::new("x")), Path::new("."));
    }
}
