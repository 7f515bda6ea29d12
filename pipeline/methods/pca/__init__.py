"""Per-step (and joint) PCA of h-space trajectories (paper sec. 4.1) and the directions built on it.

The samples dataset holds, for N samples, the bottleneck activations of every step: ``h: (N, T, D)``
(D = C*H*W). The paper takes a separate PCA of ``{h_t^(i)}_i`` at every step t and defines direction
k as the concatenation over t of the k-th component, scaled by its standard deviation. Joint
(whole-trajectory) PCA is the same with T'=1, D'=T*D.

Three methods (:class:`PCA`, ``method=``), all batched over the T steps, one module each:

- ``exact`` (:mod:`.exact`): the (N, N) Gram matrix of the centred data of each step. Holds the data
  (N x T x D values in their stored dtype) plus one (N, N) Gram at a time: for small N.
- ``randomized`` (:mod:`.randomized`): streaming subspace iteration with Rayleigh-Ritz, memory
  O(T x D x (K + oversample)), stopped by an estimated principal angle (the accuracy contract).
- ``onepass`` (:mod:`.incremental`): a one-pass truncated incremental SVD (:class:`StreamingPCA`),
  for a quick look, without a guarantee.

``auto`` takes ``exact`` up to ``exact_max_samples`` samples and ``randomized`` beyond
(:mod:`.estimator`). What every method fits and reports, and the directions made from it:
:mod:`.fitted`. The linear algebra they share with the Jacobian and the probes:
:mod:`pipeline.methods.linalg`.
"""
from pipeline.methods.pca.estimator import METHODS, PCA, resolve_method
from pipeline.methods.pca.exact import gram_pca
from pipeline.methods.pca.fitted import (
    NotFittedError,
    PCAState,
    adjacent_cosines,
    init_state,
    pca_directions,
    random_directions_like,
)
from pipeline.methods.pca.incremental import StreamingPCA, merge_summaries, svd_update
from pipeline.methods.pca.randomized import (
    Moments,
    SubspaceIteration,
    angle_bound,
    gaussian_sketch,
    merge_moments,
    moments_update,
)
from pipeline.methods.signs import align_signs

__all__ = [
    "PCAState", "NotFittedError", "init_state", "svd_update", "merge_summaries", "StreamingPCA",
    "Moments", "moments_update", "merge_moments", "gaussian_sketch", "angle_bound", "SubspaceIteration",
    "gram_pca", "resolve_method", "METHODS", "PCA", "align_signs", "adjacent_cosines", "pca_directions",
    "random_directions_like",
]
