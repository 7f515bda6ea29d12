"""Sparse autoencoders on h: the TopK SAE of Gao et al. (2024), or a ReLU SAE with an L1 penalty.

The model is EleutherAI's ``sparsify.SparseCoder`` (encoder, pre-encoder bias ``b_dec``, decoder rows of unit
norm, the fused top-k encoder with its sparse backward pass); this module holds the maths around it, each a small
function of tensors:

- the two feeds: :func:`token_examples` (every position's C-vector at a step is one example) and
  :func:`whole_examples` (the flattened h of a step);
- the normalisation (:class:`NormStats`): one scalar per step, ``scale_t = sqrt(d) / E||x_t||``, so that the
  normalised examples have mean norm sqrt(d) (the rule of Anthropic's 2024 SAEs and SAELens'
  ``expected_average_only_in``); decoder vectors go back to h's units by dividing by ``scale_t``;
- the losses (:func:`sae_terms`): the squared error over a fixed denominator (the number of examples of the global
  batch times the data's variance, so that the terms of the ranks add up to the whole batch's), AuxK for dead
  latents (Gao et al. App. B.1, as sparsify computes it) or the L1 penalty;
- the statistics of a trained SAE (:class:`FeatureStats`, :class:`CorrelationSums`): fraction of variance
  unexplained, L0, features that never fire, and every feature's correlation with every annotation.

Shapes: ``x`` (N, d) examples; ``h`` (B, T, C, H, W); ``F`` latents.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

#: the AuxK coefficient of Gao et al. (2024)
AUXK_ALPHA = 1 / 32


def sparse_coder(d_in: int, num_latents: int, k: int, seed: int, dtype=torch.float32):
    """A new ``sparsify.SparseCoder`` (TopK, unit-norm decoder rows initialised as the encoder's), its random
    initialisation drawn from ``seed`` (the global RNG is left as it was)."""
    SparseCoder, SparseCoderConfig = _sparsify()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SparseCoder(d_in, SparseCoderConfig(num_latents=num_latents, k=min(k, num_latents)), dtype=dtype)


def _sparsify():
    """sparsify's classes, imported quietly (its utils print which decoder they chose)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder
    return SparseCoder, SparseCoderConfig


def default_lr(num_latents: int) -> float:
    """Gao et al.'s learning rate for Adam, scaled with the dictionary size: 2e-4 / sqrt(F / 2^14)."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


# ---------------------------------------------------------------------- the two feeds
def example_dim(feed: str, h_shape) -> int:
    """d of one example: C (token) or C*H*W (whole); h_shape = (C, H, W)."""
    C, H, W = h_shape
    return C if feed == "token" else C * H * W


def examples_per_step(feed: str, h_shape) -> int:
    """Examples one sample gives at one step: H*W positions (token) or 1 (whole)."""
    return h_shape[1] * h_shape[2] if feed == "token" else 1


def token_examples(h: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, H*W, C): every position's C-vector at every step."""
    B, T, C = h.shape[:3]
    return h.reshape(B, T, C, -1).transpose(2, 3)


def whole_examples(h: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, 1, C*H*W): the flattened h of every step."""
    return h.reshape(*h.shape[:2], 1, -1)


def examples(h: torch.Tensor, feed: str) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, P, d) with P examples per step (see :func:`examples_per_step`)."""
    return token_examples(h) if feed == "token" else whole_examples(h)


def to_h(vectors: torch.Tensor, feed: str, h_shape) -> torch.Tensor:
    """Example-space vectors (..., d) -> h-space deltas (..., C, H, W): a token vector at every position, a
    whole-h vector reshaped."""
    C, H, W = h_shape
    if feed == "token":
        return vectors[..., :, None, None].expand(*vectors.shape[:-1], C, H, W)
    return vectors.reshape(*vectors.shape[:-1], C, H, W)


# ---------------------------------------------------------------------- sums over batches and ranks
class Sums:
    """A dataclass of float64 sums: made of zeros of given shapes, added field by field (the ranks' parts)."""

    @classmethod
    def of_shapes(cls, *shapes):
        return cls(*(torch.zeros(s, dtype=torch.float64) for s in shapes))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def add(self, other):
        return type(self)(*(a + b for a, b in zip(self.tensors(), other.tensors())))


# ---------------------------------------------------------------------- normalisation
@dataclass
class NormStats(Sums):
    """Sums over raw examples, per step: count, sum of norms, sum of squared norms, sum of vectors (T', d)."""

    count: torch.Tensor
    norm_sum: torch.Tensor
    sq_sum: torch.Tensor
    vec_sum: torch.Tensor

    @classmethod
    def zeros(cls, steps: int, d: int) -> NormStats:
        return cls.of_shapes(steps, steps, steps, (steps, d))

    def update(self, x: torch.Tensor) -> None:
        """x: (B, T', P, d) raw examples of the steps in order."""
        x = x.double()
        self.count += x.shape[0] * x.shape[2]
        self.norm_sum += x.norm(dim=-1).sum(dim=(0, 2))
        self.sq_sum += x.pow(2).sum(dim=(0, 2, 3))
        self.vec_sum += x.sum(dim=(0, 2))

    def scales(self) -> torch.Tensor:
        """(T',) float32: sqrt(d) / mean norm of the step's examples."""
        d = self.vec_sum.shape[1]
        return (math.sqrt(d) * self.count / self.norm_sum.clamp_min(1e-30)).float()

    def normalised_moments(self) -> tuple[torch.Tensor, float]:
        """The mean (d,) and the variance (E||x - mean||^2) of the normalised examples, all steps pooled."""
        s = self.scales().double()
        n = self.count.sum()
        mean = (s[:, None] * self.vec_sum).sum(0) / n
        second = (s.pow(2) * self.sq_sum).sum() / n
        return mean.float(), float(second - mean.pow(2).sum())


# ---------------------------------------------------------------------- forward and losses
class Terms(NamedTuple):
    """One batch's share of the loss and its statistics (sums over the batch's examples, not means)."""

    loss: torch.Tensor       # the batch's share: add the ranks' shares for the whole global batch's loss
    sse: torch.Tensor        # sum of squared errors
    auxk: torch.Tensor       # the AuxK term's share (before AUXK_ALPHA), or the L1 term's
    fired: torch.Tensor      # (F,) bool: latents active on some example
    l0: torch.Tensor         # number of active latents, summed over the examples


def encode(sae: nn.Module, x: torch.Tensor, sparsity: str):
    """(values, indices, pre-activations) of x (N, d): TopK's k largest (sparsify's fused encoder) or, for L1,
    every latent (ReLU of the pre-activations; indices None)."""
    if sparsity == "topk":
        return sae.encode(x)
    pre = torch.relu(sae.encoder(x - sae.b_dec))
    return pre, None, pre


def decode(sae: nn.Module, values: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """Reconstructions (N, d) from :func:`encode`'s values and indices (the sparse decoder of sparsify's eager path,
    ``embedding_bag``; dense for L1)."""
    if indices is None:
        return values @ sae.W_dec + sae.b_dec
    return nn.functional.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum") + sae.b_dec


def sae_terms(sae: nn.Module, x: torch.Tensor, n_global: int, variance: float, dead: torch.Tensor | None = None,
              sparsity: str = "topk", l1_coefficient: float = 0.0, auxk_alpha: float = AUXK_ALPHA) -> Terms:
    """The loss of x (N, d), a part of a global batch of ``n_global`` examples: sum of squared errors / (n_global
    * variance) (the batch's fraction of variance unexplained when N = n_global), plus ``auxk_alpha`` times AuxK
    (TopK: the ``dead`` latents' top k_aux = d/2 reconstruct the residual, scaled by min(#dead / k_aux, 1), as
    sparsify does) or ``l1_coefficient`` times the mean L1 norm of the codes (L1; the decoder rows have unit norm)."""
    values, indices, pre = encode(sae, x, sparsity)
    recon = decode(sae, values, indices)
    e = x - recon
    sse = e.pow(2).sum()
    denominator = n_global * variance
    if sparsity == "topk":
        active = values > 0
        fired = torch.zeros(pre.shape[1], dtype=torch.bool, device=x.device)
        fired[indices[active]] = True
        extra = _auxk(sae, pre, e, dead) / denominator
        weight = auxk_alpha
    else:
        active = values > 0
        fired = active.any(0)
        extra = values.sum() / n_global
        weight = l1_coefficient
    return Terms(sse / denominator + weight * extra, sse.detach(), extra.detach(), fired, active.sum())


def _auxk(sae: nn.Module, pre: torch.Tensor, e: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """Gao et al.'s AuxK sum of squares: the top k_aux dead latents reconstruct the residual e (detached)."""
    num_dead = 0 if dead is None else int(dead.sum())
    if num_dead == 0 or len(pre) == 0:
        return pre.new_zeros(()) * pre.sum()  # zero, in the graph (every rank's backward touches the same parameters)
    k_aux = e.shape[1] // 2
    scale = min(num_dead / k_aux, 1.0)
    acts, idx = torch.where(dead[None], pre, -torch.inf).topk(min(k_aux, num_dead), sorted=False)
    e_hat = nn.functional.embedding_bag(idx, sae.W_dec, per_sample_weights=acts.relu(), mode="sum")
    return scale * (e_hat - e.detach()).pow(2).sum()


# ---------------------------------------------------------------------- statistics of a trained SAE
@dataclass
class FeatureStats(Sums):
    """Sums over the examples of one split: count, squared error, squared norm, sum of the examples (d,), active
    latents; per latent: the examples it fires on and the sum of its activations."""

    count: torch.Tensor
    sse: torch.Tensor
    sq: torch.Tensor
    vec: torch.Tensor
    l0: torch.Tensor
    fires: torch.Tensor
    act_sum: torch.Tensor

    @classmethod
    def zeros(cls, d: int, num_latents: int) -> FeatureStats:
        return cls.of_shapes((), (), (), d, (), num_latents, num_latents)

    def update(self, x: torch.Tensor, recon: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None) -> None:
        """x, recon: (N, d) normalised examples and their reconstructions; values/indices from :func:`encode`."""
        x = x.double()
        self.count += len(x)
        self.sse += (x - recon.double()).pow(2).sum()
        self.sq += x.pow(2).sum()
        self.vec += x.sum(0)
        self.l0 += (values > 0).sum()
        F = len(self.fires)
        if indices is None:
            self.fires += (values > 0).sum(0).double().cpu()
            self.act_sum += values.double().sum(0).cpu()
        else:
            idx, v = indices.flatten(), values.flatten().double()
            self.fires += torch.bincount(idx[v > 0], minlength=F).double().cpu()
            self.act_sum += torch.zeros(F, dtype=torch.float64, device=v.device).index_add_(0, idx, v).cpu()

    def fvu(self) -> float:
        """Fraction of variance unexplained: squared error over the squared deviation from the split's mean."""
        sst = self.sq - self.vec.pow(2).sum() / self.count.clamp_min(1)
        return float(self.sse / sst) if float(self.count) else float("nan")

    def summary(self) -> dict:
        n = float(self.count)
        return {"examples": int(n), "fvu": self.fvu(), "l0": float(self.l0) / n if n else float("nan"),
                "never_fire": int((self.fires == 0).sum()), "never_fire_fraction": float((self.fires == 0).double().mean())}


def dense_codes(values: torch.Tensor, indices: torch.Tensor | None, num_latents: int) -> torch.Tensor:
    """(N, F) activations from :func:`encode`'s values and indices."""
    if indices is None:
        return values
    return torch.zeros(len(values), num_latents, dtype=values.dtype, device=values.device).scatter_(1, indices, values)


@dataclass
class CorrelationSums(Sums):
    """Sums that give the Pearson correlation of F per-sample scores with A annotations, over any number of
    batches and ranks: n, sum x (F), sum x^2 (F), sum y (A), sum y^2 (A), sum x y (F, A)."""

    n: torch.Tensor
    sx: torch.Tensor
    sxx: torch.Tensor
    sy: torch.Tensor
    syy: torch.Tensor
    sxy: torch.Tensor

    @classmethod
    def zeros(cls, num_scores: int, num_annotations: int) -> CorrelationSums:
        F, A = num_scores, num_annotations
        return cls.of_shapes((), F, F, A, A, (F, A))

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x: (B, F) per-sample scores; y: (B, A) their annotations."""
        x, y = x.double(), y.double()
        self.n += len(x)
        self.sx += x.sum(0)
        self.sxx += x.pow(2).sum(0)
        self.sy += y.sum(0)
        self.syy += y.pow(2).sum(0)
        self.sxy += x.T @ y

    def correlation(self) -> torch.Tensor:
        """(F, A) Pearson correlations; 0 where a score or an annotation does not vary."""
        n = self.n
        cov = n * self.sxy - self.sx[:, None] * self.sy[None]
        vx = (n * self.sxx - self.sx.pow(2)).clamp_min(0)
        vy = (n * self.syy - self.sy.pow(2)).clamp_min(0)
        den = (vx[:, None] * vy[None]).sqrt()
        return torch.where(den > 1e-12 * n * n, cov / den.clamp_min(1e-300), torch.zeros_like(cov)).float()


def per_sample_activations(values: torch.Tensor, indices: torch.Tensor | None, sample: torch.Tensor, num_samples: int,
                           num_latents: int) -> torch.Tensor:
    """(num_samples, F): each sample's sum of activations over its examples; ``sample`` (N,) gives the sample of
    each example (0 .. num_samples - 1)."""
    if indices is None:
        return torch.zeros(num_samples, num_latents, dtype=values.dtype, device=values.device).index_add_(0, sample, values)
    flat = (sample[:, None] * num_latents + indices).flatten()
    out = torch.zeros(num_samples * num_latents, dtype=values.dtype, device=values.device)
    return out.index_add_(0, flat, values.flatten()).reshape(num_samples, num_latents)


# ---------------------------------------------------------------------- labels and directions
def best_features(r: torch.Tensor, alive: torch.Tensor, per_attribute: int) -> list[list[int]]:
    """For each annotation (column of r (F, A)), the ``per_attribute`` alive features of largest |r|."""
    score = r.abs().masked_fill(~alive[:, None], -1.0)
    k = min(per_attribute, int(alive.sum()))
    return [score[:, a].topk(k).indices.tolist() if k else [] for a in range(r.shape[1])]


def feature_directions(W_dec: torch.Tensor, features: list[int], gains: torch.Tensor, scales: torch.Tensor,
                       steps: list[int], T: int, feed: str, h_shape) -> torch.Tensor:
    """(K, T, C, H, W) deltas: feature f's decoder row times ``gains[k]`` (its mean activation when it fires, with
    the sign that raises its attribute), in h's units at each trained step (divided by that step's scale), at
    every position (token) or as the whole h (whole); zero at the other steps."""
    out = torch.zeros(len(features), T, *h_shape)
    rows = W_dec[features].detach().float().cpu() * gains.float()[:, None]  # (K, d)
    for j, t in enumerate(steps):
        out[:, t] = to_h(rows / float(scales[j]), feed, h_shape)
    return out
