"""Element types: cairn's names (the safetensors spelling) and their numpy
and torch counterparts. bf16 and fp8 use ml_dtypes on the numpy side."""

import numpy as np

try:
    import ml_dtypes as _ml
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _ml = None

_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "F32": np.dtype(np.float32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F64": np.dtype(np.float64),
}
if _ml is not None:
    _NUMPY["BF16"] = np.dtype(_ml.bfloat16)
    _NUMPY["F8E4M3"] = np.dtype(_ml.float8_e4m3fn)
    _NUMPY["F8E5M2"] = np.dtype(_ml.float8_e5m2)

_FROM_NUMPY = {v: k for k, v in _NUMPY.items()}

_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "F8E4M3": "float8_e4m3fn",
    "F8E5M2": "float8_e5m2",
}


def from_numpy(dtype):
    """cairn's name of a numpy dtype, or None if cairn cannot store it."""
    dtype = np.dtype(dtype)
    if dtype.byteorder == ">":
        return None
    return _FROM_NUMPY.get(dtype.newbyteorder("="))


def to_numpy(name):
    """The numpy dtype of a cairn dtype name."""
    try:
        return _NUMPY[name]
    except KeyError:
        raise TypeError(
            f"dtype {name} has no numpy counterpart here (install ml_dtypes for BF16 and F8)"
        ) from None


def from_torch(dtype):
    """cairn's name of a torch dtype, or None if cairn cannot store it."""
    import torch

    for name, tname in _TORCH_NAMES.items():
        if getattr(torch, tname, None) == dtype:
            return name
    return None


def to_torch(name):
    """The torch dtype of a cairn dtype name."""
    import torch

    t = getattr(torch, _TORCH_NAMES.get(name, ""), None)
    if t is None:
        raise TypeError(f"dtype {name} has no torch counterpart in this torch build")
    return t
