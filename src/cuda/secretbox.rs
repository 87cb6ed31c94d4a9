//! Opening XSalsa20-Poly1305 boxes (libsodium `crypto_secretbox_open_detached`, spec §9) in
//! place in device memory: the kernels in `kernels/secretbox.cu`, compiled once per process
//! with NVRTC ([`super::nvrtc`]) and loaded once per device.
//!
//! Use: [`SecretboxKernels::get`] for the device (an error when they cannot run here: no
//! NVRTC, an architecture it cannot build for; fall back to the host path), a
//! [`Verdicts`] buffer with one slot per chunk of the load, then for each piece that has
//! landed in device memory [`SecretboxKernels::open_in_place`] on the stream that copied it
//! (the kernels queue behind the copy). After synchronising, [`Verdicts::read`]: a tensor may
//! be handed out only when every one of its chunks' slots reads [`Verdict::Authentic`].
//! Forged chunks are left as ciphertext; a slot never reached reads [`Verdict::Pending`].
//!
//! Chunk lists travel inside the kernel argument (at most [`MAX_CHUNKS_PER_LAUNCH`] per launch,
//! 2 KiB, copied by the driver when the launch is queued): no descriptor buffer to allocate,
//! fill, copy and keep alive until the kernel has run. The key travels the same way and is
//! zeroed on the host right after the launch calls.
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys;
use zeroize::Zeroize;

use super::{driver, nvrtc, result, Context, StreamHandle};
use crate::crypto::{Piece, KEY_LEN, MAC_LEN, NONCE_LEN};
use crate::error::{Error, ErrorKind, Result};

/// The kernels' source (CUDA C++; also compiled on the host by the tests).
pub const SOURCE: &str = include_str!("kernels/secretbox.cu");
/// Chunks per launch (the kernel argument's fixed array).
pub const MAX_CHUNKS_PER_LAUNCH: usize = 32;
const VERIFY_THREADS: u32 = 256;
const VERIFY_BLOCKS_PER_THREAD: u64 = 16;
const DECRYPT_THREADS: u32 = 256;
const DECRYPT_BLOCKS_PER_THREAD: u64 = 4;
/// Grid size cap; the kernels loop over tiles beyond it.
const MAX_GRID: u64 = 1 << 16;

/// One sealed chunk in device memory (`tz_chunk` in the kernel source; 64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceChunk {
    /// Device address of its first byte.
    pub data: u64,
    pub len: u64,
    pub nonce: [u8; NONCE_LEN],
    pub mac: [u8; MAC_LEN],
    /// Its slot in the [`Verdicts`] buffer.
    pub slot: u32,
    reserved: u32,
}

impl DeviceChunk {
    pub fn new(data: u64, len: u64, nonce: [u8; NONCE_LEN], mac: [u8; MAC_LEN], slot: u32) -> Self {
        DeviceChunk { data, len, nonce, mac, slot, reserved: 0 }
    }

    /// The chunks of a tensor whose data starts at device address `base`, from its decryption
    /// plan's pieces (`crypto::DecryptPlan::pieces`), with slots `first_slot..`.
    pub fn from_pieces(base: u64, pieces: &[Piece], first_slot: u32) -> Vec<Self> {
        pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                DeviceChunk::new(
                    base + p.range.start as u64,
                    p.range.len() as u64,
                    p.nonce,
                    p.mac,
                    first_slot + i as u32,
                )
            })
            .collect()
    }
}

/// The kernel argument (`tz_open_args`; 2096 bytes). Zeroes its key when dropped.
#[repr(C)]
pub struct OpenArgs {
    key: [u8; KEY_LEN],
    slots: u64,
    nslots: u32,
    nchunks: u32,
    chunks: [DeviceChunk; MAX_CHUNKS_PER_LAUNCH],
}

const _: () = assert!(std::mem::size_of::<DeviceChunk>() == 64);
const _: () = assert!(std::mem::size_of::<OpenArgs>() == 2096);
const _: () = assert!(std::mem::size_of::<Slot>() == 48);

