//! Where bytes come from and go to. Every backend implements one small trait; the load
//! pipeline and the writer never know which one they talk to.
//!
//! Backends: local paths (`local`), `http://`/`https://` (`http`, read-only) and `s3://` (`s3`).
//! The remote ones run their requests on one shared tokio runtime (`retry::runtime`) and expose
//! blocking calls, so callers are plain threads.
mod config;
mod http;
mod http_direct;
pub mod local;
mod ranged;
mod retry;
mod s3;
mod tls;

pub use config::StorageOptions;
pub use http_direct::direct_bytes as http_direct_bytes;
pub use ranged::{hedged_requests, ByteSink};
pub use retry::{load_stopped, reads_stop_on};
pub use s3::{abort_upload as s3_abort_upload, pending_uploads as s3_pending_uploads, PendingUpload};

/// Bounce buffer of the default [`Source::read_stream`].
const STREAM_BUFFER: usize = 8 << 20;

use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::AtomicBool;

/// A random-access, read-only byte source (a local file, an HTTP(S) URL, an S3 object).
pub trait Source: Send + Sync {
    /// A name for messages: the path or URI, never credentials.
    fn describe(&self) -> &str;
    /// Total size in bytes, known once the source is open.
    fn size(&self) -> u64;
    /// Fill `buf` with the bytes at `offset..offset + buf.len()`; a short read is an error.
    /// Remote sources split a large read into concurrent ranged requests, retry each, and fail
    /// (rather than return other bytes) if the object changed since it was opened.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Hand `offset..offset + len` to `sink` in order, in pieces of any size, as the bytes come;
    /// an error from `sink` ends the read with that error. Remote sources fetch the range with
    /// one request (resumed where it stopped after a dropped connection), so a caller that
    /// consumes bytes as they arrive pays one request per range instead of one per buffer.
    fn read_stream(&self, offset: u64, len: usize, sink: &mut ByteSink<'_>) -> Result<()> {
        let mut buf = vec![0u8; len.min(STREAM_BUFFER)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len());
            self.read_at(offset + done as u64, &mut buf[..n])?;
            sink(&buf[..n])?;
            done += n;
        }
        Ok(())
    }
    /// [`Source::read_stream`] into buffers `dest` lends: a source that can (plain HTTP) reads
    /// from the socket straight into them; others copy each piece in with [`StreamDest::put`].
    fn read_stream_into(&self, offset: u64, len: usize, dest: &mut dyn StreamDest) -> Result<()> {
        self.read_stream(offset, len, &mut |bytes: &[u8]| dest.put(bytes))
    }
    /// Whether [`Source::read_stream_into`] reads straight into the lent buffers (plain HTTP):
    /// then one streamed request per piece beats a `read_at` split into requests whose bodies
    /// are copied.
    fn reads_into_buffers(&self) -> bool {
        false
    }
    /// Whether every read is checked to come from the version of the object seen at open (a
    /// strong validator: an ETag that is not weak, or a Last-Modified date). Without one, a
    /// server could hand out another version mid-load unnoticed: the loader then verifies the
    /// stored hashes whatever the caller asked.
    fn pins_version(&self) -> bool {
        true
    }
    /// How many concurrent `read_at` calls this source serves well (local: many; remote: many
    /// ranged requests). The pipeline uses it when the caller leaves `num_readers` unset.
    fn preferred_parallelism(&self) -> usize {
        8
    }
}

/// Where the bytes of [`Source::read_stream_into`] go, in order: the source asks for room,
/// writes the next bytes at its start and says how many.
pub trait StreamDest: Send {
    /// Room for the next bytes; never empty.
    fn room(&mut self) -> Result<&mut [u8]>;
    /// The first `n` bytes of the room last handed out hold the next bytes.
    fn advance(&mut self, n: usize) -> Result<()>;
    /// Whether the load this read belongs to has stopped: a read waiting for bytes gives up.
    fn stopped(&self) -> bool {
        false
    }
    /// Copy `bytes` in through as many rooms as they need.
    fn put(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let room = self.room()?;
            let n = room.len().min(bytes.len());
            room[..n].copy_from_slice(&bytes[..n]);
            self.advance(n)?;
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

/// A [`StreamDest`] over one buffer, filled from its start.
pub struct SliceDest<'a> {
    buf: &'a mut [u8],
    at: usize,
    stop: Option<&'a AtomicBool>,
}

impl<'a> SliceDest<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        SliceDest { buf, at: 0, stop: None }
    }
    /// Refuse more bytes once `stop` is set: the read then ends with an error.
    pub fn stopped_by(mut self, stop: &'a AtomicBool) -> Self {
        self.stop = Some(stop);
        self
    }
}

