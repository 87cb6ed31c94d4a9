//! Local files: positional reads (`pread`) from many threads, and for reads into page-aligned
//! buffers, `O_DIRECT` for the pages that are not in the page cache; writes to a temporary
//! file in the destination directory (unnamed where the file system allows), renamed into
//! place on success.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use super::{Caps, Landed, Sink, Source, Stop};
use crate::error::{Error, ErrorKind, Result};

/// The page size `O_DIRECT` reads align to.
pub const PAGE: usize = 4096;
/// Reads smaller than this never bypass the page cache (not worth the alignment dance).
const DIRECT_MIN: usize = 256 << 10;
/// The most one `O_DIRECT` request asks for: a larger read goes as several in turn. Cold GPU
/// loads on the GPU machine's virtio disk read faster with their 4 MiB reads issued as 512 KiB
/// requests (ahead in 10 of 12 interleaved pairs, docs/benchmarks.md), the size that disk
/// serves best. Only that disk has been measured (no NVMe host is lent here).
const DIRECT_REQUEST: usize = 512 << 10;

/// How [`Source::read_aligned`] may reach a local file's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// Through the page cache where the pages are cached, `O_DIRECT` where they are not: a cold
    /// load reads at the disk's speed without filling the cache, a warm one copies from it.
    #[default]
    Auto,
    /// Always through the page cache.
    Buffered,
    /// Always `O_DIRECT` (where the file system allows it).
    Direct,
}

impl std::str::FromStr for ReadMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(ReadMode::Auto),
            "buffered" => Ok(ReadMode::Buffered),
            "direct" => Ok(ReadMode::Direct),
            _ => Err(Error::value(format!("unknown io mode {s:?} (expected auto, buffered or direct)"))),
        }
    }
}

/// The file system a local file lives on, as far as reading it matters: whether its pages
/// are the file itself (memory-backed: nothing below them, no `O_DIRECT` worth trying) or a
/// cache of a disk. Told from `fstatfs` of the open file, never from its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FileSystem {
    /// Not a local file, or one we do not tell apart.
    #[default]
    Other,
    /// tmpfs / shmem: `/dev/shm`, Kubernetes memory volumes.
    Tmpfs,
    Ramfs,
    Hugetlbfs,
    Ext4,
    Xfs,
    Btrfs,
    Overlay,
    Nfs,
}

impl FileSystem {
    /// `statfs.f_type` magic numbers (linux/magic.h).
    fn from_magic(magic: u64) -> FileSystem {
        match magic {
            0x0102_1994 => FileSystem::Tmpfs,
            0x8584_58f6 => FileSystem::Ramfs,
            0x9584_58f6 => FileSystem::Hugetlbfs,
            0xEF53 => FileSystem::Ext4,
            0x5846_5342 => FileSystem::Xfs,
            0x9123_683E => FileSystem::Btrfs,
            0x794c_7630 => FileSystem::Overlay,
            0x6969 => FileSystem::Nfs,
            _ => FileSystem::Other,
        }
    }

    /// The file system of `file` (`Other` where `fstatfs` fails).
    pub fn of(file: &File) -> FileSystem {
        let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
        // SAFETY: an out-parameter call on a descriptor we hold open.
        if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return FileSystem::Other;
        }
        // SAFETY: fstatfs succeeded, so it filled the struct.
        let f_type = unsafe { st.assume_init() }.f_type;
        // f_type is signed on some targets; the magics are 32-bit.
        FileSystem::from_magic(f_type as u64 & 0xFFFF_FFFF)
    }

    /// The file's pages are memory, not a cache of a disk: reads from them are copies out of
    /// RAM, bound by the copying threads rather than a device.
    pub fn in_memory(self) -> bool {
        matches!(self, FileSystem::Tmpfs | FileSystem::Ramfs | FileSystem::Hugetlbfs)
    }

    /// A short name for stats and messages.
    pub fn name(self) -> &'static str {
        match self {
            FileSystem::Other => "other",
            FileSystem::Tmpfs => "tmpfs",
            FileSystem::Ramfs => "ramfs",
            FileSystem::Hugetlbfs => "hugetlbfs",
            FileSystem::Ext4 => "ext4",
            FileSystem::Xfs => "xfs",
            FileSystem::Btrfs => "btrfs",
            FileSystem::Overlay => "overlay",
            FileSystem::Nfs => "nfs",
        }
    }
}

pub struct LocalFile {
    file: File,
    path: String,
    size: u64,
    fs: FileSystem,
    /// What aligned reads need, made on the first one (loads to the host never ask).
    direct: OnceLock<Direct>,
}

