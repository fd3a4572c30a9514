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


def test_vispruner_keeps_the_surviving_a_tokens_in_similarity_order():
    """30 tokens, budget 20: important 0..9 (attention falls with the index); diverse 10 of c0..c19
    (token 10 + k), whose features are built from orthogonal unit vectors u_k:

    - B side of round 1 (odd c): c3, c5, ..., c19 = u_k; c1 = 0.8 u3 + 0.6 u1 (cos(c1, c3) = .8).
    - Eight A tokens copy their right neighbour (c0 = c1, c2 = c3, c6 = c7, ...): similarity 1.
    - c4 = .1 u15 + .995 u4 (similarity .1, to c15); c10 = .2 u19 + .955 u4 + .22 u10 (similarity .2,
      to c19), so cos(c4, c10) = .95.

    Round 1: r = min(8, 20 - 10, 10) = 8 drops the eight copies; the survivors, by descending
    similarity, are [c10, c4] (original order: [c4, c10]). Remainder [c10, c4, c1, c3, ..., c19].
    Round 2: r = 2; A = [c10, c1, c5, c9, c13, c17], B = [c4, c3, c7, c11, c15, c19]; c10 scores .95
    (to c4) and c1 .8 (to c3), the rest 0: c10 and c1 go. Kept c: 3, 4, 5, 7, 9, ..., 19.
    With the survivors in original order, c4 would stand in A and go instead of c10.
    """
    u = torch.eye(30)
    c = {k: u[10 + k] for k in range(20)}
    c[1] = 0.8 * u[13] + 0.6 * u[11]
    for k in (0, 2, 6, 8, 12, 14, 16, 18):
        c[k] = c[k + 1]
    c[4] = 0.1 * u[25] + math.sqrt(1 - 0.01) * u[14]
    a = 0.95 / math.sqrt(1 - 0.01)
    c[10] = 0.2 * u[29] + a * u[14] + math.sqrt(1 - 0.04 - a * a) * u[20]
    features = torch.stack([u[i] for i in range(10)] + [c[k] for k in range(20)])
    attention = torch.tensor([(30 - i) / 100 for i in range(30)])
    keep = VisPruner().prune(one(features=features, attention=attention), 20).keep[0]
    assert keep.tolist() == [*range(10), *(10 + k for k in (3, 4, 5, 7, 9, 11, 13, 15, 17, 19))]


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
    with pytest.raises(ValueError, match="unknown pruner 'magicprune'"):
        build_pruner("magicprune")


def test_fastv_prunes_at_layer_k_and_reports_tokens_per_layer(digits_dir):
    from tprl_ray.backbones.inllm import fastv_generate
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


def test_cdpruner_greedy_map_on_a_hand_worked_kernel():
    """r = (1, .9, .5), S = [[1, .9, 0], [.9, 1, 0], [0, 0, 1]]: L = diag(r) S diag(r) has diagonal
    (1, .81, .25) and L01 = .81. Step 1 takes item 0. Its gains then: item 1, .81 - .81^2 = .1539 (its
    relevance left after removing what item 0 explains); item 2, .25 - 0 = .25. So item 2 (less
    relevant, but diverse) comes second: det L_{0,2} = .25 > det L_{0,1} = .1539, the MAP pair."""
    from itertools import combinations

    from tprl_ray.pruners.cdpruner import greedy_map

    r = torch.tensor([1.0, 0.9, 0.5])
    s = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    kernel = r[:, None] * s * r[None, :]
    assert greedy_map(kernel, 1).tolist() == [0] and greedy_map(kernel, 2).tolist() == [0, 2]
    assert greedy_map(kernel, 3).tolist() == [0, 2, 1]
    best = max(combinations(range(3), 2), key=lambda p: torch.det(kernel[list(p)][:, list(p)]).item())
    assert best == (0, 2)


def test_cdpruner_choice_follows_the_question():
    """Tokens x, y, z and (x + y)/sqrt(2). Asked along x, the relevances (min-max of the cosines
    1, 0, 0, .707) are 1, 0, 0, .707: x first, then the diagonal token (gain .707^2 (1 - .707^2) = .25;
    y and z have none). Asked along y the roles of x and y swap."""
    from tprl_ray.pruners.cdpruner import CDPruner

    tokens = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.7071, 0.7071, 0]])

    def keep(query):
        batch = PruneBatch([tokens], [tokens], None, [(2, 2)], ["q"], ["?"], [torch.tensor(query)])
        return CDPruner().prune(batch, 2).keep[0].tolist()

    assert keep([1.0, 0, 0]) == [0, 3] and keep([0, 1.0, 0]) == [1, 3]
    with pytest.raises(ValueError, match="query embedding"):
        CDPruner().prune(one(features=tokens), 2)


