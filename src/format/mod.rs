//! The `.tensors` byte layout: bytes in, structs out, and back. No I/O happens here.
//! See `docs/format.md` and CoreWeave's spec for the field-by-field description.
pub mod crypt_info;
pub mod cursor;
pub mod dtype;
pub mod hash;
pub mod header;
pub mod index;
pub mod names;
pub mod record;

pub use dtype::DType;
pub use header::FileHeader;
pub use index::IndexEntry;
pub use names::{PathComponent, TensorPath};
pub use record::TensorHeader;

/// Tensor kinds stored in the index and the record header.
pub const TYPE_PARAM: u8 = 0;
pub const TYPE_BUFFER: u8 = 1;
pub const TYPE_STATE_DICT: u8 = 2;
