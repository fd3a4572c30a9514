"""PPO that samples while it learns (``overlap``): the env runners play the next batch during the update.

One-step off-policy, as in asynchronous RLHF trainers: the batch learned from in iteration ``k`` was
sampled with the weights of iteration ``k - 1``. PPO's ratio and clip are taken against the policy that
sampled it (the action log-probabilities stored with the episodes), so each update is still a clipped
step from that policy; the learner's value function computes the advantages as in plain PPO. The
weights published after an update reach each env runner once its in-flight sample is done (an actor runs
one call at a time), so every sample uses one set of weights.
"""

from __future__ import annotations

import time

from ray.rllib.algorithms.ppo import PPO
from ray.rllib.core import ALL_MODULES
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_MODULE_STEPS_TRAINED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

SAMPLE = "tprl-sample"


def sample_with_metrics(runner) -> tuple[list, dict]:
    """One env runner's rollout (``rollout_fragment_length`` steps per sub-env) and its metrics."""
    return runner.sample(), runner.get_metrics()


class OverlappedPPO(PPO):
    """RLlib's PPO ``training_step`` with the next sample requested before the learner update."""

    def training_step(self) -> None:
        group = self.env_runner_group
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes, runner_metrics = self.collect()
        if not episodes:  # every env runner failed: train_ppo runs the iteration again
            return
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        group.foreach_env_runner_async(sample_with_metrics, tag=SAMPLE)  # the next batch, during this update

        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                episodes=episodes,
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                        (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)
                    ),
                    NUM_MODULE_STEPS_TRAINED_LIFETIME: self.metrics.peek(
                        (LEARNER_RESULTS, ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), default=0
                    ),
                },
                num_epochs=self.config.num_epochs,
                minibatch_size=self.config.minibatch_size,
                shuffle_batch_per_epoch=self.config.shuffle_batch_per_epoch,
            )
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            group.sync_weights(  # queued behind each runner's in-flight sample
                from_worker_or_learner_group=self.learner_group,
                policies=set(learner_results[0]) - {ALL_MODULES},
                inference_only=True,
            )

    def collect(self) -> tuple[list, list[dict]]:
        """The in-flight batch (requested now if none is), topped up from the healthy env runners until it
        holds ``train_batch_size`` env steps; empty after ``sample_timeout_s`` without any."""
        group, episodes, runner_metrics, steps = self.env_runner_group, [], [], 0
        deadline = time.monotonic() + self.config.sample_timeout_s
        while steps < self.config.total_train_batch_size and time.monotonic() < deadline:
            if not group.num_in_flight_async_reqs(SAMPLE) and not group.foreach_env_runner_async(
                sample_with_metrics, tag=SAMPLE
            ):
                time.sleep(1.0)  # no healthy env runner: RLlib restores them between iterations
                break
            for _, (sampled, metrics) in group.fetch_ready_async_reqs(tags=SAMPLE, timeout_seconds=1.0):
                episodes += sampled
                runner_metrics.append(metrics)
                steps += int(metrics.get(NUM_ENV_STEPS_SAMPLED, 0))
        return episodes, runner_metrics
