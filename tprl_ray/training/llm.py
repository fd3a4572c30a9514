"""`tprl train llm`: the LVLM's language model fine-tuned on pruned inputs (docs/design.md §1.7), with Ray Train.

A trained pruner is fixed (the PPO policy by default, selecting as its evaluation does). Each batch
of the train split keeps a fraction drawn from ``budget_range`` of each image's visual tokens (the
pruner's choice) and builds the LLM input exactly as scoring and generation do
(:meth:`~tprl_ray.backbones.base.Backbone.build_inputs`: the stored features through the frozen
projector, the kept tokens spliced into the prompt, the reference answer teacher-forced); the loss is
the cross-entropy of the answer tokens and the end of turn. ``method: lora`` trains a peft LoRA
adapter on the language model's linear layers (rank, alpha, targets by config; the frozen weights in
the backbone's dtype, the adapter in float32 as peft keeps it); ``full`` trains every language-model
weight but the input embeddings (and an LM head tied to them), so the query embeddings the pruner
reads stay the frozen model's; it refuses float16 weights (no master copy to update). Checkpoints
hold the trainable weights only.

Exports: ``OUT/adapter`` (peft ``save_pretrained``; ``--backbone.adapter OUT/adapter`` loads it),
with ``merge`` also ``OUT/merged``, and for ``full`` ``OUT/model`` (checkpoint directories for
``--backbone.path``, with the processor and the model card), and ``OUT/llm.json`` (epochs, metrics,
what was saved). The MLflow run logs the adapter (or the model) and registers it as a version of
``tprl-llm``; merged weights stay on disk. A re-run of a finished run exports nothing again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tprl_ray.artifacts.atomic import atomic_write_bytes, atomic_write_dir
from tprl_ray.artifacts.export import check_export
from tprl_ray.backbones.base import BackboneError, all_argmax, checkpoint_config, project_rows
from tprl_ray.config import BackboneConfig
from tprl_ray.pruners.base import PruneBatch
from tprl_ray.training.common import (
    all_reduce_sum,
    check_width,
    end_epoch,
    fit,
    load_state,
    load_weights,
    log_history,
    restore,
)
from tprl_ray.training.config import LlmConfig

REGISTERED_MODEL = "tprl-llm"
COLUMNS = ["sample_id", "question", "answer", "features", "query", "grid_rows", "grid_cols"]
VAL_STREAM = 2**40  # validation's budget stream: never one of the training streams


def lora_pattern(targets: list[str]) -> str:
    """The peft ``target_modules`` regex: the named linear layers of the language model only."""
    return rf".*language_model\..*\.({'|'.join(map(re.escape, targets))})"


def trainable_model(config: dict, device: str):
    """The backbone on ``device`` and the module that trains: the peft model around it (``lora``), or
    the model with every language-model weight but the input embeddings trainable (``full``)."""
    from tprl_ray.backbones.load import load_backbone

    backbone = load_backbone(BackboneConfig.model_validate({**config["backbone"], "device": device}))
    model = backbone.model.requires_grad_(False)
    if config["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = config["lora"]
        adapter = LoraConfig(
            r=lora["rank"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora_pattern(lora["target_modules"]),
        )
        model = get_peft_model(model, adapter)
    else:
        backbone.language_model.requires_grad_(True)
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if head.weight is not embeddings.weight:  # an untied LM head trains; a tied one is the embeddings
            head.requires_grad_(True)
        embeddings.requires_grad_(False)
    if config["gradient_checkpointing"]:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return backbone, model


def answer_loss(backbone, model, pruner, batch: dict, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the reference answers (end of turn included) given the tokens ``pruner``
    keeps at ``budget``, and each sample's teacher-forced exact match (every target the argmax)."""
    padded = torch.as_tensor(batch["features"]).float()
    features = [f[:n] for f, n in zip(padded, batch["tokens"].tolist())]
    tokens = project_rows(backbone, features)
    grids = list(zip(batch["grid_rows"].tolist(), batch["grid_cols"].tolist()))
    questions = [str(q) for q in batch["question"]]
    pruning = pruner.prune(
        PruneBatch(
            tokens=tokens,
            features=features,
            attention=None,
            grids=grids,
            question_ids=[str(i) for i in batch["sample_id"]],
            questions=questions,
            queries=list(torch.as_tensor(batch["query"])),
        ),
        budget,
    )
    inputs = backbone.build_inputs(questions, pruning.tokens, pruning.keep, [str(a) for a in batch["answer"]], grids)
    logits, row, tok, _ = backbone.target_logits(inputs, model)
    return torch.nn.functional.cross_entropy(logits, tok), all_argmax(logits, row, tok, len(questions))


