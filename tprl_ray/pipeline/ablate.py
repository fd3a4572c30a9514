"""`tprl ablate`: the paper's ablations on the multi-seed protocol (docs/design.md §7).

An ablation is a list of settings; a setting is the ``pipeline`` section with a few fields changed,
what it trains, and the pruner whose rows judge it:

- ``method`` (the paper's Table 6): VisPruner (the demonstrator), RL from scratch (PPO from a random
  policy), LfD alone, LfD + PPO.
- ``t_max`` (Table 7): PPO in the paper's discount regime with 1..5 steps per episode.
- ``architecture`` (Table 8): an MLP-only policy against the attention policy.
- ``latent`` (Fig. 2): the autoencoder's code size.
- ``optimiser`` (Fig. 3): PPO with a per-sample reward and the value baseline, with the
  group-relative reward (this project's default), with the paper's batch-mean reward.

Each setting runs once per seed: the autoencoder, the LfD policy and PPO as it needs, then the
evaluation of its pruner on the test split at every budget. The data, the model and the precompute
are shared; so is what settings have in common (a run directory per digest of the setting's config,
an autoencoder and an LfD policy per digest of theirs), and a (setting, seed) whose report exists
is not run again. Writes ``OUT/<ablation>.md`` (relative accuracy, mean ± std over the seeds),
``OUT/<ablation>.png`` and ``OUT/ablations.json``. MLflow: one parent run ``ablate``, a child run per
(ablation, setting) with the mean and std per budget, the stages' runs inside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.artifacts.outputs import check_writable
from tprl_ray.config import deep_merge, set_dotted
from tprl_ray.evaluation.engine import run_eval
from tprl_ray.evaluation.figures import pyplot, save_png
from tprl_ray.evaluation.report import mean_report
from tprl_ray.pipeline.config import AblateConfig, PipelineConfig, stage_configs, with_fields
from tprl_ray.pipeline.run import check_inputs, check_splits, prepare_data, prepare_model
from tprl_ray.tracking import pipeline_run, tracking_uri

TITLES = {
    "method": "Table 6: LfD and PPO against VisPruner and RL from scratch",
    "t_max": "Table 7: steps per episode (discount regime)",
    "architecture": "Table 8: MLP-only policy against attention",
    "latent": "Fig. 2: the autoencoder's code size d_l",
    "optimiser": "Fig. 3: the RL objective",
}


@dataclass(frozen=True)
class Setting:
    """One setting: ``changes`` (dotted pipeline fields), what it ``trains`` (``ppo``: autoencoder,
    LfD, PPO; ``lfd``: no PPO; ``scratch``: PPO from a random policy; ``none``: a rule) and the
    ``pruner`` whose rows judge it."""

    name: str
    changes: tuple[tuple[str, Any], ...] = ()
    trains: str = "ppo"
    pruner: str = "tprl"


def ablation_settings(cfg: AblateConfig) -> dict[str, list[Setting]]:
    discount = ("ppo.env.regime", "discount")
    return {
        "method": [
            Setting("vispruner", trains="none", pruner="vispruner"),
            Setting("rl-scratch", trains="scratch"),
            Setting("lfd", trains="lfd", pruner="lfd"),
            Setting("lfd+ppo"),
        ],
        "t_max": [Setting(f"t_max={t}", (discount, ("ppo.env.t_max", t))) for t in cfg.t_max],
        "architecture": [
            Setting("mlp-only", (("lfd.attention", False), ("ppo.attention", False))),
            Setting("attention"),
        ],
        "latent": [Setting(f"d_l={d}", (("autoencoder.latent", d),)) for d in cfg.latent],
        "optimiser": [
            Setting("ppo+value (sample reward)", (("ppo.env.reward", "sample"),)),
            Setting("group-relative"),
            Setting("batch-mean (paper)", (("ppo.env.reward", "batch"),)),
        ],
    }


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def setting_pipeline(cfg: AblateConfig, setting: Setting) -> PipelineConfig:
    """The pipeline section with the setting's changes, writing under ``cfg.out``."""
    data = cfg.pipeline.model_dump(mode="json", exclude_unset=True)  # the sections' wired fields stay unset
    for key, value in setting.changes:
        set_dotted(data, key, value)
    wired = {"out": str(cfg.out), "seeds": [], "trajectories": 0, "finetune": False}
    deep_merge(data, {**wired, "ray_address": cfg.ray_address, "mlflow_uri": cfg.mlflow_uri})
    return PipelineConfig.model_validate(data)


