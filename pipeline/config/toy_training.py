"""The sections of the toy domain's commands (``hspace train-toy``, ``finetune-toy``, ``train-toy-annotator``):
how the embedded default model and its annotator are trained."""
from __future__ import annotations

from typing import Annotated, Dict, List, Literal, Optional

from pydantic import Field

from pipeline.config.sections import Section, Seed


class ToyTrainConfig(Section):
    """hspace train-toy: the embedded default DDPM (resumable)"""

    out_dir: str = "runs/train-toy"
    steps: int = Field(5000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(6e-4, gt=0)
    warmup_steps: int = Field(300, ge=0)
    ema_decay: float = Field(0.999, ge=0, le=1)
    min_snr_gamma: float = 5.0
    seed: Seed = 0
    block_out_channels: List[Annotated[int, Field(ge=1)]] = Field([32, 64, 128], min_length=1)
    layers_per_block: int = Field(2, ge=1)
    correlations: Dict[str, float] = Field({"glasses~hair": 0.4}, description="entanglements for the "
                                           "disentanglement experiment")
    prediction_type: Literal["v_prediction", "epsilon"] = Field("v_prediction", description="the engine converts "
                                                                "either to eps")
    beta_schedule: Literal["squaredcos_cap_v2", "linear"] = Field("squaredcos_cap_v2", description="cosine; linear "
                                                                  "is the hub DDPMs' schedule")
    timestep_spacing: Literal["trailing", "leading", "linspace"] = Field(
        "trailing", description="trailing: sampling starts at t=999 (no signal leak at the first step)")
    checkpoint_every: int = Field(250, ge=1)
    sample_every: int = Field(1000, ge=1)
    skip_dropout: float = Field(0.0, ge=0, le=1, description="probability of zeroing a sample's down-block skips, so "
                                "that the decoder must draw from h alone (phase 2 uses it)")
    init_from: Optional[str] = Field(None, description="an exported model to start from; null: random weights from "
                                     "the seed")


#: what phase 2 must share with phase 1 (the model and the data): interpolated from train_toy in the
#: defaults, so that one override of train_toy reaches both phases
PHASE_1_KEYS = ("batch_size", "min_snr_gamma", "block_out_channels", "layers_per_block", "correlations",
                "prediction_type", "beta_schedule", "timestep_spacing")


class FinetuneToyConfig(ToyTrainConfig):
    """hspace finetune-toy: phase 2, the embedded default itself (resumable); its model and data keys
    (batch_size, min_snr_gamma, block_out_channels, ..., timestep_spacing) follow train_toy"""

    out_dir: str = "runs/finetune-toy"
    init_from: Optional[str] = Field("runs/train-toy/model", description="phase 1's EMA weights (float32)")
    steps: int = Field(1000, ge=1)
    lr: float = Field(3e-4, gt=0, description="cosine decay to 5%, no warm-up")
    warmup_steps: int = Field(0, ge=0)
    ema_decay: float = Field(0.995, ge=0, le=1)
    seed: Seed = Field(1, description="other batches than phase 1's")
    checkpoint_every: int = Field(100, ge=1)
    sample_every: int = Field(400, ge=1)
    skip_dropout: float = Field(0.75, ge=0, le=1, description="the decoder must draw 3 faces in 4 from h alone: the "
                                "eyes become editable")


class ToyAnnotatorTrainConfig(Section):
    """hspace train-toy-annotator: the toy-face factor reader"""

    out_dir: str = "runs/train-toy-annotator"
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(32, ge=1)
    seed: Seed = 0
