"""The ``sae`` section of the configuration: the sparse autoencoder of :mod:`pipeline.stages.sae` (its own
module, as :mod:`~pipeline.config.toy_training` holds the toy's training sections)."""
from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import Field, model_validator

from pipeline.config.sections import NonNegInt, Section, _accepts, _cross


class SAEConfig(Section):
    """hspace sae: a sparse autoencoder trained on the run's h (Lightning fit over the streamed shards) ->
    <run_dir>/sae/, directions/sae.safetensors (its features labelled by the annotation each correlates with most)"""

    feed: Literal["token", "whole"] = Field("token", description="token: each position's C-vector at a step is one "
                                            "example (the toy: 128-d, 64 per step); whole: the flattened h of a step "
                                            "(C*H*W, the space of the paper's directions)")
    steps: Union[None, NonNegInt, List[NonNegInt]] = Field(
        None, description="the steps trained on (and edited): null every step, t one step, [first, last] a window",
        **_accepts("null, a step index or [first, last] (step indices, first <= last)"))
    num_latents: int = Field(2048, ge=1, description="dictionary size F")
    sparsity: Literal["topk", "l1"] = Field("topk", description="topk: the k largest latents (Gao et al. 2024, with "
                                            "AuxK for dead latents); l1: ReLU latents with an L1 penalty")
    k: int = Field(16, ge=1, description="topk: active latents per example (at most num_latents)")
    l1_coefficient: float = Field(0.1, ge=0, description="l1: weight of the mean L1 norm of the codes (per example, over "
                                  "the FVU term's scale)")
    auxk_alpha: float = Field(1 / 32, ge=0, description="topk: weight of the AuxK loss (0: none)")
    dead_after: int = Field(1_000_000, ge=1, description="topk: a latent that has not fired for this many examples "
                            "(at most one epoch's) counts as dead and AuxK trains it on the residual")
    lr: Optional[float] = Field(None, gt=0, description="Adam's learning rate; null: 2e-4 / sqrt(num_latents / 2^14) "
                                "(Gao et al.)")
    warmup_steps: int = Field(50, ge=0, description="linear learning-rate warm-up (optimizer steps)")
    batch_size: Optional[int] = Field(None, ge=1, description="examples (h vectors) per optimizer step, all processes "
                                      "together; null: 4096 token-wise, 256 whole-h")
    epochs: Optional[int] = Field(None, ge=1, description="passes over the training examples; null: 3 token-wise (the "
                                  "toy: 1.8M h vectors), 30 whole-h (the toy: 280k)")
    holdout: float = Field(0.1, ge=0, lt=1, description="share of the samples (a fixed hash of their ids) not trained "
                           "on: the fraction of variance unexplained and L0 are measured on them")
    window: int = Field(4, ge=1, description="shards whose examples are shuffled together (and held at once); at "
                        "least the number of processes, or some wait")
    seed: int = Field(0, description="of the initialisation and of the data order")
    features_per_attribute: int = Field(3, ge=1, description="directions/sae.safetensors: the features of largest "
                                        "|correlation| with each annotation")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank (0: read in the training "
                             "process); the model is the same")
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between checkpoints (<run_dir>/sae/"
                                  "last.ckpt); a killed run resumes from the last one to the same result")
    log_every: int = Field(10, ge=1, description="optimizer steps between rows of <run_dir>/sae/curves.csv")

    @model_validator(mode="after")
    def _k_within_dictionary(self):
        if self.sparsity == "topk" and self.k > self.num_latents:
            raise _cross("sae.k", self.k, f"at most sae.num_latents={self.num_latents} (the dictionary size)",
                         "sae.num_latents")
        if isinstance(self.steps, list) and (len(self.steps) != 2 or self.steps[0] > self.steps[1]):
            raise _cross("sae.steps", self.steps, "null, a step index or a window [first, last] with first <= last",
                         "sae.steps")
        return self

    def examples_per_batch(self) -> int:
        return self.batch_size or (4096 if self.feed == "token" else 256)

    def num_epochs(self) -> int:
        return self.epochs or (3 if self.feed == "token" else 30)

    def step_list(self, T: int) -> list[int]:
        """The trained steps as indices (null: 0..T-1)."""
        if self.steps is None:
            return list(range(T))
        first, last = (self.steps, self.steps) if isinstance(self.steps, int) else self.steps
        return list(range(first, last + 1))
