"""`tprl ablate`: Table 6 (method) on a few questions over two seeds, its Markdown table, plot, JSON and
MLflow child runs; a re-run reuses every finished setting; the config's presets and refusals."""

import json

import mlflow
import pytest
import ray

from tprl_ray.config import ConfigError
from tprl_ray.pipeline.ablate import run_ablate
from tprl_ray.pipeline.config import AblateConfig


@pytest.fixture(scope="module")
def ablated(tmp_path_factory, small_pipeline):
    out = tmp_path_factory.mktemp("ablate")
    pipeline = {k: v for k, v in small_pipeline.items() if k not in ("trajectories", "pruners")}  # ablate's own
    pipeline |= {"train_questions": 32, "eval_questions": 24}  # eight trainings: the fewest questions that learn
    fields = {"out": out, "ablations": ["method"], "seeds": [0, 1], "pipeline": pipeline, "ray_address": "local"}
    cfg = AblateConfig.model_validate(fields)
    try:
        yield cfg, run_ablate(cfg)
    finally:
        ray.shutdown()


def test_method_ablation_trains_each_setting_per_seed_and_writes_table_plot_and_runs(ablated):
    cfg, results = ablated
    rows = {r["name"]: r for r in results["method"]}
    assert list(rows) == ["vispruner", "rl-scratch", "lfd", "lfd+ppo"]
    assert {r["pruner"] for r in rows.values()} == {"vispruner", "tprl", "lfd"}
    assert all(r["seeds"] == [0, 1] and r["budgets"] == [0.25] for r in rows.values())
    assert rows["vispruner"]["relative_std"] == [0.0]  # a rule: the seed changes nothing
    assert all(0 < r["relative"][0] <= 1.5 for r in rows.values())
    # every trained setting has its own export per seed; LfD is shared by lfd and lfd+ppo
    assert len(list((cfg.out / "shared").glob("lfd-*/seed-*/policy.safetensors"))) == 2
    assert len(list((cfg.out / "runs").glob("*/seed-*/ppo/policy.safetensors"))) == 4
    table = (cfg.out / "method.md").read_text()
    assert "| rl-scratch |" in table and "± " in table and "seeds 0, 1" in table
    assert (cfg.out / "method.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((cfg.out / "ablations.json").read_text()) == results

    client = mlflow.MlflowClient(f"sqlite:///{cfg.out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tprl-ablate").experiment_id
    parent = client.search_runs([experiment], "attributes.run_name = 'ablate'")[-1]
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {r.info.run_name for r in children}
    assert {"method/vispruner", "method/rl-scratch", "method/lfd", "method/lfd+ppo"} <= names
    scratch = next(r for r in children if r.info.run_name == "method/rl-scratch")
    assert scratch.data.metrics["relative_0.250"] == pytest.approx(rows["rl-scratch"]["relative"][0])
    stages = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{scratch.info.run_id}'")
    assert {r.info.run_name for r in stages} >= {"autoencoder", "ppo", "evaluation"}


def test_a_rerun_reuses_every_finished_setting_and_stage(ablated):
    cfg, results = ablated
    exports = sorted(cfg.out.rglob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in exports]
    (report,) = [p for p in (cfg.out / "runs").glob("*/seed-1/report.json") if (p.parent / "ppo").is_dir()][:1]
    report.unlink()  # that seed is evaluated again, from the exports it trained
    assert run_ablate(cfg) == results
    assert [p.stat().st_mtime_ns for p in exports] == stamps and report.is_file()


def test_quick_fills_what_is_not_given_and_bad_settings_are_refused():
    quick = AblateConfig.load(overrides={"quick": True, "pipeline.ppo.iterations": 3})
    assert quick.seeds == [0, 1] and quick.t_max == [1, 3, 5] and quick.pipeline.ppo.iterations == 3
    assert quick.pipeline.train_questions == 3000 and quick.chosen() == [
        "method", "t_max", "architecture", "latent", "optimiser"
    ]  # fmt: skip
    assert AblateConfig(ablations=["latent", "method"]).chosen() == ["method", "latent"]
    with pytest.raises(ConfigError, match="unknown ablation 'tmax'"):
        AblateConfig.load(overrides={"ablations": ["tmax"]})
    with pytest.raises(ConfigError, match=r"seeds \[1, 1\] repeat a seed"):
        AblateConfig.load(overrides={"seeds": [1, 1]})
    with pytest.raises(ConfigError, match=r"pipeline: \['seeds'\] are set by tprl ablate"):
        AblateConfig.load(overrides={"pipeline.seeds": [0, 1]})
