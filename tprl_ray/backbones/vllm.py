"""The ``vllm`` backend: LLaVA's language model in a vLLM engine, fed the kept visual tokens as image embeddings.

vLLM accepts precomputed post-projector image embeddings for LLaVA (``enable_mm_embeds``) with any
number of rows: the prompt's one image token becomes as many placeholders as there are rows, so a
pruned set goes in as is (positions contiguous, as the ``hf`` LLaVA adapter recompacts them). The
vision side (encoder, projector, query embeddings, prompts) stays the ``hf`` adapter's, with its
decoder layers dropped. Scoring reads prompt log-probabilities: the answer's mean log-likelihood, and
greedy-correct when every answer token (and the end of turn) is the top-1 token at its position.

Two facts of vLLM 0.32-0.33 shape this module. Its LLaVA loader expects the vision weights under
``vision_tower.vision_model.*``; transformers 5 saves them as ``vision_tower.*``, so the engine loads
a copy with the keys renamed (:func:`engine_checkpoint`). And one engine step cannot hold image
embeddings of different row counts (the embeddings schema's row dimension is not dynamic: the engine
dies), so scoring sends one call per kept count and serving admits one kept count at a time
(:class:`CountGate`).

Qwen2.5-VL is refused: vLLM derives its M-RoPE positions from the image grid (``image_grid_thw``),
which a pruned subset of tokens no longer fills. vLLM pins its own torch, so it runs in the runtime
environment of the actors that host it (``BackboneConfig.vllm.runtime_env``), not in this one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections import defaultdict
from pathlib import Path

import torch

from tprl_ray.backbones.base import Backbone, BackboneError, checkpoint_config
from tprl_ray.backbones.families import family_of
from tprl_ray.config import BackboneConfig


def check_vllm(cfg: BackboneConfig) -> None:
    """A ``BackboneError`` unless the ``vllm`` backend can serve the model ``cfg`` names."""
    family = family_of(checkpoint_config(cfg.resolved_path()))
    if family.model_type != "llava":
        raise BackboneError(
            f"backbone.backend vllm serves LLaVA only: {family.label} keeps each kept token's M-RoPE position, "
            "which vLLM's image-embedding input recomputes from the full image grid (use backbone.backend hf)"
        )
    if cfg.adapter is not None:
        raise BackboneError("backbone.backend vllm loads the checkpoint as is: merge the adapter first (--merge)")


def engine_checkpoint(path: Path, cache: Path) -> Path:
    """``path``, or (when its vision weights are saved as ``vision_tower.*``) a copy under ``cache`` with them
    renamed ``vision_tower.vision_model.*``, the key layout vLLM's LLaVA loader reads; made once per checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tprl_ray.artifacts.atomic import atomic_write_bytes

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BackboneError(f"{path}: the vllm backend needs safetensors weights")
    with safe_open(str(files[0]), "pt") as f:
        keys = list(f.keys())
    if not any(k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") for k in keys):
        return path
    digest = hashlib.sha256("".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files).encode())
    out = Path(cache) / f"{path.name}-{digest.hexdigest()[:12]}"
    if (out / "tprl-vllm-ready").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)

    def rename(key: str) -> str:
        head = "vision_tower."
        return head + "vision_model." + key[len(head) :] if key.startswith(head) else key

    for item in path.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            atomic_write_bytes(out / item.name, item.read_bytes())
    for file in files:
        tmp = out / f".{file.name}.{os.getpid()}.tmp"  # replicas on one node may write it at once
        save_file({rename(k): v for k, v in load_file(str(file)).items()}, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / file.name)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        atomic_write_bytes(out / index.name, json.dumps(data, indent=2).encode())
    atomic_write_bytes(out / "tprl-vllm-ready", str(path).encode())
    return out


class CountGate:
    """Admits requests of one kept-token count at a time: a step of the engine may not mix counts.

    Waiters queue in arrival order. A waiter enters when the engine is empty or busy with its count,
    and every waiter ahead of it has its count: so the requests of the count in flight keep joining
    (and batch in the engine) until another count waits, and when the engine empties, the oldest
    count enters with all its waiters up to the first of another count. A cancelled waiter (its
    client went away) leaves the queue."""

    def __init__(self):
        self.count, self.inside, self.queue = None, 0, []
        self.changed = asyncio.Condition()

    def _may_enter(self, ticket: tuple) -> bool:
        ahead = self.queue[: self.queue.index(ticket)]
        return self.count in (None, ticket[0]) and all(t[0] == ticket[0] for t in ahead)

    async def admit(self, count: int) -> None:
        ticket = (count, object())
        async with self.changed:
            self.queue.append(ticket)
            try:
                await self.changed.wait_for(lambda: self._may_enter(ticket))
            finally:
                self.queue.remove(ticket)
                self.changed.notify_all()
            self.count, self.inside = count, self.inside + 1

    async def leave(self) -> None:
        async with self.changed:
            self.inside -= 1
            if self.inside == 0:
                self.count = None
            self.changed.notify_all()