/// An `O_DIRECT` descriptor of the same file, and a read-only mapping of it whose residency
/// (`mincore`) says which pages the page cache holds. The mapping is never read through.
struct Direct {
    fd: Option<File>,
    usable: AtomicBool,
    map: Option<Mapping>,
}

struct Mapping {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the mapping is only passed to `mincore`, never dereferenced.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `Direct::open` with this length.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

impl LocalFile {
    pub fn open(path: &str) -> Result<Self> {
        // Non-blocking, so that a FIFO with no writer fails here instead of hanging the open
        // (no Ctrl-C reaches a thread blocked in open(2)); regular files ignore the flag.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::from(e).in_file(path))?;
        let meta = file.metadata().map_err(|e| Error::from(e).in_file(path))?;
        if meta.is_dir() {
            return Err(Error::new(ErrorKind::Io, "is a directory, not a .tensors file").in_file(path));
        }
        let kind = meta.file_type();
        if !(kind.is_file() || kind.is_block_device()) {
            // Reads are positional and parallel: a pipe's bytes can only be read once, in order.
            return Err(Error::new(
                ErrorKind::Value,
                "is a pipe, socket or character device, not a regular file: pass it as an open stream (e.g. sys.stdin.buffer) instead",
            )
            .in_file(path));
        }
        // SAFETY: fcntl on a descriptor this function owns.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
        let fs = FileSystem::of(&file);
        Ok(LocalFile { file, path: path.to_string(), size: meta.len(), fs, direct: OnceLock::new() })
    }

    fn direct(&self) -> &Direct {
        self.direct.get_or_init(|| Direct::open(&self.file, &self.path, self.size))
    }

    /// Whole pages around `offset..offset + len`, read past the page cache into `buf`; the
    /// bytes start at the returned offset.
    fn read_direct(&self, fd: &File, offset: u64, len: usize, buf: &mut [u8]) -> Result<usize> {
        let start = offset & !(PAGE as u64 - 1);
        let need = (offset + len as u64 - start) as usize;
        let total = need.next_multiple_of(PAGE);
        let mut got = 0usize;
        while got < need {
            let end = total.min(got + DIRECT_REQUEST);
            match fd.read_at(&mut buf[got..end], start + got as u64) {
                Ok(0) => return Err(Error::format("file is truncated").in_file(&self.path)),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)) => {
                    return Err(Error::new(ErrorKind::Unsupported, "O_DIRECT not usable here"))
                }
                Err(e) => return Err(Error::from(e).in_file(&self.path)),
            }
        }
        Ok((offset - start) as usize)
    }
}

impl Direct {
    fn open(file: &File, path: &str, size: u64) -> Self {
        let mut d = Direct { fd: None, usable: AtomicBool::new(false), map: None };
        if size == 0 {
            return d;
        }
        // The same file as the one open (not whatever the path names now).
        let same = |f: &File| match (f.metadata(), file.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        d.fd = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok().filter(same);
        d.usable.store(d.fd.is_some(), Ordering::Relaxed);
        let len = size as usize;
        // SAFETY: a read-only shared mapping of a file we hold open; never read through.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr != libc::MAP_FAILED {
            d.map = Some(Mapping { ptr: ptr as *mut u8, len });
        }
        d
    }

    /// Whether every page of `offset..offset + len` is in the page cache (unknown: yes).
    fn resident(&self, offset: u64, len: usize) -> bool {
        let Some(map) = &self.map else { return true };
        let start = offset & !(PAGE as u64 - 1);
        let end = (offset + len as u64).min(map.len as u64);
        if end <= start {
            return true;
        }
        let mut vec = vec![0u8; (end - start).div_ceil(PAGE as u64) as usize];
        // SAFETY: the range lies inside our mapping; `vec` has one byte per page.
        let r = unsafe {
            libc::mincore(map.ptr.add(start as usize) as *mut libc::c_void, (end - start) as usize, vec.as_mut_ptr())
        };
        r != 0 || vec.iter().all(|&b| b & 1 == 1)
    }
}

