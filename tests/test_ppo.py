"""PPO stage: the pruning MDP, the per-token Bernoulli distribution and RLModule, tau calibration, and
RLlib training against the Ray Serve scorer (a killed replica, resuming)."""

import json
import math
import threading
import time

import numpy as np
import pytest
import ray
import torch

from tprl_ray.artifacts.export import export
from tprl_ray.policy.autoencoder import TokenAutoencoder
from tprl_ray.policy.networks import PolicyValueNet
from tprl_ray.rl.codes import Codes
from tprl_ray.rl.config import EnvConfig, PpoConfig
from tprl_ray.rl.env import PruningVectorEnv
from tprl_ray.rl.module import DROPPED_LOGIT, TokenBernoulli, sampling_logits

PAPER_ENV = PpoConfig.load(preset="paper").env  # the discount regime of the paper, beta = 0.1


def toy_codes(m=5, n=8, d=4, dq=3) -> Codes:
    rng = np.random.default_rng(0)
    return Codes(
        np.array([f"s{i}" for i in range(m)]),
        rng.normal(size=(m, n, d)).astype(np.float16),
        rng.normal(size=(m, dq)).astype(np.float32),
        np.full(m, -0.5, np.float32),
        np.ones(m, bool),
        (2, n // 2),
    )


def first_half_score(ids, masks):
    """A score that only depends on keeping tokens 0..3: log-likelihood -2 * (fraction of them dropped)."""
    lost = 1.0 - masks[:, :4].mean(axis=1)
    return (-0.5 - 2.0 * lost).astype(np.float32), lost == 0


def test_env_rewards_masks_and_next_step_autoreset():
    env = PruningVectorEnv(
        toy_codes(),
        PAPER_ENV.model_copy(update={"t_max": 2, "reward": "sample"}),
        num_envs=2,
        score_fn=first_half_score,
        seed=0,
    )
    obs, _ = env.reset()
    assert obs["codes"].shape == (2, 8, 4) and obs["mask"].tolist() == [[1.0] * 8] * 2
    assert obs["step"].ravel().tolist() == [0, 0]
    keep = np.array(
        [
            [1, 1, 1, 1, 0, 0, 0, 0],  # drops the unimportant half: no score lost
            [0, 0, 1, 1, 1, 1, 1, 1],
        ]
    )  # drops half of the important tokens
    obs, reward, terminated, truncated, _ = env.step(keep)
    # r = alpha * dScore + beta * (1 - K_t / K_{t-1})
    np.testing.assert_allclose(reward, [0.0 + 0.1 * 0.5, -1.0 + 0.1 * 0.25], rtol=1e-6)
    assert obs["mask"].tolist() == keep.astype(float).tolist() and not terminated.any()
    obs, reward, terminated, _, _ = env.step(np.zeros((2, 8), dtype=np.int8))  # dropping all keeps one token
    assert obs["mask"].sum(axis=1).tolist() == [1, 1] and terminated.all() and obs["step"].ravel().tolist() == [2, 2]
    assert keep[0, obs["mask"][0].argmax()] == 1  # the survivor was kept at the step before
    obs, reward, terminated, _, _ = env.step(keep)  # NEXT_STEP autoreset: a fresh episode, no reward
    assert reward.tolist() == [0.0, 0.0] and not terminated.any() and obs["mask"].sum() == 16

    batch = PruningVectorEnv(
        toy_codes(), PAPER_ENV.model_copy(update={"reward": "batch"}), num_envs=2, score_fn=first_half_score, seed=0
    )
    batch.reset()
    _, reward, _, _, _ = batch.step(keep)
    np.testing.assert_allclose(reward, [(0.0 - 1.0) / 2 + 0.1 * 0.375] * 2, rtol=1e-6)


def test_group_reward_is_relative_to_the_other_plays_of_the_same_sample():
    cfg = PAPER_ENV.model_copy(update={"reward": "group", "group_size": 3, "t_max": 1})
    env = PruningVectorEnv(toy_codes(m=50), cfg, num_envs=6, score_fn=first_half_score, seed=0)
    env.reset()
    for _ in range(4):  # t_max=1: a step plays, the next one restarts with one new sample per group
        assert len(set(env.index[:3])) == 1 and len(set(env.index[3:])) == 1
        env.step(np.ones((6, 8), dtype=np.int8))
    keep = np.ones((6, 8), dtype=np.int8)
    keep[0, :4] = 0  # loses the whole score (-2) and half the tokens
    keep[1, 4:] = 0  # loses nothing, prunes half
    keep[3:, :2] = 0  # all three plays of the second sample act alike: no relative reward
    _, reward, _, _, _ = env.step(keep)
    own = np.array([-2.0 + 0.05, 0.05, 0.0])
    np.testing.assert_allclose(reward[:3], own - (own.sum() - own) / 2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(reward[3:], 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="multiple of group_size"):
        PruningVectorEnv(toy_codes(), cfg, num_envs=4, score_fn=first_half_score)
    with pytest.raises(ValueError, match="envs_per_runner"):  # refused at load time, not in the env runners
        PpoConfig(envs_per_runner=12)


def test_sampling_probabilities_discount_and_mask():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    mask = torch.tensor([[True, True, False]])
    for t in (0, 1, 2):
        q = torch.sigmoid(sampling_logits(logits, mask, torch.tensor([float(t)]), 0.5))
        torch.testing.assert_close(q[0, :2], 0.5**t * torch.sigmoid(logits[0, :2]))
        assert q[0, 2] < 1e-12
    dist = TokenBernoulli.from_logits(sampling_logits(logits, mask, torch.tensor([1.0]), 0.5))
    action = torch.tensor([[1, 0, 0]], dtype=torch.int8)
    p = 0.5 * torch.sigmoid(logits[0, :2])
    torch.testing.assert_close(dist.logp(action), (torch.log(p[0]) + torch.log(1 - p[1]))[None], atol=1e-5, rtol=0)
    assert dist.entropy().shape == (1,) and (dist.sample()[0, 2] == 0)
    assert dist.to_deterministic().sample().tolist() == [[0.0, 0.0, 0.0]]
    assert DROPPED_LOGIT < -20


def test_rl_module_wraps_the_lfd_network(tmp_path):
    from ray.rllib.core.columns import Columns

    from tprl_ray.rl.module import PruningModule

    torch.manual_seed(0)
    net = PolicyValueNet(4, 3, heads=2, hidden=8)
    export(net, net.state_dict(), tmp_path, "policy", {})
    env = PruningVectorEnv(
        toy_codes(), PAPER_ENV.model_copy(update={"reward": "sample"}), num_envs=3, score_fn=first_half_score, seed=0
    )
    module = PruningModule(
        observation_space=env.single_observation_space,
        action_space=env.single_action_space,
        model_config={"dims": net.dims, "lambda_disc": 0.5, "steps": 3, "init": str(tmp_path)},
    )
    obs, _ = env.reset()
    obs["mask"][0, 5:] = 0
    obs["step"][:] = 1
    batch = {Columns.OBS: {k: torch.from_numpy(v) for k, v in obs.items()}}
    out = module.forward_train(batch)
    state = batch[Columns.OBS]
    codes, query, mask = state["codes"].float(), state["query"], state["mask"] > 0
    expected_logits, expected_values = net(codes, query, mask)
    expected_inputs = sampling_logits(expected_logits, mask, torch.ones(3), 0.5)
    torch.testing.assert_close(out[Columns.ACTION_DIST_INPUTS], expected_inputs)
    torch.testing.assert_close(module.compute_values(batch, embeddings=out[Columns.EMBEDDINGS]), expected_values)
    torch.testing.assert_close(module.compute_values(batch), expected_values)


def test_the_env_runners_pass_skips_the_network_on_observations_that_end_an_episode(tmp_path):
    """Rows at ``step == steps`` are only ever acted on by the env's autoreset: DROPPED_LOGIT, no network;
    the other rows are the training pass's logits. With one-step episodes every other pass is skipped."""
    from ray.rllib.core.columns import Columns

    from tprl_ray.rl.module import PruningModule

    torch.manual_seed(0)
    net = PolicyValueNet(4, 3, heads=2, hidden=8)
    export(net, net.state_dict(), tmp_path, "policy", {})
    env_cfg = EnvConfig(regime="budget", reward="sample")
    env = PruningVectorEnv(toy_codes(), env_cfg, num_envs=4, score_fn=first_half_score, seed=0)
    module = PruningModule(
        observation_space=env.single_observation_space,
        action_space=env.single_action_space,
        model_config={"dims": net.dims, "lambda_disc": 0.5, "steps": env_cfg.steps, "init": str(tmp_path)},
    )
    rows = []
    features = module.net.features  # counts the rows each pass runs the network on
    module.net.features = lambda codes, *rest: (rows.append(len(codes)), features(codes, *rest))[1]

    def batch(obs):
        return {Columns.OBS: {k: torch.from_numpy(v) for k, v in obs.items()}}

    first, _ = env.reset()
    live = module.forward_exploration(batch(first))[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(live, module.forward_train(batch(first))[Columns.ACTION_DIST_INPUTS])
    ended, *_ = env.step(np.ones((4, env.n_tokens), bool))  # every one-step episode is over
    assert (ended["step"] == 1).all()
    rows.clear()
    out = module.forward_exploration(batch(ended))[Columns.ACTION_DIST_INPUTS]
    assert rows == [] and (out == DROPPED_LOGIT).all()

    mixed = {k: np.concatenate([first[k][:2], ended[k][2:]]) for k in first}
    out = module.forward_exploration(batch(mixed))[Columns.ACTION_DIST_INPUTS]
    assert rows == [2] and (out[2:] == DROPPED_LOGIT).all()
    torch.testing.assert_close(out[:2], live[:2])
    restarted, *_ = env.step(np.zeros((4, env.n_tokens), bool))  # the autoreset ignores the action
    assert (restarted["step"] == 0).all() and restarted["mask"].sum() == env.data.counts[env.index].sum()


def test_tprl_threshold_is_calibrated_to_the_average_budget(tmp_path):
    from tprl_ray.pruners.base import PruneBatch
    from tprl_ray.pruners.lfd import TprlPruner, tau_for_budget
    from tprl_ray.rl.train import calibration

    torch.manual_seed(0)
    ae, net = TokenAutoencoder(12, 4, 16), PolicyValueNet(4, 3, heads=2, hidden=8)
    export(ae, ae.state_dict(), tmp_path, "autoencoder", {})
    features, queries = torch.randn(40, 20, 12), torch.randn(40, 3)
    with torch.no_grad():
        codes = ae.encode(features)
    quantiles = calibration(
        net, Codes(np.arange(40).astype(str), codes.numpy(), queries.numpy(), np.zeros(40), np.ones(40, bool), (4, 5))
    )
    export(net, net.state_dict(), tmp_path, "policy", {"keep_quantiles": quantiles})
    pruner = TprlPruner(tmp_path)
    batch = PruneBatch(list(features), list(features), None, [(4, 5)] * 40, ["q"] * 40, ["?"] * 40, list(queries))
    for budget in (0.5, 0.25):
        kept = [len(k) for k in pruner.prune(batch, budget).keep]
        assert np.mean(kept) / 20 == pytest.approx(budget, abs=0.02)  # on average, not per sample
        assert tau_for_budget(quantiles, budget) == pytest.approx(np.quantile(quantiles, 1 - budget), abs=1e-3)
    export(net, net.state_dict(), tmp_path / "plain", "policy", {})
    export(ae, ae.state_dict(), tmp_path / "plain", "autoencoder", {})
    with pytest.raises(ValueError, match="no tau calibration"):
        TprlPruner(tmp_path / "plain")


@pytest.fixture(scope="module")
def ppo_inputs(precomputed, tmp_path_factory):
    """The shared precompute dataset (train split) and an LfD-shaped export to start from."""
    out = tmp_path_factory.mktemp("ppo")
    (out / "train").symlink_to(precomputed / "train")
    torch.manual_seed(0)
    ae, net = TokenAutoencoder(96, 8, 32), PolicyValueNet(8, 128, heads=2, hidden=16)
    export(ae, ae.state_dict(), out / "lfd", "autoencoder", {})
    export(net, net.state_dict(), out / "lfd", "policy", {})
    yield out
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def small_run(inputs, out, iterations, **overrides):
    settings = {
        "data": inputs / "train",
        "init": inputs / "lfd",
        "out": out,
        "iterations": iterations,
        "envs_per_runner": 8,
        "train_batch_size": 48,
        "minibatch_size": 24,
        "epochs": 1,
        "checkpoint_every": 1,
        "ray_address": "local",
        "scorer": {"pool": {"cpus": 0.25}},
        "cpus_per_runner": 0.25,
    }
    return PpoConfig.model_validate(settings | overrides)


def scorer_replicas() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]


def test_training_survives_a_killed_scorer_replica(ppo_inputs, tmp_path):
    from tprl_ray.rl.train import train_ppo

    killed = []

    def kill_soon(iteration, metrics):
        if iteration == 1:

            def kill():  # during iteration 2's sampling
                name = scorer_replicas()[0]
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                killed.append(name)

            threading.Timer(0.5, kill).start()

    # thresholded, and sampling while it learns: the next sample is in flight when the replica dies
    paper = small_run(ppo_inputs, tmp_path / "ppo", 3, env=PAPER_ENV, overlap=True)
    result = train_ppo(paper, on_iteration=kill_soon)
    assert killed and result["iterations"] == 3
    history = json.loads((tmp_path / "ppo" / "checkpoints" / "iter-00003" / "progress.json").read_text())["history"]
    assert len(history) == 3
    for metrics in history:
        for key in ("policy_loss", "vf_loss", "entropy"):
            assert math.isfinite(metrics[key])
        assert 0.0 < metrics["scorer_busy_fraction"] < 1.0 and 0.0 < metrics["learner_idle_fraction"] < 1.0
    card = json.loads((tmp_path / "ppo" / "policy.json").read_text())
    assert card["iterations"] == 3 and card["regime"] == "discount" and len(card["keep_quantiles"]) == 1001
    assert set(card["tau"]) == {f"{b:.4f}" for b in paper.budgets}


def test_an_emulated_scorer_sleeps_its_cost_and_scores_from_the_stored_full_scores(ppo_inputs):
    import pyarrow.parquet as pq

    from tprl_ray.precompute.schema import shard_files
    from tprl_ray.ray_setup import init_ray
    from tprl_ray.service.config import EmulatedCost, ScorerConfig
    from tprl_ray.service.scorer import handle_score, scorer_clock, start_scorer

    cost = EmulatedCost(full_tokens=100, fixed_s=0.01, per_sample_s=0.001, per_token_s=0.0005, floor_s=0.02)
    assert cost.seconds(np.array([0.5, 1.0])) == pytest.approx(0.01 + 2 * 0.001 + 0.0005 * 150)
    assert cost.seconds(np.array([0.01])) == 0.02  # the floor: a batch of one is launch-bound
    table = pq.read_table(shard_files(ppo_inputs / "train")[0])
    ids, n = table["sample_id"].to_pylist()[:6], table["grid_rows"][0].as_py() * table["grid_cols"][0].as_py()
    masks = np.zeros((6, n), np.uint8)
    for i in range(6):
        masks[i, : (i + 1) * n // 8] = 1
    init_ray("local")
    start_scorer(ScorerConfig(emulate=cost, pool={"cpus": 0.25, "batch_size": 4}), ppo_inputs / "train")
    before = scorer_clock()
    logp, correct = handle_score(ids, masks)
    deadline = time.monotonic() + 30
    while (after := scorer_clock())["samples"] - before["samples"] < 6 and time.monotonic() < deadline:
        time.sleep(0.05)  # a replica reports to the clock without waiting for it
    fractions = masks.sum(axis=1) / n
    expected = cost.seconds(fractions[:4]) + cost.seconds(fractions[4:])  # two chunks of pool.batch_size
    assert after["samples"] - before["samples"] == 6
    assert expected <= after["busy_s"] - before["busy_s"] < expected + 0.5
    np.testing.assert_allclose(logp, table["full_logp"].to_numpy()[:6] + np.log(fractions), rtol=1e-6)
    assert correct.tolist() == table["full_correct"].to_pylist()[:6]


def test_overlapped_ppo_samples_during_every_update_and_the_runners_get_each_new_policy(ppo_inputs, tmp_path):
    from ray import serve
    from ray.rllib.core.columns import Columns

    from tprl_ray.ray_setup import init_ray
    from tprl_ray.rl.overlap import SAMPLE
    from tprl_ray.rl.train import build_algo, prepare_codes
    from tprl_ray.service.scorer import APP, start_scorer

    cfg = small_run(ppo_inputs, tmp_path / "ppo", 3, overlap=True, scorer={"emulate": {}, "pool": {"cpus": 0.25}})
    init_ray(cfg.ray_address)
    codes_dir, _ = prepare_codes(cfg)
    start_scorer(cfg.scorer, cfg.data)
    algo = build_algo(cfg, codes_dir)
    in_flight, update = [], algo.learner_group.update

    def watched(*args, **kwargs):  # how many samples are running while the learner updates
        in_flight.append(algo.env_runner_group.num_in_flight_async_reqs(SAMPLE))
        return update(*args, **kwargs)

    algo.learner_group.update = watched
    learner, rows = algo.learner_group._learner, []  # the local learner (num_learners=0)
    compute_losses = learner.compute_losses

    def counted(*, fwd_out, batch):  # the rows of each minibatch the loss sees, and whether any is masked out
        rows.append((len(batch["default_policy"][Columns.ACTIONS]), Columns.LOSS_MASK in batch["default_policy"]))
        return compute_losses(fwd_out=fwd_out, batch=batch)

    learner.compute_losses = counted
    try:
        sampled = [algo.train()["env_runners"]["num_env_steps_sampled"] for _ in range(3)]
        learner = algo.get_module().get_state(inference_only=True)
        # runs after the runner's in-flight sample and the weights queued behind it
        (runner,) = algo.env_runner_group.foreach_env_runner(
            lambda r: r.module.get_state(inference_only=True), local_env_runner=False
        )
    finally:
        algo.stop()
        serve.delete(APP)
    assert in_flight == [1, 1, 1] and all(steps >= 48 for steps in sampled)
    # one epoch of 24-sample minibatches over each batch of one-step episodes, without their bootstrap rows
    assert rows and set(rows) == {(24, False)} and len(rows) == sum(math.ceil(steps / 24) for steps in sampled)
    assert runner.keys() == learner.keys()
    for name, weights in learner.items():
        np.testing.assert_array_equal(runner[name], weights, err_msg=name)


def test_the_ppo_bench_reports_busy_and_idle_fractions_with_an_emulated_scorer(ppo_inputs, tmp_path):
    from tprl_ray.bench.config import PpoBenchConfig
    from tprl_ray.bench.ppo import format_ppo_bench, run_ppo_bench

    cfg = PpoBenchConfig(
        data=ppo_inputs / "train",
        init=ppo_inputs / "lfd",
        out=tmp_path / "ppo.json",
        runner_counts=[2],
        overlap=[False, True],
        envs_per_runner=8,
        env={"regime": "discount"},  # the paper's three-step episodes
        train_batch_size=32,
        warmup=0,
        iterations=1,
        emulate=True,
        cost={"fixed_s": 0.05},
    )
    result = run_ppo_bench(cfg)
    assert json.loads(cfg.out.read_text()) == result and result["cost"]["fixed_s"] == 0.05
    assert result["env"]["regime"] == "discount" and result["env"]["t_max"] == 3
    assert [(r["env_runners"], r["overlap"]) for r in result["rows"]] == [(2, False), (2, True)]
    for row in result["rows"]:
        assert row["env_steps"] >= 32 and row["emulated"]
        assert 0.0 < row["scorer_busy_fraction"] <= 1.0 and 0.0 < row["learner_idle_fraction"] < 1.0
        assert row["scorer_samples_per_s"] > 0
    assert "| 2 | 8 | emulated | yes |" in format_ppo_bench(result)


def test_training_resumes_from_its_checkpoint(ppo_inputs, tmp_path):
    from mlflow import MlflowClient

    from tprl_ray.pruners.registry import build_pruner
    from tprl_ray.rl.train import train_ppo

    cfg = small_run(ppo_inputs, tmp_path / "ppo", 1)
    first = train_ppo(cfg)
    resumed = train_ppo(cfg.model_copy(update={"iterations": 2}))
    assert first["iterations"] == 1 and resumed["iterations"] == 2
    history = json.loads((tmp_path / "ppo" / "checkpoints" / "iter-00002" / "progress.json").read_text())["history"]
    assert history[0]["policy_loss"] == pytest.approx(first["policy_loss"])  # iteration 1 was not redone
    assert history[0]["env_steps"] < history[1]["env_steps"]  # the env step count continued too
    with pytest.raises(ValueError, match="trained with other lr"):
        train_ppo(cfg.model_copy(update={"iterations": 3, "lr": 1e-2}))
    client = MlflowClient(f"sqlite:///{tmp_path / 'ppo' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tprl-ppo").experiment_id])
    assert sorted(len(client.get_metric_history(r.info.run_id, "policy_loss")) for r in runs) == [1, 1]
    assert build_pruner("tprl", policy=tmp_path / "ppo").name == "tprl"


def test_budget_regime_plays_one_step_at_a_drawn_target_shared_by_the_group():
    cfg = EnvConfig(regime="budget", budget_range=(0.2, 0.4), group_size=3, beta=0.0)
    env = PruningVectorEnv(toy_codes(m=50), cfg, num_envs=6, score_fn=first_half_score, seed=0)
    obs, _ = env.reset()
    seen = []
    for _ in range(6):  # play, restart, play, ...: every episode is one step
        budget = obs["budget"][:, 0]
        assert ((0.2 <= budget) & (budget <= 0.4)).all()
        assert len(set(budget[:3])) == 1 and len(set(budget[3:])) == 1  # a group plays one sample at one budget
        seen.append(float(budget[0]))
        obs, reward, terminated, _, _ = env.step(np.ones((6, 8), dtype=np.int8))
        assert terminated.all()
        obs, reward, terminated, _, _ = env.step(np.ones((6, 8), dtype=np.int8))
        assert reward.tolist() == [0.0] * 6 and not terminated.any()
    assert len(set(seen)) == 6  # a new target every episode
    with pytest.raises(ValueError, match="budget_range"):
        EnvConfig(budget_range=(0.5, 0.2))


def test_budget_logits_keep_the_target_fraction_in_expectation_at_any_logit_scale():
    from tprl_ray.rl.module import budget_logits

    torch.manual_seed(0)
    mask = torch.ones(4, 64, dtype=torch.bool)
    mask[2, 40:] = False
    budget = torch.tensor([0.1, 0.25, 0.3, 0.4])
    for scale in (1.0, 50.0, 500.0):  # the level of the logits drifts freely in this regime
        logits = torch.randn(4, 64) * scale + 3 * scale
        shifted = budget_logits(logits, mask, budget)
        q = torch.sigmoid(shifted)
        torch.testing.assert_close((q * mask).sum(dim=1), budget * mask.sum(dim=1), atol=1e-3, rtol=0)
        assert (q[~mask] < 1e-12).all()
        assert torch.equal(shifted[0].argsort(), logits[0].argsort())  # one shift per row: the ranking stays


def test_rl_module_in_the_budget_regime_without_a_critic(tmp_path):
    from ray.rllib.core.columns import Columns

    from tprl_ray.rl.module import PruningModule, budget_logits

    torch.manual_seed(0)
    net = PolicyValueNet(4, 3, heads=2, hidden=8, positions=True)
    export(net, net.state_dict(), tmp_path, "policy", {})
    env = PruningVectorEnv(toy_codes(), EnvConfig(regime="budget", group_size=3), num_envs=3, score_fn=None, seed=0)
    module = PruningModule(
        observation_space=env.single_observation_space,
        action_space=env.single_action_space,
        model_config={"dims": net.dims, "lambda_disc": 0.5, "steps": 1, "init": str(tmp_path), "critic": False},
    )
    obs, _ = env.reset()
    batch = {Columns.OBS: {k: torch.from_numpy(v) for k, v in obs.items()}}
    out = module.forward_train(batch)
    state = batch[Columns.OBS]
    mask = state["mask"] > 0
    logits, _ = net(state["codes"].float(), state["query"], mask, (2, 4))
    torch.testing.assert_close(out[Columns.ACTION_DIST_INPUTS], budget_logits(logits, mask, state["budget"][:, 0]))
    assert module.compute_values(batch).tolist() == [0.0] * 3  # no critic: the advantage is the return


def test_count_neutral_rewards_pay_for_which_tokens_not_how_many():
    def score(ids, masks):  # one point per kept token, and three for token 0
        return (masks.sum(axis=1) + 3.0 * masks[:, 0]).astype(np.float32), np.ones(len(ids), bool)

    cfg = EnvConfig(regime="budget", group_size=4, count_neutral=True)
    env = PruningVectorEnv(toy_codes(m=4), cfg, num_envs=8, score_fn=score, seed=0)
    env.reset()
    keep = np.zeros((8, 8), dtype=np.int8)
    for row, (first, count) in enumerate([(1, 3), (0, 2), (0, 4), (1, 1), (0, 2), (0, 3), (0, 4), (0, 5)]):
        keep[row, 1 : 1 + count] = 1
        keep[row, 0] = first
    _, reward, _, _, _ = env.step(keep)
    plain = PruningVectorEnv(toy_codes(m=4), cfg.model_copy(update={"count_neutral": False}), 8, score, seed=0)
    plain.reset()
    _, raw, _, _, _ = plain.step(keep)
    assert np.corrcoef(raw[4:], keep[4:].sum(axis=1))[0, 1] > 0.99  # the second group differs by count only
    # fitted out, the count earns nothing and token 0 its 3 points against the others' mean
    np.testing.assert_allclose(reward, [2.0, -2.0, -2.0, 2.0, 0.0, 0.0, 0.0, 0.0], atol=1e-5)
