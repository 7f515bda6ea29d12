"""Annotators: networks that score generated images (attributes, pose, CLIP zero-shot).

Build one by name with ``build_annotator(name, options, device)``; built-in names: ``clip``
(annotators.clip), ``face_pose`` (annotators.face_pose), ``celeba`` and ``hopenet``
(annotators.celeba), ``toy`` and ``toy_consistency`` (toyfaces.annotator). The modules are
imported on first use (lazy ``"module:factory"`` entries in ``ANNOTATORS``), so importing this
package stays light.
"""
from pathlib import Path

from annotators.base import ANNOTATORS, Annotator, build_annotator, register

#: Weights that ship inside the package (the toy annotator's, used by toyfaces.annotator).
ASSETS = Path(__file__).resolve().parent / "assets"

__all__ = ["ANNOTATORS", "ASSETS", "Annotator", "assets_identity", "build_annotator", "register"]


def assets_identity() -> str:
    """A content hash of the annotator weights shipped in the package."""
    from pipeline.io import hash_tree

    return hash_tree(ASSETS)
