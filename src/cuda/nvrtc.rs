//! NVRTC, the CUDA run-time compiler, loaded at run time from wherever it can be found, to
//! compile our kernels (`kernels/*.cu`) for the GPU at hand.
//!
//! cudarc's `nvrtc` feature is not used: its loader looks only for the library names of the
//! CUDA major version it was built for (`libnvrtc.so.12` with our `cuda-12080`), on the default
//! loader path, panics when none is there and cannot be pointed at a file. PyTorch's CUDA 13
//! wheels ship `libnvrtc.so.13` inside `site-packages/nvidia/cu13/lib`, which is on no loader
//! path. So we open it ourselves ([`library`]), trying in order:
//!
//! 1. the place given with [`set_path`] (`TENSORIZER_RS_NVRTC`, read by `load::options`): a
//!    file, or a folder holding `libnvrtc.so*`;
//! 2. folders given with [`add_search_dirs`] (the Python side passes torch's `nvidia/*/lib`);
//! 3. the folders of CUDA libraries this process has already loaded (`libcudart`, `libcublas`,
//!    `libtorch_cuda`, ... from `/proc/self/maps`), and the `nvidia/{cu13,cuda_nvrtc,cu12}/lib`
//!    folders of the `site-packages` they, or this extension, sit in;
//! 4. `libnvrtc.so.13`, `libnvrtc.so.12`, `libnvrtc.so` on the default loader path;
//! 5. `/usr/local/cuda/lib64`.
//!
//! The NVRTC entry points we use have had the same C signatures since CUDA 11, so either
//! major version serves. Any failure is an `Unsupported` error saying what was tried, never a
//! panic: the caller falls back to decrypting on the host.
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, ErrorKind, Result};

type NvrtcResult = c_int;
type Program = *mut std::ffi::c_void;

/// The NVRTC functions we call, resolved from one loaded library.
pub struct Nvrtc {
    path: String,
    version: (i32, i32),
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult,
    destroy: unsafe extern "C" fn(*mut Program) -> NvrtcResult,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    log: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    num_archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
    /// Keeps the functions above valid.
    _lib: libloading::Library,
    /// `libnvrtc-builtins` from the same folder, loaded first: NVRTC opens it by name when it
    /// compiles, which finds it only on the loader path or already loaded.
    _builtins: Option<libloading::Library>,
}

fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}

fn given_path() -> &'static Mutex<Option<PathBuf>> {
    static PATH: Mutex<Option<PathBuf>> = Mutex::new(None);
    &PATH
}

/// The NVRTC library to try first: a file, or a folder holding `libnvrtc.so*` (the user's
/// setting). Effective until the library has been loaded.
pub fn set_path(path: Option<PathBuf>) {
    *given_path().lock().unwrap_or_else(|p| p.into_inner()) = path;
}

fn search_dirs() -> &'static Mutex<Vec<PathBuf>> {
    static DIRS: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    DIRS.get_or_init(Default::default)
}

/// Extra folders to look for `libnvrtc.so*` in (e.g. `.../site-packages/nvidia/cu13/lib`),
/// tried before the system's. Effective until the library has been loaded.
pub fn add_search_dirs<I: IntoIterator<Item = PathBuf>>(dirs: I) {
    let mut d = search_dirs().lock().unwrap_or_else(|p| p.into_inner());
    for dir in dirs {
        if !d.contains(&dir) {
            d.push(dir);
        }
    }
}

/// `libnvrtc.so*` files in `dir`, newest major first (not the `-builtins` or `.alt` ones).
fn nvrtc_files_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n == "libnvrtc.so" || n.starts_with("libnvrtc.so."))
        })
        .collect();
    found.sort();
    found.reverse();
    found
}

/// Folders next to the CUDA libraries already mapped into this process (torch loads them).
fn loaded_cuda_dirs() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut dirs = Vec::new();
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5).map(Path::new) else { continue };
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let cuda =
            ["libcudart.so", "libcublas.so", "libnvrtc.so", "libnvJitLink.so", "libtorch_cuda.so", "libc10_cuda.so"]
                .iter()
                .any(|p| name.starts_with(p));
        let Some(dir) = path.parent() else { continue };
        // Our own extension: site-packages/tensorizer_rs/_native*.so, beside torch's wheels.
        let ours = name.starts_with("_native") && dir.file_name().is_some_and(|d| d == "tensorizer_rs");
        if !cuda && !ours {
            continue;
        }
        let mut push = |d: PathBuf| {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        };
        if cuda {
            push(dir.to_path_buf());
        }
        // site-packages/torch/lib/libtorch_cuda.so or site-packages/tensorizer_rs/_native.so ->
        // site-packages/nvidia/*/lib (only folders that exist, to keep error messages short)
        let site = if ours { dir.parent() } else { dir.parent().and_then(Path::parent) };
        if let Some(site) = site {
            for sub in ["cu13", "cuda_nvrtc", "cu12"] {
                let d = site.join("nvidia").join(sub).join("lib");
                if d.is_dir() {
                    push(d);
                }
            }
        }
    }
    dirs
}

