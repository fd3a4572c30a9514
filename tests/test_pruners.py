"""Each pruner's defining rule, on hand-worked examples."""

import math

import pytest
import torch

from tprl_ray.pruners.base import PruneBatch, budget_tokens
from tprl_ray.pruners.divprune import DivPrune
from tprl_ray.pruners.registry import build_pruner
from tprl_ray.pruners.tome import ToMe
from tprl_ray.pruners.vispruner import VisPruner


def unit(degrees: float, plane: str = "xz") -> list[float]:
    r = math.radians(degrees)
    return [math.cos(r), 0.0, math.sin(r)] if plane == "xz" else [math.cos(r), math.sin(r)]


def one(tokens=None, features=None, attention=None) -> PruneBatch:
    tokens = features if tokens is None else tokens
    return PruneBatch(
        [tokens],
        [features],
        None if attention is None else [attention],
        [(1, len(tokens))],
        ["q0"],
        ["what digit is at a1 ?"],
    )


def test_budgets_are_fractions_or_counts():
    assert budget_tokens(0.25, 576) == 144 and budget_tokens(192 / 576, 576) == 192 and budget_tokens(192, 576) == 192
    assert budget_tokens(0.25, 64) == 16 and budget_tokens(1000, 64) == 64
    with pytest.raises(ValueError):
        budget_tokens(1.5, 64)
    with pytest.raises(ValueError):
        budget_tokens(0, 64)


def test_vispruner_hand_worked_example():
    """24 tokens, budget 14: T_imp = 7 important tokens, 7 diverse ones from the other 17.

    Attention falls with the index, so the important tokens are 0..6 and the rest, in descending
    attention order, is 7..23. Features: B-side tokens lie in the x-z plane at the angles below;
    token 15 points along y (cosine 0 to all of them); the other odd tokens lie in the x-z plane.
    Round 1: r = min(8, 17 - 7, |A| = 9) = 8; A = 7, 9, ..., 23; B = 8, 10, ..., 22. Every A token but
    15 has a positive similarity to some B token, so the 8 dropped are all odd tokens except 15.
    Remainder: [15, 8, 10, 12, 14, 16, 18, 20, 22] (9 > 7).
    Round 2: r = min(8, 2, 5) = 2; A = [15, 10, 14, 18, 22], B = [8, 12, 16, 20] at 0, 40, 80, 120 deg.
    Max similarity: 15 -> 0; 10 (5 deg) -> cos 5 = .9962 (to 8); 14 (44) -> cos 4 = .9976 (to 12);
    18 (100) -> cos 20 = .9397; 22 (150) -> cos 30 = .8660. Dropped: 14 and 10.
    Kept: 0..6 and [15, 18, 22, 8, 12, 16, 20].
    """
    angles = {
        8: 0,
        10: 5,
        12: 40,
        14: 44,
        16: 80,
        18: 100,
        20: 120,
        22: 150,
        7: 2,
        9: 42,
        11: 82,
        13: 118,
        17: 60,
        19: 20,
        21: 140,
        23: 170,
    }
    features = torch.tensor([unit(angles.get(i, 0)) if i != 15 else [0.0, 1.0, 0.0] for i in range(24)])
    attention = torch.tensor([(24 - i) / 100 for i in range(24)])
    keep = VisPruner().prune(one(features=features, attention=attention), 14).keep[0]
    assert keep.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 12, 15, 16, 18, 20, 22]


def test_vispruner_needs_attention():
    with pytest.raises(ValueError, match="attention"):
        VisPruner().prune(one(features=torch.randn(8, 3)), 4)


def test_divprune_max_min_choice():
    """Unit vectors at 0, 10, 90, 180, 185 deg; distance 1 - cos.
    First: the token whose nearest neighbour is farthest: 90 deg (nearest at 80 deg away) -> index 2.
    Then the farthest from {90}: 185 deg (1 - cos 95 = 1.087) -> index 4.
    Then the largest min-distance to {90, 185}: 0 deg (min(1, 1.996) = 1) beats 10 deg (.826) and
    180 deg (.0038) -> index 0."""
    tokens = torch.tensor([unit(a, "xy") for a in (0, 10, 90, 180, 185)])
    assert DivPrune().prune(one(tokens=tokens, features=torch.zeros(5, 2)), 3).keep[0].tolist() == [0, 2, 4]
    assert DivPrune().prune(one(tokens=tokens, features=torch.zeros(5, 2)), 2).keep[0].tolist() == [2, 4]


