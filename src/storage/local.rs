//! Local files: positional reads (`pread`) from many threads; writes to a temporary file in the
//! destination directory (unnamed where the file system allows), renamed into place on success.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Sink, Source};
use crate::error::{Error, ErrorKind, Result};

pub struct LocalFile {
    file: File,
    path: String,
    size: u64,
}

impl LocalFile {
    pub fn open(path: &str) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::from(e).in_file(path))?;
        let meta = file.metadata().map_err(|e| Error::from(e).in_file(path))?;
        if meta.is_dir() {
            return Err(Error::new(ErrorKind::Value, "is a directory, not a .tensors file").in_file(path));
        }
        Ok(LocalFile { file, path: path.to_string(), size: meta.len() })
    }
}

impl Source for LocalFile {
    fn describe(&self) -> &str {
        &self.path
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| Error::from(e).in_file(&self.path))
    }
    fn preferred_parallelism(&self) -> usize {
        crate::cores().clamp(4, 16)
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

fn tmpfile_allowed() -> bool {
    std::env::var("TENSORIZER_RS_O_TMPFILE").map_or(true, |v| v.trim() != "0") && Path::new("/proc/self/fd").is_dir()
}

fn io_err(path: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::from(e).in_file(path)
}

impl AtomicFile {
    pub fn create(path: &str) -> Result<Self> {
        Self::create_with(path, tmpfile_allowed())
    }

    /// [`AtomicFile::create`], with (`unnamed`) or without an `O_TMPFILE` temporary.
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
