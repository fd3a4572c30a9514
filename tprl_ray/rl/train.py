"""`tprl train ppo`: fine-tune the policy with RLlib PPO (new API stack) against the scorer service.

Controller (this process, PPO's learner) -> ``env_runners`` CPU env runners, each stepping one
:class:`PruningVectorEnv` of ``envs_per_runner`` sub-envs -> one request per env step to the Ray Serve
scorer pool (ids and masks, batched across runners); with ``overlap`` the runners sample the next
batch during each update (:mod:`tprl_ray.rl.overlap`). Every PPO hyperparameter of docs/design.md §1.5 is set
explicitly. Each iteration logs curated metrics to MLflow; every ``checkpoint_every`` iterations the
algorithm is saved atomically under ``out/checkpoints`` and a re-run with the same ``out`` resumes
from the newest one (other settings are refused). At the end the policy is exported as
``out/policy.*`` next to its autoencoder; a ``discount``-regime policy also gets keep-probability
quantiles on the validation set that calibrate the threshold ``tau`` to any average budget (a
``budget``-regime policy keeps its top ``b * N`` tokens; both are the ``tprl`` pruner).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from tprl_ray.artifacts.atomic import remove_leftovers
from tprl_ray.artifacts.export import check_export, copy_export, export
from tprl_ray.artifacts.outputs import check_writable
from tprl_ray.artifacts.resume import refuse_other_settings
from tprl_ray.config import deep_merge, first_error, known_settings
from tprl_ray.rl.codes import Codes
from tprl_ray.rl.config import EnvConfig, PpoConfig
from tprl_ray.service.scorer import APP

ENV_NAME = "tprl-pruning"
PROGRESS = "progress.json"


def make_env(config: dict):
    """RLlib's env creator (``vector_entry_point``): the vector env of one env runner."""
    from tprl_ray.rl.env import PruningVectorEnv
    from tprl_ray.service.scorer import handle_score

    # RLlib's vector entry point does not pass the worker index: each env runner draws its own seed
    return PruningVectorEnv(
        Codes.load(Path(config["codes"])),
        EnvConfig.model_validate(config["env"]),
        config.get("num_envs", 1),
        handle_score,
        seed=np.random.SeedSequence().entropy % 2**32,
    )


def kept_fraction(episode, metrics_logger, **kwargs) -> None:
    """``on_episode_end``: the fraction of tokens the episode's last state kept."""
    mask = episode.get_observations(-1)["mask"]
    metrics_logger.log_value("kept_fraction", float(np.mean(mask)))


def policy_dims(cfg: PpoConfig, d_latent: int, d_query: int) -> dict:
    if cfg.init is not None:
        return json.loads((cfg.init / "policy.json").read_text())["dims"]
    return {
        "d_latent": d_latent,
        "d_query": d_query,
        "heads": cfg.heads,
        "hidden": cfg.hidden,
        "attention": cfg.attention,
    }


def prepare_codes(cfg: PpoConfig) -> tuple[Path, Path]:
    """The codes of the training data and of the calibration data (written if missing)."""
    from tprl_ray.rl.codes import write_codes

    codes_dir = write_codes(cfg.data, cfg.autoencoder_dir(), cfg.out / "codes")
    if cfg.val_data is None:
        return codes_dir, codes_dir
    return codes_dir, write_codes(cfg.val_data, cfg.autoencoder_dir(), cfg.out / "codes-val")


