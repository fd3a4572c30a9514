"""The ``vllm`` backend against ``hf`` on the same inputs: answer log-likelihoods, greedy-correct flags and
greedy answers of a split's questions at several kept fractions (one random keep-set per question).

:func:`agreement` runs as a Ray task in the runtime environment of ``backbone.vllm`` (vLLM pins its own
torch), on a GPU when the cluster has one; ``tprl bench serve --backend vllm`` calls it before the load
tests and puts the result in its JSON.
"""

from __future__ import annotations

from pathlib import Path

from tprl_ray.config import BackboneConfig


def vllm_outputs(backbone: dict, questions, answers, tokens, keeps: dict) -> dict:
    """In vLLM's environment: the ``vllm`` backend's scores and greedy answers under each keep-set."""
    from tprl_ray.backbones.load import load_backbone

    vllm = load_backbone(BackboneConfig.model_validate(backbone).model_copy(update={"backend": "vllm"}))
    out = {}
    for fraction, keep in keeps.items():
        logp, ok = vllm.score(questions, answers, tokens, keep)
        out[fraction] = (logp, ok, vllm.generate(questions, tokens, keep, max_new_tokens=8))
    return out


def agreement(cfg: BackboneConfig, data: Path, limit: int, fractions: list[float]) -> dict:
    """Per kept fraction: max and mean |log-likelihood difference| and the share of samples whose
    greedy-correct flag and greedy answer agree, vllm (a Ray task in ``cfg.vllm.runtime_env``, one GPU
    when the cluster has GPUs) against hf (this process) on the same visual tokens and keep-sets."""
    import ray
    from PIL import Image

    from tprl_ray.backbones.load import load_backbone
    from tprl_ray.data.layout import read_split
    from tprl_ray.pruners.random import random_keep
    from tprl_ray.ray_setup import gpus_per_actor

    samples = read_split(Path(data))[:limit]
    hf = load_backbone(cfg.model_copy(update={"backend": "hf"}))
    images = [Image.open(Path(data) / "images" / s.image).convert("RGB") for s in samples]
    tokens = hf.encode(images).llm_tokens.cpu()
    questions, answers = [s.text for s in samples], [s.answer for s in samples]
    keeps = {f: None if f >= 1 else random_keep(tokens, f) for f in fractions}
    task = ray.remote(num_cpus=1, num_gpus=gpus_per_actor(None), runtime_env=cfg.vllm.runtime_env)(vllm_outputs)
    remote = ray.get(task.remote(cfg.model_dump(mode="json"), questions, answers, tokens, keeps))
    out = {"n": len(samples), "fractions": {}}
    for fraction, keep in keeps.items():
        hf_logp, hf_ok = hf.score(questions, answers, tokens.to(hf.device), keep)
        hf_text = hf.generate(questions, tokens.to(hf.device), keep, max_new_tokens=8)
        v_logp, v_ok, v_text = remote[fraction]
        diff = (hf_logp.double() - v_logp.double()).abs()
        out["fractions"][str(fraction)] = {
            "max_abs_logp_diff": float(diff.max()),
            "mean_abs_logp_diff": float(diff.mean()),
            "correct_agree": float((hf_ok == v_ok).float().mean()),
            "answers_agree": sum(a == b for a, b in zip(hf_text, v_text)) / len(samples),
            "hf_mean_logp": float(hf_logp.mean()),
        }
    return out


def format_agreement(result: dict) -> str:
    lines = [f"vllm against hf on {result['n']} questions"]
    for fraction, r in result["fractions"].items():
        lines.append(
            f"  kept {float(fraction):.2f}: |dlogp| max {r['max_abs_logp_diff']:.2e} "
            f"mean {r['mean_abs_logp_diff']:.2e}, "
            f"greedy-correct agree {r['correct_agree']:.0%}, answers agree {r['answers_agree']:.0%}"
        )
    return "\n".join(lines)