impl Drop for OpenArgs {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// One launch's argument and grid sizes.
pub struct Launch {
    pub args: Box<OpenArgs>,
    pub verify_grid: u32,
    pub decrypt_grid: u32,
}

fn verify_tiles(len: u64) -> u64 {
    len.div_ceil(16).div_ceil(VERIFY_THREADS as u64 * VERIFY_BLOCKS_PER_THREAD).max(1)
}

fn decrypt_tiles(len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    (len + 32).div_ceil(64).div_ceil(DECRYPT_THREADS as u64 * DECRYPT_BLOCKS_PER_THREAD)
}

/// Split `chunks` into launches of at most [`MAX_CHUNKS_PER_LAUNCH`], each carrying the key and
/// the status buffer at `slots` (`nslots` slots). Public for the host emulation test.
pub fn pack_launches(key: &[u8; KEY_LEN], chunks: &[DeviceChunk], slots: u64, nslots: u32) -> Vec<Launch> {
    chunks
        .chunks(MAX_CHUNKS_PER_LAUNCH)
        .map(|group| {
            let mut args = Box::new(OpenArgs {
                key: *key,
                slots,
                nslots,
                nchunks: group.len() as u32,
                chunks: [DeviceChunk::new(0, 0, [0; NONCE_LEN], [0; MAC_LEN], u32::MAX); MAX_CHUNKS_PER_LAUNCH],
            });
            args.chunks[..group.len()].copy_from_slice(group);
            let v: u64 = group.iter().map(|c| verify_tiles(c.len)).sum();
            let d: u64 = group.iter().map(|c| decrypt_tiles(c.len)).sum();
            Launch { args, verify_grid: v.clamp(1, MAX_GRID) as u32, decrypt_grid: d.clamp(1, MAX_GRID) as u32 }
        })
        .collect()
}

/// A chunk's status slot (`tz_slot`): the verdict and the verify kernel's scratch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Slot {
    pub acc: [u64; 5],
    pub arrived: u32,
    pub verdict: u32,
}

/// What the kernels decided about one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not (yet) verified: no launch reached this slot, or it has not run yet.
    Pending,
    /// The MAC matched; the chunk was decrypted in place.
    Authentic,
    /// The MAC did not match (wrong key or altered data); the chunk is still ciphertext.
    Forged,
}

impl Verdict {
    pub fn from_raw(v: u32) -> Self {
        match v {
            1 => Verdict::Authentic,
            2 => Verdict::Forged,
            _ => Verdict::Pending,
        }
    }
}

/// Status slots in device memory, one per chunk, zeroed (pending) when made. Each slot may be
/// launched into once ([`SecretboxKernels::open_in_place`] refuses a second use), so a verdict
/// read back is always the one of the launch that claimed it.
pub struct Verdicts {
    ctx: Context,
    dptr: sys::CUdeviceptr,
    n: usize,
    used: Mutex<Vec<bool>>,
}

// The device allocation is process-wide; access is through the driver.
unsafe impl Send for Verdicts {}
unsafe impl Sync for Verdicts {}

impl Verdicts {
    /// `n` pending slots on `ctx`'s device.
    pub fn new(ctx: &Context, n: usize) -> Result<Self> {
        let n = n.max(1);
        let bytes = n * std::mem::size_of::<Slot>();
        let _bound = ctx.bind_scoped()?;
        let dptr = result::mem_alloc(bytes)?;
        // SAFETY: the allocation just made, of `bytes` bytes.
        if let Err(e) = unsafe { result::memset_zero_sync(dptr, bytes) } {
            // SAFETY: ours, never handed out.
            unsafe { result::mem_free(dptr) };
            return Err(e);
        }
        Ok(Verdicts { ctx: *ctx, dptr, n, used: Mutex::new(vec![false; n]) })
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Mark `slots` used; an error if one is out of range or was used before.
    fn claim(&self, chunks: &[DeviceChunk]) -> Result<()> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        for c in chunks {
            let s = c.slot as usize;
            if s >= self.n {
                return Err(Error::value(format!("verdict slot {s} out of range ({} slots)", self.n)));
            }
            if used[s] {
                return Err(Error::value(format!("verdict slot {s} was already used")));
            }
        }
        for c in chunks {
            used[c.slot as usize] = true;
        }
        Ok(())
    }

