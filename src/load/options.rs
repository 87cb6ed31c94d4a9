//! A load's settings, built once: the caller's arguments over the process environment over the
//! defaults measured on the GPU machine (docs/benchmarks.md). This is the one module that reads
//! `TENSORIZER_RS_*` variables; the layers below get plain values (storage its options, cuda
//! its pool size and where NVRTC is, trace its switch). Every knob a user can turn is in the
//! README's "Settings" table.
//!
//! [`Tuning`] is what a load runs with once its source and destination are known: readers,
//! staging buffers, read sizes, the CPUs readers run on. Where a count scales with the machine
//! (cores, the local ranks sharing it, the file system a local file lives on), it is decided
//! here.
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::numa::{self, Placement};
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

impl LoadOptions {
    /// These options for a source with `caps`: hash verification turned on where the caller
    /// left it off and the source cannot pin one version of the object (no strong validator,
    /// [`Caps::pins_version`]), so a server handing out another version mid-load is caught by
    /// the stored hashes instead of returning mixed bytes.
    pub fn for_source(&self, caps: Caps) -> std::borrow::Cow<'_, LoadOptions> {
        if self.verify_hash || caps.pins_version {
            std::borrow::Cow::Borrowed(self)
        } else {
            std::borrow::Cow::Owned(LoadOptions { verify_hash: true, ..self.clone() })
        }
    }
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
    /// `LOCAL_WORLD_SIZE` (set by vLLM, torchrun): processes of one job on this host, each
    /// loading at the same time. Not ours, so a value we cannot read is ignored.
    pub local_world_size: Option<usize>,
    /// `TENSORIZER_RS_LOCAL_RANKS`: the same, set by hand; wins over `LOCAL_WORLD_SIZE`.
    pub local_ranks: Option<usize>,
    /// `TENSORIZER_RS_NUMA=0`: leave GPU readers where the scheduler puts them.
    pub numa: bool,
    /// `TENSORIZER_RS_SYSFS`: where sysfs is (tests hand a fake topology); default `/sys`.
    pub sysfs: Option<PathBuf>,
    /// `TENSORIZER_RS_STALL_TIMEOUT`: seconds a remote read request may receive nothing before
    /// it is dropped and sent again.
    pub stall_timeout: Option<Duration>,
    /// `TENSORIZER_RS_HEDGE_AFTER`: seconds a remote read request may receive nothing while the
    /// source's other requests flow before it is sent again on another connection (0: never).
    pub hedge_after: Option<Duration>,
    /// `TENSORIZER_RS_O_TMPFILE=0`: local writes through a named, locked temporary file instead
    /// of an unnamed `O_TMPFILE` one.
    pub local_tmpfile: Option<bool>,
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
        let mut env = Env { numa: true, ..Env::default() };
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
        if let Some(v) = get("TENSORIZER_RS_LOCAL_RANKS") {
            match v.trim().parse::<usize>() {
                Ok(n) if (1..=4096).contains(&n) => env.local_ranks = Some(n),
                _ => bad("TENSORIZER_RS_LOCAL_RANKS", &v, "a number of processes from 1 to 4096"),
            }
        }
        if let Some(v) = get("TENSORIZER_RS_NUMA") {
            match v.trim() {
                "0" => env.numa = false,
                "1" | "" => {}
                _ => bad("TENSORIZER_RS_NUMA", &v, "0 or 1"),
            }
        }
        if let Some(v) = get("TENSORIZER_RS_SYSFS") {
            if !v.trim().is_empty() {
                env.sysfs = Some(PathBuf::from(v));
            }
        }
        env.local_world_size =
            get("LOCAL_WORLD_SIZE").and_then(|v| v.trim().parse::<usize>().ok()).filter(|n| (1..=4096).contains(n));
        if let Some(v) = get("TENSORIZER_RS_O_TMPFILE") {
            match v.trim() {
                "0" => env.local_tmpfile = Some(false),
                "1" | "" => {}
                _ => bad("TENSORIZER_RS_O_TMPFILE", &v, "0 or 1"),
            }
        }
        let seconds = |v: &str| v.trim().parse::<f64>().ok().and_then(|s| Duration::try_from_secs_f64(s).ok());
        if let Some(v) = get("TENSORIZER_RS_STALL_TIMEOUT") {
            match seconds(&v) {
                Some(d) => env.stall_timeout = Some(d),
                None => bad("TENSORIZER_RS_STALL_TIMEOUT", &v, "a number of seconds >= 0"),
            }
        }
        if let Some(v) = get("TENSORIZER_RS_HEDGE_AFTER") {
            match seconds(&v) {
                Some(d) => env.hedge_after = Some(d),
                None => bad("TENSORIZER_RS_HEDGE_AFTER", &v, "a number of seconds >= 0"),
            }
        }
        env
    }

    /// Processes of one job loading on this host at once: `TENSORIZER_RS_LOCAL_RANKS`, else
    /// `LOCAL_WORLD_SIZE`, else 1.
    pub fn local_ranks(&self) -> usize {
        self.local_ranks.or(self.local_world_size).unwrap_or(1)
    }

    /// The root of sysfs.
    pub fn sysfs(&self) -> &Path {
        self.sysfs.as_deref().unwrap_or(Path::new("/sys"))
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
        let total = env.staging_bytes.or_else(|| {
            let ranks = env.local_ranks();
            (ranks > 1).then(|| staging_per_rank(cuda::DEFAULT_STAGING.total, ranks))
        });
        if let Some(total) = total {
            cuda::set_staging_config(cuda::StagingConfig { total, ..cuda::staging_config() });
        }
        env
    })
}

