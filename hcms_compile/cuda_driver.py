"""The three CUDA driver calls the copy-engine exchange needs, through ctypes (PyTorch exposes none
of them in the form needed).

- `write(stream, address, value)`: `cuStreamWriteValue32`, a 32-bit store executed by the GPU's
  front end in stream order, after every earlier operation of the stream (memory barrier).
- `wait(stream, address, value)`: `cuStreamWaitValue32` (equal): the stream waits until the word holds
  `value`. No SM is involved: a running persistent kernel does not hold it back.
- `copy(stream, dst, src)`: `cuMemcpyBatchAsync` (CUDA 12.8+) with
  `CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE`, which asks the driver for a copy engine. Measured on
  the H200 (torch 2.11, CUDA 13 driver): a copy within one GPU still runs on the SMs either way (at
  HBM speed; one that becomes ready under a running cuDNN attention kernel starts in its tail, like
  an NCCL kernel); the flag is for copies that cross a link (peer-to-peer over NVLink, to and from
  host), which copy engines carry. `cuMemcpyBatchAsync` cannot be captured in a CUDA graph, so under
  capture `copy` issues `Tensor.copy_` (cudaMemcpyAsync), as it does where the driver lacks the call;
  `copy_method()` says which the process uses outside capture.

Functions are looked up with `cuGetProcAddress` at the ABI version their ctypes signature was
written for, so a newer driver hands out the matching entry point.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

_WAIT_VALUE_EQ = 0x1
_WRITE_VALUE_DEFAULT = 0x0
_SRC_ACCESS_ORDER_STREAM = 0x1
_PREFER_OVERLAP_WITH_COMPUTE = 0x1
_CUDA_12_0, _CUDA_12_8 = 12000, 12080


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [("src_access_order", ctypes.c_int), ("src_location_hint", _Location),
                ("dst_location_hint", _Location), ("flags", ctypes.c_uint)]


# one set of attributes for every copy: source read in stream order, no location hints, copy engines preferred
_ATTRIBUTES = _MemcpyAttributes(_SRC_ACCESS_ORDER_STREAM, _Location(0, 0), _Location(0, 0),
                                _PREFER_OVERLAP_WITH_COMPUTE)
_FIRST = (ctypes.c_size_t * 1)(0)  # every copy of a call uses attributes 0
_VALUE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)
# the CUDA 12.8 signature (13.0 dropped the failure index; its entry point is asked for at 12.8)
_BATCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                          ctypes.POINTER(ctypes.c_size_t), ctypes.c_size_t, ctypes.POINTER(_MemcpyAttributes),
                          ctypes.POINTER(ctypes.c_size_t), ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                          ctypes.c_void_p)


@dataclass(frozen=True)
class _Driver:
    write: object
    wait: object
    batch: object | None  # None: no cuMemcpyBatchAsync, copies fall back to Tensor.copy_


_driver: _Driver | str | None = None


def _lookup(lib: ctypes.CDLL, name: str, version: int, prototype: type) -> object | None:
    get = getattr(lib, "cuGetProcAddress_v2", None)
    if get is not None:
        get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64,
                        ctypes.POINTER(ctypes.c_int)]
        get.restype = ctypes.c_int
        pointer, status = ctypes.c_void_p(), ctypes.c_int()
        if get(name.encode(), ctypes.byref(pointer), version, 0, ctypes.byref(status)) == 0 and pointer.value:
            return prototype(pointer.value)
    symbol = getattr(lib, name, None)
    return None if symbol is None else prototype(ctypes.cast(symbol, ctypes.c_void_p).value)


def load() -> _Driver | str:
    """The driver's entry points, or why they cannot be had."""
    global _driver
    if _driver is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as err:
            _driver = f"the CUDA driver library cannot be loaded ({err})"
            return _driver
        write = _lookup(lib, "cuStreamWriteValue32", _CUDA_12_0, _VALUE)
        wait = _lookup(lib, "cuStreamWaitValue32", _CUDA_12_0, _VALUE)
        if write is None or wait is None:
            _driver = "the CUDA driver has no stream memory operations (cuStreamWriteValue32, cuStreamWaitValue32)"
            return _driver
        _driver = _Driver(write, wait, _lookup(lib, "cuMemcpyBatchAsync", _CUDA_12_8, _BATCH))
    return _driver


def unavailable() -> str | None:
    driver = load()
    return driver if isinstance(driver, str) else None


def copy_method() -> str:
    driver = load()
    if isinstance(driver, str) or driver.batch is None:
        return "cudaMemcpyAsync (Tensor.copy_: no cuMemcpyBatchAsync in this driver)"
    return "cuMemcpyBatchAsync, prefer overlap with compute (copy engines)"


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"hcms copy-engine exchange: {what} failed with CUDA driver error {result}")


def write(stream: torch.cuda.Stream, address: int, value: int) -> None:
    _check(load().write(stream.cuda_stream, address, value, _WRITE_VALUE_DEFAULT), "cuStreamWriteValue32")


def wait(stream: torch.cuda.Stream, address: int, value: int) -> None:
    _check(load().wait(stream.cuda_stream, address, value, _WAIT_VALUE_EQ), "cuStreamWaitValue32")


def copy(stream: torch.cuda.Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` for contiguous tensors of equal bytes, in `stream`'s order, on a copy engine."""
    batch = load().batch
    with torch.cuda.stream(stream):
        if batch is None or torch.cuda.is_current_stream_capturing():
            dst.copy_(src)
            return
        nbytes = src.numel() * src.element_size()
        failed = ctypes.c_size_t()
        _check(batch((ctypes.c_uint64 * 1)(dst.data_ptr()), (ctypes.c_uint64 * 1)(src.data_ptr()),
                     (ctypes.c_size_t * 1)(nbytes), 1, ctypes.byref(_ATTRIBUTES), _FIRST, 1,
                     ctypes.byref(failed), stream.cuda_stream), "cuMemcpyBatchAsync")
