"""`tprl model tiny`: train an embedded tiny model (LLaVA or Qwen2.5-VL) on the digits benchmark, on CPU.

End-to-end training from scratch stalls: the language model never learns to bind "c2" or "7" in the
question to the visual tokens. The recipe mirrors LLaVA's two stages, with a denser stage 1:

1. **Alignment.** The vision tower and projector learn, for every visual token, to point at two
   words in the LLM's own input-embedding space: the name of its cell (``a1..d4``) and the digit in
   that cell (or ``none``): a softmax over ``feature @ embedding(word)`` for the candidate words.
   Question words and visual tokens then live in one space, and attention can match them.
2. **Instruction tuning.** Next-token loss on the answer (and end-of-sequence) of fresh scenes, all
   weights trained, the alignment loss kept with a smaller weight.

Qwen2.5-VL's vision tower has no absolute positions (2-D RoPE in every block), so its tokens cannot
know their cell: it aligns digits only, and the LLM finds cells through M-RoPE, whose positions
carry each token's row and column. In stage 2 each visual token's state after each decoder layer of
``position_layers`` is also trained to name its cell and its digit (``position_weight``; a softmax
over the cell names and one over the digit words, so that naming one does not suppress the other):
the layers below learn to read the positions, and the layers above find "c2" or "7" in the question
and the tokens of c2 or of 7 alike.
Its benchmark may mix board sides (the two-resolution variant).

Scenes are drawn on the fly from the *train* digit pool of the benchmark's seed (never the test
pool), so the model sees far more boards than the written train split without touching test digits.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from tprl_ray.backbones.base import Backbone, Grid, Row
from tprl_ray.backbones.llava import LlavaBackbone
from tprl_ray.backbones.load import load_backbone
from tprl_ray.backbones.qwen import QwenBackbone
from tprl_ray.data.config import GRID
from tprl_ray.data.digits import ALL_CELL_NAMES, SceneSampler, board_side, cell_names, key_word, load_digit_pools
from tprl_ray.data.layout import DataError, read_split
from tprl_ray.evaluation.predict import evaluate
from tprl_ray.models import tiny_llava, tiny_qwen
from tprl_ray.models.config import TinyModelConfig


def token_cells(grid: Grid, side: int) -> torch.Tensor:
    """Cell index of each visual token of a ``grid`` in raster order, on a ``side x side`` board."""
    rows, cols = grid
    r, c = np.divmod(np.arange(rows * cols), cols)
    return torch.from_numpy((r * side // rows) * side + c * side // cols)


@cache
def cell_positions(side: int) -> torch.Tensor:
    """Where each cell name of a ``side x side`` board stands in ``ALL_CELL_NAMES``."""
    return torch.tensor([ALL_CELL_NAMES.index(name) for name in cell_names(side)])


class AlignmentHead:
    """Scores visual tokens against the embeddings of digit words and, if ``cells``, of cell names
    (no parameters)."""

    def __init__(self, backbone: Backbone, cells: bool):
        tok = self.tokenizer = backbone.tokenizer
        self.embed = backbone.model.get_input_embeddings()
        self.cell_ids = torch.tensor(tok.convert_tokens_to_ids(list(cell_names(GRID)))) if cells else None
        self.all_cell_ids = torch.tensor(tok.convert_tokens_to_ids(list(ALL_CELL_NAMES)))
        self.digit_ids = torch.tensor(tok.convert_tokens_to_ids([*map(str, range(10)), "none"]))

    @staticmethod
    def targets(grids: list[Grid], labels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each visual token's cell index on its board and digit class (10: none), images concatenated."""
        cells = [token_cells(grid, board_side(lab)) for grid, lab in zip(grids, labels)]
        digits = torch.cat([torch.from_numpy(lab)[cell] for lab, cell in zip(labels, cells)])
        digits[digits < 0] = 10
        return torch.cat(cells), digits

    def loss(
        self, tokens: list[torch.Tensor], grids: list[Grid], labels: list[np.ndarray]
    ) -> tuple[torch.Tensor, float]:
        """Cross-entropy of each token's digit (and cell); returns (loss, digit accuracy)."""
        cells, digit_target = self.targets(grids, labels)
        features = torch.cat(tokens)
        digit_logits = features @ self.embed(self.digit_ids).T
        loss = F.cross_entropy(digit_logits, digit_target)
        if self.cell_ids is not None:
            loss = loss + F.cross_entropy(features @ self.embed(self.cell_ids).T, cells)
        acc = (digit_logits.argmax(-1) == digit_target).float().mean().item()
        return loss, acc

    def lens_loss(self, logits: torch.Tensor, grids: list[Grid], labels: list[np.ndarray]) -> torch.Tensor:
        """Cross-entropy of the visual tokens' vocabulary ``logits`` restricted to the cell names (target:
        the token's cell) plus restricted to the digit words (target: its digit). Each restriction is its
        own softmax, so a state can name its cell and its digit at once, as stage 1 aligns LLaVA's tokens."""
        cells, digits = self.targets(grids, labels)
        per_image = cells.split([rows * cols for rows, cols in grids])
        named = torch.cat([cell_positions(board_side(lab))[c] for lab, c in zip(labels, per_image)])
        return F.cross_entropy(logits[:, self.all_cell_ids], named) + F.cross_entropy(logits[:, self.digit_ids], digits)


