"""What the Ray Train stages share: their config fields, Parquet inputs, checkpoints, resuming, exports.

Each stage runs a ``TorchTrainer`` whose workers stream their shard of a precompute dataset
(``ray.train.get_dataset_shard``), report metrics every epoch and a checkpoint from rank 0
(``state.pt``: model, optimizer, epoch, history; loaded with ``weights_only=True``). A re-run with the
same ``out`` resumes from the newest checkpoint under ``out/ray_train``. The driver then
exports the weights as safetensors with a JSON card and logs the history to MLflow.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tprl_ray.artifacts.atomic import remove_leftovers
from tprl_ray.artifacts.export import export
from tprl_ray.artifacts.outputs import check_writable
from tprl_ray.artifacts.resume import refuse_other_settings
from tprl_ray.precompute.schema import column_width, max_tokens, padded_table, shard_files
from tprl_ray.training.config import TrainStageConfig

STATE = "state.pt"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints a run resumes from


def check_width(data: Path, expected: int, what: str) -> None:
    width = column_width(data, "features")
    if width != expected:
        raise ValueError(
            f"{data}: features are {width}-wide but {what} expects {expected}-wide features "
            f"(precomputed with another model?)"
        )


def token_width(cfg: TrainStageConfig) -> int:
    """The most tokens of a sample in the stage's data (and validation data): the padded width."""
    return max(max_tokens(path) for path in (cfg.data, cfg.val_data) if path is not None)


def datasets(cfg: TrainStageConfig, columns: list[str]) -> dict:
    """Ray Data ``train`` and ``val`` datasets of the Parquet shards (only ``columns`` are read), token
    columns padded to :func:`token_width` with each row's count in ``tokens``; without ``val_data``, a
    tenth of the images (with all their questions) is held out. A dataset whose shards hold at most
    ``cfg.cache_mb`` is materialized in the object store once (in order), so that each epoch streams
    it from memory instead of reading and padding it again."""
    import zlib

    import ray.data

    width = token_width(cfg)

    def read(path: Path, keep=None):
        ds = ray.data.read_parquet(str(Path(path) / "shards")).select_columns([*columns, "image"])
        if keep is not None:  # split by image: every question of an image lands on the same side
            ds = ds.filter(lambda row: (zlib.crc32(str(row["image"]).encode()) % 10 == 0) == keep)
        ds = ds.drop_columns(["image"]).map_batches(padded_table, batch_format="pyarrow", fn_kwargs={"width": width})
        if sum(f.stat().st_size for f in shard_files(path)) > cfg.cache_mb * 2**20:
            return ds
        ds.context.execution_options.preserve_order = True  # the blocks in the order a streamed run reads them
        return ds.materialize()

    if cfg.val_data is not None:
        return {"train": read(cfg.data), "val": read(cfg.val_data)}
    return {"train": read(cfg.data, keep=False), "val": read(cfg.data, keep=True)}


def fit(loop, loop_config: dict, cfg: TrainStageConfig, name: str, columns: list[str]):
    """Run ``loop`` on ``cfg.workers`` Ray Train workers over the :func:`datasets` of ``columns``. Ray
    Train (v2) restores the run named ``name`` under ``out/ray_train`` from its checkpoint manager's
    snapshot, so ``ray.train.get_checkpoint()`` in the workers is the newest checkpoint of an earlier
    run, if any. The output directory and the resumed run are checked before Ray starts."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tprl_ray.ray_setup import init_ray

    check_writable(cfg.out)
    storage = cfg.out.resolve() / "ray_train"
    if removed := remove_leftovers(cfg.out) + remove_unlisted_checkpoints(storage / name):
        print(f"[train] removed leftovers of a killed run: {', '.join(removed)}")
    check_resumable(storage / name, loop_config)
    init_ray(cfg.ray_address)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets(cfg, columns),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(name=name, storage_path=str(storage), checkpoint_config=CheckpointConfig(num_to_keep=2)),
        # the same rows reach the same worker in the same order every run: with the seed, a run is reproducible
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    return trainer.fit()


def settings(loop_config: dict) -> dict:
    """What must not change when a run resumes (everything but the epoch count)."""
    return {k: v for k, v in loop_config.items() if k != "epochs"}


def remove_unlisted_checkpoints(run_dir: Path) -> list[str]:
    """Remove the checkpoint folders of ``run_dir`` that Ray Train's snapshot does not list (a killed
    run's half-copied or unregistered ones; Ray Train never resumes from them); none if it does not parse."""
    snapshot = run_dir / SNAPSHOT
    try:
        state = json.loads(snapshot.read_text()) if snapshot.is_file() else {}
        results = [*state.get("checkpoint_results", []), *state.get("pending_training_results", [])]
        listed = {r["checkpoint_dir_name"] for r in results}
    except (ValueError, KeyError, TypeError):
        return []
    return remove_leftovers(run_dir, ("checkpoint_*",), keep={SNAPSHOT, *listed})


