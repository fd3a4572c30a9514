"""The ``oracle`` reference row of the embedded benchmark: it knows which cells a question is about.

Not a method and not a strict bound: it shows what a question-aware choice of cells is worth at a
budget. The digits benchmark records, per question, the cells it is about (``cells``: the asked
cell, or every cell holding the asked digit). The oracle keeps those cells' tokens first (highest
attention first if they alone exceed the budget) and fills the rest of the budget with VisPruner's
rule over the other tokens. A board of ``side x side`` cells (``board``, 4 if not recorded) over the
token grid gives each cell its block of tokens.
"""

from __future__ import annotations

import torch

from tprl_ray.data.config import GRID
from tprl_ray.pruners.base import PruneBatch, Pruner, budget_tokens
from tprl_ray.pruners.vispruner import VisPruner


def cell_tokens(cells: list[int], grid: tuple[int, int], side: int = GRID) -> torch.Tensor:
    """Raster indices of the tokens covering ``cells`` of a ``side x side`` board (cell ``c`` is row
    ``c // side``, column ``c % side``)."""
    rows, cols = grid
    if rows % side or cols % side:
        raise ValueError(f"a {rows}x{cols} token grid does not split into {side}x{side} cells")
    h, w = rows // side, cols // side
    out = []
    for cell in cells:
        r, c = divmod(cell, side)
        out += [(r * h + i) * cols + c * w + j for i in range(h) for j in range(w)]
    return torch.tensor(sorted(out), dtype=torch.long)


class Oracle(Pruner):
    name = "oracle"
    needs_attention = True

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        if batch.attention is None:
            raise ValueError("oracle needs the vision encoder's attention (encode with_attention=True)")
        if batch.extra is None or any("cells" not in e for e in batch.extra):
            raise ValueError("oracle needs each question's cells (the digits benchmark's 'cells' field)")
        out = []
        for features, attention, grid, extra in zip(batch.features, batch.attention, batch.grids, batch.extra):
            total = budget_tokens(budget, features.shape[0])
            known = cell_tokens(extra["cells"], grid, extra.get("board", GRID)).to(features.device)
            known = known[torch.argsort(attention[known], descending=True, stable=True)][:total]
            others = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
            others[known] = False
            rest = others.nonzero()[:, 0]
            if total > known.numel():
                sub = PruneBatch([features[rest]], [features[rest]], [attention[rest]], [grid], [""], [""])
                known = torch.cat([known, rest[VisPruner().select(sub, total - known.numel())[0]]])
            out.append(known)
        return out
