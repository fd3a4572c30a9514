"""Training on a mixture of datasets and evaluating a suite: the precompute records each sample's
dataset, the environment draws datasets by weight, `tprl eval --suite` and `tprl report` write the
paper's Table 1 layout. The pipeline on a two-dataset mixture and a two-benchmark suite runs in
test_reproducible.py (with several seeds and twice with one)."""

import json
from collections import Counter

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tprl_ray.cli import main
from tprl_ray.data.config import DataPart
from tprl_ray.data.layout import read_split
from tprl_ray.data.mixture import Mixture
from tprl_ray.evaluation.config import EvalConfig
from tprl_ray.evaluation.table1 import format_suite, mean_suites, suite_table
from tprl_ray.precompute.config import PrecomputeConfig
from tprl_ray.precompute.job import run_precompute
from tprl_ray.rl.codes import Codes
from tprl_ray.rl.config import EnvConfig
from tprl_ray.rl.env import PruningVectorEnv

SUBSETS = ("readexist", "countwhere")


@pytest.fixture
def local_ray():
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def parts(mixture_parts):
    return mixture_parts


def test_a_mixture_prefixes_ids_and_finds_each_image(parts):
    mixture = Mixture.of([DataPart(name=n, path=p["train"]) for n, p in parts.items()])
    samples = mixture.read()
    by_part = Counter(mixture.dataset(s.question_id) for s in samples)
    assert by_part == {n: len(read_split(p["train"])) for n, p in parts.items()}
    first = samples[0]
    assert first.question_id.startswith("readexist/") and first.image.startswith("readexist/")
    assert mixture.image_path(first.image) == parts["readexist"]["train"] / "images" / first.image.split("/", 1)[1]
    single = Mixture.of(parts["readexist"]["train"])  # one split: ids as they are
    assert single.read()[0].question_id == first.question_id.split("/", 1)[1]
    with pytest.raises(ValueError, match="repeat a name"):
        PrecomputeConfig(data=[{"name": "a", "path": "x"}, {"name": "a", "path": "y"}])


def test_precompute_records_the_dataset_of_each_sample(parts, tmp_path):
    data = [DataPart(name=n, path=p["train"], weight=w) for (n, p), w in zip(parts.items(), (3.0, 1.0))]
    cfg = PrecomputeConfig(data=data, out=tmp_path / "pc", shard_size=64, limit=20)
    summary = run_precompute(cfg, progress=False, engine="local")
    assert summary["rows"] == 40 and summary["datasets"] == {"readexist": 20, "countwhere": 20}
    table = pq.read_table(sorted((tmp_path / "pc" / "shards").glob("*.parquet")), columns=["sample_id", "dataset"])
    for sample_id, dataset in zip(table["sample_id"].to_pylist(), table["dataset"].to_pylist()):
        assert sample_id.split("/")[0] == dataset
    manifest = json.loads((tmp_path / "pc" / "manifest.json").read_text())
    assert [p["name"] for p in manifest["data"]] == list(SUBSETS) and manifest["schema_version"] == 3
    # the weights are the environment's: other weights reuse the precompute
    other = cfg.model_copy(update={"data": [part.model_copy(update={"weight": 1.0}) for part in data]})
    assert run_precompute(other, progress=False, engine="local")["shards_skipped"] == summary["shards"]


def test_the_environment_draws_datasets_by_weight():
    m, n = 40, 8
    rng = np.random.default_rng(0)
    dataset = np.array(["big"] * 30 + ["small"] * 10, dtype=object)  # 30 samples of one, 10 of the other
    codes = Codes(
        np.array([f"s{i}" for i in range(m)]),
        rng.normal(size=(m, n, 4)).astype(np.float16),
        rng.normal(size=(m, 3)).astype(np.float32),
        np.zeros(m, np.float32),
        np.ones(m, bool),
        (2, 4),
        dataset,
    )
    cfg = EnvConfig(reward="sample", weights={"big": 1.0, "small": 3.0})
    env = PruningVectorEnv(codes, cfg, 64, score_fn=None, seed=0)
    drawn = Counter()
    for seed in range(50):
        env.reset(seed=seed)
        drawn.update(dataset[env.index])
    share = drawn["small"] / sum(drawn.values())
    assert 0.70 < share < 0.80  # 3:1 by weight although the data hold 1:3 (3,200 draws: std 0.008)
    uniform = PruningVectorEnv(codes, cfg.model_copy(update={"weights": {}}), 64, score_fn=None, seed=0)
    uniform.reset(seed=0)
    assert np.array_equal(uniform.index, np.random.default_rng(0).integers(0, m, size=64))  # the old stream
    for weights, message in (({"big": 1.0}, "no weight for dataset"), ({**cfg.weights, "x": 1.0}, "lacks")):
        with pytest.raises(ValueError, match=message):
            PruningVectorEnv(codes, cfg.model_copy(update={"weights": weights}), 64, score_fn=None)


