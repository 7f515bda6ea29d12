"""Reading and editing h, an activation of the denoiser, through forward hooks.

Nothing of the network's forward is copied, so any diffusers U-Net or transformer works. The hook
point is ``"after"`` (default: the output of ``mid_block``, the paper's h), ``"before"`` (the mid
block's input) or a dotted module path such as ``"up_blocks.0"``, ``"down_blocks.1.resnets.0"`` or
``"transformer_blocks.14"`` (that module's output). A module that returns a tuple gives h as one
declared element of it (the first by default, as down blocks return (h, skips); the image stream
``[1]`` of the two-stream blocks of SD3 and FLUX, which return (text, image)); a diffusers output
object gives its ``.sample``. h is a tensor (B, *h_shape) of any rank >= 2 per sample: (C, H, W) in
a U-Net, (N, C) tokens in a transformer.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from pipeline.errors import InputError

HOOK_POINTS = ("after", "before")


def resolve_hook(net: nn.Module, point: str) -> tuple[nn.Module, bool]:
    """(module, before): the module a hook point names and whether h is its input.

    An unknown name raises InputError listing the network's top-level modules."""
    point = str(point)
    if point in HOOK_POINTS:
        if getattr(net, "mid_block", None) is None:
            raise InputError("the network has no mid_block, so it has no h-space bottleneck; give model.hook a module path")
        return net.mid_block, point == "before"
    try:
        module = net.get_submodule(point) if point else None
    except AttributeError:
        module = None
    if module is None or module is net:
        names = [n for n, _ in net.named_children()]
        raise InputError(f"unknown hook point {point!r}: not a module of the network; give 'after', 'before' or a "
                         f"dotted module path starting with one of its top-level modules: {', '.join(names)}")
    return module, False


def check_h(h, point: str, module: nn.Module, rows: int) -> None:
    """Refuse, in one line, a hook point whose activation is not a per-sample tensor of rank >= 2."""
    name = type(module).__name__
    if not isinstance(h, torch.Tensor):
        raise InputError(f"model.hook={point}: {name} returns {type(h).__name__}, not a tensor; hook a block of the "
                         f"network whose output is an activation (B, C, H, W) or (B, N, C)")
    if h.ndim < 3 or h.shape[0] != rows:
        raise InputError(f"model.hook={point}: {name} returns a tensor {tuple(h.shape)} for a batch of {rows}; h must "
                         f"be a per-sample activation of rank >= 2 ((C, H, W) or (N, C)): hook a block of the network")


class HSpaceHook:
    """Records h at every pass of the network and optionally replaces it or adds an offset.

    Inside :meth:`editing` (``replace``: a tensor shaped like the recorded h; ``delta``: broadcastable
    to it) the hook applies ``h' = (replace if given else h) + delta``; it always leaves the
    activation it saw, before any edit, in ``h``. ``calls`` counts passes. ``element``: which element
    of a tuple output is h (default 0).

    Inside :meth:`branch_rows` only the batch rows ``start:stop`` are h; the other rows are another
    branch of the same samples (the unconditional half of a classifier-free-guidance batch, before
    them as in SD or after them as in DiT): they move by the same offset ``h' - h`` (the branches
    must then be of equal size).
    """

    def __init__(self, module: nn.Module, before: bool = False, element: int | None = None, point: str = ""):
        self.module, self.element, self.point = module, element, point or type(module).__name__
        self.delta: torch.Tensor | None = None
        self.replace: torch.Tensor | None = None
        self.rows = slice(None)
        self.h: torch.Tensor | None = None
        self.calls = 0
        if before:
            self._handle = module.register_forward_pre_hook(self._before, with_kwargs=True)
        else:
            self._handle = module.register_forward_hook(self._after)

    @contextlib.contextmanager
    def editing(self, delta: torch.Tensor | None = None, replace: torch.Tensor | None = None):
        """Within the block, every pass edits h: replaced by ``replace``, then ``delta`` added."""
        self.delta, self.replace = delta, replace
        try:
            yield self
        finally:
            self.delta = self.replace = None

    @contextlib.contextmanager
    def branch_rows(self, start: int, stop: int | None = None):
        """Within the block, h is rows ``start:stop`` of each pass (see the class docstring)."""
        self.rows = slice(int(start), None if stop is None else int(stop))
        try:
            yield self
        finally:
            self.rows = slice(None)

    def _edit(self, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor):
            check_h(h, self.point, self.module, 0)
        self.calls += 1
        own = h[self.rows]
        self.h = own.detach()
        if self.replace is None and self.delta is None:
            return h
        if self.replace is None:
            offset = self.delta.to(h.dtype)
            new = own + offset
        else:
            new = self.replace.to(h.dtype)
            if self.delta is not None:
                new = new + self.delta.to(h.dtype)
            offset = new - own.detach()
        start, stop = self.rows.start or 0, len(h) if self.rows.stop is None else self.rows.stop
        if start == 0 and stop == len(h):
            return new
        before, after = ([h[:start] + offset] if start else []), ([h[stop:] + offset] if stop < len(h) else [])
        return torch.cat([*before, new, *after])

    def _after(self, module, args, output):
        if isinstance(output, tuple):
            k = self.element or 0
            if k >= len(output):
                raise InputError(f"model.hook={self.point}: {type(module).__name__} returns {len(output)} values; "
                                 f"h is element {k}")
            return (*output[:k], self._edit(output[k]), *output[k + 1:])
        if hasattr(output, "sample") and not isinstance(output, torch.Tensor):  # a diffusers BaseOutput
            output.sample = self._edit(output.sample)
            return output
        return self._edit(output)

    def _before(self, module, args, kwargs):
        if args:
            return (self._edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._edit(kwargs["hidden_states"])}

    def remove(self) -> None:
        self._handle.remove()