/// Where NVRTC would be looked for, in order (for error messages and tests).
pub fn candidates() -> Vec<String> {
    let mut c = Vec::new();
    if let Some(p) = given_path().lock().unwrap_or_else(|p| p.into_inner()).clone() {
        if p.is_dir() {
            c.extend(nvrtc_files_in(&p).into_iter().map(|f| f.display().to_string()));
        } else {
            c.push(p.display().to_string());
        }
    }
    let dirs = search_dirs().lock().unwrap_or_else(|p| p.into_inner()).clone();
    for d in dirs.iter().chain(loaded_cuda_dirs().iter()) {
        c.extend(nvrtc_files_in(d).into_iter().map(|f| f.display().to_string()));
    }
    c.extend(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].map(String::from));
    for d in ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"] {
        c.extend(nvrtc_files_in(Path::new(d)).into_iter().map(|f| f.display().to_string()));
    }
    let mut seen = std::collections::HashSet::new();
    c.retain(|x| seen.insert(x.clone()));
    c
}

impl Nvrtc {
    fn open(path: &str) -> std::result::Result<Nvrtc, String> {
        // SAFETY: loading NVRTC runs its initialisers only; the symbols are typed per the
        // documented C API (nvrtc.h), identical in CUDA 11, 12 and 13.
        unsafe {
            let builtins = Path::new(path).parent().and_then(|dir| {
                let mut b: Vec<PathBuf> = std::fs::read_dir(dir)
                    .ok()?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
                    })
                    .collect();
                b.sort();
                b.iter().rev().find_map(|p| libloading::Library::new(p).ok())
            });
            let lib = libloading::Library::new(path).map_err(|e| format!("{path}: {e}"))?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get(concat!($name, "\0").as_bytes()).map_err(|e| format!("{path}: {e}"))?
                };
            }
            let version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult = sym!("nvrtcVersion");
            let (mut major, mut minor) = (0, 0);
            if version(&mut major, &mut minor) != 0 {
                return Err(format!("{path}: nvrtcVersion failed"));
            }
            Ok(Nvrtc {
                path: path.to_string(),
                version: (major, minor),
                create: sym!("nvrtcCreateProgram"),
                compile: sym!("nvrtcCompileProgram"),
                destroy: sym!("nvrtcDestroyProgram"),
                log_size: sym!("nvrtcGetProgramLogSize"),
                log: sym!("nvrtcGetProgramLog"),
                ptx_size: sym!("nvrtcGetPTXSize"),
                ptx: sym!("nvrtcGetPTX"),
                cubin_size: sym!("nvrtcGetCUBINSize"),
                cubin: sym!("nvrtcGetCUBIN"),
                num_archs: sym!("nvrtcGetNumSupportedArchs"),
                archs: sym!("nvrtcGetSupportedArchs"),
                error_string: sym!("nvrtcGetErrorString"),
                _lib: lib,
                _builtins: builtins,
            })
        }
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// NVRTC's CUDA version, e.g. (13, 0).
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// The `sm_XY` architectures this NVRTC can build machine code for, as `10 * X + Y`.
    pub fn supported_archs(&self) -> Vec<i32> {
        let mut n = 0;
        // SAFETY: out-parameter calls with a buffer of the reported size.
        unsafe {
            if (self.num_archs)(&mut n) != 0 || n <= 0 {
                return Vec::new();
            }
            let mut v = vec![0; n as usize];
            if (self.archs)(v.as_mut_ptr()) != 0 {
                return Vec::new();
            }
            v
        }
    }

    fn error(&self, r: NvrtcResult, what: &str) -> Error {
        // SAFETY: returns a pointer to a static string.
        let s = unsafe { (self.error_string)(r) };
        let text = if s.is_null() {
            format!("error {r}")
        } else {
            // SAFETY: a NUL-terminated static string.
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        };
        unsupported(format!("NVRTC {what} failed: {text}"))
    }

    /// Compile `source` for the device of compute capability `cc` (`10 * major + minor`):
    /// machine code (cubin) when this NVRTC knows that architecture, else PTX for the newest
    /// one it knows below it, which the driver compiles when it loads the module.
    pub fn compile(&self, source: &str, name: &str, cc: i32, extra: &[&str]) -> Result<Image> {
        let archs = self.supported_archs();
        let (arch, cubin) = if archs.contains(&cc) {
            (format!("sm_{cc}"), true)
        } else {
            match archs.iter().filter(|&&a| a <= cc).max() {
                Some(a) => (format!("compute_{a}"), false),
                None => {
                    return Err(unsupported(format!(
                        "NVRTC {}.{} ({}) cannot build for compute capability {}.{} (it knows {archs:?})",
                        self.version.0,
                        self.version.1,
                        self.path,
                        cc / 10,
                        cc % 10
                    )))
                }
            }
        };
        let src = CString::new(source).map_err(|_| Error::value("kernel source contains a NUL byte"))?;
        let cname = CString::new(name).map_err(|_| Error::value("kernel name contains a NUL byte"))?;
        let mut opts: Vec<CString> = vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()]
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            .map(|s| CString::new(s).expect("options have no NUL"))
            .collect();
        opts.shrink_to_fit();
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: NVRTC's documented calls; the program is destroyed on every path below.
        unsafe {
            let r = (self.create)(&mut prog, src.as_ptr(), cname.as_ptr(), 0, std::ptr::null(), std::ptr::null());
            if r != 0 {
                return Err(self.error(r, "nvrtcCreateProgram"));
            }
            let out = self.compile_program(prog, &opt_ptrs, cubin);
            (self.destroy)(&mut prog);
            let (code, log) = out?;
            Ok(Image { code, cubin, arch, log, nvrtc: self.version })
        }
    }

    /// # Safety
    /// `prog` is a live program.
    unsafe fn compile_program(&self, prog: Program, opts: &[*const c_char], cubin: bool) -> Result<(Vec<u8>, String)> {
        unsafe {
            let r = (self.compile)(prog, opts.len() as c_int, opts.as_ptr());
            let mut n = 0usize;
            let mut log = String::new();
            if (self.log_size)(prog, &mut n) == 0 && n > 1 {
                let mut buf = vec![0u8; n];
                if (self.log)(prog, buf.as_mut_ptr() as *mut c_char) == 0 {
                    log = String::from_utf8_lossy(&buf[..n - 1]).into_owned();
                }
            }
            if r != 0 {
                let e = self.error(r, "compilation");
                return Err(Error::new(e.kind, format!("{}:\n{log}", e.message)));
            }
            let (size, get) = if cubin { (self.cubin_size, self.cubin) } else { (self.ptx_size, self.ptx) };
            let mut n = 0usize;
            let r = size(prog, &mut n);
            if r != 0 {
                return Err(self.error(r, "getting the compiled code's size"));
            }
            let mut code = vec![0u8; n];
            let r = get(prog, code.as_mut_ptr() as *mut c_char);
            if r != 0 {
                return Err(self.error(r, "getting the compiled code"));
            }
            Ok((code, log))
        }
    }
}