def check_resumable(run_dir: Path, loop_config: dict) -> None:
    """Refuse to resume a run that was trained with other settings (data, sizes, learning rate, ...)."""
    found = sorted(run_dir.glob("checkpoint_*/" + STATE), key=lambda p: p.stat().st_mtime)
    if not found:
        return
    before = torch.load(found[-1], map_location="cpu", weights_only=True).get("settings", {})
    refuse_other_settings(before, settings(loop_config), run_dir.parent.parent, "run trained")


def save_state(state: dict, metrics: dict) -> None:
    """From inside a worker: report ``metrics``, with a checkpoint of ``state`` from rank 0."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / STATE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (a LoRA adapter, a fine-tuned language model), by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def restore(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool = False
) -> tuple[dict, torch.nn.Module]:
    """From inside a worker: the state to continue from (epoch, history; weights and optimizer loaded
    from the checkpoint Ray Train resumes from, if any) and the model without its DDP wrapper. With
    ``trainable_only`` the checkpoint holds only the :func:`trainable_state`."""
    import ray.train

    state = load_state(ray.train.get_checkpoint()) or {"epoch": 0, "history": []}
    bare = model.module if hasattr(model, "module") else model
    if "model" in state:
        load_weights(bare, state["model"], trainable_only)
        optimizer.load_state_dict(state["optimizer"])
    return state, bare


def load_weights(model: torch.nn.Module, weights: dict, trainable_only: bool = False) -> None:
    """``weights`` into ``model``; with ``trainable_only``, exactly its trainable parameters."""
    if not trainable_only:
        model.load_state_dict(weights)
        return
    expected = set(trainable_state(model))
    if set(weights) != expected:
        raise ValueError(
            f"checkpoint holds other trainable weights than the model: {sorted(set(weights) ^ expected)[:3]}"
        )
    model.load_state_dict(weights, strict=False)


def end_epoch(
    state: dict,
    metrics: dict,
    bare: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_config: dict,
    trainable_only: bool = False,
) -> dict:
    """From inside a worker: append the epoch's metrics, report them and checkpoint; the new state."""
    state = {
        "epoch": state["epoch"] + 1,
        "history": state["history"] + [metrics],
        "model": trainable_state(bare) if trainable_only else bare.state_dict(),
        "optimizer": optimizer.state_dict(),
        "settings": settings(loop_config),
    }
    save_state(state, {**metrics, "epoch": state["epoch"]})
    return state


def load_state(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE, map_location="cpu", weights_only=True)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums over the workers (identity when torch.distributed is not set up); on the worker's device,
    as NCCL needs."""
    import ray.train.torch

    tensor = torch.tensor(values, dtype=torch.float64, device=ray.train.torch.get_device())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def log_history(cfg: TrainStageConfig, experiment: str, history: list[dict], artifacts: list[Path], then=None) -> None:
    """The run's metrics per epoch and its ``artifacts`` (files, or directories under their name) in
    MLflow; ``then()`` runs inside the MLflow run last (a registration)."""
    import mlflow

    from tprl_ray.tracking import mlflow_run

    with mlflow_run(cfg.out, experiment, experiment.removeprefix("tprl-"), cfg.mlflow_uri, params=cfg.flat()):
        for epoch, metrics in enumerate(history):
            mlflow.log_metrics(metrics, step=epoch)
        for path in artifacts:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            else:
                mlflow.log_artifact(str(path))
        if then is not None:
            then()


def export_run(cfg: TrainStageConfig, result, module: torch.nn.Module, name: str, experiment: str) -> dict:
    """Export the weights of ``result``'s newest checkpoint as ``name`` (card: data, epochs, last metrics),
    log the history to MLflow; returns the last epoch's metrics and the epoch count."""
    state = load_state(result.checkpoint)
    final = state["history"][-1]
    export(module, state["model"], cfg.out, name, {"data": str(cfg.data), "epochs": state["epoch"], "metrics": final})
    log_history(cfg, experiment, state["history"], [cfg.out / f"{name}.json"])
    return {**final, "epochs": state["epoch"]}