def build_algo(cfg: PpoConfig, codes_dir: Path):
    """The PPO algorithm (env runners, learner, RLModule) for ``cfg``; the scorer must be running."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    from tprl_ray.rl.env import PruningVectorEnv
    from tprl_ray.rl.learner import PruningPPOLearner
    from tprl_ray.rl.module import PruningModule
    from tprl_ray.rl.overlap import OverlappedPPO

    codes = Codes.load(codes_dir)
    dims = policy_dims(cfg, codes.codes.shape[-1], codes.query.shape[-1])
    spaces_env = PruningVectorEnv(codes, cfg.env, cfg.envs_per_runner, score_fn=None)

    register_env(ENV_NAME, make_env)
    config = (
        PPOConfig(algo_class=OverlappedPPO if cfg.overlap else None)
        .environment(
            ENV_NAME,
            env_config={"codes": str(codes_dir.resolve()), "env": cfg.env.model_dump()},
        )
        .env_runners(
            num_env_runners=cfg.env_runners,
            num_envs_per_env_runner=cfg.envs_per_runner,
            gym_env_vectorize_mode="vector_entry_point",
            num_cpus_per_env_runner=cfg.cpus_per_runner,
            rollout_fragment_length="auto",
            sample_timeout_s=1800,
        )
        # Ray restarts a dead env runner (process killed, node lost); RLlib samples it again once it answers.
        # A scorer call lost with its replica fails the env step: RLlib recreates the env, plays anew
        .fault_tolerance(restart_failed_env_runners=True, restart_failed_sub_environments=True)
        .learners(num_learners=0, learner_class=PruningPPOLearner)
        .rl_module(
            rl_module_spec=RLModuleSpec(
                module_class=PruningModule,
                observation_space=spaces_env.single_observation_space,
                action_space=spaces_env.single_action_space,
                model_config={
                    "dims": dims,
                    "lambda_disc": cfg.lambda_disc,
                    "steps": cfg.env.steps,
                    "critic": cfg.critic,
                    "init": str(cfg.init.resolve()) if cfg.init else None,
                },
            )
        )
        .training(
            lr=cfg.lr,
            gamma=cfg.gamma,
            lambda_=cfg.gae_lambda,
            clip_param=cfg.clip,
            use_critic=cfg.critic,
            vf_loss_coeff=cfg.vf_coef,
            entropy_coeff=cfg.entropy_coef,
            use_kl_loss=False,
            kl_coeff=0.0,
            grad_clip=cfg.grad_clip,
            num_epochs=cfg.epochs,
            minibatch_size=cfg.minibatch_size,
            train_batch_size_per_learner=cfg.train_batch_size,
            vf_clip_param=10.0,
        )
        .callbacks(on_episode_end=kept_fraction)
        .debugging(seed=cfg.seed)
    )
    return config.build_algo()


def curated(result: dict, seconds: float) -> dict:
    """The per-iteration metrics worth a chart."""
    runners, learner = result.get("env_runners", {}), result.get("learners", {}).get("default_policy", {})
    out = {
        "episode_return_mean": runners.get("episode_return_mean"),
        "kept_fraction": runners.get("kept_fraction"),
        "env_steps": runners.get("num_env_steps_sampled_lifetime"),
        "env_steps_per_s": runners.get("num_env_steps_sampled", 0) / max(seconds, 1e-9),
        "policy_loss": learner.get("policy_loss"),
        "vf_loss": learner.get("vf_loss"),
        "entropy": learner.get("entropy"),
        "vf_explained_var": learner.get("vf_explained_var"),
        "iteration_s": seconds,
    }
    return {k: float(v) for k, v in out.items() if v is not None}


# settings a resumed run may change
UNCHECKED = (
    "iterations",
    "checkpoint_every",
    "stall_timeout_s",
    "budgets",
    "registered_model",
    "ray_address",
    "mlflow_uri",
)


def settings(cfg: PpoConfig) -> dict:
    """What must not change when a run resumes."""
    return {k: v for k, v in json.loads(cfg.model_dump_json()).items() if k not in UNCHECKED}


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("iter-*"))
    return found[-1] if found else None


def save_checkpoint(algo, out: Path, history: list[dict], cfg: PpoConfig) -> None:
    """``algo.save_to_path`` into a temporary directory, then rename; keeps the two newest."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    algo.save_to_path(str(tmp.resolve()))
    (tmp / PROGRESS).write_text(json.dumps({"history": history, "settings": settings(cfg)}))
    os.replace(tmp, root / f"iter-{len(history):05d}")
    for old in sorted(root.glob("iter-*"))[:-2]:
        shutil.rmtree(old)


def resumable_history(cfg: PpoConfig) -> list[dict]:
    """The history of the run to continue (empty for a fresh one); refuses one with other settings."""
    checkpoint = latest_checkpoint(cfg.out)
    if checkpoint is None:
        return []
    progress = json.loads((checkpoint / PROGRESS).read_text())
    # the stored settings with today's defaults for fields added since, without those removed since
    stored = json.loads(cfg.model_dump_json())
    deep_merge(stored, known_settings(PpoConfig, progress["settings"]))
    try:
        before = settings(PpoConfig.model_validate(stored))
    except ValidationError as exc:
        raise ValueError(f"{checkpoint}: saved with settings this version cannot read ({first_error(exc)})") from None
    refuse_other_settings(before, settings(cfg), cfg.out, "PPO run trained")
    return progress["history"]


def resume(algo, cfg: PpoConfig) -> list[dict]:
    """Restore the newest checkpoint, if any, and return its history."""
    history = resumable_history(cfg)
    if not history:
        return []
    checkpoint = latest_checkpoint(cfg.out)
    algo.restore_from_path(str(checkpoint.resolve()))
    algo.env_runner_group.sync_weights(
        from_worker_or_learner_group=algo.learner_group, inference_only=True, timeout_seconds=60
    )
    print(f"[ppo] resumed from {checkpoint} (iteration {len(history)})")
    return history


def calibration(net, codes: Codes) -> list[float]:
    """1001 quantiles of the one-shot keep probabilities of every token of ``codes``: the threshold
    for an average kept fraction ``b`` is the ``1 - b`` quantile."""
    probabilities = []
    with torch.no_grad():
        for start in range(0, len(codes.ids), 256):
            rows = slice(start, start + 256)
            c = torch.from_numpy(codes.codes[rows].astype(np.float32))
            mask = torch.from_numpy(codes.token_mask(rows))
            p = net.keep_probabilities(
                c, torch.from_numpy(codes.query[rows]), mask, torch.from_numpy(codes.grids[rows])
            )
            probabilities.append(p[mask])
    return np.quantile(torch.cat(probabilities).numpy(), np.linspace(0, 1, 1001)).tolist()