impl Source for LocalFile {
    fn describe(&self) -> &str {
        &self.path
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn caps(&self) -> Caps {
        Caps {
            remote: false,
            reads_into_buffers: false,
            parallelism: crate::cores().clamp(4, 16),
            fs: self.fs,
            pins_version: true,
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8], _stop: &Stop) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| Error::from(e).in_file(&self.path))
    }
    fn read_aligned(&self, offset: u64, len: usize, buf: &mut [u8], mode: ReadMode, stop: &Stop) -> Result<Landed> {
        let span = (offset + len as u64).next_multiple_of(PAGE as u64) - (offset & !(PAGE as u64 - 1));
        let aligned = buf.as_ptr() as usize % PAGE == 0 && buf.len() as u64 >= span;
        if mode != ReadMode::Buffered && aligned && len >= DIRECT_MIN {
            let d = self.direct();
            if let (Some(fd), true) = (&d.fd, d.usable.load(Ordering::Relaxed)) {
                if mode == ReadMode::Direct || !d.resident(offset, len) {
                    match self.read_direct(fd, offset, len, buf) {
                        Ok(start) => return Ok(Landed { start, direct: true }),
                        // This file system refuses O_DIRECT: buffered reads from now on.
                        Err(e) if e.kind == ErrorKind::Unsupported => d.usable.store(false, Ordering::Relaxed),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        self.read(offset, &mut buf[..len], stop)?;
        Ok(Landed { start: 0, direct: false })
    }
}

/// A file being written, made visible at its destination only by `finish`; a crash (even
/// `kill -9`) leaves nothing behind.
///
/// The bytes go to an unnamed temporary file in the destination's directory (`O_TMPFILE`),
/// which `finish` links in under a temporary name (through `/proc/self/fd`) and renames over
/// the destination. Where the file system has no `O_TMPFILE` (or `TENSORIZER_RS_O_TMPFILE=0`),
/// it is a named temporary `.<name>.tmp-<pid>-<n>` instead. Either way the writer holds an
/// exclusive `flock` on its temporary for as long as it lives, and every new write to the same
/// destination first removes the temporaries whose lock it can take: their writers are gone.
pub struct AtomicFile {
    file: File,
    dir: PathBuf,
    name: std::ffi::OsString,
    /// The temporary's name once it has one (always in the fallback; at `finish` otherwise).
    tmp: Option<PathBuf>,
    dest: PathBuf,
    shown: String,
    done: bool,
}

/// Temporaries of writes to `name` are `.<name>.tmp-<pid>-<n>`.
fn temp_prefix(name: &std::ffi::OsStr) -> String {
    format!(".{}.tmp-", name.to_string_lossy())
}

fn temp_name(name: &std::ffi::OsStr) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}{}-{n}", temp_prefix(name), std::process::id())
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: `Ok(true)` when taken, `Ok(false)` when another holds it.
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a plain system call on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Remove the temporaries earlier writes to `name` in `dir` left when they died: those whose
/// lock can be taken (a live writer holds its own). Best effort: what cannot be read or removed
/// is left alone.
pub fn remove_stale_temps(dir: &Path, name: &std::ffi::OsStr) -> usize {
    let prefix = temp_prefix(name);
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(prefix.as_str())) else { continue };
        let ours = rest.split_once('-').is_some_and(|(pid, n)| {
            !pid.is_empty()
                && !n.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && n.bytes().all(|b| b.is_ascii_digit())
        });
        if !ours {
            continue;
        }
        let path = entry.path();
        let Ok(f) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&path) else { continue };
        if !matches!(try_lock(&f), Ok(true)) {
            continue; // its writer is alive (or locks do not work here)
        }
        // Still the same file under that name (not replaced since it was opened)?
        let same = match (f.metadata(), std::fs::symlink_metadata(&path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// `O_TMPFILE` temporaries are linked into place through `/proc/self/fd`.
fn tmpfile_possible() -> bool {
    Path::new("/proc/self/fd").is_dir()
}

fn io_err(path: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::from(e).in_file(path)
}

/// The file a write to `path` lands in: a symbolic link's final target, so that the link stays
/// a link (as `open(path, "wb")` would write through it).
fn follow_links(path: &Path) -> std::io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&p)?;
                p = match p.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::ELOOP))
}

