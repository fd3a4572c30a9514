"""`tprl precompute` on a local Ray: the Parquet output read with plain pyarrow, rejects, resuming."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import kill_tree

from tprl_ray.data.digits import DigitsConfig, build_digits
from tprl_ray.data.layout import read_split
from tprl_ray.precompute.config import PrecomputeConfig
from tprl_ray.precompute.job import run_precompute
from tprl_ray.precompute.schema import SCHEMA_VERSION, padded_tokens, tensor


@pytest.fixture(scope="module")
def local_ray():
    yield
    ray.shutdown()


def config(data: Path, out: Path, batch_size: int = 32, **kw) -> PrecomputeConfig:
    return PrecomputeConfig(data=data, out=out, ray_address="local", pool={"cpus": 0.5, "batch_size": batch_size}, **kw)


def test_train_split_to_parquet_that_plain_pyarrow_reads(local_ray, digits_dir, tmp_path):
    cfg = config(digits_dir / "train", tmp_path / "pc", shard_size=48, batch_size=16)
    summary = run_precompute(cfg, progress=False)
    samples = read_split(digits_dir / "train")
    assert summary["rows"] == len(samples) == 160 and summary["shards"] == 4 and summary["rejects"] == 0
    table = pq.read_table(tmp_path / "pc" / "shards")  # plain pyarrow, no Ray
    assert sorted(table["sample_id"].to_pylist()) == sorted(s.question_id for s in samples)
    assert table.schema.metadata[b"tprl.schema_version"] == str(SCHEMA_VERSION).encode()
    kind = table.schema.field("features").type  # list<fixed_size_list<halffloat>[96]>
    assert kind.value_type.list_size == 96 and str(kind.value_type.value_type) == "halffloat"
    assert np.asarray(table["features"][0].as_py()).shape == (64, 96)  # one list entry per token
    (features, counts), (attention, _), (masks, _) = (
        padded_tokens(table[c]) for c in ("features", "attention", "demo_masks")
    )
    query = tensor(table["query"])
    assert features.shape == (160, 64, 96) and features.dtype == np.float16 and (counts == 64).all()
    assert attention.shape == (160, 64) and attention.dtype == np.float32
    assert query.shape == (160, 128) and masks.shape == (160, 64, 3) and masks.dtype == np.uint8  # token-major
    assert (masks.sum(1) == [64, 48, 32]).all()
    assert (masks[..., 1:] <= masks[..., :-1]).all()  # each step's kept tokens are a subset of the previous step's
    assert "llm_tokens" not in table.column_names  # LLaVA's scorer projects the features
    logp = table["full_logp"].to_numpy()
    assert (logp <= 0).all() and table["full_correct"].to_numpy().mean() > 0.8
    # the scorer's LLM-ready tokens come back from the stored features through LLaVA's projector
    from tprl_ray.backbones.load import load_backbone
    from tprl_ray.data.layout import load_image

    backbone = load_backbone("embedded")
    image = table["image"][0].as_py()
    tokens = backbone.encode([load_image(digits_dir / "train", image)]).llm_tokens[0]
    with torch.no_grad():
        projected = backbone.model.model.multi_modal_projector(torch.from_numpy(features[0].copy()).float())
    torch.testing.assert_close(projected, tokens, atol=2e-2, rtol=0)
    again = run_precompute(cfg, progress=False)
    assert again["shards_skipped"] == 4 and again["rows"] == 160


def test_corrupt_image_and_missing_answer_are_rejected_with_reasons(local_ray, digits_dir, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(digits_dir / "train", split)
    samples = read_split(split)
    broken = samples[20].image  # in the second batch of the first shard: rejects name the right questions
    (split / "images" / broken).write_bytes(b"not an image")
    answers = [json.loads(x) for x in (split / "answers.jsonl").read_text().splitlines()]
    empty = next(s for s in samples if s.image != broken).question_id
    answers = [a | {"answer": ""} if a["question_id"] == empty else a for a in answers[:-1]]  # last one: no answer
    (split / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    summary = run_precompute(config(split, tmp_path / "pc", shard_size=64, batch_size=16), progress=False)
    on_broken = {s.question_id for s in samples if s.image == broken}
    rejects = pq.read_table(tmp_path / "pc" / "rejects").to_pylist()
    by_reason = {r["sample_id"]: r["reason"] for r in rejects}
    assert set(by_reason) == on_broken | {samples[-1].question_id, empty}
    assert all("cannot read image" in by_reason[q] for q in on_broken) and "empty answer" in by_reason[empty]
    assert "has no answer" in by_reason[samples[-1].question_id]
    kept = pq.read_table(tmp_path / "pc" / "shards")["sample_id"].to_pylist()
    assert sorted(kept) == sorted(s.question_id for s in samples[:-1] if s.question_id not in on_broken | {empty})
    assert summary["rejects"] == len(on_broken) + 1 and summary["unanswered"] == 1


def test_an_interrupted_run_resumes_with_every_sample_once(local_ray, tmp_path):
    build_digits(DigitsConfig(out=tmp_path / "data", seed=0, split_sizes={"train": 200, "val": 1, "test": 1}))
    data, out = tmp_path / "data" / "train", tmp_path / "pc"
    args = [
        "--data",
        str(data),
        "--out",
        str(out),
        "--shard-size",
        "16",
        "--pool.batch-size",
        "8",
        "--pool.cpus",
        "0.5",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tprl_ray.cli", "precompute", *args, "--ray-address", "local"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while not list((out / "rejects").glob("shard-*.parquet")) and time.time() < deadline:
            assert proc.poll() is None, "the first run ended before it was interrupted"
            time.sleep(0.01)
    finally:
        kill_tree(proc)
    done = {p.name: p.read_bytes() for p in (out / "shards").glob("shard-*.parquet")}
    completed = len(list((out / "rejects").glob("shard-*.parquet")))
    assert 1 <= completed < 50
    summary = run_precompute(config(data, out, shard_size=16, batch_size=8), progress=False)
    assert summary["shards_skipped"] == completed and summary["rows"] == 800
    ids = pq.read_table(out / "shards")["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 800
    assert sorted(ids) == sorted(s.question_id for s in read_split(data))
    assert all((out / "shards" / name).read_bytes() == blob for name, blob in done.items())  # never rewritten
    assert json.loads((out / "manifest.json").read_text())["rows"] == 800
    assert not list(out.rglob("*.tmp"))


def test_a_different_run_into_the_same_directory_is_refused(digits_dir, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must start at 0.0"):
        PrecomputeConfig(demo_schedule=[0.25, 0.5])
    run_precompute(config(digits_dir / "val", tmp_path / "pc", limit=4), progress=False, engine="local")
    with pytest.raises(ValueError, match="other demo_schedule"):
        run_precompute(
            config(digits_dir / "val", tmp_path / "pc", limit=4, demo_schedule=[0.0, 0.5]),
            progress=False,
            engine="local",
        )


def test_precompute_bench_compares_both_engines(local_ray, digits_dir, tmp_path):
    from tprl_ray.bench.config import PrecomputeBenchConfig
    from tprl_ray.bench.precompute import format_precompute_bench, run_precompute_bench

    cfg = PrecomputeBenchConfig(
        data=digits_dir / "val",
        limit=16,
        work=tmp_path / "work",
        out=tmp_path / "b.json",
        shard_size=8,
        pool={"batch_size": 8, "cpus": 0.5},
        ray_address="local",
    )
    result = run_precompute_bench(cfg)
    assert json.loads(cfg.out.read_text()) == result
    assert {e: r["rows"] for e, r in result["engines"].items()} == {"local": 16, "ray": 16}
    assert result["engines"]["ray"]["bytes_per_sample"] == pytest.approx(result["engines"]["local"]["bytes_per_sample"])
    assert result["projected_gb"] == pytest.approx(50_000 * (576 * 1024 * 2 + 576 * 4 + 4096 * 4 + 3 * 576) / 1e9)
    for name, r in result["engines"].items():  # the start-up's parts happen in this order, inside it
        parts = r["startup"]
        assert 0 < parts["prepared"] <= parts["first_worker_ready"] <= r["startup_seconds"] < r["seconds"], name
        assert parts["prepared"] + parts["ray_init"] <= parts["first_worker_ready"], name
    assert result["engines"]["local"]["startup"]["ray_init"] < 0.01  # the loop starts no Ray
    assert "ray / local" in format_precompute_bench(result)


def test_a_question_aware_demonstrator_gives_nested_masks_that_follow_the_question(digits_dir, tmp_path):
    from tprl_ray.precompute.demonstrations import demonstration_masks
    from tprl_ray.pruners.cdpruner import CDPruner

    out = tmp_path / "cd"
    run_precompute(config(digits_dir / "val", out, limit=8, demonstrator="cdpruner"), progress=False, engine="local")
    table = pq.read_table(out / "shards" / "shard-00000.parquet")
    masks = padded_tokens(table["demo_masks"])[0].transpose(0, 2, 1)  # [rows, steps, tokens]
    n = masks.shape[-1]
    assert masks[:, 0].all() and (masks[:, 1].sum(axis=1) == round(0.75 * n)).all()
    assert (masks[:, 2] <= masks[:, 1]).all()  # nested
    torch.manual_seed(0)
    tokens, query = torch.randn(16, 8), torch.randn(8)
    first = demonstration_masks(CDPruner(), tokens, tokens, torch.ones(16), query, [0.0, 0.5])[1]
    other = demonstration_masks(CDPruner(), tokens, tokens, torch.ones(16), -query, [0.0, 0.5])[1]
    assert not torch.equal(first, other)  # another question, other tokens
    with pytest.raises(ValueError, match="other demonstrator"):
        run_precompute(config(digits_dir / "val", out, limit=8), progress=False, engine="local")


def test_the_pool_has_no_more_actors_than_the_cluster_holds(tmp_path):
    from tprl_ray.precompute.job import pool_size

    ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        cfg = PrecomputeConfig(out=tmp_path)  # two actors of 0.75 CPUs and two decoding tasks of 0.25
        assert pool_size(cfg) == (1, 0.0)
        assert pool_size(cfg.model_copy(update={"pool": cfg.pool.model_copy(update={"gpus": 0})})) == (2, 0)
    finally:
        ray.shutdown()
