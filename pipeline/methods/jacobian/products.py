"""Jacobian-vector products by autograd: ``J V`` (forward mode), ``J^T U`` (backward) and the
linearisation that gives both from one forward pass of f (``products="linearized"``).

f: (b, d_in) -> (b, d_out) is batched (row i of the output depends only on row i of the input).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.cost import count
from pipeline.errors import InputError

Fn = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def autograd_context():
    """Grad on, inference mode off, math SDPA kernel (forward AD / double backward through attention)."""
    with torch.inference_mode(False), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        yield


def _copies(h: torch.Tensor, m: int) -> torch.Tensor:
    """h: (d,) -> (m, d), a fresh (non-inference, detached) tensor."""
    return h.detach().reshape(1, -1).expand(m, -1).clone()


def _grad(out: torch.Tensor, inp: torch.Tensor, cotangent: torch.Tensor, retain: bool) -> torch.Tensor:
    if not out.requires_grad:
        return torch.zeros_like(inp)
    (g,) = torch.autograd.grad(out, inp, cotangent, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g


def jvp(f: Fn, h: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``J V`` by forward-mode AD in one batched pass of f on k copies of h (Alg. 1 "batch forward").

    f: (b, d_in) -> (b, d_out); h: (d_in,); V: (k, d_in) -> (k, d_out).
    """
    import torch.autograd.forward_ad as fwAD

    with autograd_context(), fwAD.dual_level():
        H = _copies(h, len(V))
        out = f(fwAD.make_dual(H, V.detach().to(H.dtype).clone()))
        primal, tangent = fwAD.unpack_dual(out)
        return torch.zeros_like(primal) if tangent is None else tangent.detach().clone()


def vjp(f: Fn, h: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``J^T U`` by one batched backward pass of f on k copies of h. U: (k, d_out) -> (k, d_in)."""
    with autograd_context():
        H = _copies(h, len(U)).requires_grad_(True)
        out = f(H)
        return _grad(out, H, U.detach().to(out.dtype).clone(), retain=False).detach()


class Linearization:
    """``J = df/dh`` at ``h`` as batched products, from one forward pass of f on ``width`` copies of h.

    ``vjp(U)``: ``J^T U`` (n, d_out) -> (n, d_in), backward passes through the retained graph.
    ``jvp(V)``: ``J V`` (n, d_in) -> (n, d_out); ``jvp_mode="double_backward"``: differentiate the
    graph's backward ``g(W) = J^T W`` w.r.t. ``W`` (no forward pass); ``"forward"``: forward-mode AD,
    a fresh batched pass of f per call. Inputs are processed in chunks of ``width`` rows (a short
    chunk is zero-padded for the graph products). ``passes`` counts batched passes by kind,
    ``vectors`` the vectors pushed through ``J`` and ``J^T``.
    """

    def __init__(self, f: Fn, h: torch.Tensor, width: int, jvp_mode: str = "double_backward"):
        if jvp_mode not in ("double_backward", "forward"):
            raise InputError(f"jvp_mode must be 'double_backward' or 'forward', got {jvp_mode!r}")
        if width < 1:
            raise InputError(f"width must be >= 1, got {width}")
        self.f, self.width, self.jvp_mode = f, int(width), jvp_mode
        with autograd_context():
            self.h = h.detach().reshape(-1).clone()
            self._H = _copies(self.h, self.width).requires_grad_(True)
            self._y = f(self._H)
        if self._y.ndim != 2 or self._y.shape[0] != self.width:
            raise InputError(f"f must map (b, d_in) to (b, d_out); got output shape {tuple(self._y.shape)} for b={self.width}")
        if not self._y.requires_grad:
            raise InputError("f(h) does not depend on h: its Jacobian is zero")
        self.d_in, self.d_out = self.h.numel(), self._y.shape[1]
        self.dtype, self.device = self._y.dtype, self._y.device
        self._W: torch.Tensor | None = None
        self._g: torch.Tensor | None = None
        self.passes = {"forward": 1, "forward_ad": 0, "backward": 0, "double_backward": 0}
        self.vectors = {"jvp": 0, "vjp": 0}

    @property
    def value(self) -> torch.Tensor:
        """f(h), (d_out,)."""
        return self._y[0].detach()

    def _chunks(self, X: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], pad: bool, d: int) -> torch.Tensor:
        with autograd_context():
            X = X.detach().to(device=self.device, dtype=self.dtype).clone()
            outs = []
            for i in range(0, len(X), self.width):
                c = X[i:i + self.width]
                n = len(c)
                if pad and n < self.width:
                    c = torch.cat([c, c.new_zeros(self.width - n, c.shape[1])])
                outs.append(fn(c)[:n].detach())
            return torch.cat(outs) if outs else X.new_zeros(0, d)

    def _vjp_chunk(self, U: torch.Tensor) -> torch.Tensor:
        self.passes["backward"] += 1
        with autograd_context():
            return _grad(self._y, self._H, U, retain=True)

    def _jvp_chunk(self, V: torch.Tensor) -> torch.Tensor:
        if self.jvp_mode == "forward":
            self.passes["forward_ad"] += 1
            return jvp(self.f, self.h, V)
        with autograd_context():
            if self._g is None:
                self._W = torch.zeros_like(self._y.detach()).requires_grad_(True)
                (self._g,) = torch.autograd.grad(self._y, self._H, self._W, create_graph=True)
                self.passes["backward"] += 1
            self.passes["double_backward"] += 1
            return _grad(self._g, self._W, V, retain=True)

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        """J V: (n, d_in) -> (n, d_out)."""
        if V.ndim != 2 or V.shape[1] != self.d_in:
            raise InputError(f"V must be (n, {self.d_in}), got {tuple(V.shape)}")
        self.vectors["jvp"] += len(V)
        count(jacobian_products=len(V))
        return self._chunks(V, self._jvp_chunk, self.jvp_mode == "double_backward", self.d_out)

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        """J^T U: (n, d_out) -> (n, d_in)."""
        if U.ndim != 2 or U.shape[1] != self.d_out:
            raise InputError(f"U must be (n, {self.d_out}), got {tuple(U.shape)}")
        self.vectors["vjp"] += len(U)
        count(jacobian_products=len(U))
        return self._chunks(U, self._vjp_chunk, True, self.d_in)

    def close(self) -> None:
        """Free the retained graphs."""
        self._y = self._H = self._g = self._W = None


def explicit_jacobian(f: Fn, h: torch.Tensor, width: int = 64) -> torch.Tensor:
    """The full Jacobian ``J``: (d_out, d_in), one row per output (d_out / width backward passes)."""
    lin = Linearization(f, h, width)
    try:
        return lin.vjp(torch.eye(lin.d_out, device=lin.device, dtype=lin.dtype))
    finally:
        lin.close()