/// A writer of the local `path`: an atomic replacement ([`AtomicFile`]) of a regular file or a
/// new one, keeping an existing file's mode; straight into a device (`/dev/null`), which a
/// rename would replace with a regular file. Pipes are refused: the header is written last.
pub fn create_writer(path: &str, unnamed: bool) -> Result<Box<dyn Sink>> {
    let target = follow_links(Path::new(path)).map_err(io_err(path))?;
    let existing = std::fs::metadata(&target).ok();
    let kind = existing.as_ref().map(|m| m.file_type());
    if kind.is_some_and(|k| k.is_char_device() || k.is_block_device()) {
        let file = OpenOptions::new().write(true).open(&target).map_err(io_err(path))?;
        return Ok(Box::new(DeviceFile { file, shown: path.to_string() }));
    }
    if kind.is_some_and(|k| k.is_dir()) {
        return Err(Error::new(ErrorKind::Io, "is a directory, not a file").in_file(path));
    }
    if kind.is_some_and(|k| !k.is_file()) {
        return Err(Error::new(
            ErrorKind::Value,
            "is a pipe or socket: a .tensors file is written out of order (its header last), so it goes to a file or a seekable stream",
        )
        .in_file(path));
    }
    let shown = path;
    let path = target.to_str().ok_or_else(|| Error::value("the destination path is not UTF-8").in_file(shown))?;
    let mut f = AtomicFile::create_with(path, unnamed && tmpfile_possible())?;
    f.shown = shown.to_string();
    if let Some(m) = existing {
        // The replacement keeps the old file's mode (private weights stay private) and, where
        // allowed, its owner.
        f.file.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777)).map_err(io_err(shown))?;
        let _ = std::os::unix::fs::fchown(&f.file, Some(m.uid()), Some(m.gid()));
    }
    Ok(Box::new(f))
}

/// A device written in place (see [`create_writer`]): nothing to commit or to remove.
struct DeviceFile {
    file: File,
    shown: String,
}

impl Sink for DeviceFile {
    fn describe(&self) -> &str {
        &self.shown
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(io_err(&self.shown))
    }
    fn finish(self: Box<Self>) -> Result<()> {
        match self.file.sync_all() {
            // Character devices such as /dev/null have nothing to sync.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            r => r.map_err(io_err(&self.shown)),
        }
    }
}

impl AtomicFile {
    /// [`create_writer`] for a regular file, with (`unnamed`) or without an `O_TMPFILE`
    /// temporary (else a named, locked one).
    fn create_with(path: &str, unnamed: bool) -> Result<Self> {
        let dest = PathBuf::from(path);
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(io_err(path))?;
        let name =
            dest.file_name().ok_or_else(|| Error::value("destination has no file name").in_file(path))?.to_owned();
        remove_stale_temps(&dir, &name);
        // Unnamed where the file system can: nothing to clean up after a crash.
        if unnamed {
            let unnamed =
                OpenOptions::new().read(true).write(true).mode(0o666).custom_flags(libc::O_TMPFILE).open(&dir);
            if let Ok(file) = unnamed {
                // Locked from the start, so the name it gets at `finish` is never taken for stale.
                let _ = try_lock(&file);
                return Ok(AtomicFile { file, dir, name, tmp: None, dest, shown: path.to_string(), done: false });
            }
        }
        let (file, tmp) = Self::named(&dir, &name, path)?;
        Ok(AtomicFile { file, dir, name, tmp: Some(tmp), dest, shown: path.to_string(), done: false })
    }

    /// A new named temporary, locked. A remover (`remove_stale_temps` of another writer) can
    /// take the lock in the instant between creating and locking and unlink the name: then
    /// another name is tried.
    fn named(dir: &Path, name: &std::ffi::OsStr, shown: &str) -> Result<(File, PathBuf)> {
        for _ in 0..16 {
            let tmp = dir.join(temp_name(name));
            let file = OpenOptions::new().read(true).write(true).create_new(true).open(&tmp).map_err(io_err(shown))?;
            match try_lock(&file) {
                Ok(true) if file.metadata().is_ok_and(|m| m.nlink() > 0) => return Ok((file, tmp)),
                Ok(true) | Ok(false) => continue,
                // No locks on this file system: no stale temporary is ever removed either.
                Err(_) => return Ok((file, tmp)),
            }
        }
        Err(Error::io("cannot create a temporary file beside the destination").in_file(shown))
    }

    /// Where the bytes are being written: the temporary's name, if it has one yet.
    pub fn temp_path(&self) -> Option<&Path> {
        self.tmp.as_deref()
    }

