//! A load's settings, built once: the caller's arguments over the process environment over the
//! defaults measured on the GPU machine (docs/benchmarks.md). This is the one module that reads
//! `TENSORIZER_RS_*` variables; the layers below get plain values (storage its options, cuda
//! its pool size and where NVRTC is, trace its switch). Every knob a user can turn is in the
//! README's "Settings" table.
//!
//! [`Tuning`] is what a load runs with once its source and destination are known: readers,
//! staging buffers, read sizes. Where a count scales with the machine (cores; later the local
//! ranks sharing it), it is decided here.
use std::path::PathBuf;
use std::sync::OnceLock;

use super::plan::Sizes;
use crate::crypto::DecryptionKeys;
use crate::cuda::{self, Pool};
use crate::error::{Error, Result};
use crate::storage::{Caps, ReadMode, StorageOptions, PAGE};

/// What the caller of one load asked for.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Parallel readers; `None` lets the source and the destination choose.
    pub num_readers: Option<usize>,
    pub verify_hash: bool,
    pub keys: Option<DecryptionKeys>,
    /// How local files reach the staging buffers of a GPU load; `None`: `TENSORIZER_RS_IO`,
    /// else [`ReadMode::Auto`].
    pub io: Option<ReadMode>,
}

/// The environment, read once per process.
#[derive(Debug, Default)]
pub struct Env {
    /// `TENSORIZER_RS_TRACE=1`: record each load's timeline (`trace::take`).
    pub trace: bool,
    /// `TENSORIZER_RS_HTTP_DIRECT=0`: every HTTP(S) request through reqwest.
    pub http_direct: Option<bool>,
    /// `TENSORIZER_RS_STAGING_BYTES`: the pinned staging pool's bound.
    pub staging_bytes: Option<usize>,
    /// `TENSORIZER_RS_IO`: how GPU loads read local files (`auto`, `buffered`, `direct`).
    pub io: Option<ReadMode>,
    /// `TENSORIZER_RS_GPU_DECRYPT=0`: encrypted loads to a GPU decrypt on the host, as where the
    /// decryption kernels cannot run (a workaround, and the benchmarks' comparison).
    pub gpu_decrypt: Option<bool>,
    /// `TENSORIZER_RS_NVRTC`: the CUDA run-time compiler (`libnvrtc.so*`, or its folder) for the
    /// GPU decryption kernels, where it is not found beside torch's CUDA libraries.
    pub nvrtc: Option<PathBuf>,
    /// Where the GPU decryption kernels are kept between processes:
    /// `$XDG_CACHE_HOME/tensorizer_rs/kernels`, else `$HOME/.cache/tensorizer_rs/kernels`.
    pub kernel_cache: Option<PathBuf>,
    /// Values that could not be used, as messages naming the variable; every load fails with
    /// the first, rather than run with a setting the user did not ask for.
    pub problems: Vec<String>,
}

impl Env {
    /// Parse the variables `get` returns.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Env {
        let mut env = Env::default();
        let mut bad = |name: &str, value: &str, want: &str| {
            env.problems.push(format!("{name}={value:?} is not {want}"));
        };
        if let Some(v) = get("TENSORIZER_RS_TRACE") {
            env.trace = !v.is_empty() && v != "0";
        }
        if let Some(v) = get("TENSORIZER_RS_HTTP_DIRECT") {
            match v.trim() {
                "0" => env.http_direct = Some(false),
                "1" | "" => {}
                _ => bad("TENSORIZER_RS_HTTP_DIRECT", &v, "0 or 1"),
            }
        }
        if let Some(v) = get("TENSORIZER_RS_STAGING_BYTES") {
            match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => env.staging_bytes = Some(n),
                _ => bad("TENSORIZER_RS_STAGING_BYTES", &v, "a positive number of bytes"),
            }
        }
        if let Some(v) = get("TENSORIZER_RS_GPU_DECRYPT") {
            match v.trim() {
                "0" => env.gpu_decrypt = Some(false),
                "1" | "" => {}
                _ => bad("TENSORIZER_RS_GPU_DECRYPT", &v, "0 or 1"),
            }
        }
        if let Some(v) = get("TENSORIZER_RS_NVRTC") {
            if !v.trim().is_empty() {
                env.nvrtc = Some(PathBuf::from(v));
            }
        }
        let cache = get("XDG_CACHE_HOME")
            .filter(|v| v.starts_with('/'))
            .map(PathBuf::from)
            .or_else(|| get("HOME").filter(|v| v.starts_with('/')).map(|h| PathBuf::from(h).join(".cache")));
        env.kernel_cache = cache.map(|c| c.join("tensorizer_rs").join("kernels"));
        if let Some(v) = get("TENSORIZER_RS_IO") {
            match v.parse::<ReadMode>() {
                Ok(m) => env.io = Some(m),
                Err(_) => bad("TENSORIZER_RS_IO", &v, "auto, buffered or direct"),
            }
        }
        env
    }

    /// The first problem, as the error a load fails with.
    pub fn check(&self) -> Result<()> {
        match self.problems.first() {
            Some(p) => Err(Error::value(p.clone())),
            None => Ok(()),
        }
    }
}

