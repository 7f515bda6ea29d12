"""hspace: discover, apply and evaluate editing directions in the h-space of diffusion models."""
from .model import HSpaceModel, InversionOutput, SampleOutput

__all__ = ["HSpaceModel", "SampleOutput", "InversionOutput"]