    /// The verdicts of all slots, after waiting for `stream` (where the kernels were queued;
    /// synchronise any other stream that launched into these slots first).
    pub fn read(&self, stream: StreamHandle) -> Result<Vec<Verdict>> {
        let _bound = self.ctx.bind_scoped()?;
        stream.synchronize()?;
        let mut slots = vec![Slot::default(); self.n];
        // SAFETY: our allocation of exactly this many slots (plain integers); the kernels
        // writing them are done.
        unsafe { result::copy_dtoh(&mut slots, self.dptr)? };
        Ok(slots.iter().map(|s| Verdict::from_raw(s.verdict)).collect())
    }
}

impl Drop for Verdicts {
    fn drop(&mut self) {
        if let Ok(_bound) = self.ctx.bind_scoped() {
            // SAFETY: our allocation; cuMemFree waits for work that uses it.
            unsafe { result::mem_free(self.dptr) };
        }
    }
}

/// The compiled kernels, per compute capability, for the life of the process.
pub fn compiled(cc: i32) -> Result<Arc<nvrtc::Image>> {
    static IMAGES: OnceLock<Mutex<HashMap<i32, Arc<nvrtc::Image>>>> = OnceLock::new();
    let mut map = IMAGES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = map.get(&cc) {
        return Ok(i.clone());
    }
    let image = Arc::new(nvrtc::library()?.compile(SOURCE, "secretbox.cu", cc, &[])?);
    map.insert(cc, image.clone());
    Ok(image)
}

fn cache_dir() -> &'static Mutex<Option<PathBuf>> {
    static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
    &DIR
}

/// Where compiled kernels are kept between processes (`load::options` passes
/// `$XDG_CACHE_HOME/tensorizer_rs/kernels` or `~/.cache/...`); `None`: compile in every process.
/// NVRTC takes about half a second, more than a warm load of many GB; reading the cubin back
/// takes a millisecond.
pub fn set_cache_dir(dir: Option<PathBuf>) {
    *cache_dir().lock().unwrap_or_else(|p| p.into_inner()) = dir;
}

/// The cache file of the kernels for compute capability `cc`: named by the source's hash, so
/// a changed source never loads an old build.
fn cache_file(dir: &Path, cc: i32) -> PathBuf {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(SOURCE.as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("secretbox-{hex}-sm_{cc}.cubin"))
}

/// A cached cubin, if there is one we may trust: a regular file of ours that only we can write
/// (the kernels see the keys), in an ELF wrapper.
fn read_cached(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    let ours = |m: &std::fs::Metadata| {
        // SAFETY: no arguments, no failure.
        m.uid() == unsafe { libc::geteuid() } && m.mode() & 0o022 == 0
    };
    let dir = std::fs::metadata(path.parent()?).ok()?;
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() || !ours(&meta) || !ours(&dir) {
        return None;
    }
    let code = std::fs::read(path).ok()?;
    code.starts_with(b"\x7fELF").then_some(code)
}

/// Keep a cubin for later processes: written aside and renamed into place, so a reader never
/// sees part of one. Failures only cost the next process a compile.
fn write_cached(path: &Path, code: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let Some(dir) = path.parent() else { return };
    if std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(code))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// [`compiled`], and kept in the cache (machine code only).
fn compiled_and_cached(cc: i32) -> Result<Arc<nvrtc::Image>> {
    let image = compiled(cc)?;
    let dir = cache_dir().lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let (Some(dir), true) = (dir, image.cubin) {
        write_cached(&cache_file(&dir, cc), &image.code);
    }
    Ok(image)
}