def test_visionzip_dominant_set_and_contextual_merge():
    """16 tokens, budget 13: C = round(13 * 10 / 64) = 2 contextual, D = 11 dominant.

    Attention falls with the index, so the dominant tokens are 0..10 and the rest is [11..15];
    step = 5 // 2 = 2 gives the targets 11 and 13. Features: 11 along x, 13 along y; 12 (.9, .1)
    joins 11, 14 (.2, .9) and 15 (.1, 1) join 13. With token values v_i = i: the contextual tokens
    are 11 + 12 = 23 and 13 + mean(14, 15) = 27.5; every other kept value is unchanged."""
    from tprl_ray.pruners.visionzip import VisionZip, split_budget

    assert [split_budget(t) for t in (64, 128, 192, 16)] == [(54, 10), (108, 20), (162, 30), (14, 2)]
    features = torch.ones(16, 2)
    features[11], features[13] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    features[12], features[14], features[15] = torch.tensor([[0.9, 0.1], [0.2, 0.9], [0.1, 1.0]])
    tokens = torch.arange(16.0)[:, None].repeat(1, 3)
    attention = torch.tensor([(16 - i) / 100 for i in range(16)])
    pruning = VisionZip().prune(one(tokens=tokens, features=features, attention=attention), 13)
    assert pruning.keep[0].tolist() == [*range(11), 11, 13]
    values = pruning.tokens[0][:, 0].tolist()
    assert values[11] == 23.0 and values[13] == 27.5 and values[:11] == list(map(float, range(11)))


def test_prumerge_plus_outliers_uniform_tokens_and_merge():
    """16 tokens: attention .50 (token 6), .40 (12), .03 (15), .02 (14), .01 elsewhere. Sorted, Q1 = .01
    and Q3 = .01 + .25 (.02 - .01) = .0125 (linear, position 11.25), so the threshold Q3 + 1.5 IQR is
    .01625 and the outliers are 6, 12, 15, 14. Budget 8: ceil(8 / 4) = 2 outliers (6, 12), then 6
    tokens evenly spaced over the 14 free positions: linspace(0, 13, 6) rounds to 0, 3, 5, 8, 10, 13
    of [0..5, 7..11, 13, 14, 15], i.e. tokens 0, 3, 5, 9, 11, 15."""
    from tprl_ray.pruners.prumerge import PruMergePlus, iqr_outliers, merge_pruned

    attention = torch.full((16,), 0.01)
    attention[6], attention[12], attention[15], attention[14] = 0.5, 0.4, 0.03, 0.02
    assert iqr_outliers(attention).tolist() == [6, 12, 15, 14]
    features = torch.randn(16, 4)
    pruning = PruMergePlus().prune(one(features=features, attention=attention), 8)
    assert pruning.keep[0].tolist() == [0, 3, 5, 6, 9, 11, 12, 15]
    # the merge: 0 is most like 1 and 2 like 3; each kept token adds its neighbour weighted by attention
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    values = torch.tensor([[1.0], [10.0], [100.0], [1000.0]])
    merged = merge_pruned(feats, values, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 2]), k=1)
    assert merged[:, 0].tolist() == pytest.approx([1 + 0.2 * 10, 10, 100 + 0.4 * 1000, 1000])


def test_every_registered_pruner_is_named_as_its_key():
    from tprl_ray.pruners.registry import PRUNERS, pruner_class

    assert all(pruner_class(name).name == name for name in PRUNERS)


def test_oracle_keeps_the_asked_cells_first_then_fills_by_vispruner():
    """8x8 tokens, 2x2 per cell: cell 5 (row 1, column 1) is tokens 18, 19, 26, 27."""
    from tprl_ray.pruners.oracle import Oracle, cell_tokens

    assert cell_tokens([5], (8, 8)).tolist() == [18, 19, 26, 27]
    assert cell_tokens([0, 15], (8, 8)).tolist() == [0, 1, 8, 9, 54, 55, 62, 63]
    features, attention = torch.randn(64, 6), torch.rand(64)

    def keep(cells, budget):
        batch = PruneBatch([features], [features], [attention], [(8, 8)], ["q"], ["?"], None, [{"cells": cells}])
        return Oracle().prune(batch, budget).keep[0]

    kept = keep([5], 10)
    rest = torch.tensor([i for i in range(64) if i not in (18, 19, 26, 27)])
    filled = VisPruner().prune(one(features=features[rest], attention=attention[rest]), 6).keep[0]
    assert kept.tolist() == sorted([18, 19, 26, 27, *rest[filled].tolist()])
    # more asked tokens than budget: the most-attended of them
    asked = cell_tokens([0, 15], (8, 8))
    assert keep([0, 15], 3).tolist() == sorted(asked[attention[asked].argsort(descending=True)[:3]].tolist())
    with pytest.raises(ValueError, match="cells"):
        Oracle().prune(one(features=features, attention=attention), 4)
