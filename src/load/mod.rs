//! The load pipeline: open a file and parse its index (`file`), turn the wanted tensors into
//! a list of byte ranges (`plan`), then read them in parallel, check, decrypt and place them
//! (`exec`).
pub mod device;
pub mod exec;
pub mod file;
pub mod plan;

pub use exec::{load_to_host, LoadOptions, LoadedTensor};
pub use file::TensorFile;