impl StreamDest for SliceDest<'_> {
    fn stopped(&self) -> bool {
        self.stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn room(&mut self) -> Result<&mut [u8]> {
        if self.stopped() {
            return Err(Error::io("stopped: the load was stopped"));
        }
        if self.at == self.buf.len() {
            return Err(Error::io("a streamed read delivered more bytes than asked for"));
        }
        Ok(&mut self.buf[self.at..])
    }
    fn advance(&mut self, n: usize) -> Result<()> {
        self.at += n;
        Ok(())
    }
}

/// A write-only destination with positional writes, committed atomically at `finish`.
/// The writer writes each data region once (possibly from several threads, roughly in
/// ascending order) and rewrites the header region `[0, data_start)` last.
pub trait Sink: Send + Sync {
    fn describe(&self) -> &str;
    /// Tell the sink, before the first data write, how long the region rewritten at the end is
    /// (`data_start`). Sinks that upload as they go (S3) keep that much in memory until `finish`.
    fn set_header_len(&self, _len: u64) -> Result<()> {
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Make the object visible at its destination. Dropping a sink without calling this
    /// must leave nothing at the destination.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// The backends a URI can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme<'a> {
    /// A local path (`file://` stripped).
    Local(&'a str),
    Http,
    S3,
}

/// The scheme is whatever precedes `://`, case-insensitively; anything unrecognised is a path.
fn scheme_of(uri: &str) -> Result<Scheme<'_>> {
    let Some((scheme, rest)) = uri.split_once("://") else { return Ok(Scheme::Local(uri)) };
    match scheme.to_ascii_lowercase().as_str() {
        "http" | "https" => Ok(Scheme::Http),
        "s3" => Ok(Scheme::S3),
        "file" => Ok(Scheme::Local(rest)),
        "redis" => Err(Error::new(ErrorKind::Unsupported, "redis:// sources are not supported").in_file(uri)),
        _ => Ok(Scheme::Local(uri)),
    }
}

/// Open a source by URI or path: `s3://bucket/key`, `http(s)://…`, `file://…` or a local path.
pub fn open_source(uri: &str, opts: &StorageOptions) -> Result<Box<dyn Source>> {
    Ok(match scheme_of(uri)? {
        Scheme::Local(path) => Box::new(local::LocalFile::open(path)?),
        Scheme::Http => Box::new(http::open(uri, opts)?),
        Scheme::S3 => Box::new(s3::open(uri, opts)?),
    })
}

/// Open a sink by URI or path: `s3://bucket/key`, `file://…` or a local path (HTTP is read-only).
pub fn create_sink(uri: &str, opts: &StorageOptions) -> Result<Box<dyn Sink>> {
    Ok(match scheme_of(uri)? {
        Scheme::Local(path) => Box::new(local::AtomicFile::create(path)?),
        Scheme::Http => {
            return Err(Error::new(ErrorKind::Unsupported, "HTTP(S) URLs can only be read, not written").in_file(uri))
        }
        Scheme::S3 => Box::new(s3::create(uri, opts)?),
    })
}

/// Read a whole (small) object or file, e.g. a side file next to a model.
pub fn read_all(uri: &str, opts: &StorageOptions) -> Result<Vec<u8>> {
    let source = open_source(uri, opts)?;
    let size = usize::try_from(source.size()).map_err(|_| Error::value("object too large for memory").in_file(uri))?;
    let mut buf = vec![0u8; size];
    source.read_at(0, &mut buf)?;
    Ok(buf)
}

/// Write a whole (small) object or file at once; it appears only if every byte was written.
pub fn write_all(uri: &str, opts: &StorageOptions, bytes: &[u8]) -> Result<()> {
    let sink = create_sink(uri, opts)?;
    sink.write_at(0, bytes)?;
    sink.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(scheme_of("/a/b").unwrap(), Scheme::Local("/a/b"));
        assert_eq!(scheme_of("file:///a/b").unwrap(), Scheme::Local("/a/b"));
        assert_eq!(scheme_of("HTTPS://x/y").unwrap(), Scheme::Http);
        assert_eq!(scheme_of("s3://b/k").unwrap(), Scheme::S3);
        assert_eq!(scheme_of("gs://b/k").unwrap(), Scheme::Local("gs://b/k"));
        assert!(scheme_of("redis://h:1/p").is_err());
        assert!(create_sink("http://127.0.0.1:1/x", &StorageOptions::default()).is_err());
    }

    #[test]
    fn local_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/side.json");
        let path = path.to_str().unwrap();
        write_all(path, &StorageOptions::default(), b"{}\n").unwrap();
        assert_eq!(read_all(path, &StorageOptions::default()).unwrap(), b"{}\n");
    }
}