def test_table1_layout_and_seed_means():
    def report(benchmark, scores):
        rows = [
            {"label": label, "pruner": label.split("_")[0], "budget": budget, "accuracy": score,
             "relative": score / scores[0], "avg_tokens": 576 * budget, "flops": 1e12 * budget}
            for (label, budget), score in zip((("none_100", 1.0), ("vispruner_33", 1 / 3)), scores)
        ]  # fmt: skip
        return {"benchmark": benchmark, "model": "m", "data": f"d/{benchmark}", "n": 10, "rows": rows}

    table = suite_table({"gqa": report("gqa", [0.62, 0.581]), "mme": report("mme", [1553.4, 1475.0])},
                        {"gqa": "gqa", "mme": "mme"})  # fmt: skip
    text = format_suite(table)
    assert "| Method | Budget | Tokens | gqa | mme | Avg. |" in text
    assert "| none (upper bound) | 100% | 576.0 | 62.0 (100.0%) | 1553.4 (100.0%) | - (100.0%) |" in text
    average = (0.581 / 0.62 + 1475.0 / 1553.4) / 2
    assert table["rows"][1]["relative"] == pytest.approx(average)
    assert f"| vispruner | 33.3% | 192.0 | 58.1 (93.7%) | 1475.0 (95.0%) | - ({100 * average:.1f}%) |" in text
    other = suite_table({"gqa": report("gqa", [0.62, 0.55]), "mme": report("mme", [1553.4, 1475.0])},
                        {"gqa": "gqa", "mme": "mme"})  # fmt: skip
    mean = mean_suites([table, other], [0, 1])
    spread = abs(table["rows"][1]["relative"] - other["rows"][1]["relative"]) / 2**0.5
    assert mean["rows"][1]["relative_std"] == pytest.approx(spread)
    assert mean["rows"][1]["cells"]["gqa"]["score"] == pytest.approx((0.581 + 0.55) / 2)
    assert "mean of seeds 0, 1" in format_suite(mean)


def test_eval_suite_and_report_write_table1(parts, tmp_path, monkeypatch, local_ray):
    suite = {
        "benchmarks": [
            {"name": name, "benchmark": "digits", "data": str(p["test"]), "limit": 24} for name, p in parts.items()
        ]
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval" / "table1.json"
    args = [
        "--suite",
        str(tmp_path / "suite.yaml"),
        "--pruners",
        "random,vispruner",
        "--out",
        str(out),
        "--ray-address",
        "local",
    ]
    assert main(["eval", *args, "--budgets", "0.25", "--mlflow-uri", uri]) == 0
    table = json.loads(out.read_text())
    assert [r["label"] for r in table["rows"]] == ["none_100", "random_25", "vispruner_25"]
    for name in SUBSETS:
        report = json.loads((tmp_path / "eval" / name / "report.json").read_text())
        assert report["n"] == 24 and report["data"] == str(parts[name]["test"])
        for row, own in zip(table["rows"], report["rows"]):
            assert row["cells"][name] == {k: own[k] for k in ("relative", "avg_tokens")} | {"score": own["accuracy"]}
    for row in table["rows"]:
        assert row["relative"] == pytest.approx(np.mean([c["relative"] for c in row["cells"].values()]))
    assert out.with_suffix(".md").read_text().strip() == format_suite(table)
    # `tprl report` over the two benchmarks' reports writes the same table
    reports = ",".join(str(tmp_path / "eval" / name / "report.json") for name in SUBSETS)
    assert main(["report", "--inputs", reports, "--table1", "--out", str(tmp_path / "t1.md"), "--mlflow-uri", uri]) == 0
    # (two reports of one scorer: --table1 asks for the layout, their columns are named by their folders)
    assert (tmp_path / "t1.md").read_text() == out.with_suffix(".md").read_text()
    assert json.loads((tmp_path / "t1.json").read_text())["rows"] == table["rows"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("tprl-eval").experiment_id])}
    assert set(runs) == {"evaluation", "evaluation-readexist", "evaluation-countwhere"}
    assert runs["evaluation"].data.metrics["vispruner_25.avg_relative"] == table["rows"][2]["relative"]
    with pytest.raises(ValueError, match="suite benchmarks"):
        EvalConfig(suite=[suite["benchmarks"][0], suite["benchmarks"][0]])