/// The kernels' image for compute capability `cc` and where it came from: the cache where it
/// holds them, else NVRTC (then cached, machine code only).
fn image(cc: i32) -> Result<(Arc<nvrtc::Image>, String)> {
    let dir = cache_dir().lock().unwrap_or_else(|p| p.into_inner()).clone();
    let file = dir.map(|d| cache_file(&d, cc));
    if let Some(code) = file.as_deref().and_then(read_cached) {
        let from = format!("sm_{cc} from the kernel cache ({})", file.as_deref().unwrap_or(Path::new("")).display());
        // NVRTC version (0, 0): read from the cache.
        let image = nvrtc::Image { code, cubin: true, arch: format!("sm_{cc}"), log: String::new(), nvrtc: (0, 0) };
        return Ok((Arc::new(image), from));
    }
    let image = compiled_and_cached(cc)?;
    let from = format!(
        "{} by NVRTC {}.{} ({})",
        image.arch,
        image.nvrtc.0,
        image.nvrtc.1,
        nvrtc::library().map(|l| l.path().to_string()).unwrap_or_default()
    );
    Ok((image, from))
}

/// The kernels loaded into one device's primary context.
pub struct SecretboxKernels {
    ctx: Context,
    verify: sys::CUfunction,
    decrypt: sys::CUfunction,
    /// What built them, e.g. "sm_90 by NVRTC 13.0 (/path/libnvrtc.so.13)".
    pub description: String,
}

// Module and function handles are valid in their context from any thread.
unsafe impl Send for SecretboxKernels {}
unsafe impl Sync for SecretboxKernels {}

impl SecretboxKernels {
    /// The kernels for device `ordinal`: compiled on first use in the process, loaded on first
    /// use on the device. Any error means they cannot run here: use the host path and log the
    /// error's message (usually `Unsupported`: no driver, no NVRTC, an architecture NVRTC cannot
    /// build for, a module the driver refuses). Failures are not cached: a later call tries
    /// again (a few milliseconds of probing), so call it once per load.
    pub fn get(ordinal: i32) -> Result<Arc<SecretboxKernels>> {
        static LOADED: OnceLock<Mutex<HashMap<i32, Arc<SecretboxKernels>>>> = OnceLock::new();
        driver()?;
        let ctx = Context::primary(ordinal)?;
        let mut map = LOADED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = map.get(&ordinal) {
            return Ok(k.clone());
        }
        let _bound = ctx.bind_scoped()?;
        let dev = result::device(ordinal)?;
        use sys::CUdevice_attribute::*;
        let cc = 10 * result::device_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?
            + result::device_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let (image, description) = image(cc)?;
        // SAFETY: NVRTC's cubin, or its PTX (NUL-terminated), or a cubin it made before; the
        // module stays loaded for the process.
        let module = match unsafe { result::module_load_data(&image.code) } {
            Ok(m) => Ok(m),
            // A cached cubin the driver refuses (a driver change): build it again.
            Err(_) if image.nvrtc == (0, 0) => {
                let fresh = compiled_and_cached(cc)?;
                // SAFETY: as above.
                unsafe { result::module_load_data(&fresh.code) }
            }
            Err(e) => Err(e),
        }
        .map_err(|e| {
            Error::new(ErrorKind::Unsupported, format!("the decryption kernels ({}) do not load: {e}", image.arch))
        })?;
        // SAFETY: a module loaded above, never unloaded.
        let func = |name: &std::ffi::CStr| unsafe { result::module_function(module, name) };
        let kernels = Arc::new(SecretboxKernels {
            ctx,
            verify: func(c"tz_secretbox_verify")?,
            decrypt: func(c"tz_secretbox_decrypt")?,
            description,
        });
        map.insert(ordinal, kernels.clone());
        Ok(kernels)
    }

