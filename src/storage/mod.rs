//! Where bytes come from and go to. Every backend implements one small trait; the load
//! pipeline and the writer never know which one they talk to.
pub mod local;

use crate::error::Result;

/// A random-access, read-only byte source (a local file, an HTTP(S) URL, an S3 object).
pub trait Source: Send + Sync {
    /// A name for messages: the path or URI, never credentials.
    fn describe(&self) -> &str;
    /// Total size in bytes, known once the source is open.
    fn size(&self) -> u64;
    /// Fill `buf` with the bytes at `offset..offset + buf.len()`; a short read is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// How many concurrent `read_at` calls this source serves well (local: many; remote: many
    /// ranged requests). The pipeline uses it when the caller leaves `num_readers` unset.
    fn preferred_parallelism(&self) -> usize {
        8
    }
}

/// A write-only destination with positional writes, committed atomically at `finish`.
/// The writer writes each data region once (possibly from several threads, roughly in
/// ascending order) and rewrites the header region `[0, data_start)` last.
pub trait Sink: Send + Sync {
    fn describe(&self) -> &str;
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Make the object visible at its destination. Dropping a sink without calling this
    /// must leave nothing at the destination.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Open a source by URI or path. Remote schemes are dispatched here as backends are added.
pub fn open_source(uri: &str) -> Result<Box<dyn Source>> {
    Ok(Box::new(local::LocalFile::open(uri)?))
}

/// Open a sink by URI or path.
pub fn create_sink(uri: &str) -> Result<Box<dyn Sink>> {
    Ok(Box::new(local::AtomicFile::create(uri)?))
}