def test_tome_merges_best_matches_with_size_weighted_averages():
    """Features at 0, 10, 50, 60, 100 deg, LLM tokens 1, 2, 3, 4, 20; budget 1.
    Round 1: A = [0, 2, 4], B = [1, 3], r = min(4, 3) = 3: 0 -> 1 (10 deg), 2 -> 3 (10 deg), 4 -> 3 (40 deg).
    Token 1 = (1 + 2) / 2 = 1.5 (size 2); token 3 = (3 + 4 + 20) / 3 = 9 (size 3).
    Round 2: 1 -> 3: (2 * 1.5 + 3 * 9) / 5 = 6 (an unweighted average would give 5.25)."""
    features = torch.tensor([unit(a, "xy") for a in (0, 10, 50, 60, 100)])
    tokens = torch.tensor([[1.0], [2.0], [3.0], [4.0], [20.0]])
    pruning = ToMe().prune(one(tokens=tokens, features=features), 1)
    assert pruning.keep[0].tolist() == [3]
    assert pruning.tokens[0][3].item() == pytest.approx(6.0)
    pruning = ToMe().prune(one(tokens=tokens, features=features), 2)
    assert pruning.keep[0].tolist() == [1, 3]
    assert pruning.tokens[0][1].item() == pytest.approx(1.5) and pruning.tokens[0][3].item() == pytest.approx(9.0)
    assert tokens[3].item() == 4.0  # the input is not modified


def test_random_is_seeded_per_question_and_sized_by_budget():
    tokens = torch.randn(64, 4)
    batch = PruneBatch([tokens, tokens], [tokens, tokens], None, [(8, 8)] * 2, ["a", "b"], ["q", "q"])
    first = build_pruner("random", seed=3).prune(batch, 0.25).keep
    again = (
        build_pruner("random", seed=3).prune(PruneBatch([tokens], [tokens], None, [(8, 8)], ["b"], ["q"]), 0.25).keep
    )
    assert [len(k) for k in first] == [16, 16] and torch.equal(first[1], again[0])
    assert not torch.equal(first[0], first[1]) and torch.equal(first[0], torch.sort(first[0]).values)
    assert not torch.equal(build_pruner("random", seed=4).prune(batch, 0.25).keep[0], first[0])


def test_unknown_pruner_is_refused():
    with pytest.raises(ValueError, match="unknown pruner 'sparsevlm'"):
        build_pruner("sparsevlm")


def test_fastv_prunes_at_layer_k_and_reports_tokens_per_layer(digits_dir):
    from tprl_ray.backbones.fastv import fastv_generate
    from tprl_ray.backbones.llava import LlavaBackbone
    from tprl_ray.data.layout import read_split
    from tprl_ray.evaluation.predict import prune_batch
    from tprl_ray.models import tiny_llava

    size = tiny_llava.TinyLlavaSize(
        vision_hidden=32,
        vision_layers=2,
        vision_heads=2,
        text_hidden=32,
        text_layers=4,
        text_heads=2,
        text_intermediate=64,
    )
    torch.manual_seed(0)
    processor = tiny_llava.build_processor(size)
    backbone = LlavaBackbone(tiny_llava.build_model(size, processor.tokenizer), processor)
    samples = read_split(digits_dir / "test")[:4]
    batch = prune_batch(backbone, digits_dir / "test", samples, with_attention=False)
    fastv = build_pruner("fastv")
    texts, seen = fastv.generate(backbone, batch, 0.25, max_new_tokens=3)
    assert fastv.k == 2 and seen == [(2 * 64 + 2 * 16) / 4] * 4  # layers 0-1 see 64 tokens, layers 2-3 see 16
    assert texts == fastv_generate(backbone, batch.questions, batch.tokens, 2, 16, batch.grids, 3)[0]