/// Storage options before the caller's own: the environment's.
pub fn storage_options() -> StorageOptions {
    let env = env();
    StorageOptions {
        http_direct: env.http_direct,
        stall_timeout: env.stall_timeout,
        hedge_after: env.hedge_after,
        local_tmpfile: env.local_tmpfile,
        ..StorageOptions::default()
    }
}

/// What one process gets of a host-wide default `n` when `ranks` processes load at once (a
/// tensor-parallel group on one host): an equal share, so the group together uses what one
/// process alone would (cores, memory bandwidth, pinned memory), and never less than `min`
/// (or `n`, if smaller).
pub fn per_rank(n: usize, ranks: usize, min: usize) -> usize {
    (n / ranks.max(1)).max(min.min(n))
}

/// The fewest readers a rank's default gives it: one to read while the other's buffer copies.
pub const MIN_READERS_PER_RANK: usize = 2;

/// The smallest staging pool a rank's default gives it: two buffers for each of its
/// [`MIN_READERS_PER_RANK`] readers (32 MiB of 8 MiB buffers).
pub const MIN_STAGING_PER_RANK: usize = 32 << 20;

/// The staging pool of one of `ranks` processes (`TENSORIZER_RS_STAGING_BYTES` and
/// `_cuda.staging()` win).
pub fn staging_per_rank(total: usize, ranks: usize) -> usize {
    per_rank(total, ranks, MIN_STAGING_PER_RANK)
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

/// The smallest piece a local GPU load's last pieces are split into (see `Plan::taper`): two
/// of its reads, the size measured (docs/benchmarks.md).
const LOCAL_TAPER_MIN: u64 = 2 * LOCAL_FILL as u64;

/// The smallest piece a remote host load's last pieces are split into (see `Plan::taper`).
const HOST_TAPER_MIN: u64 = 4 << 20;

/// Staging buffers to page-lock before a GPU load of `uri` (the constructor's and the vLLM
/// loader's prewarm, while the index is read and the model built): the whole pool for a remote
/// source with its default readers (one per buffer), two per reader otherwise.
pub fn prewarm_buffers(uri: Option<&str>, readers: Option<usize>) -> usize {
    let ranks = env().local_ranks();
    match (readers, uri) {
        (None, Some(u)) if crate::storage::is_remote(u) => usize::MAX,
        _ => readers
            .unwrap_or_else(|| per_rank(local_gpu_readers(), ranks, MIN_READERS_PER_RANK))
            .saturating_mul(BUFFERS_PER_READER),
    }
}

/// Where the reader threads of a load to GPU `device` run ([`numa::placement`]): on its NUMA
/// node's CPUs where the host has more than one node and sysfs names the GPU's;
/// `TENSORIZER_RS_NUMA=0` turns it off.
pub fn gpu_placement(device: i32) -> Placement {
    let env = env();
    if !env.numa {
        return Placement::default();
    }
    let bus_id = cuda::pci_bus_id(device).ok();
    numa::placement(env.sysfs(), bus_id.as_deref(), numa::allowed_cpus().as_deref())
}

/// What a GPU load's tuning needs to know of its file's encryption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sealed {
    /// Not encrypted.
    No,
    /// Encrypted, opened by the GPU kernels: read like plain bytes, in whole cipher chunks.
    OnGpu,
    /// Encrypted, decrypted by the readers in the staging buffers.
    OnHost,
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
    /// Split the last pieces down to this size so the readers finish together.
    pub taper: Option<u64>,
    /// Staging buffers the load may make (GPU loads).
    pub buffers: usize,
    /// Bytes of a tensor one staging buffer takes per read (GPU loads; host: unbounded).
    pub fill: usize,
    /// Pin each reader thread to these CPUs (a GPU's NUMA node, [`gpu_placement`]).
    pub cpus: Option<Arc<[usize]>>,
    /// Processes this load's defaults were shared among ([`Env::local_ranks`]).
    pub ranks: usize,
}