/// This process's environment, read on first use (the extension reads it on import), and
/// handed to the layers that act on it: the trace switch, the staging pool's bound, where
/// NVRTC is.
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let env = Env::parse(|k| std::env::var(k).ok());
        crate::trace::set_enabled(env.trace);
        cuda::nvrtc::set_path(env.nvrtc.clone());
        cuda::secretbox::set_cache_dir(env.kernel_cache.clone());
        if let Some(total) = env.staging_bytes {
            cuda::set_staging_config(cuda::StagingConfig { total, ..cuda::staging_config() });
        }
        env
    })
}

/// Storage options before the caller's own: the environment's.
pub fn storage_options() -> StorageOptions {
    StorageOptions { http_direct: env().http_direct, ..StorageOptions::default() }
}

/// Whether an encrypted load to a GPU may authenticate and decrypt on the device (if the kernels
/// run there); `Err` says why it decrypts on the host instead. Hashes are over the plaintext,
/// so `verify_hash` keeps decryption on the host.
pub fn gpu_decrypt(opts: &LoadOptions) -> std::result::Result<(), String> {
    if env().gpu_decrypt == Some(false) {
        return Err("TENSORIZER_RS_GPU_DECRYPT=0".into());
    }
    if opts.verify_hash {
        return Err("verify_hash checks the plaintext on the host".into());
    }
    Ok(())
}

/// Local GPU loads: one reader per core, 4 to 12. The host->device copies read the staging
/// buffers from the memory the readers write them into: beside 16 reading threads the copies
/// ran at 47.7–52.6 GB/s, beside 12 at 51.2–53.9 (H200 hosts, docs/benchmarks.md); with two
/// buffers each, 12 readers beat 16 with one in 19 of 21 pairs.
pub fn local_gpu_readers() -> usize {
    crate::cores().clamp(4, 12)
}

/// Staging buffers per reader of a local GPU load that does not decrypt on the host: a reader fills one while the
/// other's copy runs.
pub const BUFFERS_PER_READER: usize = 2;

/// Bytes a local GPU reader reads into a staging buffer at a time: 12 readers x 2 buffers x
/// 4 MiB keep 96 MiB in flight, as 12 x 8 MiB did (docs/benchmarks.md).
pub const LOCAL_FILL: usize = 4 << 20;

/// Encrypted loads are bound by decryption: one reader per core.
fn decrypting_readers() -> usize {
    crate::cores().clamp(4, 64)
}

/// The smallest piece a remote host load's last pieces are split into (see `Plan::taper`).
const HOST_TAPER_MIN: u64 = 4 << 20;

/// Staging buffers to page-lock before a GPU load of `uri` (the constructor's and the vLLM
/// loader's prewarm, while the index is read and the model built): the whole pool for a remote
/// source with its default readers (one per buffer), two per reader otherwise.
pub fn prewarm_buffers(uri: Option<&str>, readers: Option<usize>) -> usize {
    match (readers, uri) {
        (None, Some(u)) if crate::storage::is_remote(u) => usize::MAX,
        _ => readers.unwrap_or_else(local_gpu_readers).saturating_mul(BUFFERS_PER_READER),
    }
}

/// What one load runs with.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Reader threads wanted (at most one per item of the plan run).
    pub readers: usize,
    /// How reads of local files may bypass the page cache.
    pub read_mode: ReadMode,
    /// How the plan cuts the file into reads.
    pub sizes: Sizes,
    /// Split the last pieces down to this size so the readers finish together (remote).
    pub taper: Option<u64>,
    /// Staging buffers the load may make (GPU loads).
    pub buffers: usize,
    /// Bytes of a tensor one staging buffer takes per read (GPU loads; host: unbounded).
    pub fill: usize,
}

impl Tuning {
    /// A load into host memory: readers as the source serves best, reads straight into the
    /// tensors' buffers through the page cache.
    pub fn host(opts: &LoadOptions, caps: Caps) -> Tuning {
        let readers = opts.num_readers.unwrap_or(caps.parallelism).clamp(1, 64);
        Tuning {
            readers,
            read_mode: ReadMode::Buffered,
            sizes: Sizes::HOST,
            taper: caps.remote.then_some(HOST_TAPER_MIN),
            buffers: 0,
            fill: usize::MAX,
        }
    }

