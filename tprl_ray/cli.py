"""The ``tprl`` command line. Each command is one stage config plus the function that runs it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from tprl_ray.config import ConfigError, StageConfig, add_config_args, config_from_args


def _data_digits(cfg) -> None:
    from tprl_ray.data.digits import build_digits

    written = build_digits(cfg)
    print(f"wrote {cfg.out}: " + ", ".join(f"{k} {v} questions" for k, v in written.items()))


def _model_tiny(cfg) -> None:
    from tprl_ray.models.train_tiny import train_tiny
    from tprl_ray.tracking import mlflow_run

    import mlflow

    with mlflow_run(cfg.out.parent, "tprl-tiny-model", "tiny-llava", params=cfg.flat()):
        metrics = train_tiny(cfg, log=lambda m, step: mlflow.log_metrics(
            {k.replace("/", "."): v for k, v in m.items() if v == v}, step=step))
    print(f"saved {cfg.out}: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}")


def _bench_scorer(cfg) -> None:
    from tprl_ray.bench.scorer import format_bench, run_scorer_bench

    print(format_bench(run_scorer_bench(cfg)))
    print(f"wrote {cfg.out}")


def _eval(cfg) -> None:
    from tprl_ray.evaluation.job import run_eval

    result = run_eval(cfg)
    print(json.dumps({k: result[k] for k in ("benchmark", "pruner", "budget", "n", "score", "relative",
                                             "avg_tokens")} | {"unpruned_score": result["unpruned"]["score"]}))
    print(f"wrote {cfg.out} and {cfg.out.with_suffix('.predictions.jsonl')}")


def _efficiency(cfg) -> None:
    from tprl_ray.evaluation.efficiency import run_efficiency

    print(json.dumps(run_efficiency(cfg), indent=2))


def _report(cfg) -> None:
    from tprl_ray.evaluation.report import run_report

    run_report(cfg)


def _bench_latency(cfg) -> None:
    from tprl_ray.bench.latency import format_latency, run_latency_bench

    print(format_latency(run_latency_bench(cfg)))
    print(f"wrote {cfg.out}")


def _precompute(cfg) -> None:
    from tprl_ray.precompute.job import run_precompute

    print(json.dumps(run_precompute(cfg)))
    print(f"wrote {cfg.out}")


def _bench_precompute(cfg) -> None:
    from tprl_ray.bench.precompute import format_precompute_bench, run_precompute_bench

    print(format_precompute_bench(run_precompute_bench(cfg)))
    print(f"wrote {cfg.out}")


def _train_autoencoder(cfg) -> None:
    from tprl_ray.training.autoencoder import train_autoencoder

    print(json.dumps(train_autoencoder(cfg)))
    print(f"wrote {cfg.out / 'autoencoder.safetensors'}")


def _train_lfd(cfg) -> None:
    from tprl_ray.training.lfd import train_lfd

    print(json.dumps(train_lfd(cfg)))
    print(f"wrote {cfg.out / 'policy.safetensors'}")


def _train_ppo(cfg) -> None:
    from tprl_ray.rl.train import train_ppo

    print(json.dumps(train_ppo(cfg)))
    print(f"wrote {cfg.out / 'policy.safetensors'} (pruner: tprl --policy {cfg.out})")


def _bench_ppo(cfg) -> None:
    from tprl_ray.bench.ppo import format_ppo_bench, run_ppo_bench

    print(format_ppo_bench(run_ppo_bench(cfg)))
    print(f"wrote {cfg.out}")


def _pipeline(cfg) -> None:
    from tprl_ray.pipeline import run_pipeline

    run_pipeline(cfg)


def _commands() -> dict[tuple[str, ...], tuple[type[StageConfig], Callable, str]]:
    from tprl_ray.bench.latency import LatencyBenchConfig
    from tprl_ray.bench.scorer import ScorerBenchConfig
    from tprl_ray.data.digits import DigitsConfig
    from tprl_ray.pipeline import PipelineConfig
    from tprl_ray.evaluation.efficiency import EfficiencyConfig
    from tprl_ray.evaluation.job import EvalConfig
    from tprl_ray.evaluation.report import ReportConfig
    from tprl_ray.bench.precompute import PrecomputeBenchConfig
    from tprl_ray.models.train_tiny import TinyModelConfig
    from tprl_ray.precompute.job import PrecomputeConfig
    from tprl_ray.training.autoencoder import AutoencoderConfig
    from tprl_ray.training.lfd import LfdConfig
    from tprl_ray.rl.train import PpoConfig
    from tprl_ray.bench.ppo import PpoBenchConfig

    return {
        ("data", "digits"): (DigitsConfig, _data_digits, "build the embedded digit-grid VQA benchmark"),
        ("model", "tiny"): (TinyModelConfig, _model_tiny, "train the embedded tiny LLaVA on CPU"),
        ("pipeline",): (PipelineConfig, _pipeline, "every stage, then every pruner evaluated (default: the embedded "
                                                    "model and data)"),
        ("precompute",): (PrecomputeConfig, _precompute, "features, query embeddings, scores and demonstrations "
                                                          "to Parquet (Ray Data)"),
        ("train", "autoencoder"): (AutoencoderConfig, _train_autoencoder, "fit the token autoencoder (Ray Train)"),
        ("train", "lfd"): (LfdConfig, _train_lfd, "pre-train the policy on VisPruner demonstrations (Ray Train)"),
        ("train", "ppo"): (PpoConfig, _train_ppo, "fine-tune the policy with PPO against the scorer (RLlib, Serve)"),
        ("eval",): (EvalConfig, _eval, "evaluate a benchmark unpruned and pruned on a Ray Data actor pool"),
        ("efficiency",): (EfficiencyConfig, _efficiency, "FLOPs and KV-cache bytes of a model config, as JSON"),
        ("report",): (ReportConfig, _report, "one table and a Pareto plot from reports and eval results"),
        ("bench", "ppo"): (PpoBenchConfig, _bench_ppo, "PPO env steps/s and scorer busy fraction by env runners"),
        ("bench", "scorer"): (ScorerBenchConfig, _bench_scorer, "time batched pruned scoring (samples/s)"),
        ("bench", "latency"): (LatencyBenchConfig, _bench_latency, "measure prefill and per-token decode latency"),
        ("bench", "precompute"): (PrecomputeBenchConfig, _bench_precompute,
                                  "rows/s of the Ray precompute against a single-process loop; bytes per sample"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tprl", description="TPRL: token pruning by RL, on Ray.")
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nested: dict[str, argparse._SubParsersAction] = {}
    for path, (cls, fn, help_text) in _commands().items():
        if len(path) == 1:
            sub = groups.add_parser(path[0], help=help_text, description=help_text)
        else:
            if path[0] not in nested:
                group = groups.add_parser(path[0], help=f"{path[0]} commands")
                nested[path[0]] = group.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            sub = nested[path[0]].add_parser(path[1], help=help_text, description=help_text)
        add_config_args(sub, cls)
        sub.set_defaults(_run=fn, _cls=cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tprl_ray.backbones.base import BackboneError
    from tprl_ray.data.layout import DataError

    try:
        cfg = config_from_args(args, args._cls)
        args._run(cfg)
    except (ConfigError, DataError, BackboneError, ValueError, FileNotFoundError) as exc:
        print(f"tprl: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
