"""Configurations of the PPO stage (`tprl train ppo`, `pipelines/ppo.py`) and its MDP."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from tprl_ray.config import PAPER_BUDGETS, Command, RunConfig, Section, check_budgets
from tprl_ray.service.config import ScorerConfig


class EnvConfig(Section):
    """The MDP (defaults: docs/design.md §1.2)."""

    regime: Literal["discount", "budget"] = Field(
        "budget",
        description="discount: the paper's t_max steps, keep probabilities discounted by lambda_disc ** t; "
        "budget: one step per episode keeping a target fraction drawn from budget_range (in the "
        "observation), the regime the pruner is used in",
    )
    budget_range: tuple[float, float] = Field((0.08, 0.4), description="regime=budget: target kept fractions")
    t_max: int = Field(3, ge=1, description="regime=discount: steps per episode")
    alpha: float = Field(1.0, description="weight of the score difference")
    beta: float = Field(0.0, description="weight of the pruned fraction (the paper's 0.1 with regime=discount)")
    reward: Literal["sample", "batch", "group"] = Field(
        "group",
        description="per-sample reward, the mean over the sub-envs of a step (the paper's), or "
        "group-relative: each reward minus its group's leave-one-out mean (GRPO-style)",
    )
    group_size: int = Field(8, ge=2, description="reward=group: sub-envs playing the same sample")
    count_neutral: bool = Field(
        True,
        description="regime=budget, reward=group: take out of the reward the part that the sampled kept "
        "count's deviation from the group's explains (a linear fit per step)",
    )
    score: Literal["logprob", "accuracy"] = Field(
        "logprob", description="Score: mean answer log-likelihood, or greedy-correct (0/1)"
    )
    weights: dict[str, float] = Field(
        {},
        description="a mixture's sampling weights by dataset: an episode draws dataset d with probability "
        "w_d / sum(w), then one of its samples uniformly (none: every sample equally likely)",
    )

    @model_validator(mode="after")
    def _budget_range(self):
        low, high = self.budget_range
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"budget_range {self.budget_range} must satisfy 0 < low <= high <= 1")
        return self

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        if not all(math.isfinite(w) and w > 0 for w in value.values()):
            raise ValueError(f"weights {value} must be positive and finite")
        return value

    @property
    def steps(self) -> int:
        """Steps per episode."""
        return 1 if self.regime == "budget" else self.t_max

    def check_envs(self, num_envs: int, what: str = "sub-envs") -> None:
        """reward=group plays whole groups: ``num_envs`` must be a multiple of ``group_size``."""
        if self.reward == "group" and num_envs % self.group_size:
            raise ValueError(f"reward=group: {what} ({num_envs}) must be a multiple of group_size ({self.group_size})")


# The paper's PPO recipe (docs/design.md §1.5), where this project's defaults differ: `--preset paper`.
PAPER_PPO: dict[str, Any] = {
    "env.regime": "discount",
    "env.t_max": 3,
    "env.beta": 0.1,
    "env.reward": "batch",
    "lambda_disc": 0.5,
    "entropy_coef": 0.01,
    "critic": True,
}


class PpoConfig(RunConfig):
    """`tprl train ppo` (defaults: docs/design.md §1.5; 60 iterations, the demo's)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": PAPER_PPO}

    data: Path = Field(Path("runs/precompute/train"), description="precompute dataset to train on")
    val_data: Path | None = Field(None, description="precompute dataset to calibrate tau on (default: data)")
    init: Path | None = Field(Path("runs/train/lfd"), description="LfD export to start from (None: from scratch)")
    autoencoder: Path | None = Field(None, description="autoencoder directory (default: the copy in init)")
    out: Path = Field(Path("runs/train/ppo"), description="output directory")
    iterations: int = Field(60, ge=1, description="PPO iterations (a re-run continues up to this count)")
    env: EnvConfig = EnvConfig()
    scorer: ScorerConfig = ScorerConfig()
    lambda_disc: float = Field(0.5, gt=0, le=1, description="step discount of the keep probability")
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    critic: bool = Field(
        True,
        description="learn the value head as GAE's baseline; False: the advantage is the return itself "
        "(with reward=group, GRPO's leave-one-out baseline)",
    )
    vf_coef: float = 0.5
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus (the paper's 0.01)")
    lr: float = Field(3e-4, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    epochs: int = Field(4, ge=1, description="PPO epochs per iteration")
    minibatch_size: int = Field(
        64,
        ge=1,
        description="samples per SGD step (RLlib's bootstrap rows are dropped before the minibatches: rl/learner.py)",
    )
    train_batch_size: int = Field(768, ge=1, description="env steps per iteration")
    env_runners: int = Field(1, ge=1)
    envs_per_runner: int = Field(64, ge=1)
    cpus_per_runner: float = Field(0.5, gt=0)
    overlap: bool = Field(
        False,
        description="the env runners sample the next batch while the learner updates (one-step off-policy PPO: "
        "each batch was sampled with the weights of one update before)",
    )
    attention: bool = Field(True, description="without init: False is the MLP-only ablation")
    heads: int = Field(4, ge=1)
    hidden: int = Field(256, ge=1)
    checkpoint_every: int = Field(5, ge=1)
    stall_timeout_s: float = Field(
        600, gt=0, description="stop with an error after this long without an env step (a lost node takes minutes)"
    )
    budgets: list[float] = Field(PAPER_BUDGETS, description="budgets whose tau the card lists")
    registered_model: str | None = Field(
        "tprl-pruner", description="MLflow model the export is registered as (None: not registered)"
    )

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: list[float]) -> list[float]:
        return check_budgets(value, counts=False)

    @model_validator(mode="after")
    def _needs_an_autoencoder(self):
        if self.init is None and self.autoencoder is None:
            raise ValueError("from scratch (init: null) the autoencoder directory must be given")
        return self

    @model_validator(mode="after")
    def _whole_groups(self):
        self.env.check_envs(self.envs_per_runner, "envs_per_runner")
        return self

    def autoencoder_dir(self) -> Path:
        return self.autoencoder or self.init


COMMANDS = (
    Command(
        ("train", "ppo"),
        PpoConfig,
        "tprl_ray.rl.train:command",
        "fine-tune the policy with PPO against the scorer (RLlib, Serve)",
    ),
)