impl Tuning {
    /// A load into host memory: readers as the source serves best, reads straight into the
    /// tensors' buffers through the page cache.
    pub fn host(opts: &LoadOptions, caps: Caps) -> Tuning {
        Tuning::host_for(opts, caps, env().local_ranks())
    }

    /// [`Tuning::host`] for one of `ranks` processes loading at once: a share of the source's
    /// readers.
    pub fn host_for(opts: &LoadOptions, caps: Caps, ranks: usize) -> Tuning {
        let default = per_rank(caps.parallelism, ranks, MIN_READERS_PER_RANK);
        let readers = opts.num_readers.unwrap_or(default).clamp(1, 64);
        Tuning {
            readers,
            read_mode: ReadMode::Buffered,
            sizes: Sizes::HOST,
            taper: caps.remote.then_some(HOST_TAPER_MIN),
            buffers: 0,
            fill: usize::MAX,
            cpus: None,
            ranks,
        }
    }

    /// A load to a GPU through `pool`'s staging buffers.
    pub fn device(opts: &LoadOptions, caps: Caps, sealed: Sealed, pool: &Pool) -> Tuning {
        let env = env();
        let io = opts.io.or(env.io);
        Tuning::device_for(opts, caps, sealed, pool.chunk(), pool.max_buffers(), io, env.local_ranks())
    }