# where a setting runs and how it is tracked: not part of what it trains
UNTRAINED = {"out", "seed", "ray_address", "mlflow_uri", "experiment", "evaluation", "llm", "finetune", "trajectories"}


class Runner:
    """Runs settings seed by seed, sharing the precompute and what settings have in common."""

    def __init__(self, cfg: AblateConfig, data: Path, model: Path):
        self.cfg, self.data, self.model = cfg, data, model

    def home(self, pipeline: PipelineConfig, setting: Setting) -> Path:
        trained = pipeline.model_dump(mode="json", exclude=UNTRAINED)
        return self.cfg.out / "runs" / digest([trained, setting.trains, setting.pruner])

    @staticmethod
    def train(stage, function, export: str) -> None:
        """``function(stage)`` unless its export is there (the directory is keyed by the stage's config)."""
        if not all((stage.out / f"{export}.{e}").is_file() for e in ("safetensors", "json")):
            function(stage)

    def run(self, setting: Setting, seed: int) -> dict:
        """One seed of ``setting``: its training stages and the evaluation of its pruner; the report."""
        from tprl_ray.rl.train import train_ppo
        from tprl_ray.training.autoencoder import train_autoencoder
        from tprl_ray.training.lfd import train_lfd

        pipeline = setting_pipeline(self.cfg, setting)
        home = self.home(pipeline, setting)
        report_path = home / f"seed-{seed}" / "report.json"
        if report_path.is_file():
            return json.loads(report_path.read_text())
        atomic_write_bytes(home / "setting.json", json.dumps({"changes": setting.changes, **pipeline.flat()}).encode())
        stages = stage_configs(pipeline, self.data, self.model, seed, runs=home)
        shared = self.cfg.out / "shared"
        ae = stages["autoencoder"]
        ae_key = digest(ae.model_dump(mode="json", exclude=UNTRAINED))
        ae = with_fields(ae, out=shared / f"autoencoder-{ae_key}" / f"seed-{seed}")
        lfd = stages["lfd"]
        lfd_key = digest([ae_key, lfd.model_dump(mode="json", exclude=UNTRAINED | {"autoencoder"})])
        lfd = with_fields(lfd, out=shared / f"lfd-{lfd_key}" / f"seed-{seed}", autoencoder=ae.out)
        policies = {}
        if setting.trains != "none":
            print(f"[ablate] {setting.name}, seed {seed}: autoencoder {ae.out}")
            self.train(ae, train_autoencoder, "autoencoder")
        if setting.trains in ("lfd", "ppo"):
            print(f"[ablate] {setting.name}, seed {seed}: LfD {lfd.out}")
            self.train(lfd, train_lfd, "policy")
            policies["lfd"] = lfd.out
        if setting.trains in ("ppo", "scratch"):
            start = {"init": lfd.out} if setting.trains == "ppo" else {"init": None, "autoencoder": ae.out}
            ppo = with_fields(stages["ppo"], registered_model=None, **start)
            print(f"[ablate] {setting.name}, seed {seed}: PPO {ppo.out}")
            self.train(ppo, train_ppo, "policy")
            policies["tprl"] = ppo.out
        policies = {k: v for k, v in policies.items() if k == setting.pruner}
        return run_eval(with_fields(stages["evaluation"], pruners=[setting.pruner], policies=policies, out=report_path))


def summary(setting: Setting, report: dict) -> dict:
    """The setting's rows of its pruner: relative accuracy (mean, std) and accuracy per budget."""
    rows = [r for r in report["rows"] if r["pruner"] == setting.pruner]
    return {
        "name": setting.name,
        "pruner": setting.pruner,
        "changes": dict(setting.changes),
        "seeds": report["seeds"],
        "budgets": [r["budget"] for r in rows],
        "relative": [r["relative"] for r in rows],
        "relative_std": [r["relative_std"] for r in rows],
        "accuracy": [r["accuracy"] for r in rows],
    }