    /// Give the unnamed temporary a name beside the destination (linkat through /proc).
    fn link(&mut self) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::io::AsRawFd;
        let tmp = self.dir.join(temp_name(&self.name));
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", self.file.as_raw_fd())).expect("no NUL");
        let to = std::ffi::CString::new(tmp.as_os_str().as_bytes())
            .map_err(|_| Error::value("the destination path contains a NUL byte").in_file(&self.shown))?;
        // SAFETY: two valid C strings; no descriptors other than the current directory's.
        let rc = unsafe {
            libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW)
        };
        if rc == 0 {
            self.tmp = Some(tmp);
            return Ok(());
        }
        // Linking refused (a /proc without it): copy into a named temporary instead.
        let (mut named, path) = Self::named(&self.dir, &self.name, &self.shown)?;
        self.tmp = Some(path);
        let mut src = &self.file;
        std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(0)).map_err(io_err(&self.shown))?;
        std::io::copy(&mut src, &mut named).map_err(io_err(&self.shown))?;
        named.sync_all().map_err(io_err(&self.shown))?;
        self.file = named;
        Ok(())
    }
}

impl Sink for AtomicFile {
    fn describe(&self) -> &str {
        &self.shown
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(|e| Error::from(e).in_file(&self.shown))
    }
    fn finish(mut self: Box<Self>) -> Result<()> {
        self.file.sync_all().map_err(io_err(&self.shown))?;
        if self.tmp.is_none() {
            self.link()?;
        }
        let tmp = self.tmp.clone().expect("named above");
        std::fs::rename(&tmp, &self.dest).map_err(io_err(&self.shown))?;
        self.done = true;
        // The rename itself is durable once the directory is synced (best effort).
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let (false, Some(tmp)) = (self.done, &self.tmp) {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page-aligned buffer of `len` bytes.
    fn aligned(len: usize) -> (Vec<u8>, usize) {
        let v = vec![0xAAu8; len + PAGE];
        let at = v.as_ptr().align_offset(PAGE);
        (v, at)
    }

    #[test]
    fn aligned_reads_land_the_same_bytes_every_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = LocalFile::open(path.to_str().unwrap()).unwrap();
        for mode in [ReadMode::Auto, ReadMode::Buffered, ReadMode::Direct] {
            // Direct reads of one request, of several (`DIRECT_REQUEST`) and of a part of one.
            for (offset, len) in [(0usize, 300_000usize), (4095, 1 << 20), (12345, 2_000_001), (2_999_000, 1000)] {
                let (mut v, at) = aligned(len + 2 * PAGE);
                let buf = &mut v[at..at + len + 2 * PAGE];
                let landed = f.read_aligned(offset as u64, len, buf, mode, Stop::never()).unwrap();
                assert_eq!(&buf[landed.start..landed.start + len], &data[offset..offset + len], "{mode:?} {offset}");
                // Buffered never bypasses the cache; small reads never do (the file system may
                // refuse O_DIRECT altogether, e.g. tmpfs: then nothing does).
                assert!(!landed.direct || (mode != ReadMode::Buffered && len >= DIRECT_MIN), "{mode:?} {len}");
                if !landed.direct {
                    assert_eq!(landed.start, 0);
                }
            }
        }
        // A buffer without room for the whole pages reads exactly the bytes asked for.
        let mut small = vec![0u8; 400_000];
        let landed = f.read_aligned(5, 400_000, &mut small, ReadMode::Direct, Stop::never()).unwrap();
        assert_eq!((landed, &small[..]), (Landed { start: 0, direct: false }, &data[5..400_005]));
        // Past the end: an error, not a short read.
        let (mut v, at) = aligned(1 << 20);
        assert!(f
            .read_aligned(2_900_000, 300_000, &mut v[at..at + (1 << 20)], ReadMode::Direct, Stop::never())
            .is_err());
    }

    #[test]
    fn the_file_system_is_told_from_the_open_file() {
        assert!(FileSystem::from_magic(0x0102_1994).in_memory());
        assert!(FileSystem::from_magic(0x8584_58f6).in_memory() && FileSystem::from_magic(0x9584_58f6).in_memory());
        assert_eq!(FileSystem::from_magic(0xEF53), FileSystem::Ext4);
        assert!(!FileSystem::from_magic(0xEF53).in_memory() && !FileSystem::from_magic(7).in_memory());
        // A file in the working tree (ext4/overlay/... here, never tmpfs in CI) against one in
        // /dev/shm where that is tmpfs.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let disk = dir.path().join("f.bin");
        std::fs::write(&disk, b"x").unwrap();
        let on_disk = LocalFile::open(disk.to_str().unwrap()).unwrap();
        assert!(!on_disk.caps().fs.in_memory(), "the checkout is on {:?}", on_disk.fs);
        let shm = std::path::Path::new("/dev/shm");
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            let f = dir.path().join("f.bin");
            std::fs::write(&f, b"x").unwrap();
            let in_shm = LocalFile::open(f.to_str().unwrap()).unwrap();
            // /dev/shm is tmpfs on every Linux host we run on; say so if it is not.
            assert_eq!(in_shm.caps().fs, FileSystem::Tmpfs, "/dev/shm is not tmpfs here");
        }
    }

