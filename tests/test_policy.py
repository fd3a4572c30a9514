"""Autoencoder, policy/value networks, LfD training on Ray Train (2 workers, resume) and the learned pruner."""

import json

import pytest
import ray
import torch

from tprl_ray.artifacts.export import export, load_exported
from tprl_ray.policy.autoencoder import TokenAutoencoder, relative_mse
from tprl_ray.policy.networks import PolicyValueNet
from tprl_ray.pruners.base import PruneBatch
from tprl_ray.pruners.lfd import LearnedPruner


def test_autoencoder_shapes_and_relative_mse():
    ae = TokenAutoencoder(96, 64)
    x = torch.randn(2, 10, 96)
    assert ae.encode(x).shape == (2, 10, 64) and ae(x).shape == x.shape
    assert relative_mse(x, x).item() == 0.0
    assert relative_mse(x.mean(dim=(0, 1)).expand_as(x), x).item() == pytest.approx(1.0)


@pytest.mark.parametrize("attention", [True, False])
def test_policy_ignores_masked_tokens_and_pools_values_over_kept_ones(attention):
    torch.manual_seed(0)
    net = PolicyValueNet(16, 8, heads=4, hidden=32, attention=attention).eval()
    codes, query = torch.randn(1, 6, 16), torch.randn(1, 8)
    mask = torch.tensor([[True, True, False, True, False, True]])
    logits, value = net(codes, query, mask)
    assert logits.shape == (1, 6) and value.shape == (1,)
    other = codes.clone()
    other[:, ~mask[0]] = torch.randn(1, 2, 16) * 10  # what dropped tokens hold must not matter
    logits2, value2 = net(other, query, mask)
    torch.testing.assert_close(logits[mask], logits2[mask])
    torch.testing.assert_close(value, value2)
    probabilities = net.keep_probabilities(codes, query, mask)
    torch.testing.assert_close(probabilities, torch.sigmoid(logits))


def test_learned_pruner_keeps_the_most_probable_tokens(tmp_path):
    torch.manual_seed(0)
    export(TokenAutoencoder(12, 8, 16), TokenAutoencoder(12, 8, 16).state_dict(), tmp_path, "autoencoder", {})
    export(PolicyValueNet(8, 5, 2, 16), PolicyValueNet(8, 5, 2, 16).state_dict(), tmp_path, "policy", {})
    pruner = LearnedPruner(tmp_path)
    features, query = torch.randn(20, 12), torch.randn(5)
    batch = PruneBatch([features], [features], None, [(4, 5)], ["q"], ["?"], [query])
    logits = pruner.keep_logits(features, query, (4, 5))
    assert pruner.prune(batch, 0.25).keep[0].tolist() == sorted(logits.topk(5).indices.tolist())
    p = torch.sigmoid(logits)
    pruner.threshold = float(p.median())
    assert pruner.prune(batch, 0.25).keep[0].tolist() == (p > p.median()).nonzero()[:, 0].tolist()
    with pytest.raises(ValueError, match="features are 7-wide but the autoencoder expects 12-wide"):
        pruner.keep_logits(torch.randn(20, 7), query, (4, 5))


