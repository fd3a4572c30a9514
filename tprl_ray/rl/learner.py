"""PPO's learner without the bootstrap rows in its minibatches.

RLlib's PPO learner adds one artificial timestep to every episode, so that a single value pass yields
the bootstrap values GAE needs, and masks those rows out of the loss. The masked rows still travel
through every minibatch: with this env's one-step episodes (``regime="budget"``) half of each
minibatch, and half of every forward and backward pass, is rows the loss ignores. The connector piece
appended after GAE drops them, so ``minibatch_size`` counts samples the loss sees and the learner
computes nothing it throws away. The loss over the remaining rows is RLlib's (the masked mean it
took before is now the plain mean over the same rows).
"""

from __future__ import annotations

import tree
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns


class DropBootstrapRows(ConnectorV2):
    """Keep only the rows inside each module batch's loss mask, and drop the mask."""

    def __call__(self, *, rl_module, batch: dict, episodes, explore=None, shared_data=None, **kwargs) -> dict:
        for module_id, columns in batch.items():
            mask = columns.pop(Columns.LOSS_MASK, None)
            if mask is not None:
                keep = mask.nonzero().squeeze(-1)
                batch[module_id] = tree.map_structure(lambda column, keep=keep: column[keep], columns)
        return batch


class PruningPPOLearner(PPOTorchLearner):
    """RLlib's torch PPO learner with :class:`DropBootstrapRows` after its GAE connector."""

    def build(self) -> None:
        super().build()
        if self._learner_connector is not None:
            self._learner_connector.append(DropBootstrapRows())