class VllmBackbone:
    """The :class:`~tprl_ray.backbones.backend.Backend` of a vLLM-hosted LLaVA."""

    def __init__(self, cfg: BackboneConfig, hf: Backbone):
        self.cfg, self.hf = cfg, hf
        self.device, self.end_id, self.projects_features = hf.device, hf.end_id, hf.projects_features
        self._engine = self._async_engine = None
        self.gate = CountGate()

    # ---- the vision side and prompts: the hf adapter's --------------------------------------
    def encode(self, images, with_attention: bool = False):
        return self.hf.encode(images, with_attention)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.hf.project(features)

    def query_embedding(self, question: str) -> torch.Tensor:
        return self.hf.query_embedding(question)

    def text_tokens(self, question: str) -> int:
        return self.hf.text_tokens(question)

    def decode(self, sequences: list[list[int]]) -> list[str]:
        return self.hf.decode(sequences)

    # ---- the engine -----------------------------------------------------------------------
    def engine_args(self) -> dict:
        v = self.cfg.vllm
        model = engine_checkpoint(self.cfg.resolved_path(), Path.home() / ".cache" / "tprl" / "vllm")
        return {
            "model": str(model),
            "dtype": self.cfg.dtype,
            "enable_mm_embeds": True,
            "limit_mm_per_prompt": {"image": 1},
            "gpu_memory_utilization": v.gpu_memory_utilization,
            "max_model_len": v.max_model_len,
            "max_num_seqs": v.max_num_seqs,
            "enforce_eager": v.enforce_eager,
            "seed": 0,
        }

    @property
    def engine(self):
        """The synchronous engine (scoring, batch generation), started on first use."""
        if self._engine is None:
            from vllm import LLM

            self._engine = LLM(**self.engine_args())
        return self._engine

    @property
    def async_engine(self):
        """The asynchronous engine (serving: continuous batching), started on first use."""
        if self._async_engine is None:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self._async_engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args()))
        return self._async_engine

    def prompt(self, question: str, visual: torch.Tensor, continuation: tuple[int, ...] = ()) -> dict:
        """The engine input: the prompt's ids around one image token, then ``continuation``; the image
        embeddings ``[k, d_llm]`` (vLLM expands the image token to ``k`` placeholders)."""
        before, after = self.hf._prompt_ids(question)
        if visual.ndim != 2 or visual.shape[0] == 0:
            raise BackboneError(f"image embeddings must be [k >= 1, d_llm], not {list(visual.shape)}")
        ids = [*before, self.hf.image_token_id, *after, *continuation]
        # a list of one [k, d] tensor: one image's embeddings (a bare [k, d] tensor would be k images)
        embeds = visual.detach().to(getattr(torch, self.cfg.dtype)).cpu()
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": [embeds]}}

    def run(self, prompts: list[dict], params) -> list:
        """``engine.generate`` over ``prompts``, one call per kept-token count, outputs in order."""
        groups = defaultdict(list)
        for i, prompt in enumerate(prompts):
            groups[prompt["multi_modal_data"]["image"][0].shape[0]].append(i)
        out = [None] * len(prompts)
        for index in groups.values():
            for i, result in zip(index, self.engine.generate([prompts[i] for i in index], params, use_tqdm=False)):
                out[i] = result
        return out

    @staticmethod
    def kept(tokens, keep, i: int) -> torch.Tensor:
        return tokens[i] if keep is None else tokens[i][torch.sort(keep[i].to(tokens[i].device)).values]

    # ---- scoring and decoding --------------------------------------------------------------
    def score(self, questions, answers, tokens, keep=None, grids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean answer log-likelihood and greedy-correct per sample, from prompt log-probabilities."""
        from vllm import SamplingParams

        targets = [self.hf.answer_ids(q, a) for q, a in zip(questions, answers)]
        prompts = [self.prompt(q, self.kept(tokens, keep, i), t) for i, (q, t) in enumerate(zip(questions, targets))]
        outputs = self.run(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0))
        logps, correct = [], []
        for target, out in zip(targets, outputs):
            positions = out.prompt_logprobs[-len(target) :]
            picked = [pos[tok] for pos, tok in zip(positions, target)]
            logps.append(sum(p.logprob for p in picked[:-1]) / max(1, len(picked) - 1))
            correct.append(all(p.rank == 1 for p in picked))
        return torch.tensor(logps), torch.tensor(correct)

    def generate_ids(self, questions, tokens, keep=None, grids=None, max_new_tokens: int = 8) -> list[list[int]]:
        from vllm import SamplingParams

        prompts = [self.prompt(q, self.kept(tokens, keep, i)) for i, q in enumerate(questions)]
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        return [list(out.outputs[0].token_ids) for out in self.run(prompts, params)]

    def generate(self, questions, tokens, keep=None, grids=None, max_new_tokens: int = 8) -> list[str]:
        return self.decode(self.generate_ids(questions, tokens, keep, grids, max_new_tokens))

    async def generate_async(self, question: str, visual: torch.Tensor, max_new_tokens: int) -> dict:
        """Greedy ids of one request through the async engine, and when its first token came (``perf_counter``)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        first, final = None, None
        await self.gate.admit(visual.shape[0])
        try:
            async for out in self.async_engine.generate(self.prompt(question, visual), params, uuid.uuid4().hex):
                first = first or time.perf_counter()
                final = out
        finally:
            await self.gate.leave()
        return {"ids": list(final.outputs[0].token_ids), "first_token": first}


def load_vllm(cfg: BackboneConfig) -> VllmBackbone:
    """The ``hf`` adapter for the vision side (its decoder layers dropped), the engine started on first use."""
    from tprl_ray.backbones.load import load_hf, resolve_device  # load imports this module lazily

    check_vllm(cfg)
    hf = load_hf(cfg.model_copy(update={"backend": "hf", "device": "cpu"}))
    hf.language_model.layers = torch.nn.ModuleList()  # the engine runs them
    hf.model.to(resolve_device(cfg.device))
    hf.device = torch.device(resolve_device(cfg.device))
    return VllmBackbone(cfg, hf)