def markdown(ablation: str, results: list[dict]) -> str:
    budgets = results[0]["budgets"]
    head = "| setting | " + " | ".join(f"{b:.1%}" for b in budgets) + " |"
    lines = [f"### {TITLES[ablation]}", "", head, "|---" * (len(budgets) + 1) + "|"]
    for r in results:
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(r["relative"], r["relative_std"])]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    seeds = ", ".join(map(str, results[0]["seeds"]))
    lines += ["", f"Relative accuracy (over the unpruned model), mean ± sample std over seeds {seeds}."]
    return "\n".join(lines) + "\n"


def plot(ablation: str, results: list[dict], path: Path) -> None:
    """Relative accuracy per setting, one line per budget, error bars one std."""
    fig, ax = pyplot().subplots(figsize=(max(5.0, 1.3 * len(results) + 2), 3.6))
    budgets = results[0]["budgets"]
    for j, budget in enumerate(budgets):
        shift = 0.08 * (j - (len(budgets) - 1) / 2)  # side by side, so that the error bars stay apart
        means = [r["relative"][j] for r in results]
        spread = [r["relative_std"][j] for r in results]
        x = [i + shift for i in range(len(results))]
        ax.errorbar(x, means, yerr=spread, marker="o", capsize=3, label=f"{budget:.1%} kept")
    ax.set_xticks(range(len(results)), [r["name"] for r in results], rotation=20, ha="right")
    ax.set_ylabel("relative accuracy")
    ax.set_title(TITLES[ablation], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path, bbox_inches="tight", dpi=120)


def run_ablate(cfg: AblateConfig) -> dict:
    """Every chosen ablation's settings over the seeds; the tables, plots and ``ablations.json``."""
    import mlflow

    from tprl_ray.precompute.job import run_precompute

    check_writable(cfg.out)
    base = setting_pipeline(cfg, Setting("base"))
    data = prepare_data(base)
    splits = check_splits(base, data)
    model = prepare_model(base, data)
    base_stages = stage_configs(base, data, model)
    check_inputs(base, splits, base_stages)
    runner, results = Runner(cfg, data, model), {}
    uri = tracking_uri(cfg.out, cfg.mlflow_uri)
    with pipeline_run(cfg.out, "tprl-ablate", "ablate", uri, params=cfg.flat()):
        for split in ("train", "val"):
            print(f"[ablate] precompute: {split}")
            run_precompute(base_stages[f"precompute_{split}"])
        settings = ablation_settings(cfg)
        for ablation in cfg.chosen():
            results[ablation] = []
            for setting in settings[ablation]:
                home = runner.home(setting_pipeline(cfg, setting), setting)
                with pipeline_run(home, "tprl-ablate", f"{ablation}/{setting.name}", uri, dict(setting.changes)):
                    report = mean_report([runner.run(setting, seed) for seed in cfg.seeds], cfg.seeds)
                    result = summary(setting, report)
                    for b, m, s in zip(result["budgets"], result["relative"], result["relative_std"]):
                        mlflow.log_metrics({f"relative_{b:.3f}": m, f"relative_std_{b:.3f}": s})
                results[ablation].append(result)
            table = markdown(ablation, results[ablation])
            atomic_write_bytes(cfg.out / f"{ablation}.md", table.encode())
            plot(ablation, results[ablation], cfg.out / f"{ablation}.png")
            mlflow.log_artifact(str(cfg.out / f"{ablation}.md"))
            mlflow.log_artifact(str(cfg.out / f"{ablation}.png"))
            print(table)
        atomic_write_bytes(cfg.out / "ablations.json", json.dumps(results, indent=2).encode())
        mlflow.log_artifact(str(cfg.out / "ablations.json"))
    print(f"[ablate] wrote {', '.join(f'{a}.md' for a in results)} (and .png) and ablations.json in {cfg.out}")
    return results


def command(cfg: AblateConfig) -> None:
    """`tprl ablate`."""
    run_ablate(cfg)
