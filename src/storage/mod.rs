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
mod s3_insecure;
mod tls;

pub use config::StorageOptions;
pub use http_direct::direct_bytes as http_direct_bytes;
pub use local::{FileSystem, ReadMode, PAGE};
pub use ranged::{hedged_requests, ByteSink};
pub use s3::{abort_upload as s3_abort_upload, pending_uploads as s3_pending_uploads, PendingUpload};

/// Bounce buffer of the default [`Source::read_stream`].
const STREAM_BUFFER: usize = 8 << 20;

use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// A load's stop signal, handed to each of its reads. Whoever drives the reads (the load
/// pipeline) owns it and sets it when the load fails or is interrupted; a read then gives up
/// soon instead of running to its end: one waiting on the network within 100 ms, rather than
/// after a stalled server's read timeout.
#[derive(Debug, Default)]
pub struct Stop(AtomicBool);

impl Stop {
    pub const fn new() -> Self {
        Stop(AtomicBool::new(false))
    }
    /// A signal nobody sets: for reads outside a load (opening a file, side files).
    pub fn never() -> &'static Stop {
        static NEVER: Stop = Stop::new();
        &NEVER
    }
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    /// The error a read ends with once stopped.
    pub fn error() -> Error {
        Error::io("stopped: the load was stopped")
    }
}

/// What a source can do, for the pipeline to plan with (it never looks at the URI itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Bytes come over a network: each request has a fixed cost, so a large piece goes as one
    /// streamed request, and a read waiting on one must not hold scarce buffers meanwhile.
    pub remote: bool,
    /// [`Source::read_stream_into`] reads from the socket straight into the lent buffers
    /// (plain HTTP): then one streamed request per piece beats a `read_at` split into
    /// requests whose bodies are copied.
    pub reads_into_buffers: bool,
    /// How many concurrent reads this source serves well (used when the caller leaves
    /// `num_readers` unset).
    pub parallelism: usize,
    /// The file system of a local file (`Other` for remote sources): memory-backed ones
    /// (tmpfs) are read differently (`load::options::Tuning`).
    pub fs: FileSystem,
    /// Every read is checked to come from the version of the object seen at open (a strong
    /// validator: an ETag that is not weak, or a Last-Modified date). Without one, a server
    /// could hand out another version mid-load unnoticed: the loader then verifies the stored
    /// hashes whatever the caller asked.
    pub pins_version: bool,
}

/// A random-access, read-only byte source (a local file, an HTTP(S) URL, an S3 object).
pub trait Source: Send + Sync {
    /// A name for messages: the path or URI, never credentials.
    fn describe(&self) -> &str;
    /// Total size in bytes, known once the source is open.
    fn size(&self) -> u64;
    /// What this source can do.
    fn caps(&self) -> Caps {
        Caps { remote: false, reads_into_buffers: false, parallelism: 8, fs: FileSystem::Other, pins_version: true }
    }
    /// Fill `buf` with the bytes at `offset..offset + buf.len()`; a short read is an error.
    /// Remote sources split a large read into concurrent ranged requests, retry each, and fail
    /// (rather than return other bytes) if the object changed since it was opened; they give
    /// up once `stop` is set.
    fn read(&self, offset: u64, buf: &mut [u8], stop: &Stop) -> Result<()>;
    /// [`Source::read`] outside any load (nothing stops it).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(offset, buf, Stop::never())
    }
    /// Read `len` bytes at `offset` into `buf` (at least `len` long) and return where in `buf`
    /// they start. Given a page-aligned `buf` with room for the bytes plus a page on either
    /// side, a local file may read the whole pages around them straight from the disk
    /// (`O_DIRECT`, which needs that alignment) when `mode` allows it and they are not in the
    /// page cache; `direct` in the answer says so. Other sources read into `buf[..len]`.
    fn read_aligned(&self, offset: u64, len: usize, buf: &mut [u8], mode: ReadMode, stop: &Stop) -> Result<Landed> {
        let _ = mode;
        self.read(offset, &mut buf[..len], stop)?;
        Ok(Landed { start: 0, direct: false })
    }
    /// Hand `offset..offset + len` to `sink` in order, in pieces of any size, as the bytes come;
    /// an error from `sink` ends the read with that error. Remote sources fetch the range with
    /// one request (resumed where it stopped after a dropped connection), so a caller that
    /// consumes bytes as they arrive pays one request per range instead of one per buffer.
    fn read_stream(&self, offset: u64, len: usize, sink: &mut ByteSink<'_>, stop: &Stop) -> Result<()> {
        let mut buf = vec![0u8; len.min(STREAM_BUFFER)];
        let mut done = 0;
        while done < len {
            if stop.is_stopped() {
                return Err(Stop::error());
            }
            let n = (len - done).min(buf.len());
            self.read(offset + done as u64, &mut buf[..n], stop)?;
            sink(&buf[..n])?;
            done += n;
        }
        Ok(())
    }
    /// [`Source::read_stream`] into buffers `dest` lends: a source that can (plain HTTP) reads
    /// from the socket straight into them; others copy each piece in with [`StreamDest::put`].
    fn read_stream_into(&self, offset: u64, len: usize, dest: &mut dyn StreamDest, stop: &Stop) -> Result<()> {
        self.read_stream(offset, len, &mut |bytes: &[u8]| dest.put(bytes), stop)
    }
}