    /// A load to a GPU through `pool`'s staging buffers; `host_decrypt`: an encrypted file whose
    /// readers decrypt in the staging buffers (else the GPU opens it, and the load runs as a
    /// plain one, in reads of whole cipher chunks).
    pub fn device(opts: &LoadOptions, caps: Caps, encrypted: bool, host_decrypt: bool, pool: &Pool) -> Tuning {
        let chunk = pool.chunk();
        // Decryption on the host is CPU-bound: those loads use every core by default. Over the network
        // each reader waits on one request at a time: one reader per buffer keeps the most in
        // flight (HTTP on the H200 host: 16.3 vs 13.0–13.8 GB/s with 12), except where readers
        // receive the bodies themselves (plain HTTP): there the source's own figure, one per
        // core (24.2–24.3 vs 20.4–22.8 GB/s with 32, docs/benchmarks.md).
        let default = if caps.remote && caps.reads_into_buffers {
            caps.parallelism
        } else {
            let cpu = if host_decrypt { decrypting_readers() } else { local_gpu_readers() };
            if caps.remote {
                cpu.max(pool.max_buffers())
            } else {
                cpu
            }
        };
        let readers = opts.num_readers.unwrap_or(default).clamp(1, 64);
        // Sealed bytes the GPU opens pass through staging as plain ones do.
        let local_plain = !caps.remote && !host_decrypt;
        // A page short of the buffer at most: a direct read of an unaligned range rounds out to
        // whole pages on both sides and must still fit (as on merge-25 since 99f5334).
        let fill = if local_plain { LOCAL_FILL.min(chunk.saturating_sub(PAGE).max(PAGE)) } else { chunk };
        Tuning {
            readers,
            read_mode: opts.io.or(env().io).unwrap_or_default(),
            // The pipeline reads sealed data in `fill`s of whole cipher chunks.
            sizes: Sizes::device(chunk as u64, encrypted.then_some(fill as u64)),
            // Encrypted pieces stay whole numbers of cipher chunks.
            taper: (caps.remote && !encrypted).then_some(chunk as u64),
            // Remote loads keep the whole pool: one buffer per reader made no difference there
            // (HTTP to CUDA, H200 host, docs/benchmarks.md).
            buffers: if caps.remote {
                pool.max_buffers()
            } else if local_plain {
                readers * BUFFERS_PER_READER
            } else {
                readers
            },
            fill,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_parsed_once_and_strictly() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let env = Env::parse(vars(&[
            ("TENSORIZER_RS_TRACE", "1"),
            ("TENSORIZER_RS_HTTP_DIRECT", "0"),
            ("TENSORIZER_RS_STAGING_BYTES", "134217728"),
            ("TENSORIZER_RS_IO", "direct"),
            ("TENSORIZER_RS_NVRTC", "/opt/cuda/lib64"),
            ("TENSORIZER_RS_GPU_DECRYPT", "0"),
        ]));
        assert!(env.trace && env.problems.is_empty(), "{:?}", env.problems);
        assert_eq!(
            (env.http_direct, env.staging_bytes, env.io),
            (Some(false), Some(128 << 20), Some(ReadMode::Direct))
        );
        assert_eq!(env.nvrtc.as_deref(), Some(std::path::Path::new("/opt/cuda/lib64")));
        assert_eq!(env.gpu_decrypt, Some(false));
        assert_eq!(env.kernel_cache, None);
        let home = Env::parse(vars(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "relative")]));
        assert_eq!(home.kernel_cache.as_deref(), Some(std::path::Path::new("/home/u/.cache/tensorizer_rs/kernels")));
        let xdg = Env::parse(vars(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/c")]));
        assert_eq!(xdg.kernel_cache.as_deref(), Some(std::path::Path::new("/c/tensorizer_rs/kernels")));
        assert!(env.check().is_ok());
        let env = Env::parse(vars(&[("TENSORIZER_RS_TRACE", "0"), ("TENSORIZER_RS_HTTP_DIRECT", "1")]));
        assert!(!env.trace && env.http_direct.is_none() && env.check().is_ok());
        // A value that cannot be used fails every load, naming the variable.
        let env = Env::parse(vars(&[
            ("TENSORIZER_RS_IO", "mmap"),
            ("TENSORIZER_RS_STAGING_BYTES", "lots"),
            ("TENSORIZER_RS_GPU_DECRYPT", "no"),
        ]));
        assert_eq!(env.problems.len(), 3);
        let e = env.check().unwrap_err();
        assert!(e.message.contains("TENSORIZER_RS_STAGING_BYTES") || e.message.contains("TENSORIZER_RS_IO"), "{e}");
    }

    #[test]
    fn prewarm_takes_the_pool_only_for_remote_sources_with_default_readers() {
        assert_eq!(prewarm_buffers(Some("/m.tensors"), Some(3)), 6);
        assert_eq!(prewarm_buffers(Some("http://h/m.tensors"), Some(2)), 4);
        assert_eq!(prewarm_buffers(Some("s3://b/m.tensors"), None), usize::MAX);
        assert_eq!(prewarm_buffers(None, None), local_gpu_readers() * BUFFERS_PER_READER);
    }
}