    #[test]
    fn io_modes_parse() {
        for (s, m) in [("auto", ReadMode::Auto), ("buffered", ReadMode::Buffered), ("direct", ReadMode::Direct)] {
            assert_eq!(s.parse::<ReadMode>().unwrap(), m);
        }
        let e = "mmap".parse::<ReadMode>().unwrap_err();
        assert!(e.kind == ErrorKind::Value && e.message.contains("io mode"), "{e}");
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn commits_or_leaves_nothing_either_way() {
        for unnamed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("out.tensors");
            let dest_s = dest.to_str().unwrap();
            let f = AtomicFile::create_with(dest_s, unnamed).unwrap();
            f.write_at(3, b"def").unwrap();
            f.write_at(0, b"abc").unwrap();
            // Unnamed: nothing visible while writing; named: just the temporary.
            assert_eq!(listing(dir.path()).len(), usize::from(!unnamed), "{unnamed}");
            Box::new(f).finish().unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), b"abcdef");
            assert_eq!(listing(dir.path()), ["out.tensors"]);
            let g = AtomicFile::create_with(dest_s, unnamed).unwrap();
            g.write_at(0, b"zzz").unwrap();
            drop(g);
            assert_eq!(listing(dir.path()), ["out.tensors"]);
            assert_eq!(std::fs::read(&dest).unwrap(), b"abcdef");
        }
    }

    #[test]
    fn writes_go_through_links_keep_the_mode_and_never_replace_devices() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.tensors");
        std::fs::write(&real, b"old").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.tensors");
        std::os::unix::fs::symlink("real.tensors", &link).unwrap();
        for unnamed in [true, false] {
            let w = create_writer(link.to_str().unwrap(), unnamed).unwrap();
            w.write_at(0, b"new").unwrap();
            w.finish().unwrap();
            assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "{unnamed}");
            assert_eq!(std::fs::read(&real).unwrap(), b"new");
            assert_eq!(std::fs::metadata(&real).unwrap().mode() & 0o777, 0o600, "{unnamed}");
        }
        // A link to /dev/null: the bytes go through it, and the device stays a device.
        let null = dir.path().join("null.tensors");
        std::os::unix::fs::symlink("/dev/null", &null).unwrap();
        let w = create_writer(null.to_str().unwrap(), true).unwrap();
        w.write_at(5, b"bytes").unwrap();
        w.finish().unwrap();
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
        assert_eq!(listing(dir.path()), ["link.tensors", "null.tensors", "real.tensors"]);
        // A directory and a FIFO are refused at once, by name (opening a FIFO would block).
        let e = create_writer(dir.path().to_str().unwrap(), true).err().unwrap();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = create_writer(fifo.to_str().unwrap(), true).err().unwrap();
        assert!(e.to_string().contains("pipe") && e.to_string().contains("fifo"), "{e}");
        let e = LocalFile::open(fifo.to_str().unwrap()).err().unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn stale_temporaries_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::new("m.tensors");
        // A dead writer's temporary (nobody holds its lock), a live one's, and bystanders.
        std::fs::write(dir.path().join(".m.tensors.tmp-999999-3"), b"stale").unwrap();
        let live = dir.path().join(".m.tensors.tmp-1-0");
        std::fs::write(&live, b"live").unwrap();
        let held = File::open(&live).unwrap();
        assert!(try_lock(&held).unwrap());
        for other in [".m.tensors.tmp-x-1", ".other.tensors.tmp-5-5", "m.tensors", ".m.tensors.tmp-7-"] {
            std::fs::write(dir.path().join(other), b"keep").unwrap();
        }
        assert_eq!(remove_stale_temps(dir.path(), name), 1);
        let left = listing(dir.path());
        assert!(!left.contains(&".m.tensors.tmp-999999-3".to_string()), "{left:?}");
        assert!(left.contains(&".m.tensors.tmp-1-0".to_string()), "{left:?}");
        assert_eq!(left.len(), 5);
        // A new write to the destination removes the stale ones itself.
        drop(held);
        let f = AtomicFile::create_with(dir.path().join("m.tensors").to_str().unwrap(), false).unwrap();
        assert!(!dir.path().join(".m.tensors.tmp-1-0").exists());
        drop(f);
    }
}