/// Where [`Source::read_aligned`] put the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    /// Offset of the first byte in the buffer (non-zero after an aligned direct read).
    pub start: usize,
    /// Read straight from the disk, past the page cache.
    pub direct: bool,
}

/// Where the bytes of [`Source::read_stream_into`] go, in order: the source asks for room,
/// writes the next bytes at its start and says how many.
pub trait StreamDest: Send {
    /// Room for the next bytes; never empty.
    fn room(&mut self) -> Result<&mut [u8]>;
    /// The first `n` bytes of the room last handed out hold the next bytes.
    fn advance(&mut self, n: usize) -> Result<()>;
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
}

impl<'a> SliceDest<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        SliceDest { buf, at: 0 }
    }
}

impl StreamDest for SliceDest<'_> {
    fn room(&mut self) -> Result<&mut [u8]> {
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

/// The scheme of `uri`, lowercased (`"s3"`, `"https"`, `"file"`, `"redis"`, ...), or `None`
/// for a plain path: for callers that choose among places this crate does not serve itself
/// (the Python package's `redis://` streams) or check a URI before opening it.
pub fn scheme(uri: &str) -> Option<String> {
    uri.split_once("://").map(|(s, _)| s.to_ascii_lowercase())
}

/// Whether `uri` names a remote object (HTTP(S), S3) rather than a local file: what a caller
/// must know before the source is open (to size buffers it prepares meanwhile).
pub fn is_remote(uri: &str) -> bool {
    matches!(scheme_of(uri), Ok(Scheme::Http | Scheme::S3))
}

/// Open a source by URI or path: `s3://bucket/key`, `http(s)://…`, `file://…` or a local path.
pub fn open_source(uri: &str, opts: &StorageOptions) -> Result<Box<dyn Source>> {
    open_source_until(uri, opts, Stop::never())
}

/// [`open_source`], giving up once `stop` is set: a remote open's probe (with its retries)
/// ends within moments instead of waiting out a silent server.
pub fn open_source_until(uri: &str, opts: &StorageOptions, stop: &Stop) -> Result<Box<dyn Source>> {
    Ok(match scheme_of(uri)? {
        Scheme::Local(path) => Box::new(local::LocalFile::open(path)?),
        Scheme::Http => Box::new(http::open(uri, opts, stop)?),
        Scheme::S3 => Box::new(s3::open(uri, opts, stop)?),
    })
}

/// [`open_source_until`], called `name` in messages instead of `uri` when one is given (a
/// stream spilled to a temporary file is named after the stream, e.g. its `redis://` URI).
pub fn open_source_named(uri: &str, opts: &StorageOptions, name: Option<&str>, stop: &Stop) -> Result<Box<dyn Source>> {
    let Some(name) = name else { return open_source_until(uri, opts, stop) };
    let inner = open_source_until(uri, opts, stop).map_err(|e| Error { file: Some(name.to_string()), ..e })?;
    Ok(Box::new(Named { inner, name: name.to_string() }))
}

/// A source shown under another name; everything else is the inner source's.
struct Named {
    inner: Box<dyn Source>,
    name: String,
}

impl Source for Named {
    fn describe(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    fn read(&self, offset: u64, buf: &mut [u8], stop: &Stop) -> Result<()> {
        self.inner.read(offset, buf, stop)
    }
    fn read_aligned(&self, offset: u64, len: usize, buf: &mut [u8], mode: ReadMode, stop: &Stop) -> Result<Landed> {
        self.inner.read_aligned(offset, len, buf, mode, stop)
    }
    fn read_stream(&self, offset: u64, len: usize, sink: &mut ByteSink<'_>, stop: &Stop) -> Result<()> {
        self.inner.read_stream(offset, len, sink, stop)
    }
    fn read_stream_into(&self, offset: u64, len: usize, dest: &mut dyn StreamDest, stop: &Stop) -> Result<()> {
        self.inner.read_stream_into(offset, len, dest, stop)
    }
}

/// Open a sink by URI or path: `s3://bucket/key`, `file://…` or a local path (HTTP is read-only).
pub fn create_sink(uri: &str, opts: &StorageOptions) -> Result<Box<dyn Sink>> {
    create_sink_until(uri, opts, Stop::never())
}

/// [`create_sink`], giving up once `stop` is set (an S3 sink may wait on the network for
/// credentials).
pub fn create_sink_until(uri: &str, opts: &StorageOptions, stop: &Stop) -> Result<Box<dyn Sink>> {
    Ok(match scheme_of(uri)? {
        Scheme::Local(path) => local::create_writer(path, opts.local_tmpfile != Some(false))?,
        Scheme::Http => {
            return Err(Error::new(ErrorKind::Unsupported, "HTTP(S) URLs can only be read, not written").in_file(uri))
        }
        Scheme::S3 => Box::new(s3::create(uri, opts, stop)?),
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

/// Copy a file or object to another place (`s3_upload`): read and written in order, in pieces of
/// [`STREAM_BUFFER`] bytes, so memory stays bounded; `tick` runs between pieces (Ctrl-C) and an
/// error from it stops the copy. The destination appears only if every byte was copied.
pub fn copy(src: &str, dst: &str, opts: &StorageOptions, tick: &mut dyn FnMut() -> Result<()>) -> Result<()> {
    let source = open_source(src, &StorageOptions::default())?;
    let sink = create_sink(dst, opts)?;
    let size = source.size();
    let mut buf = vec![0u8; usize::try_from(size).unwrap_or(STREAM_BUFFER).min(STREAM_BUFFER)];
    let mut at = 0u64;
    while at < size {
        tick()?;
        let n = buf.len().min(usize::try_from(size - at).unwrap_or(usize::MAX));
        source.read_at(at, &mut buf[..n])?;
        sink.write_at(at, &buf[..n])?;
        at += n as u64;
    }
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
        assert!(is_remote("HTTP://x/y") && is_remote("s3://b/k") && !is_remote("file:///a") && !is_remote("/a"));
        assert!(!is_remote("redis://h/p") && !is_remote("gs://b/k"));
        assert_eq!(scheme("Redis://h:1/p").as_deref(), Some("redis"));
        assert_eq!((scheme("/a/b"), scheme("rel/x.tensors")), (None, None));
        assert!(create_sink("http://127.0.0.1:1/x", &StorageOptions::default()).is_err());
    }

    #[test]
    fn a_named_source_reads_as_the_inner_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spilled.bin");
        std::fs::write(&path, b"0123456789").unwrap();
        let opts = StorageOptions::default();
        let src = open_source_named(path.to_str().unwrap(), &opts, Some("redis://h:1/p"), Stop::never()).unwrap();
        assert_eq!((src.describe(), src.size()), ("redis://h:1/p", 10));
        assert_eq!(src.caps(), open_source(path.to_str().unwrap(), &opts).unwrap().caps());
        let mut buf = [0u8; 4];
        src.read_at(3, &mut buf).unwrap();
        assert_eq!(&buf, b"3456");
        // Failing to open: the error names what the caller calls it.
        let missing = dir.path().join("missing");
        let e =
            open_source_named(missing.to_str().unwrap(), &opts, Some("redis://h:1/p"), Stop::never()).err().unwrap();
        assert_eq!(e.file.as_deref(), Some("redis://h:1/p"), "{e}");
    }

    #[test]
    fn a_stopped_open_gives_up_on_a_silent_server() {
        // Accepts connections (the backlog does) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://{}/m.tensors", silent.local_addr().unwrap());
        let opts = StorageOptions { http_direct: Some(false), ..Default::default() };
        let stop = Stop::new();
        let t0 = std::time::Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(300));
                stop.stop();
            });
            let e = open_source_until(&uri, &opts, &stop).err().expect("nothing to open");
            assert!(e.message.contains("stopped"), "{e}");
        });
        // The probe waits on the stop (within 100 ms), not its stall timeout (60 s) and retries.
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[test]
    fn local_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/side.json");
        let path = path.to_str().unwrap();
        write_all(path, &StorageOptions::default(), b"{}\n").unwrap();
        assert_eq!(read_all(path, &StorageOptions::default()).unwrap(), b"{}\n");
    }

    #[test]
    fn copy_in_pieces_and_stop() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        let data: Vec<u8> = (0..STREAM_BUFFER + 12345).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let (src, dst) = (src.to_str().unwrap(), dir.path().join("out/dst.bin"));
        let mut ticks = 0;
        copy(src, dst.to_str().unwrap(), &StorageOptions::default(), &mut || {
            ticks += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(ticks, 2);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        // Stopped after the first piece: nothing at the destination.
        let stopped = dir.path().join("stopped.bin");
        let mut n = 0;
        let err = copy(src, stopped.to_str().unwrap(), &StorageOptions::default(), &mut || {
            n += 1;
            if n > 1 {
                Err(Error::io("interrupted"))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Io);
        assert!(!stopped.exists());
        assert!(copy(
            &dir.path().join("missing").to_string_lossy(),
            dst.to_str().unwrap(),
            &StorageOptions::default(),
            &mut || Ok(())
        )
        .is_err());
    }
}
