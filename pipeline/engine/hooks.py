"""Reading and editing h, a U-Net activation, through forward hooks.

Nothing of the U-Net's forward is copied, so any diffusers U-Net works. The hook point is
``"after"`` (default: the output of ``unet.mid_block``, the paper's h), ``"before"`` (the mid
block's input) or a dotted module path such as ``"up_blocks.0"`` or ``"down_blocks.1.resnets.0"``
(that module's output; its first element when the module returns a tuple, as down blocks do, or
its ``.sample`` when it returns a diffusers output object).
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import InputError

HOOK_POINTS = ("after", "before")


def resolve_hook(unet: nn.Module, point: str) -> tuple[nn.Module, bool]:
    """(module, before): the module a hook point names and whether h is its input.

    An unknown name raises InputError listing the U-Net's top-level modules."""
    point = str(point)
    if point in HOOK_POINTS:
        if getattr(unet, "mid_block", None) is None:
            raise InputError("the U-Net has no mid_block, so it has no h-space bottleneck; give model.hook a module path")
        return unet.mid_block, point == "before"
    try:
        module = unet.get_submodule(point) if point else None
    except AttributeError:
        module = None
    if module is None or module is unet:
        names = [n for n, _ in unet.named_children()]
        raise InputError(f"unknown hook point {point!r}: not a module of the U-Net; give 'after', 'before' or a "
                         f"dotted module path starting with one of its top-level modules: {', '.join(names)}")
    return module, False


class HSpaceHook:
    """Records h at every U-Net call and optionally replaces it or adds an offset.

    Set ``replace`` (a tensor shaped like the recorded h) and/or ``delta`` (broadcastable to it)
    before a U-Net call; the hook applies ``h' = (replace if given else h) + delta`` and leaves the
    activation it saw, before any edit, in ``h``. ``calls`` counts U-Net passes.

    ``first_row``: the batch rows before it are another branch of the same samples (the
    unconditional half of a classifier-free-guidance batch): h is recorded from rows
    ``first_row:`` only, and the rows before move by the same offset ``h' - h`` (the batch
    halves must then be of equal size).
    """

    def __init__(self, module: nn.Module, before: bool = False):
        self.module = module
        self.delta: torch.Tensor | None = None
        self.replace: torch.Tensor | None = None
        self.first_row = 0
        self.h: torch.Tensor | None = None
        self.calls = 0
        if before:
            self._handle = module.register_forward_pre_hook(self._before, with_kwargs=True)
        else:
            self._handle = module.register_forward_hook(self._after)

    def _edit(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        own = h[self.first_row:]
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
        if self.first_row == 0:
            return new
        return torch.cat([h[:self.first_row] + offset, new])

    def _after(self, module, args, output):
        if isinstance(output, torch.Tensor):
            return self._edit(output)
        if isinstance(output, tuple):
            return (self._edit(output[0]), *output[1:])
        if hasattr(output, "sample"):  # a diffusers BaseOutput
            output.sample = self._edit(output.sample)
            return output
        raise InputError(f"the hooked module returns {type(output).__name__}; hook a module that returns a tensor")

    def _before(self, module, args, kwargs):
        if args:
            return (self._edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._edit(kwargs["hidden_states"])}

    def clear(self) -> None:
        """Forget any edit; the next call runs the U-Net unchanged."""
        self.delta = None
        self.replace = None

    def remove(self) -> None:
        self._handle.remove()
