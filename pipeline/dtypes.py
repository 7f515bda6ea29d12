"""The one dtype table: the names the configuration and the API use -> the torch dtype, and the
numpy dtype its values are stored as on disk (bfloat16 as its bits, uint16: Arrow has no bfloat16).

Each configuration field lists the names it accepts (``model.dtype``, ``generate.h_dtype``,
``pca.dtype``); every one of them is a key here.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .errors import InputError


class DType(NamedTuple):
    tensor: torch.dtype  # in memory
    storage: type  # numpy dtype of the stored values


DTYPES: dict[str, DType] = {
    "float64": DType(torch.float64, np.float64),
    "float32": DType(torch.float32, np.float32),
    "float16": DType(torch.float16, np.float16),
    "bfloat16": DType(torch.bfloat16, np.uint16),
}


def dtype_entry(name: str) -> DType:
    """The table's entry for ``name``; an unknown name is an InputError listing the choices."""
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A dtype name (or a torch dtype, passed through; None: float32) -> the torch dtype."""
    if dtype is None:
        return torch.float32
    return dtype if isinstance(dtype, torch.dtype) else dtype_entry(dtype).tensor
