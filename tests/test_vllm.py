"""The ``vllm`` backend for real, where an interpreter with vLLM and Ray 2.60 is given in ``TPRL_VLLM_PYTHON``
(skipped otherwise: vLLM pins its own torch, so it never shares the project's virtualenv). Its scorer's
log-likelihoods and greedy answers against ``hf``'s, and `tprl serve` on it: `tprl eval`'s answers, and
requests of different kept counts in flight together."""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serve import QUESTIONS, chat, eval_predictions, serving

from tprl_ray.config import BackboneConfig, VllmConfig
from tprl_ray.data.layout import read_split

PYTHON = os.environ.get("TPRL_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="TPRL_VLLM_PYTHON (an interpreter with vLLM and Ray) not set")
REPO = str(Path(__file__).resolve().parents[1])


def runtime_env() -> dict:
    return {"py_executable": PYTHON, "env_vars": {"PYTHONPATH": REPO, "VLLM_CPU_KVCACHE_SPACE": "1"}}


def test_vllm_scores_agree_with_hf(digits_dir):
    import ray

    from tprl_ray.bench.vllm import agreement
    from tprl_ray.ray_setup import init_ray

    init_ray("local")
    try:
        cfg = BackboneConfig(backend="vllm", vllm=VllmConfig(runtime_env=runtime_env(), enforce_eager=True))
        result = agreement(cfg, digits_dir / "test", 24, [1.0, 0.25])
    finally:
        ray.shutdown()
    assert result["n"] == 24
    for fraction in ("1.0", "0.25"):
        r = result["fractions"][fraction]
        assert r["max_abs_logp_diff"] < 1e-4 and r["correct_agree"] == 1.0 and r["answers_agree"] == 1.0, r


def test_vllm_serving_answers_equal_tprl_eval(tmp_path_factory, digits_dir):
    from openai import OpenAI

    env = json.dumps(runtime_env())  # a flag's value is YAML: JSON is YAML
    args = ["--pruner", "vispruner", "--budget", "0.25", "--backbone.backend", "vllm"]
    args += ["--backbone.vllm.runtime-env", env, "--backbone.vllm.enforce-eager", "true"]
    split = digits_dir / "test"
    samples = read_split(split)[:QUESTIONS]
    images = {s.image: (split / "images" / s.image).read_bytes() for s in samples}
    tmp = tmp_path_factory.mktemp("vs")  # short: Ray's socket paths must stay under 108 characters
    with serving(tmp, *args) as server:
        expected = eval_predictions(server, split, tmp / "report.json", "vispruner", "vispruner_25")
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda s: chat(client, s.text, images[s.image]), samples))
            assert [a.choices[0].message.content for a in answers] == [expected[s.question_id] for s in samples]
            # three kept counts in flight at once: one engine step may not mix them (the count gate)
            budgets = [0.25, 1.0, 8] * 4
            mixed = list(pool.map(lambda b: chat(client, samples[0].text, images[samples[0].image], budget=b), budgets))
        assert [m.usage.visual_tokens for m in mixed] == [16, 64, 8] * 4


def test_vllm_scorer_service_rewards_agree_with_hf(precomputed):
    """The PPO scorer deployment on the vllm backend: its rewards for full and pruned keep masks."""
    import numpy as np
    import pyarrow.parquet as pq
    import ray
    import torch
    from ray import serve

    from tprl_ray.backbones.load import load_backbone
    from tprl_ray.precompute.schema import tensor
    from tprl_ray.ray_setup import init_ray
    from tprl_ray.service.config import ScorerConfig
    from tprl_ray.service.scorer import APP, scorer_handle, start_scorer

    shard = sorted((precomputed / "train" / "shards").glob("*.parquet"))[0]
    table = pq.read_table(shard).slice(0, 16)
    ids = table["sample_id"].to_pylist()
    features = torch.from_numpy(tensor(table["features"]))
    rng = np.random.default_rng(0)
    masks = np.ones((32, features.shape[1]), np.uint8)
    masks[16:] = 0
    for row in masks[16:]:
        row[rng.choice(features.shape[1], 16, replace=False)] = 1
    hf = load_backbone("embedded")
    keep = [torch.from_numpy(m).nonzero()[:, 0] for m in masks]
    questions, answers = table["question"].to_pylist() * 2, table["answer"].to_pylist() * 2
    expected, expected_ok = hf.score(questions, answers, hf.project(torch.cat([features, features])), keep)
    init_ray("local")
    try:
        backbone = BackboneConfig(backend="vllm", vllm=VllmConfig(runtime_env=runtime_env(), enforce_eager=True))
        start_scorer(ScorerConfig(backbone=backbone, threads=1), precomputed / "train")
        logp, correct = scorer_handle().score.remote(ids * 2, masks).result(timeout_s=300)
        serve.delete(APP)
    finally:
        scorer_handle.cache_clear()
        ray.shutdown()
    assert np.abs(logp - expected.numpy()).max() < 1e-4
    assert (correct == expected_ok.numpy()).all()
