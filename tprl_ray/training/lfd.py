"""`tprl train lfd`: the policy pre-trained on VisPruner demonstrations (docs/design.md §1.3), with Ray Train.

Each demonstration step ``t >= 1`` is one example: the state holds the tokens step ``t-1`` kept
(their frozen autoencoder codes; dropped tokens are masked out of the attention) plus the query,
and each state token's label is 1 if VisPruner still keeps it at step ``t``. The loss is token-wise
BCE over every state token and step. Validation: token-level F1 of ``p > 0.5`` against VisPruner.
The export (``OUT/policy.*`` next to a copy of the autoencoder) is what the ``lfd`` pruner loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from tprl_ray.artifacts.export import check_export, copy_export, load_exported
from tprl_ray.precompute.schema import column_width
from tprl_ray.training.common import (
    all_reduce_sum,
    check_width,
    end_epoch,
    export_run,
    fit,
    restore,
)
from tprl_ray.training.config import LfdConfig


def step_examples(masks):
    """(state mask, labels) per demonstration step ``t >= 1`` of token-major masks ``[B, N, S]``: states
    are step ``t-1``'s kept tokens (padding is in no state: its masks are zero)."""
    return [(masks[..., t - 1].bool(), masks[..., t].float()) for t in range(1, masks.shape[-1])]


def lfd_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn import functional as F

    from tprl_ray.policy.autoencoder import TokenAutoencoder
    from tprl_ray.policy.networks import PolicyValueNet

    torch.manual_seed(config["seed"])
    encoder, _ = load_exported(TokenAutoencoder, Path(config["autoencoder"]), "autoencoder")
    encoder.requires_grad_(False).to(ray.train.torch.get_device())
    policy = PolicyValueNet(
        config["d_latent"],
        config["d_query"],
        config["heads"],
        config["hidden"],
        config["attention"],
        config["positions"],
    )
    model = ray.train.torch.prepare_model(policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    state, bare = restore(model, optimizer)

    def losses_and_hits(batch):
        codes = encoder.encode(batch["features"].float())
        grid = torch.stack([batch["grid_rows"], batch["grid_cols"]], dim=1)
        loss, hits = 0.0, torch.zeros(3)
        examples = step_examples(batch["demo_masks"])
        for state_mask, labels in examples:
            logits, values = model(codes, batch["query"], state_mask, grid)  # through DDP: gradients are averaged
            # PPO trains the value head later; its zero-weighted term keeps DDP's gradient buckets complete
            bce = F.binary_cross_entropy_with_logits(logits[state_mask], labels[state_mask])
            loss = loss + bce + 0.0 * values.sum()
            predicted, truth = (logits > 0)[state_mask], labels[state_mask].bool()
            hits += torch.tensor([(predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()])
        return loss / len(examples), hits

    for _ in range(state["epoch"], config["epochs"]):
        model.train()
        total, batches = 0.0, 0
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=config["batch_size"]):
            loss, _ = losses_and_hits(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        model.eval()
        hits = torch.zeros(3)
        with torch.no_grad():
            for batch in ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=config["batch_size"]):
                hits += losses_and_hits(batch)[1]
        tp, fp, fn, total, batches = all_reduce_sum([*hits.tolist(), total, batches])
        metrics = {"train_bce": total / max(batches, 1.0), "val_f1": 2 * tp / max(2 * tp + fp + fn, 1.0)}
        state = end_epoch(state, metrics, bare, optimizer, config)


def train_lfd(cfg: LfdConfig) -> dict:
    """Fit (or resume), export the policy beside a copy of its autoencoder and log the run."""
    from tprl_ray.policy.networks import PolicyValueNet

    check_export(cfg.autoencoder, "autoencoder")
    dims = json.loads((cfg.autoencoder / "autoencoder.json").read_text())["dims"]
    check_width(cfg.data, dims["d_v"], f"the autoencoder in {cfg.autoencoder}")
    if cfg.val_data is not None:
        check_width(cfg.val_data, dims["d_v"], f"the autoencoder in {cfg.autoencoder}")
    d_query = column_width(cfg.data, "query")
    loop_config = {
        "autoencoder": str(cfg.autoencoder.resolve()),
        "d_latent": dims["d_latent"],
        "d_query": d_query,
        "heads": cfg.heads,
        "hidden": cfg.hidden,
        "attention": cfg.attention,
        "positions": cfg.positions,
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }
    result = fit(lfd_loop, loop_config, cfg, "lfd", ["features", "query", "demo_masks", "grid_rows", "grid_cols"])
    copy_export(cfg.autoencoder, cfg.out, "autoencoder")
    return export_run(
        cfg,
        result,
        PolicyValueNet(dims["d_latent"], d_query, cfg.heads, cfg.hidden, cfg.attention, cfg.positions),
        "policy",
        "tprl-lfd",
    )


def command(cfg: LfdConfig) -> None:
    """`tprl train lfd`."""
    print(json.dumps(train_lfd(cfg)))
    print(f"wrote {cfg.out / 'policy.safetensors'}")
