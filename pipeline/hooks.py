"""Reading and editing h, the U-Net bottleneck activation, through forward hooks.

The hook sits on ``unet.mid_block``; nothing of the U-Net's forward is copied, so any
diffusers ``UNet2DModel`` works. ``point="after"`` (default) is the mid-block output,
``point="before"`` its input.
"""
from __future__ import annotations

import torch
from torch import nn

HOOK_POINTS = ("after", "before")


class HSpaceHook:
    """Records h at every U-Net call and optionally replaces it or adds an offset.

    Set ``replace`` (a tensor shaped like h) and/or ``delta`` (broadcastable to h) before a
    U-Net call; the hook applies ``h' = (replace if given else h) + delta`` and leaves the
    activation it saw, before any edit, in ``h``. ``calls`` counts U-Net passes.
    """

    def __init__(self, mid_block: nn.Module, point: str = "after"):
        if point not in HOOK_POINTS:
            raise ValueError(f"unknown hook point {point!r}; choose one of {HOOK_POINTS}")
        self.point = point
        self.delta: torch.Tensor | None = None
        self.replace: torch.Tensor | None = None
        self.h: torch.Tensor | None = None
        self.calls = 0
        if point == "after":
            self._handle = mid_block.register_forward_hook(self._after)
        else:
            self._handle = mid_block.register_forward_pre_hook(self._before, with_kwargs=True)

    def _edit(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.h = h.detach()
        if self.replace is None and self.delta is None:
            return h
        out = h if self.replace is None else self.replace.to(h.dtype)
        if self.delta is not None:
            out = out + self.delta.to(h.dtype)
        return out

    def _after(self, module, args, output):
        return self._edit(output)

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