def chat_renderer(backbone: Backbone):
    """``render(messages, add_generation_prompt=False) -> str`` with the backbone's chat template."""
    if isinstance(backbone, LlavaBackbone):
        return backbone.processor.apply_chat_template
    return partial(backbone.tokenizer.apply_chat_template, tokenize=False)


def conversation_rows(
    backbone: Backbone,
    features: list[torch.Tensor],
    grids: list[Grid],
    conversations: list[list[tuple[str, str]]],
    at_key_word: bool = False,
) -> list:
    """Multi-turn LLaVA conversations (image in the first turn) as ``Backbone.pack`` rows whose
    targets are every assistant reply token and its end-of-sequence; with ``at_key_word`` also the
    first answer token at the position of the question's key word (the curriculum of stage 2).

    Replies are found as in LLaVA's training code: each one follows the assistant-turn separator
    (the ids the chat template adds for the generation prompt) and runs through end-of-sequence.
    """
    tokenizer, render = backbone.tokenizer, chat_renderer(backbone)
    user = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    head = tokenizer(render(user), add_special_tokens=False)["input_ids"]
    sep = tokenizer(render(user, add_generation_prompt=True), add_special_tokens=False)["input_ids"][len(head) :]
    rows = []
    for visual, grid, turns in zip(features, grids, conversations):
        messages = []
        for j, (question, answer) in enumerate(turns):
            content = ([{"type": "image"}] if j == 0 else []) + [{"type": "text", "text": question}]
            messages += [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
        ids = tokenizer(render(messages))["input_ids"]
        cut = ids.index(backbone.image_token_id)
        targets, p, turn = [], cut + 1, 0
        while p < len(ids):
            if ids[p : p + len(sep)] != sep:
                p += 1
                continue
            start = p + len(sep)
            end = ids.index(tokenizer.eos_token_id, start) + 1
            # input position q - 1 predicts token q; positions count from the first id after the image
            targets += [(q - 1 - (cut + 1), ids[q]) for q in range(start, end)]
            if at_key_word:
                word = tokenizer.convert_tokens_to_ids(key_word(turns[turn][0]))
                mention = max(i for i in range(cut + 1, p) if ids[i] == word)  # in this turn's question
                targets.append((mention - (cut + 1), ids[start]))
            p, turn = end, turn + 1
        rows.append(Row(ids[:cut], visual, ids[cut + 1 :], targets, torch.arange(visual.shape[0]), tuple(grid)))
    return rows


def answer_loss(
    backbone: Backbone, rows: list, lens=None, layers: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the rows' targets and, given ``lens`` (a loss of vocabulary logits, one row per
    visual token, rows concatenated), that loss of the visual tokens' states after each decoder layer of
    ``layers`` (their mean) read through the final norm and the (tied) output embedding (a logit lens: question
    words and the cells they name then meet in the embedding space, as stage 1 does for digits)."""
    batch = backbone.pack(rows)
    out = backbone.logits(batch, output_hidden_states=lens is not None)
    rows_idx = torch.tensor([i for i, tgt in enumerate(batch.targets) for _ in tgt])
    pos = torch.tensor([p for tgt in batch.targets for p, _ in tgt])
    tok = torch.tensor([t for tgt in batch.targets for _, t in tgt])
    answer = F.cross_entropy(out.logits[rows_idx, pos], tok)
    if lens is None:
        return answer, torch.tensor(float("nan"))
    norm, head = backbone.language_model.norm, backbone.model.lm_head
    return answer, torch.stack([lens(head(norm(out.hidden_states[k][batch.visual_mask]))) for k in layers]).mean()


def conversation(sampler: SceneSampler, scene, questions, rounds: int) -> list[tuple[str, str]]:
    """Up to ``rounds`` distinct questions of each category about one scene, in random order."""
    turns = [(q, a) for _, q, a in questions]
    counts = np.bincount(scene.labels[scene.labels >= 0], minlength=10)
    for _ in range(rounds - 1):
        target = int(sampler.rng.choice([c for c in range(4) if (counts == c).any()]))
        turns += [(q, a) for _, q, a in sampler.questions(scene.labels, count_target=target)]
    turns = list(dict(turns).items())  # a repeated question could be answered from the context
    order = sampler.rng.permutation(len(turns))
    return [turns[i] for i in order]


VISION_PARAMETERS = ("vision_tower", "multi_modal_projector", "visual.")


def build_backbone(cfg: TinyModelConfig) -> Backbone:
    """``cfg.init_from``'s checkpoint, else a fresh model of ``cfg.family`` at its sizes."""
    if cfg.init_from is not None:
        return load_backbone(cfg.init_from)
    if cfg.family == "qwen":
        tokenizer = tiny_qwen.build_tokenizer()
        model = tiny_qwen.build_model(tokenizer, cfg.qwen_size)
        return QwenBackbone(model, tokenizer, tiny_qwen.build_image_processor(cfg.qwen_size.patch_size))
    processor = tiny_llava.build_processor(cfg.size)
    return LlavaBackbone(tiny_llava.build_model(cfg.size, processor.tokenizer), processor)


def lr_at(step: int, cfg: TinyModelConfig) -> float:
    """Linear warm-up then cosine decay to 10%, restarted at the beginning of each stage."""
    stage_len = cfg.align_steps if step < cfg.align_steps else cfg.tune_steps
    step = step if step < cfg.align_steps else step - cfg.align_steps
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, stage_len - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train_tiny(cfg: TinyModelConfig, log=None) -> dict:
    """Train and save the tiny model to ``cfg.out``; returns the final validation metrics.

    ``log(metrics: dict, step: int)`` receives training and validation metrics (e.g. MLflow).
    """
    meta_path = cfg.data / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found; build the benchmark with `tprl data digits` first")
    meta = json.loads(meta_path.read_text())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    boards = tuple(meta["config"].get("boards", [GRID]))
    pools = load_digit_pools(meta["config"]["seed"], meta["config"]["test_digit_fraction"])
    sampler = SceneSampler(
        pools["train"],
        np.random.default_rng([cfg.seed, 0x7A1]),
        meta["config"]["min_digits"],
        meta["config"]["max_digits"],
        boards,
    )
    backbone = build_backbone(cfg)
    if isinstance(backbone, LlavaBackbone) and boards != (GRID,):
        raise DataError(f"{cfg.data}: the tiny LLaVA reads 96-px 4x4 boards only, this benchmark has boards {boards}")
    model = backbone.model.train()
    head = AlignmentHead(backbone, cells=isinstance(backbone, LlavaBackbone))
    val = read_split(cfg.data / "val")[: cfg.val_questions] if cfg.val_questions else []
    vision = [p for n, p in model.named_parameters() if any(k in n for k in VISION_PARAMETERS)]
    ids = {id(p) for p in vision}
    optimizer = torch.optim.AdamW(
        [
            {"params": vision, "name": "vision"},
            {"params": [p for p in model.parameters() if id(p) not in ids], "name": "llm"},
        ],
        lr=cfg.lr,
        weight_decay=0.01,
    )
    total = cfg.align_steps + cfg.tune_steps
    metrics: dict = {}
    started = time.time()
    bar = tqdm(range(total), desc=f"tiny-{cfg.family}", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            scale = cfg.vision_lr_scale if group["name"] == "vision" and step >= cfg.align_steps else 1.0
            group["lr"] = lr_at(step, cfg) * scale
        scenes = [sampler.sample() for _ in range(cfg.batch_scenes)]
        images = [Image.fromarray(s.image).convert("RGB") for s, _ in scenes]
        features, grids = backbone.trainable_tokens(images)
        align, digit_acc = head.loss(features, grids, [s.labels for s, _ in scenes])
        if step < cfg.align_steps:
            loss, lm, where = align, torch.tensor(float("nan")), torch.tensor(float("nan"))
        else:
            talks = [conversation(sampler, scene, qs, cfg.rounds) for scene, qs in scenes]
            curriculum = step < cfg.align_steps + cfg.key_word_steps
            rows = conversation_rows(backbone, features, grids, talks, at_key_word=curriculum)
            positions = isinstance(backbone, QwenBackbone) and cfg.position_weight > 0
            labels = [s.labels for s, _ in scenes]
            lens = partial(head.lens_loss, grids=grids, labels=labels) if positions else None
            lm, where = answer_loss(backbone, rows, lens, tuple(cfg.position_layers))
            loss = lm + cfg.align_weight * align + (cfg.position_weight * where if positions else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        metrics = {
            "train/align_loss": align.item(),
            "train/token_digit_acc": digit_acc,
            "train/answer_loss": lm.item(),
            "train/position_loss": where.item(),
            "train/lr": optimizer.param_groups[1]["lr"],
        }
        bar.set_postfix(align=f"{align.item():.3f}", answer=f"{lm.item():.3f}", digit=f"{digit_acc:.2f}", refresh=False)
        last = step == total - 1
        if val and ((step + 1) % cfg.eval_every == 0 or last) and step >= cfg.align_steps:
            model.eval()
            result = evaluate(backbone, cfg.data / "val", val)
            model.train()
            metrics["val/accuracy"] = result["accuracy"]
            metrics.update({f"val/{k}": v for k, v in result["per_type"].items()})
            tqdm.write(
                f"step {step + 1}: val accuracy {result['accuracy']:.3f} "
                f"{json.dumps({k: round(v, 3) for k, v in result['per_type'].items()})}"
            )
        if log is not None:
            log(metrics, step)
    model.eval()
    save_tiny(backbone, cfg, meta, metrics, time.time() - started)
    return metrics


def save_tiny(backbone: Backbone, cfg: TinyModelConfig, meta: dict, metrics: dict, seconds: float) -> None:
    """Write the checkpoint atomically: into a temporary directory, then rename over ``cfg.out``."""
    import shutil

    out = Path(cfg.out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.model.save_pretrained(tmp)
    if isinstance(backbone, QwenBackbone):
        backbone.tokenizer.save_pretrained(tmp)
        backbone.image_processor.save_pretrained(tmp)
    else:
        backbone.processor.save_pretrained(tmp)
    set_fields = json.loads(cfg.model_dump_json(include=cfg.model_fields_set))
    command = " ".join(
        [
            "tprl model tiny",
            *(
                f"--{k.replace('_', '-')} {shlex.quote(v if isinstance(v, str) else json.dumps(v))}"
                for k, v in set_fields.items()
            ),
        ]
    )
    card = {
        "prompt_format": "chat_template",
        "command": command,  # the settings given; every other one is the recipe's default
        "recipe": json.loads(cfg.model_dump_json()),
        "benchmark": {
            "seed": meta["config"]["seed"],
            "boards": meta["config"].get("boards", [GRID]),
            "test_pool_fingerprint": meta["test_pool_fingerprint"],
        },
        "final_metrics": metrics,
        "train_seconds": round(seconds, 1),
        "init_from": json.loads((Path(cfg.init_from) / "tprl_model_card.json").read_text())
        if cfg.init_from and (Path(cfg.init_from) / "tprl_model_card.json").is_file()
        else None,
    }
    (tmp / "tprl_model_card.json").write_text(json.dumps(card, indent=2))
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def command(cfg: TinyModelConfig) -> None:
    """`tprl model tiny`: train, logging every metric to MLflow."""
    import mlflow

    from tprl_ray.tracking import mlflow_run

    with mlflow_run(cfg.out.parent, "tprl-tiny-model", f"tiny-{cfg.family}", params=cfg.flat()):
        metrics = train_tiny(
            cfg,
            log=lambda m, step: mlflow.log_metrics({k.replace("/", "."): v for k, v in m.items() if v == v}, step=step),
        )
    print(f"saved {cfg.out}: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}")