    /// Queue, on `stream`, the authentication and in-place decryption of `chunks` (any
    /// number; at most [`MAX_CHUNKS_PER_LAUNCH`] per pair of kernel launches), each chunk's
    /// verdict into its slot of `verdicts`. Returns once queued; read the verdicts after the
    /// stream has run them ([`Verdicts::read`]).
    ///
    /// # Safety
    /// Every chunk's `data .. data + len` must be device memory of this device, holding the
    /// ciphertext by the time `stream` reaches the kernels, and not touched by other work
    /// until they have run.
    pub unsafe fn open_in_place(
        &self,
        key: &[u8; KEY_LEN],
        chunks: &[DeviceChunk],
        verdicts: &Verdicts,
        stream: StreamHandle,
    ) -> Result<()> {
        if verdicts.ctx.ordinal != self.ctx.ordinal {
            return Err(Error::value("the verdict buffer belongs to another device"));
        }
        verdicts.claim(chunks)?;
        let _bound = self.ctx.bind_scoped()?;
        for mut launch in pack_launches(key, chunks, verdicts.dptr, verdicts.n as u32) {
            let mut params = [&mut *launch.args as *mut OpenArgs as *mut c_void];
            for (f, grid, threads, what) in [
                (self.verify, launch.verify_grid, VERIFY_THREADS, "cuLaunchKernel (verify)"),
                (self.decrypt, launch.decrypt_grid, DECRYPT_THREADS, "cuLaunchKernel (decrypt)"),
            ] {
                // SAFETY: the kernel takes one `tz_open_args` by value, which the driver copies
                // before returning; the caller vouches for the memory it names.
                unsafe { result::launch_kernel(f, grid, threads, stream.0, &mut params, what)? };
            }
        }
        super::counters::add(super::counters::Counter::DecryptedOnDevice, chunks.iter().map(|c| c.len).sum());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_cache_keeps_only_trusted_cubins() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tensorizer_rs").join("kernels");
        let f = cache_file(&dir, 90);
        assert!(f.file_name().unwrap().to_str().unwrap().ends_with("-sm_90.cubin"));
        assert_ne!(f, cache_file(&dir, 80));
        assert_eq!(read_cached(&f), None);
        let cubin = b"\x7fELF and the rest".to_vec();
        write_cached(&f, &cubin);
        assert_eq!(read_cached(&f), Some(cubin.clone()));
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        // Writable by others (the file or its folder), or not a cubin: not loaded.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o622)).unwrap();
        assert_eq!(read_cached(&f), None);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(read_cached(&f), None);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(&f, b"PTX text").unwrap();
        assert_eq!(read_cached(&f), None);
        // A link to a cubin elsewhere is not followed.
        let other = root.path().join("x.cubin");
        std::fs::write(&other, &cubin).unwrap();
        std::fs::remove_file(&f).unwrap();
        std::os::unix::fs::symlink(&other, &f).unwrap();
        assert_eq!(read_cached(&f), None);
    }

    #[test]
    fn launches_hold_at_most_32_chunks_and_cover_every_tile() {
        let chunks: Vec<DeviceChunk> = (0..70)
            .map(|i| DeviceChunk::new(0x1000 * i, if i == 69 { 5 } else { 2 << 20 }, [i as u8; 24], [0; 16], i as u32))
            .collect();
        let l = pack_launches(&[7; 32], &chunks, 0xdead, 70);
        assert_eq!(l.iter().map(|l| l.args.nchunks).collect::<Vec<_>>(), [32, 32, 6]);
        // 2 MiB = 131072 Poly1305 blocks = 32 verify tiles of 4096; (2 MiB + 32) / 64 rounded up
        // = 32769 keystream blocks = 33 decrypt tiles of 1024.
        assert_eq!((l[0].verify_grid, l[0].decrypt_grid), (32 * 32, 32 * 33));
        assert_eq!((l[2].verify_grid, l[2].decrypt_grid), (5 * 32 + 1, 5 * 33 + 1));
        assert_eq!(l[2].args.chunks[5], chunks[69]);
        assert_eq!(l[2].args.chunks[6].slot, u32::MAX);
        assert_eq!((l[1].args.slots, l[1].args.nslots, l[1].args.key), (0xdead, 70, [7; 32]));
        assert_eq!((verify_tiles(0), decrypt_tiles(0)), (1, 0));
    }
}