def export_policy(cfg: PpoConfig, net, history: list[dict], val_codes: Codes) -> dict:
    from tprl_ray.pruners.lfd import tau_for_budget

    copy_export(cfg.autoencoder_dir(), cfg.out, "autoencoder")
    card = {"data": str(cfg.data), "iterations": len(history), "init": str(cfg.init), "regime": cfg.env.regime}
    taus = {}
    if cfg.env.regime == "discount":  # thresholded at inference; a budget policy keeps its top b * N
        quantiles = calibration(net, val_codes)
        taus = {f"{b:.4f}": tau_for_budget(quantiles, b) for b in cfg.budgets}
        card |= {"keep_quantiles": quantiles, "tau": taus}
    export(net, net.state_dict(), cfg.out, "policy", {**card, "metrics": history[-1]})
    return taus


def stage_pruner(source: Path, into: Path) -> Path:
    """The pruner's own files (the policy and autoencoder exports of ``source``) copied to ``into``, for MLflow."""
    for name in ("policy", "autoencoder"):
        copy_export(source, into, name)
    return into


def train_ppo(cfg: PpoConfig, on_iteration=None) -> dict:
    """Train (or resume) up to ``cfg.iterations``; export and log. Leftovers of a killed run are removed
    first; an iteration that sampled nothing (its env runners died) is run again. ``on_iteration(i,
    metrics)`` is called after each iteration (tests use it to disturb the run)."""
    import mlflow
    from ray import serve

    from tprl_ray.pruners.pyfunc import log_pruner
    from tprl_ray.ray_setup import init_ray
    from tprl_ray.rl.telemetry import IterationClock, record_iteration
    from tprl_ray.service.scorer import start_scorer
    from tprl_ray.tracking import mlflow_run, register_pruner

    check_writable(cfg.out)  # refuse early, before anything starts
    check_export(cfg.autoencoder_dir(), "autoencoder")
    if cfg.init is not None:
        check_export(cfg.init, "policy")
    resumable_history(cfg)
    removed = remove_leftovers(cfg.out / "checkpoints", [".tmp-*"])  # what a killed save_checkpoint left
    for directory in (cfg.out, cfg.out / "codes", cfg.out / "codes-val"):
        removed += remove_leftovers(directory)
    if removed:
        print(f"[ppo] removed leftovers of a killed run: {', '.join(removed)}")
    codes_dir, val_dir = prepare_codes(cfg)
    init_ray(cfg.ray_address)
    print(f"[ppo] starting {cfg.scorer.pool.size} scorer replica(s)")
    algo = None
    try:
        start_scorer(cfg.scorer, cfg.data)
        algo = build_algo(cfg, codes_dir)
        history = resume(algo, cfg)
        with mlflow_run(cfg.out, "tprl-ppo", "ppo", cfg.mlflow_uri, params=cfg.flat()):
            sampled_at, clock = time.monotonic(), IterationClock(algo, cfg.scorer.pool.size)
            while (i := len(history)) < cfg.iterations:
                start = time.perf_counter()
                clock.start()
                result = algo.train()
                metrics = curated(result, time.perf_counter() - start) | clock.stop()
                if not metrics.get("env_steps_per_s", 0) > 0:  # 0 or NaN: every env runner failed
                    if time.monotonic() - sampled_at > cfg.stall_timeout_s:  # RLlib would learn from nothing
                        raise RuntimeError(
                            f"no env steps sampled in {cfg.stall_timeout_s:g} s: the env runners fail "
                            "(their worker logs under the Ray session's logs/ say why)"
                        )
                    print(f"[ppo] iteration {i + 1} sampled nothing (a dead env runner restarts?); running it again")
                    time.sleep(1)
                    continue
                sampled_at = time.monotonic()
                history.append(metrics)
                mlflow.log_metrics(metrics, step=i + 1)
                record_iteration(metrics, i + 1)
                print(
                    f"[ppo] iteration {i + 1}/{cfg.iterations}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                )
                if (i + 1) % cfg.checkpoint_every == 0 or i + 1 == cfg.iterations:
                    save_checkpoint(algo, cfg.out, history, cfg)
                if on_iteration is not None:
                    on_iteration(i + 1, metrics)
            net = algo.get_module().net.cpu().eval()
            taus = export_policy(cfg, net, history, Codes.load(val_dir))
            if cfg.registered_model:
                register_pruner(cfg.registered_model, log_pruner(stage_pruner(cfg.out, cfg.out / "pruner")), taus)
    finally:
        if algo is not None:
            algo.stop()
        serve.delete(APP)
    return {**history[-1], "iterations": len(history), "tau": taus}


def command(cfg: PpoConfig) -> None:
    """`tprl train ppo`."""
    print(json.dumps(train_ppo(cfg)))
    print(f"wrote {cfg.out / 'policy.safetensors'} (pruner: tprl --policies tprl={cfg.out})")
