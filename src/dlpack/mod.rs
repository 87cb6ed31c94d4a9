//! Handing tensors to Python without a copy: a DLPack `DLManagedTensor` in a `"dltensor"`
//! capsule, whose deleter frees the Rust-owned buffer once the consumer (torch, numpy) is done.
use std::ffi::c_void;

use dlpack_rs::ffi::{DLDataType, DLDevice, DLDeviceType, DLManagedTensor, DLTensor};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::buffer::HostBuffer;
use crate::format::dtype::{DType, Kind};

/// DLPack (type code, bits) of the container handed to Python: opaque types travel as signed
/// ints of their width and are `.view()`ed to the torch dtype on the Python side.
pub fn dtype_code(d: &DType) -> (u8, u8) {
    use dlpack_rs::ffi::DLDataTypeCode as C;
    let bits = (d.itemsize * 8) as u8;
    let code = match d.kind {
        Kind::Bool => C::kDLBool,
        Kind::Int | Kind::Void => C::kDLInt,
        Kind::UInt => C::kDLUInt,
        Kind::Float => C::kDLFloat,
        Kind::Complex => C::kDLComplex,
    };
    (code as u8, bits)
}

struct ManagerCtx {
    _buf: HostBuffer,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

unsafe extern "C" fn deleter(managed: *mut DLManagedTensor) {
    if managed.is_null() {
        return;
    }
    // SAFETY: both boxes were leaked in `into_capsule` and are reclaimed exactly once here.
    unsafe {
        let m = Box::from_raw(managed);
        drop(Box::from_raw(m.manager_ctx as *mut ManagerCtx));
    }
}

const NAME: &std::ffi::CStr = c"dltensor";

unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // A consumer renames the capsule to "used_dltensor" and owns the tensor from then on;
    // only an unconsumed capsule still holds our memory.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, NAME.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(capsule, NAME.as_ptr()) as *mut DLManagedTensor;
            if let Some(d) = (*m).deleter {
                d(m);
            }
        }
    }
}

/// Wrap `buf` (C-contiguous, native byte order) as a CPU DLPack capsule.
pub fn into_capsule(py: Python<'_>, buf: HostBuffer, shape: &[u64], code: u8, bits: u8) -> PyResult<Py<PyAny>> {
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    let data = buf.as_ptr() as *mut c_void;
    let mut ctx = Box::new(ManagerCtx { _buf: buf, shape, strides });
    let dl_tensor = DLTensor {
        data,
        device: DLDevice { device_type: DLDeviceType::kDLCPU, device_id: 0 },
        ndim: ctx.shape.len() as i32,
        dtype: DLDataType { code, bits, lanes: 1 },
        shape: ctx.shape.as_mut_ptr(),
        strides: ctx.strides.as_mut_ptr(),
        byte_offset: 0,
    };
    let managed = Box::into_raw(Box::new(DLManagedTensor {
        dl_tensor,
        manager_ctx: Box::into_raw(ctx) as *mut c_void,
        deleter: Some(deleter),
    }));
    // SAFETY: standard capsule creation; on failure we free what we leaked.
    unsafe {
        let cap = ffi::PyCapsule_New(managed as *mut c_void, NAME.as_ptr(), Some(capsule_destructor));
        if cap.is_null() {
            deleter(managed);
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, cap).unbind())
    }
}

/// A loaded host tensor that any DLPack consumer can import once (`torch.from_dlpack`,
/// `numpy.from_dlpack`).
#[pyclass(module = "tensorizer_rs._native", name = "HostTensor")]
pub struct HostTensor {
    buf: Option<HostBuffer>,
    shape: Vec<u64>,
    code: u8,
    bits: u8,
}

impl HostTensor {
    pub fn new(buf: HostBuffer, shape: Vec<u64>, code: u8, bits: u8) -> Self {
        HostTensor { buf: Some(buf), shape, code, bits }
    }
}

#[pymethods]
impl HostTensor {
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &mut self,
        py: Python<'_>,
        stream: Option<Py<PyAny>>,
        max_version: Option<Py<PyAny>>,
        dl_device: Option<Py<PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = (stream, max_version, dl_device, copy);
        let buf =
            self.buf.take().ok_or_else(|| pyo3::exceptions::PyBufferError::new_err("tensor was already exported"))?;
        into_capsule(py, buf, &self.shape, self.code, self.bits)
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (DLDeviceType::kDLCPU as i32, 0)
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }
}
