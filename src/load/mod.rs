//! The load pipeline: open a file and parse its index (`file`), turn the wanted tensors into
//! a list of reads (`plan`), then read them in parallel into buffers, verify, decrypt and place
//! them (`pipeline`), into host memory (`host`) or a GPU through pinned staging (`device`).
//! What a load runs with is decided once, in `options`.
pub mod device;
pub mod file;
pub mod host;
pub mod numa;
pub mod options;
mod pipeline;
pub mod plan;

pub use file::TensorFile;
pub use host::{load_to_host, LoadedTensor};
pub use options::LoadOptions;
pub use pipeline::TICK;
