//! Local files: positional reads (`pread`) from many threads; writes to a temporary file in the
//! destination directory, renamed into place on success.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
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

/// Writes go to `.<name>.tmp-<pid>-<n>` beside the destination; `finish` syncs and renames.
pub struct AtomicFile {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    shown: String,
    done: bool,
}

impl AtomicFile {
    pub fn create(path: &str) -> Result<Self> {
        let dest = PathBuf::from(path);
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::from(e).in_file(path))?;
        let name = dest.file_name().ok_or_else(|| Error::value("destination has no file name").in_file(path))?;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id()));
        let file =
            OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| Error::from(e).in_file(path))?;
        Ok(AtomicFile { file, tmp, dest, shown: path.to_string(), done: false })
    }

    pub fn temp_path(&self) -> &Path {
        &self.tmp
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
        self.file.sync_all().map_err(|e| Error::from(e).in_file(&self.shown))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::from(e).in_file(&self.shown))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
