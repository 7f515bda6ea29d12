"""The one dtype table: the names the configuration and the API use -> the torch dtype, and the
numpy dtype its values are stored as on disk (bfloat16 as its bits, uint16: Arrow has no bfloat16).

Each configuration field lists the names it accepts (``generate.h_dtype``, ``pca.dtype``); every one
of them is a key here. ``trainer.precision`` (Lightning's names) is the one precision of the weights:
:func:`precision_dtypes` reads it as Lightning does, :func:`autocast` applies its ``*-mixed`` half.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
import torch

from pipeline.errors import InputError


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


#: Lightning's shorthand precisions -> their full names (as ``lightning.Trainer`` reads them)
_PRECISION_ALIASES = {16: "16-mixed", "16": "16-mixed", "bf16": "bf16-mixed", 32: "32-true", "32": "32-true",
                      64: "64-true", "64": "64-true"}
_PRECISION_DTYPES = {"16": torch.float16, "bf16": torch.bfloat16, "32": None, "64": torch.float64}


def precision_dtypes(precision, device_type: str = "cpu") -> tuple[torch.dtype | None, torch.dtype | None]:
    """(weights dtype, autocast dtype) of a ``trainer.precision`` setting, as Lightning applies it:
    ``*-true`` converts the weights (32-true: nothing), ``*-mixed`` keeps them and autocasts (16-mixed
    on a CPU: bfloat16, as Lightning substitutes it)."""
    name = _PRECISION_ALIASES.get(precision, str(precision))
    width, _, kind = name.partition("-")
    if width not in _PRECISION_DTYPES or kind not in ("true", "mixed"):
        raise InputError(f"unknown precision {precision!r}; choose one of 32-true, 16-mixed, bf16-mixed, 16-true, "
                         f"bf16-true, 64-true")
    dtype = _PRECISION_DTYPES[width]
    if kind == "mixed" and dtype == torch.float16 and device_type == "cpu":
        dtype = torch.bfloat16
    return (dtype, None) if kind == "true" else (None, dtype)


def autocast(precision, device_type: str):
    """The context a ``*-mixed`` precision computes in on ``device_type`` (torch.autocast), else a no-op
    (``*-true`` precisions are applied by converting the weights, once)."""
    dtype = precision_dtypes(precision, device_type)[1]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def weights_dtype(precision) -> torch.dtype:
    """The dtype a ``trainer.precision`` keeps the weights in: ``*-true``'s own, else (and for None) float32."""
    return (None if precision is None else precision_dtypes(precision)[0]) or torch.float32