def test_top_k_ranks_by_logit_where_probabilities_saturate(tmp_path):
    """A policy whose keep probabilities all round to 1.0 still keeps its best-ranked tokens."""
    torch.manual_seed(0)
    export(TokenAutoencoder(12, 8, 16), TokenAutoencoder(12, 8, 16).state_dict(), tmp_path, "autoencoder", {})
    net = PolicyValueNet(8, 5, 2, 16)
    with torch.no_grad():
        net.policy_out.weight.mul_(40.0)
        net.policy_out.bias.fill_(200.0)
    export(net, net.state_dict(), tmp_path, "policy", {})
    pruner = LearnedPruner(tmp_path)
    features, query = torch.randn(20, 12), torch.randn(5)
    logits = pruner.keep_logits(features, query, (4, 5))
    assert bool((torch.sigmoid(logits) == 1.0).all())  # every probability ties
    batch = PruneBatch([features], [features], None, [(4, 5)], ["q"], ["?"], [query])
    kept = pruner.prune(batch, 0.25).keep[0].tolist()
    assert kept == sorted(logits.topk(5).indices.tolist()) and kept != [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def precomputed(precomputed):
    """The shared precompute dataset; this module's local Ray is shut down after it."""
    yield precomputed
    ray.shutdown()


def test_a_small_dataset_is_materialized_once_with_the_rows_of_a_streamed_read(precomputed, tmp_path):
    from ray.data.dataset import MaterializedDataset

    from tprl_ray.training.common import datasets
    from tprl_ray.training.config import AutoencoderConfig

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        read = {
            mb: datasets(AutoencoderConfig(data=precomputed / "train", cache_mb=mb), ["features", "full_logp"])
            for mb in (0, 256)
        }
        assert isinstance(read[256]["train"], MaterializedDataset)
        assert not isinstance(read[0]["train"], MaterializedDataset)
        for split in ("train", "val"):
            read[0][split].context.execution_options.preserve_order = True  # as the trainer's DataConfig reads
            streamed, cached = (read[mb][split].to_pandas() for mb in (0, 256))
            assert len(cached) > 0 and cached["full_logp"].tolist() == streamed["full_logp"].tolist()
            assert (cached["tokens"] == streamed["tokens"]).all()
    finally:
        ray.shutdown()


def test_autoencoder_and_lfd_train_on_two_workers_and_resume(precomputed, tmp_path):
    from tprl_ray.training.autoencoder import train_autoencoder
    from tprl_ray.training.config import AutoencoderConfig, LfdConfig
    from tprl_ray.training.lfd import train_lfd

    common = dict(
        data=precomputed / "train",
        val_data=precomputed / "val",
        workers=2,
        cpus_per_worker=0.5,
        batch_size=16,
        ray_address="local",
    )
    ae_cfg = AutoencoderConfig(out=tmp_path / "ae", latent=16, epochs=1, **common)
    first = train_autoencoder(ae_cfg)
    resumed = train_autoencoder(ae_cfg.model_copy(update={"epochs": 2}))
    card = json.loads((tmp_path / "ae" / "autoencoder.json").read_text())
    assert first["epochs"] == 1 and resumed["epochs"] == 2 and card["epochs"] == 2
    history = torch.load(sorted((tmp_path / "ae" / "ray_train").rglob("state.pt"))[-1], weights_only=True)["history"]
    assert len(history) == 2 and history[0]["train_mse"] == pytest.approx(first["train_mse"])  # epoch 1 not redone
    assert 0 < resumed["val_relative_mse"] < 1.5
    with pytest.raises(ValueError, match="trained with other lr"):
        train_autoencoder(ae_cfg.model_copy(update={"epochs": 3, "lr": 1e-2}))
    encoder, _ = load_exported(TokenAutoencoder, tmp_path / "ae", "autoencoder")
    assert encoder.dims == {"d_v": 96, "d_latent": 16, "hidden": 256}

    lfd_cfg = LfdConfig(out=tmp_path / "lfd", autoencoder=tmp_path / "ae", epochs=1, **common)
    first = train_lfd(lfd_cfg)
    resumed = train_lfd(lfd_cfg.model_copy(update={"epochs": 2}))
    assert first["epochs"] == 1 and resumed["epochs"] == 2 and 0.0 < resumed["val_f1"] <= 1.0
    pruner = LearnedPruner(tmp_path / "lfd")  # the export is self-contained: policy plus its autoencoder
    assert pruner.policy.dims["d_latent"] == 16


def test_features_of_another_width_fail_clearly(precomputed, tmp_path):
    from tprl_ray.training.config import LfdConfig
    from tprl_ray.training.lfd import train_lfd

    export(TokenAutoencoder(32, 16), TokenAutoencoder(32, 16).state_dict(), tmp_path / "ae32", "autoencoder", {})
    with pytest.raises(ValueError, match="features are 96-wide but the autoencoder in .* expects 32-wide"):
        train_lfd(LfdConfig(data=precomputed / "train", autoencoder=tmp_path / "ae32", out=tmp_path / "lfd"))


def test_a_positional_policy_tells_equal_tokens_apart_by_place():
    from tprl_ray.policy.networks import grid_features

    torch.manual_seed(0)
    features = grid_features(3, 4)
    assert features.shape == (12, 16) and not torch.allclose(features[0], features[5])
    net = PolicyValueNet(8, 5, 2, 16, positions=True).eval()
    codes = torch.randn(1, 1, 8).expand(1, 12, 8)  # the same code everywhere
    mask = torch.ones(1, 12, dtype=torch.bool)
    logits, _ = net(codes, torch.randn(1, 5), mask, (3, 4))
    assert logits[0].unique().numel() == 12
    with pytest.raises(ValueError, match="token grid of its 12 tokens"):
        net(codes, torch.randn(1, 5), mask, (4, 4))
    plain, _ = PolicyValueNet(8, 5, 2, 16).eval()(codes, torch.randn(1, 5), mask)
    assert plain[0].unique().numel() == 1