    /// [`Tuning::device`] with the pool's buffer size (`chunk`) and count, the read mode asked
    /// for (`io`: the caller's, else the environment's) and the processes loading at once.
    pub fn device_for(
        opts: &LoadOptions,
        caps: Caps,
        sealed: Sealed,
        chunk: usize,
        max_buffers: usize,
        io: Option<ReadMode>,
        ranks: usize,
    ) -> Tuning {
        let (encrypted, host_decrypt) = (sealed != Sealed::No, sealed == Sealed::OnHost);
        // Decryption on the host is CPU-bound: those loads use every core by default. Over the network
        // each reader waits on one request at a time: one reader per buffer keeps the most in
        // flight (HTTP on the H200 host: 16.3 vs 13.0–13.8 GB/s with 12), except where readers
        // receive the bodies themselves (plain HTTP): there the source's own figure, one per
        // core (24.2–24.3 vs 20.4–22.8 GB/s with 32, docs/benchmarks.md).
        // A memory-backed file (tmpfs) has no disk below its pages: buffered reads, without the
        // O_DIRECT attempt and `mincore` that `auto` would make. Readers and buffers as for the
        // page cache: that reached 85–86 % of pinned host→device from /dev/shm (H100,
        // e3e5822, docs/benchmarks.md); more readers there is not measured yet.
        let in_memory = !caps.remote && caps.fs.in_memory();
        // Ranks sharing the host share its cores: each gets its part of a per-core count. The
        // pool is shared the same way (in `env()`), so one reader per buffer needs no more.
        let share = |n| per_rank(n, ranks, MIN_READERS_PER_RANK);
        let default = if caps.remote && caps.reads_into_buffers {
            share(caps.parallelism)
        } else {
            let cpu = share(if host_decrypt { decrypting_readers() } else { local_gpu_readers() });
            if caps.remote {
                cpu.max(max_buffers)
            } else {
                cpu
            }
        };
        let readers = opts.num_readers.unwrap_or(default).clamp(1, 64);
        // Sealed bytes the GPU opens pass through staging as plain ones do.
        let local_plain = !caps.remote && !host_decrypt;
        // A page short of the buffer at most: a direct read of an unaligned range rounds out to
        // whole pages on both sides and must still fit.
        let fill = if local_plain { LOCAL_FILL.min(chunk.saturating_sub(PAGE).max(PAGE)) } else { chunk };
        let default_mode = if in_memory { ReadMode::Buffered } else { ReadMode::Auto };
        Tuning {
            readers,
            read_mode: io.unwrap_or(default_mode),
            // The pipeline reads sealed data in `fill`s of whole cipher chunks.
            sizes: Sizes::device(chunk as u64, encrypted.then_some(fill as u64)),
            // The last pieces split finer, so the readers finish together: cold, the readers
            // holding the last 64 MiB pieces of a local file read alone for 255-293 ms at the
            // end of a 6.46 GB load, 16-21 ms split down to 8 MiB (H100, docs/benchmarks.md).
            // Encrypted pieces stay whole numbers of cipher chunks.
            taper: match (encrypted, caps.remote) {
                (true, _) => None,
                (false, true) => Some(chunk as u64),
                (false, false) => Some(LOCAL_TAPER_MIN),
            },
            // Remote loads keep the whole pool: one buffer per reader made no difference there
            // (HTTP to CUDA, H200 host, docs/benchmarks.md).
            buffers: if caps.remote {
                max_buffers
            } else if local_plain {
                readers * BUFFERS_PER_READER
            } else {
                readers
            },
            fill,
            cpus: None,
            ranks,
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
            ("TENSORIZER_RS_STALL_TIMEOUT", "1.5"),
            ("TENSORIZER_RS_HEDGE_AFTER", "0"),
            ("TENSORIZER_RS_O_TMPFILE", "0"),
            ("TENSORIZER_RS_GPU_DECRYPT", "0"),
        ]));
        assert!(env.trace && env.problems.is_empty(), "{:?}", env.problems);
        assert_eq!(
            (env.http_direct, env.staging_bytes, env.io),
            (Some(false), Some(128 << 20), Some(ReadMode::Direct))
        );
        assert_eq!(env.nvrtc.as_deref(), Some(std::path::Path::new("/opt/cuda/lib64")));
        assert_eq!((env.stall_timeout, env.hedge_after), (Some(Duration::from_millis(1500)), Some(Duration::ZERO)));
        assert_eq!(env.local_tmpfile, Some(false));
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
        let env = Env::parse(vars(&[("TENSORIZER_RS_STALL_TIMEOUT", "-1"), ("TENSORIZER_RS_HEDGE_AFTER", "soon")]));
        assert_eq!(env.problems.len(), 2, "{:?}", env.problems);
    }

    #[test]
    fn sources_without_a_strong_validator_are_loaded_verified() {
        let caps = |pins_version| Caps {
            remote: true,
            reads_into_buffers: false,
            parallelism: 8,
            fs: crate::storage::FileSystem::Other,
            pins_version,
        };
        let opts = LoadOptions { num_readers: Some(3), ..Default::default() };
        assert!(!opts.for_source(caps(true)).verify_hash);
        let forced = opts.for_source(caps(false));
        assert!(forced.verify_hash && forced.num_readers == Some(3));
        let asked = LoadOptions { verify_hash: true, ..Default::default() };
        assert!(matches!(asked.for_source(caps(false)), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn local_ranks_come_from_the_override_then_vllm() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(Env::parse(vars(&[])).local_ranks(), 1);
        assert_eq!(Env::parse(vars(&[("LOCAL_WORLD_SIZE", "8")])).local_ranks(), 8);
        let both = Env::parse(vars(&[("LOCAL_WORLD_SIZE", "8"), ("TENSORIZER_RS_LOCAL_RANKS", "2")]));
        assert_eq!(both.local_ranks(), 2);
        // vLLM's variable is not ours: unusable, it is ignored; ours fails loads.
        let env = Env::parse(vars(&[("LOCAL_WORLD_SIZE", "lots")]));
        assert!(env.local_ranks() == 1 && env.check().is_ok());
        let env = Env::parse(vars(&[("TENSORIZER_RS_LOCAL_RANKS", "0"), ("TENSORIZER_RS_NUMA", "off")]));
        assert_eq!(env.problems.len(), 2, "{:?}", env.problems);
        let env = Env::parse(vars(&[("TENSORIZER_RS_NUMA", "0"), ("TENSORIZER_RS_SYSFS", "/tmp/fake")]));
        assert!(!env.numa && env.sysfs() == Path::new("/tmp/fake"));
        assert!(Env::parse(vars(&[])).numa && Env::parse(vars(&[])).sysfs() == Path::new("/sys"));
    }

    fn local(fs: crate::storage::FileSystem) -> Caps {
        Caps { remote: false, reads_into_buffers: false, parallelism: 16, fs, pins_version: true }
    }

    #[test]
    fn ranks_on_one_host_share_readers_and_staging() {
        use crate::storage::FileSystem;
        let chunk = (8 << 20) - crate::cuda::pool::SLACK;
        let ext4 = local(FileSystem::Ext4);
        let opts = LoadOptions::default();
        let gpu = |ranks, opts: &LoadOptions| Tuning::device_for(opts, ext4, Sealed::No, chunk, 32, None, ranks);
        let one = gpu(1, &opts);
        assert_eq!((one.readers, one.buffers, one.ranks), (local_gpu_readers(), local_gpu_readers() * 2, 1));
        for ranks in [2, 8] {
            let t = gpu(ranks, &opts);
            assert_eq!(t.readers, (local_gpu_readers() / ranks).max(2), "{ranks}");
            assert_eq!((t.buffers, t.ranks), (t.readers * BUFFERS_PER_READER, ranks));
        }
        // Explicit readers win.
        let five = LoadOptions { num_readers: Some(5), ..LoadOptions::default() };
        assert_eq!(gpu(8, &five).readers, 5);
        // The pool: 256 MiB for one, 128 for two, 32 (four buffers) from eight on.
        let total = crate::cuda::DEFAULT_STAGING.total;
        assert_eq!(
            [1, 2, 8, 64].map(|r| staging_per_rank(total, r)),
            [256 << 20, 128 << 20, 32 << 20, MIN_STAGING_PER_RANK]
        );
        assert_eq!(per_rank(3, 8, 2), 2);
        assert_eq!(per_rank(1, 8, 2), 1);
        // Host loads share the source's readers the same way.
        assert_eq!(Tuning::host_for(&opts, ext4, 1).readers, 16);
        assert_eq!(Tuning::host_for(&opts, ext4, 2).readers, 8);
        assert_eq!(Tuning::host_for(&opts, ext4, 8).readers, 2);
        assert_eq!(Tuning::host_for(&five, ext4, 8).readers, 5);
        // Remote loads keep one reader per (already shared) buffer.
        let s3 = Caps {
            remote: true,
            reads_into_buffers: false,
            parallelism: 32,
            fs: FileSystem::Other,
            pins_version: true,
        };
        let remote = Tuning::device_for(&opts, s3, Sealed::No, chunk, 4, None, 8);
        // Their last pieces split down to one buffer (one request streamed through it).
        assert_eq!((remote.readers, remote.taper), (4, Some(chunk as u64)));
    }

    #[test]
    fn memory_backed_files_read_buffered() {
        use crate::storage::FileSystem;
        let chunk = (8 << 20) - crate::cuda::pool::SLACK;
        let opts = LoadOptions::default();
        for fs in [FileSystem::Tmpfs, FileSystem::Ramfs, FileSystem::Hugetlbfs] {
            let t = Tuning::device_for(&opts, local(fs), Sealed::No, chunk, 32, None, 1);
            assert_eq!((t.read_mode, t.readers, t.buffers), (ReadMode::Buffered, local_gpu_readers(), t.readers * 2));
            assert_eq!(t.fill, LOCAL_FILL);
            // Asked for explicitly, another mode wins.
            let d = Tuning::device_for(&opts, local(fs), Sealed::No, chunk, 32, Some(ReadMode::Direct), 1);
            assert_eq!(d.read_mode, ReadMode::Direct);
            // Shared among ranks like any other default.
            let t = Tuning::device_for(&opts, local(fs), Sealed::No, chunk, 32, None, 4);
            assert_eq!(t.readers, (local_gpu_readers() / 4).max(2));
        }
        // Page cache over a disk: as before.
        for fs in [FileSystem::Ext4, FileSystem::Overlay, FileSystem::Other] {
            let t = Tuning::device_for(&opts, local(fs), Sealed::No, chunk, 32, None, 1);
            assert_eq!((t.read_mode, t.readers, t.buffers), (ReadMode::Auto, local_gpu_readers(), t.readers * 2));
            // The last pieces split down to 8 MiB; encrypted ones stay whole cipher reads.
            assert_eq!(t.taper, Some(8 << 20));
            let sealed = Tuning::device_for(&opts, local(fs), Sealed::OnGpu, chunk, 32, None, 1);
            assert_eq!(sealed.taper, None);
        }
        // Encrypted files on tmpfs: decryption's readers, buffered reads.
        let t = Tuning::device_for(&opts, local(FileSystem::Tmpfs), Sealed::OnHost, chunk, 32, None, 1);
        assert_eq!((t.read_mode, t.readers), (ReadMode::Buffered, decrypting_readers()));
    }

    #[test]
    fn prewarm_takes_the_pool_only_for_remote_sources_with_default_readers() {
        assert_eq!(prewarm_buffers(Some("/m.tensors"), Some(3)), 6);
        assert_eq!(prewarm_buffers(Some("http://h/m.tensors"), Some(2)), 4);
        assert_eq!(prewarm_buffers(Some("s3://b/m.tensors"), None), usize::MAX);
        assert_eq!(prewarm_buffers(None, None), local_gpu_readers() * BUFFERS_PER_READER);
    }
}