def budgets(low: float, high: float, seed: int):
    """An endless stream of kept fractions drawn uniformly from ``[low, high]``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield low + (high - low) * torch.rand(1, generator=generator).item()


def llm_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from tprl_ray.pruners.registry import build_pruner

    torch.manual_seed(config["seed"])
    backbone, model = trainable_model(config, str(ray.train.torch.get_device()))
    pruner = build_pruner(config["pruner"], config["seed"], config["policy"])
    low, high = config["budget_range"]
    wrapped = ray.train.torch.prepare_model(model)  # DDP across workers (none for one)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"])
    state, bare = restore(wrapped, optimizer, trainable_only=True)
    rank = ray.train.get_context().get_world_rank()

    def batches(split: str):
        shard = ray.train.get_dataset_shard(split)
        return shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy")

    for epoch in range(state["epoch"], config["epochs"]):
        bare.train()
        total, steps = 0.0, 0
        drawn = budgets(low, high, (config["seed"] * 1000 + epoch) * 1000 + rank)
        for batch, budget in zip(batches("train"), drawn):
            loss, _ = answer_loss(backbone, wrapped, pruner, batch, budget)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        bare.eval()
        val = torch.zeros(4, dtype=torch.float64)  # loss sum, batches, exact matches, samples
        with torch.no_grad():  # the same budgets every epoch
            for batch, budget in zip(batches("val"), budgets(low, high, VAL_STREAM + config["seed"] * 1000 + rank)):
                loss, correct = answer_loss(backbone, wrapped, pruner, batch, budget)
                val += torch.tensor([loss.item(), 1.0, correct.sum().item(), correct.numel()], dtype=torch.float64)
        total, steps, val_loss, val_steps, exact, seen = all_reduce_sum([total, steps, *val.tolist()])
        metrics = {
            "train_loss": total / max(steps, 1.0),
            "val_loss": val_loss / max(val_steps, 1.0),
            "val_exact": exact / max(seen, 1.0),
        }
        state = end_epoch(state, metrics, bare, optimizer, config, trainable_only=True)


def check_model(cfg: LlmConfig):
    """Refuse a model the stage cannot fine-tune (its family, float16 full fine-tuning) and LoRA
    targets it does not have; its transformers config. Needs no trained stage (the pipeline checks
    this before it trains)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText, LlavaConfig

    path = cfg.backbone.resolved_path()
    config = checkpoint_config(path)
    if not isinstance(config, LlavaConfig):
        raise BackboneError(
            f"{path}: tprl train llm fine-tunes LLaVA for now (it builds the inputs with LLaVA's projector from "
            f"the stored features); {config.model_type!r} is not supported"
        )
    if cfg.method == "full" and cfg.backbone.dtype == "float16":
        raise ValueError("method full trains the weights themselves: use dtype float32 or bfloat16, or method lora")
    if cfg.method == "lora":
        with init_empty_weights():
            names = [n for n, _ in AutoModelForImageTextToText.from_config(config).named_modules()]
        if not any(re.fullmatch(lora_pattern(cfg.lora.target_modules), n) for n in names):
            raise ValueError(
                f"lora.target_modules {cfg.lora.target_modules} name no layer of the language model of {path}"
            )
    return config