/// Compiled kernels, ready for `cuModuleLoadData` (PTX is NUL-terminated, as it requires).
#[derive(Debug, Clone)]
pub struct Image {
    pub code: Vec<u8>,
    /// Machine code (`sm_XY`) rather than PTX (`compute_XY`).
    pub cubin: bool,
    pub arch: String,
    /// NVRTC's messages (warnings), usually empty.
    pub log: String,
    /// The NVRTC version that built it.
    pub nvrtc: (i32, i32),
}

/// The NVRTC library, loaded on first use (see the module docs for where it is looked for).
/// A failure is not remembered: a later call (after [`add_search_dirs`]) tries again.
pub fn library() -> Result<&'static Nvrtc> {
    static LIB: Mutex<Option<&'static Nvrtc>> = Mutex::new(None);
    let mut slot = LIB.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = *slot {
        return Ok(l);
    }
    let tried = candidates();
    let mut errors = Vec::new();
    for c in &tried {
        match Nvrtc::open(c) {
            Ok(l) => {
                let l: &'static Nvrtc = Box::leak(Box::new(l));
                *slot = Some(l);
                return Ok(l);
            }
            // Files that exist but failed to open say more than the names that were not found.
            Err(e) if Path::new(c).exists() => errors.push(e),
            Err(_) => {}
        }
    }
    let found = errors;
    Err(unsupported(format!(
        "the CUDA run-time compiler (libnvrtc) was not found (tried {}{}; set TENSORIZER_RS_NVRTC to its path)",
        tried.join(", "),
        if found.is_empty() { String::new() } else { format!("; {}", found.join("; ")) }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nvrtc_files_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libnvrtc.alt.so.13", "x.so"] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let found: Vec<String> =
            nvrtc_files_in(dir.path()).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(found, ["libnvrtc.so.13", "libnvrtc.so.12"]);
    }

    #[test]
    fn a_missing_library_is_an_unsupported_error_naming_what_was_tried() {
        let bad = Nvrtc::open("/nonexistent/libnvrtc.so.13").err().unwrap();
        assert!(bad.contains("/nonexistent/libnvrtc.so.13"), "{bad}");
        // A file that is not a library: named with the loader's complaint.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libnvrtc.so.13");
        std::fs::write(&fake, b"not a library").unwrap();
        let bad = Nvrtc::open(fake.to_str().unwrap()).err().unwrap();
        assert!(bad.starts_with(fake.to_str().unwrap()), "{bad}");
    }
}
