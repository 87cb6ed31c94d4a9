//! The GPU decryption kernels compile with NVRTC, without a GPU: for sm_90 (H100/H200) as
//! machine code, and for an architecture newer than NVRTC knows as PTX of the newest it does.
//!
//! NVRTC comes from the venv's `nvidia-cuda-nvrtc` wheel (scripts/setup-env.sh installs it;
//! torch's CUDA wheels bring the same). This test fails when it cannot find or run NVRTC; it
//! never skips.
use std::path::PathBuf;
use std::process::Command;

use tensorizer_rs::cuda::{nvrtc, secretbox};

/// `site-packages/nvidia/*/lib` of the project's Python (`PYO3_PYTHON`, or `$VENV/bin/python`).
fn venv_nvidia_dirs() -> Vec<PathBuf> {
    let python = std::env::var("PYO3_PYTHON")
        .ok()
        .or_else(|| std::env::var("VENV").ok().map(|v| format!("{v}/bin/python")))
        .unwrap_or_else(|| "python3".into());
    let out = Command::new(&python)
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        .output()
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let site = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    ["cu13", "cuda_nvrtc", "cu12"].iter().map(|s| site.join("nvidia").join(s).join("lib")).collect()
}

fn nvrtc() -> &'static nvrtc::Nvrtc {
    nvrtc::add_search_dirs(venv_nvidia_dirs());
    nvrtc::library().unwrap_or_else(|e| panic!("{e}\n(install the nvidia-cuda-nvrtc wheel, e.g. scripts/setup-env.sh)"))
}

#[test]
fn kernels_compile_to_sm_90_machine_code() {
    let lib = nvrtc();
    eprintln!("NVRTC {:?} from {}", lib.version(), lib.path());
    assert!(lib.supported_archs().contains(&90), "{:?}", lib.supported_archs());
    let image = secretbox::compiled(90).unwrap_or_else(|e| panic!("{e}"));
    assert!(image.cubin && image.arch == "sm_90", "{image:?}");
    assert!(image.log.is_empty(), "NVRTC warns:\n{}", image.log);
    // An ELF holding both kernels.
    assert_eq!(&image.code[..4], b"\x7fELF");
    for name in [&b"tz_secretbox_verify"[..], b"tz_secretbox_decrypt"] {
        assert!(image.code.windows(name.len()).any(|w| w == name), "{}", String::from_utf8_lossy(name));
    }
    // Cached: the same image again.
    assert!(std::sync::Arc::ptr_eq(&image, &secretbox::compiled(90).unwrap()));
}

#[test]
fn an_unknown_architecture_gets_ptx_and_bad_source_a_clear_error() {
    let lib = nvrtc();
    let newest = *lib.supported_archs().iter().max().unwrap();
    let image = lib.compile(secretbox::SOURCE, "secretbox.cu", newest + 1, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(!image.cubin && image.arch == format!("compute_{newest}"), "{image:?}");
    let ptx = String::from_utf8_lossy(&image.code);
    assert!(ptx.contains(".entry tz_secretbox_verify") && ptx.contains(".entry tz_secretbox_decrypt"));
    assert_eq!(image.code.last(), Some(&0), "PTX is NUL-terminated for cuModuleLoadData");
    // Kernel arguments stay within the 4 KiB every architecture accepts.
    assert!(ptx.contains(".param .align 8 .b8 tz_secretbox_verify_param_0[2096]"), "{ptx:.2000}");

    let err = lib.compile("this is not CUDA", "bad.cu", 90, &[]).unwrap_err();
    assert!(err.message.contains("NVRTC compilation failed") && err.message.contains("bad.cu"), "{err}");
    // Older than anything NVRTC builds for.
    let err = lib.compile(secretbox::SOURCE, "secretbox.cu", 10, &[]).unwrap_err();
    assert!(err.message.contains("cannot build for compute capability 1.0"), "{err}");
}