def check_inputs(cfg: LlmConfig) -> None:
    """Refuse, before Ray starts, the model (:func:`check_model`), data or a pruner of other widths."""
    from tprl_ray.pruners.registry import build_pruner

    check_export(cfg.policy, "policy")
    config = check_model(cfg)
    width = config.vision_config.hidden_size
    for data in (cfg.data, cfg.val_data):
        if data is not None:
            check_width(data, width, f"the model {cfg.backbone.resolved_path()}")
    build_pruner(cfg.pruner, cfg.seed, cfg.policy).check_widths(width, config.text_config.hidden_size)


def save_checkpoint(backbone, model, directory: Path, cfg: LlmConfig) -> None:
    """A checkpoint directory ``--backbone.path`` loads: the weights, the base model's processor files
    and a model card (the base model's, if it has one, with the prompt format and what was fine-tuned)."""
    from transformers import LlavaProcessor

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        LlavaProcessor.from_pretrained(cfg.backbone.resolved_path()).save_pretrained(tmp)
        base_card = Path(cfg.backbone.resolved_path()) / "tprl_model_card.json"
        card = json.loads(base_card.read_text()) if base_card.is_file() else {}
        card.update(
            prompt_format=backbone.prompt_format,
            finetuned={
                "from": str(cfg.backbone.resolved_path()),
                "pruner": cfg.pruner,
                "policy": str(cfg.policy),
                "method": cfg.method,
            },
        )
        (tmp / "tprl_model_card.json").write_text(json.dumps(card, indent=2))

    atomic_write_dir(directory, write)


def export_llm(cfg: LlmConfig, loop_config: dict, state: dict) -> list[Path]:
    """The trained weights of ``state`` saved with ``save_pretrained``; the directories written."""
    backbone, model = trainable_model(loop_config, "cpu")
    load_weights(model, state["model"], trainable_only=True)
    if cfg.method == "full":
        save_checkpoint(backbone, backbone.model, cfg.out / "model", cfg)
        return [cfg.out / "model"]
    atomic_write_dir(cfg.out / "adapter", model.save_pretrained)
    if not cfg.merge:
        return [cfg.out / "adapter"]
    save_checkpoint(backbone, model.merge_and_unload(), cfg.out / "merged", cfg)
    return [cfg.out / "adapter", cfg.out / "merged"]


def train_llm(cfg: LlmConfig) -> dict:
    """Fit (or resume), save the adapter (or weights), log and register them in MLflow."""
    from tprl_ray.tracking import register_model

    check_inputs(cfg)
    loop_config = {
        "backbone": cfg.backbone.model_dump(mode="json"),
        "policy": str(cfg.policy.resolve()),
        "pruner": cfg.pruner,
        "budget_range": cfg.budget_range,
        "method": cfg.method,
        "lora": cfg.lora.model_dump(),
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }
    result = fit(llm_loop, loop_config, cfg, "llm", COLUMNS)
    state = load_state(result.checkpoint)
    card_path = cfg.out / "llm.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    if card.get("epochs") == state["epoch"] and all(Path(p).is_dir() for p in card.get("saved", [])):
        print(f"[llm] {cfg.out}: already trained and exported ({state['epoch']} epochs)")
    else:
        written = export_llm(cfg, loop_config, state)
        card = {"epochs": state["epoch"], "metrics": state["history"][-1], "saved": [str(p) for p in written]}
        atomic_write_bytes(card_path, json.dumps({**card, "settings": loop_config}, indent=2).encode())

        def register() -> None:
            import mlflow

            source = f"runs:/{mlflow.active_run().info.run_id}/{written[0].name}"
            description = f"{cfg.method} fine-tune of {cfg.backbone.resolved_path()} on inputs {cfg.policy} pruned"
            about = "A vision-language model fine-tuned on visual tokens a TPRL pruner kept"
            register_model(REGISTERED_MODEL, source, description, {"method": cfg.method}, about)

        # the adapter (or the fine-tuned model) is the registered artifact; merged weights stay on disk only
        log_history(cfg, "tprl-llm", state["history"], [written[0], card_path], then=register)
    return {**card["metrics"], "epochs": state["epoch"], "saved": card["saved"]}


def command(cfg: LlmConfig) -> None:
    """`tprl train llm`."""
    result = train_llm(cfg)
    print(json.dumps(result))
    print(f"wrote {', '.join(result['saved'])}")
