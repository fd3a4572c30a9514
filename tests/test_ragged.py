"""Variable token counts end to end, on a tiny random Qwen2.5-VL and digits boards of two sizes: one
precompute shard holding both resolutions as plain Parquet lists, the codes, the env's padded batch
through the Ray Serve scorer (LLM tokens from the stored inputs) against one-by-one scoring from the
images, the positional policy on padded batches, and the Ray Train stages on the ragged dataset."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from tprl_ray.artifacts.export import export
from tprl_ray.backbones.load import load_backbone
from tprl_ray.config import BackboneConfig
from tprl_ray.data.config import DigitsConfig
from tprl_ray.data.digits import build_digits
from tprl_ray.data.layout import load_image, read_split
from tprl_ray.models.tiny_qwen import TEST_SIZE, build_image_processor, build_model, build_tokenizer
from tprl_ray.policy.autoencoder import TokenAutoencoder
from tprl_ray.policy.networks import PolicyValueNet
from tprl_ray.precompute.config import PrecomputeConfig
from tprl_ray.precompute.job import run_precompute
from tprl_ray.precompute.schema import SCHEMA_VERSION, SchemaError, token_rows
from tprl_ray.rl.codes import Codes, write_codes
from tprl_ray.rl.config import EnvConfig
from tprl_ray.rl.env import PruningVectorEnv

GRIDS = {(8, 8), (12, 12)}  # 12-px LLM tokens: a 96-px 4x4 board and a 144-px 6x6 board


@pytest.fixture(scope="module")
def boards(tmp_path_factory):
    out = tmp_path_factory.mktemp("boards")
    build_digits(DigitsConfig(out=out, split_sizes={"train": 8, "val": 2, "test": 2}, boards=[4, 6]))
    return out


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A random tiny Qwen2.5-VL with 6-px patches, saved as a checkpoint directory."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("qwen")
    tokenizer = build_tokenizer()
    build_model(tokenizer, TEST_SIZE.model_copy(update={"patch_size": 6})).save_pretrained(out)
    tokenizer.save_pretrained(out)
    build_image_processor(6).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_precomputed(boards, qwen_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qpc")
    backbone = BackboneConfig(path=str(qwen_dir))
    for split, engine in (("train", "ray"), ("val", "local")):
        cfg = PrecomputeConfig(
            data=boards / split, out=out / split, shard_size=64, backbone=backbone, ray_address="local"
        )
        run_precompute(cfg, progress=False, engine=engine)
    ray.shutdown()  # the scorer test starts a Ray of its own
    return out


def test_the_ray_engine_writes_the_shards_of_the_local_loop(boards, qwen_dir, qwen_precomputed, tmp_path):
    cfg = PrecomputeConfig(data=boards / "train", out=tmp_path, shard_size=64, backbone={"path": str(qwen_dir)})
    run_precompute(cfg, progress=False, engine="local")
    name = "shards/shard-00000.parquet"
    assert pq.read_table(tmp_path / name).equals(pq.read_table(qwen_precomputed / "train" / name))


def test_one_shard_holds_both_resolutions_as_plain_parquet_lists(boards, qwen_dir, qwen_precomputed):
    table = pq.read_table(qwen_precomputed / "train" / "shards" / "shard-00000.parquet")  # plain pyarrow
    assert table.schema.metadata[b"tprl.schema_version"] == str(SCHEMA_VERSION).encode()
    grids = list(zip(table["grid_rows"].to_pylist(), table["grid_cols"].to_pylist()))
    assert set(grids) == GRIDS and len(table) == 32
    backbone = load_backbone(BackboneConfig(path=str(qwen_dir)))
    samples = {s.question_id: s for s in read_split(boards / "train")}
    d, d_v = backbone.model.config.text_config.hidden_size, backbone.model.config.vision_config.hidden_size
    steps = len(json.loads(table.schema.metadata[b"tprl.demo_schedule"]))  # its step 0 keeps everything
    for i, (rows, cols) in enumerate(grids):
        n = rows * cols
        assert np.asarray(table["features"][i].as_py()).shape == (n, d_v)
        assert np.asarray(table["llm_tokens"][i].as_py()).shape == (n, d)
        masks = np.asarray(table["demo_masks"][i].as_py())  # token-major
        assert len(table["attention"][i]) == n and masks.shape == (n, steps) and masks[:, 0].all()
    # the stored LLM tokens are the image's, up to fp16 rounding
    for i in (grids.index((8, 8)), grids.index((12, 12))):
        image = load_image(boards / "train", samples[table["sample_id"][i].as_py()].image)
        expected = backbone.encode([image]).llm_tokens[0]
        stored = torch.from_numpy(token_rows(table["llm_tokens"].slice(i, 1))[0]).float()
        torch.testing.assert_close(stored, expected, atol=2e-3, rtol=1e-3)


def test_fixed_shape_shards_of_schema_2_are_refused_with_a_message():
    import pyarrow as pa

    old = pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((2, 4, 3), np.float16))
    with pytest.raises(SchemaError, match="schema version 1-2.*run tprl precompute into a new directory"):
        token_rows(old)


def test_padded_env_batch_through_the_scorer_equals_one_by_one_scoring_from_the_images(
    boards, qwen_dir, qwen_precomputed, tmp_path
):
    import ray
    from ray import serve

    from tprl_ray.service.config import ScorerConfig
    from tprl_ray.service.scorer import handle_score, start_scorer

    torch.manual_seed(0)
    autoencoder = TokenAutoencoder(TEST_SIZE.vision_hidden, 8, 16)
    export(autoencoder, autoencoder.state_dict(), tmp_path / "ae", "autoencoder", {})
    codes = Codes.load(write_codes(qwen_precomputed / "train", tmp_path / "ae", tmp_path / "codes", progress=False))
    assert codes.codes.shape[1] == 144 and set(codes.counts.tolist()) == {64, 144}
    assert not codes.codes[codes.counts == 64][:, 64:].any()  # padding is zeros

    backbone = BackboneConfig(path=str(qwen_dir))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        start_scorer(ScorerConfig(backbone=backbone, threads=1), qwen_precomputed / "train")
        calls = []

        def recorded(ids, masks):
            calls.append((ids, masks, *handle_score(ids, masks)))
            return calls[-1][2:]

        env = PruningVectorEnv(codes, EnvConfig(reward="sample", t_max=1), 12, recorded, seed=3)
        obs, _ = env.reset(seed=3)
        counts = codes.counts[env.index]
        assert set(counts.tolist()) == {64, 144}  # one batch, both resolutions
        np.testing.assert_array_equal(obs["mask"].sum(axis=1), counts)
        np.testing.assert_array_equal(obs["grid"].prod(axis=1), counts)
        actions = np.random.default_rng(0).random((12, 144)) < 0.3
        env.step(actions.astype(np.int8))
    finally:
        serve.shutdown()
        ray.shutdown()
    (ids, masks, logp, correct) = calls[0]
    assert len(ids) == 12
    hf = load_backbone(backbone)
    samples = {s.question_id: s for s in read_split(boards / "train")}
    for sample_id, mask, lp, ok in zip(ids, masks, logp, correct):
        s = samples[sample_id]
        visual = hf.encode([load_image(boards / "train", s.image)])
        n = len(visual.llm_tokens[0])
        assert not mask[n:].any() and mask[:n].sum() >= 1
        keep = [torch.from_numpy(mask[:n]).nonzero()[:, 0]]
        one_lp, one_ok = hf.score([s.text], [s.answer], visual.llm_tokens, keep, visual.grids)
        assert lp == pytest.approx(one_lp.item(), abs=2e-3) and ok == one_ok.item()


def test_positional_policy_on_a_padded_batch_equals_each_sample_alone():
    torch.manual_seed(0)
    net = PolicyValueNet(6, 5, heads=2, hidden=8, positions=True).eval()
    grids = [(2, 3), (4, 4), (3, 2)]
    width = max(r * c for r, c in grids)
    codes, query = torch.randn(3, width, 6), torch.randn(3, 5)
    mask = torch.arange(width)[None] < torch.tensor([r * c for r, c in grids])[:, None]
    codes[~mask] = 0.0
    logits, values = net(codes, query, mask, torch.tensor(grids))
    for i, (rows, cols) in enumerate(grids):
        n = rows * cols
        alone, value = net(codes[i : i + 1, :n], query[i : i + 1], mask[i : i + 1, :n], (rows, cols))
        torch.testing.assert_close(logits[i, :n], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(values[i], value[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="token grid"):
        net(codes, query, mask, torch.tensor([(5, 5)] * 3))


def test_ray_train_stages_fit_the_ragged_dataset(qwen_precomputed, tmp_path):
    from tprl_ray.training.autoencoder import train_autoencoder
    from tprl_ray.training.config import AutoencoderConfig, LfdConfig
    from tprl_ray.training.lfd import train_lfd

    data, val = qwen_precomputed / "train", qwen_precomputed / "val"
    common = {"data": data, "val_data": val, "epochs": 2, "batch_size": 8, "ray_address": "local"}
    ae = train_autoencoder(AutoencoderConfig(out=tmp_path / "ae", latent=8, **common))
    lfd = train_lfd(LfdConfig(out=tmp_path / "lfd", autoencoder=tmp_path / "ae", positions=True, **common))
    assert np.isfinite(ae["val_relative_mse"]) and ae["epochs"] == 2
    assert 0.0 < lfd["val_f1"] <= 1.0 and np.isfinite(lfd["train_bce"])
    assert json.loads((tmp_path / "lfd" / "policy.json").read_text())["dims"]["positions"] is True


def test_rl_module_reads_each_sample_grid_from_the_padded_observation(tmp_path):
    from ray.rllib.core.columns import Columns

    from tprl_ray.rl.module import PruningModule, sampling_logits

    rng = np.random.default_rng(0)
    counts = np.array([6, 16, 6, 16])
    padded = rng.normal(size=(4, 16, 4)).astype(np.float16) * (np.arange(16)[None, :, None] < counts[:, None, None])
    grid = np.array([(2, 3), (4, 4), (3, 2), (4, 4)])
    codes = Codes(
        np.array(["a", "b", "c", "d"]),
        padded,
        rng.normal(size=(4, 3)).astype(np.float32),
        np.zeros(4),
        np.ones(4, bool),
        grid,
    )
    env = PruningVectorEnv(codes, EnvConfig(regime="discount", reward="sample"), 4, score_fn=None, seed=0)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs["mask"].sum(axis=1), codes.counts[env.index])
    torch.manual_seed(0)
    net = PolicyValueNet(4, 3, heads=2, hidden=8, positions=True)
    export(net, net.state_dict(), tmp_path, "policy", {})
    module = PruningModule(
        observation_space=env.single_observation_space,
        action_space=env.single_action_space,
        model_config={"dims": net.dims, "lambda_disc": 0.5, "steps": 3, "init": str(tmp_path)},
    )
    out = module.forward_train({Columns.OBS: {k: torch.from_numpy(v) for k, v in obs.items()}})
    logits = out[Columns.ACTION_DIST_INPUTS]
    for i, j in enumerate(env.index):
        n, (rows, cols) = codes.counts[j], grid[j]
        c = torch.from_numpy(padded[j : j + 1, :n].astype(np.float32))
        alone = net.keep_logits(
            c, torch.from_numpy(codes.query[j : j + 1]), torch.ones(1, n, dtype=torch.bool), (rows, cols)
        )
        expected = sampling_logits(alone, torch.ones(1, n, dtype=torch.bool), torch.zeros(1), 0.5)[0]  # step 0
        torch.testing.assert_close(logits[i, :n], expected, atol=1e-4, rtol=1e-4)
        assert (logits[i, n:] < -20).all()  # padding is never sampled


def test_token_columns_round_trip_through_slices_and_chunks():
    import pyarrow as pa

    from tprl_ray.precompute.schema import padded_table, padded_tokens, token_array

    rows = [np.arange(i * 6, dtype=np.float16).reshape(i * 2, 3) for i in (1, 3, 2)]
    column = token_array(rows, np.float16)
    for array, expected in ((column, rows), (column.slice(1, 2), rows[1:])):  # a slice keeps its own offset
        assert [r.tolist() for r in token_rows(array)] == [r.tolist() for r in expected]
    chunked = pa.chunked_array([column.slice(0, 1), column.slice(1, 2)])
    values, counts = padded_tokens(chunked, width=7)
    assert values.shape == (3, 7, 3) and counts.tolist() == [2, 6, 4] and not values[0, 2:].any()
    np.testing.assert_array_equal(values[2, :4], rows[2])
    table = padded_table(pa.table({"features": column, "sample_id": ["a", "b", "c"]}), width=6)
    assert table["tokens"].to_pylist() == [2, 6, 4] and tensor_shape(table["features"]) == (3, 6, 3)
    empty = padded_table(pa.table({"features": column.slice(0, 0)}), width=6)  # a block a filter emptied
    assert empty.num_rows == 0 and empty.schema == table.select(["features", "tokens"]).schema
    with pytest.raises(ValueError, match="more than the width"):
        padded_tokens(column, width=5)


def tensor_shape(column) -> tuple:
    from tprl_ray.precompute.schema import tensor

    return tensor(column).shape


def test_pipeline_model_shorthand_names_the_backbone(tmp_path):
    from tprl_ray.pipeline.config import PipelineConfig

    assert PipelineConfig(model="embedded", out=tmp_path).backbone.path == "embedded"
    with pytest.raises(ValueError, match="name two models"):
        PipelineConfig(model="embedded-qwen", backbone={"path": "embedded"}, out=tmp_path)
    with pytest.raises(ValueError, match="shipped LfD policy is the tiny LLaVA's"):
        PipelineConfig(model="embedded-qwen", policy="shipped", out=tmp_path)


def test_six_by_six_boards_name_their_cells_and_the_oracle_finds_their_tokens(boards):
    from tprl_ray.data.digits import question_cells
    from tprl_ray.pruners.oracle import cell_tokens

    labels = np.full(36, -1)
    labels[[4, 29]] = [7, 3]  # e1 and f5
    assert question_cells(labels, "what digit is at e5 ?") == [28] and question_cells(labels, "where is the 3 ?") == [
        29
    ]
    assert cell_tokens([29], (12, 12), side=6).tolist() == [8 * 12 + 10, 8 * 12 + 11, 9 * 12 + 10, 9 * 12 + 11]
    assert {s.extra["board"] for s in read_split(boards / "train")} == {4, 6}
    with pytest.raises(ValueError, match="do not fit"):
        DigitsConfig(boards=[2])
