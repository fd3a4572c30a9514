"""`tprl train autoencoder`: the token-wise autoencoder on the precomputed features, with Ray Train.

Every visual token of every sample is a training example (per-token MSE; padding is left out). Validation reports the
relative MSE (:func:`tprl_ray.policy.autoencoder.relative_mse`, summed across workers). The export
``OUT/autoencoder.safetensors`` + ``autoencoder.json`` is what the policy stages load, frozen.
"""

from __future__ import annotations

import json

from tprl_ray.precompute.schema import column_width
from tprl_ray.training.common import all_reduce_sum, end_epoch, export_run, fit, restore
from tprl_ray.training.config import AutoencoderConfig


def real_tokens(batch: dict):
    """Every token of a padded batch, ``[sum of counts, d_v]`` (float)."""
    import torch

    features = batch["features"]
    width = torch.arange(features.shape[1], device=features.device)
    return features[width[None, :] < batch["tokens"][:, None]].float()


def autoencoder_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from tprl_ray.policy.autoencoder import TokenAutoencoder

    torch.manual_seed(config["seed"])
    d_v = config["d_v"]
    model = ray.train.torch.prepare_model(TokenAutoencoder(d_v, config["latent"], config["hidden"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    state, bare = restore(model, optimizer)
    for _ in range(state["epoch"], config["epochs"]):
        model.train()
        total, batches = 0.0, 0
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=config["batch_size"]):
            tokens = real_tokens(batch)
            loss = torch.nn.functional.mse_loss(model(tokens), tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        model.eval()
        sse, n = 0.0, 0.0
        sums = torch.zeros(d_v, dtype=torch.float64, device=ray.train.torch.get_device())
        squares = torch.zeros_like(sums)
        with torch.no_grad():
            for batch in ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=config["batch_size"]):
                tokens = real_tokens(batch)
                sse += ((bare(tokens) - tokens) ** 2).sum().item()
                n += tokens.shape[0]
                sums += tokens.double().sum(0)
                squares += (tokens.double() ** 2).sum(0)
        reduced = all_reduce_sum([sse, n, *sums.tolist(), *squares.tolist()])
        sse, n = reduced[0], reduced[1]
        sums = torch.tensor(reduced[2 : 2 + d_v], dtype=torch.float64)
        squares = torch.tensor(reduced[2 + d_v :], dtype=torch.float64)
        sst = (squares - sums**2 / max(n, 1.0)).sum().item()
        losses = all_reduce_sum([total, batches])
        metrics = {
            "train_mse": losses[0] / max(losses[1], 1.0),
            "val_relative_mse": sse / sst if sst > 0 else float("nan"),
        }  # NaN: no validation tokens
        state = end_epoch(state, metrics, bare, optimizer, config)


def train_autoencoder(cfg: AutoencoderConfig) -> dict:
    """Fit (or resume), export the autoencoder and log the run; returns the last epoch's metrics."""
    from tprl_ray.policy.autoencoder import TokenAutoencoder

    d_v = column_width(cfg.data, "features")
    loop_config = {
        "d_v": d_v,
        "latent": cfg.latent,
        "hidden": cfg.hidden,
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }
    result = fit(autoencoder_loop, loop_config, cfg, "autoencoder", ["features"])
    return export_run(cfg, result, TokenAutoencoder(d_v, cfg.latent, cfg.hidden), "autoencoder", "tprl-autoencoder")


def command(cfg: AutoencoderConfig) -> None:
    """`tprl train autoencoder`."""
    print(json.dumps(train_autoencoder(cfg)))
    print(f"wrote {cfg.out / 'autoencoder.safetensors'}")
