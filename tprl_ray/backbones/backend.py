"""The backend seam: what the scorer, the evaluation engine and the input pruners ask of a model.

A backend serves one vision-language model: it encodes images into visual tokens, scores reference
answers given each sample's kept tokens (one batched prefill) and generates from kept tokens. The
Hugging Face adapters (:class:`tprl_ray.backbones.base.Backbone`) implement it; another backend
(vLLM) registers a loader in :data:`tprl_ray.backbones.load.BACKENDS`. FastV and other in-LLM
pruners drive the decoder layers themselves and need the ``hf`` backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from tprl_ray.backbones.base import Grid, VisualTokens


@runtime_checkable
class Backend(Protocol):
    """One loaded vision-language model, driven with kept-token indices."""

    device: torch.device
    end_id: int
    projects_features: bool  # project() rebuilds the LLM tokens from stored features (else they are stored)

    def encode(self, images: Sequence, with_attention: bool = False) -> VisualTokens:
        """One vision pass over ``images``: LLM-ready tokens, policy features, attention, grids."""

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """LLM-ready visual tokens from stored pre-projector features."""

    def query_embedding(self, question: str) -> torch.Tensor:
        """The MDP's query vector for ``question``."""

    def text_tokens(self, question: str) -> int:
        """Prompt text tokens around the image."""

    def score(
        self,
        questions: list[str],
        answers: list[str],
        tokens,
        keep: list[torch.Tensor] | None = None,
        grids: list[Grid] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: mean answer log-likelihood and whether greedy decoding reproduces the answer."""

    def generate(
        self,
        questions: list[str],
        tokens,
        keep: list[torch.Tensor] | None = None,
        grids: list[Grid] | None = None,
        max_new_tokens: int = 8,
    ) -> list[str]:
        """Greedy answers from each sample's kept visual tokens."""

    def generate_ids(
        self,
        questions: list[str],
        tokens,
        keep: list[torch.Tensor] | None = None,
        grids: list[Grid] | None = None,
        max_new_tokens: int = 8,
    ) -> list[list[int]]:
        """:meth:`generate` as token ids (each ending with ``end_id`` if the answer finished)."""

    def decode(self, sequences: list[list[int]]) -> list[str]:
        """The answer text of each id sequence."""
