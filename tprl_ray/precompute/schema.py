"""The precompute dataset: a versioned Parquet schema that plain pyarrow reads.

Layout of ``OUT/``::

    manifest.json               schema version, the config that produced it, counts
    shards/shard-00000.parquet  one row per (image, question); absent if every question was rejected
    rejects/shard-00000.parquet questions left out of that shard, with the reason (possibly none)
    rejects/unanswered.parquet  questions the driver left out: without an answer or text,
    rejects/too_long.parquet    or over the question-token cap (backbone.max_question_tokens)

Each file is written atomically (temporary name, then rename); a shard is complete once its rejects
file exists (it is written last), and a re-run skips complete shards.

Columns of a shard (schema version 2; ``N`` visual tokens, ``d_v`` feature width, ``d`` LLM width,
``S`` demonstration steps; tensors are canonical ``arrow.fixed_shape_tensor`` extension arrays):

============  =====================================  ===========================================
column        type                                   content
============  =====================================  ===========================================
sample_id     string                                 the question id (``name/id`` in a mixture)
dataset       string                                 the mixture part the sample comes from
image         string                                 image file name in the split
question      string
answer        string                                 the reference answer the scores use
category      string
grid_rows     int32                                  token grid (rows x cols = N)
grid_cols     int32
features      fixed_shape_tensor<float16>[N, d_v]    pre-projector features the policy sees
attention     fixed_shape_tensor<float32>[N]         the vision encoder's attention signal
query         fixed_shape_tensor<float32>[d]         query embedding (mean of the question's
                                                     LLM input embeddings)
full_logp     float32                                mean answer log-likelihood, every token kept
full_correct  bool                                   greedy decoding reproduces the answer
demo_masks    fixed_shape_tensor<uint8>[S, N]        the demonstrator's keep-masks over original
                                                     indices, nested step by step
============  =====================================  ===========================================

Schema metadata: ``tprl.schema_version``, ``tprl.demo_schedule`` (JSON list of pruned fractions per
step), ``tprl.model``. Not stored, by decision: the LLM-ready tokens (LLaVA's scorer recomputes them
with the projector from ``features``, the tower's output up to fp16 rounding; Qwen2.5-VL's merger needs the
per-patch states, so its scorer re-encodes the image) and the autoencoder codes (a later pass writes
them keyed by ``sample_id`` once the autoencoder is trained, so retraining it never invalidates this
dataset).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2  # 2: the dataset column (a mixture's part); readers take version 1 as one dataset ""
TENSORS = {"features": np.float16, "attention": np.float32, "query": np.float32, "demo_masks": np.uint8}
SCALARS = {
    "sample_id": pa.string(),
    "dataset": pa.string(),
    "image": pa.string(),
    "question": pa.string(),
    "answer": pa.string(),
    "category": pa.string(),
    "grid_rows": pa.int32(),
    "grid_cols": pa.int32(),
    "full_logp": pa.float32(),
    "full_correct": pa.bool_(),
}
COLUMNS = (
    "sample_id",
    "dataset",
    "image",
    "question",
    "answer",
    "category",
    "grid_rows",
    "grid_cols",
    "features",
    "attention",
    "query",
    "full_logp",
    "full_correct",
    "demo_masks",
)
REJECT_SCHEMA = pa.schema({"sample_id": pa.string(), "image": pa.string(), "reason": pa.string()})


def shard_table(rows: list[dict], schedule: list[float], model: str) -> pa.Table:
    """One shard's rows (numpy arrays for the tensor columns) as an Arrow table with the schema metadata."""
    shapes = {np.shape(r["features"]) for r in rows}
    if len(shapes) > 1:
        raise ValueError(
            f"a shard needs one token grid, got feature shapes {sorted(shapes)}: resize the split's "
            f"images to one resolution (Qwen2.5-VL gives one grid per image size)"
        )
    columns = {}
    for name in COLUMNS:
        if name in TENSORS:
            values = np.stack([np.asarray(r[name], dtype=TENSORS[name]) for r in rows])
            columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))
        else:
            columns[name] = pa.array([r[name] for r in rows], SCALARS[name])
    metadata = {
        "tprl.schema_version": str(SCHEMA_VERSION),
        "tprl.demo_schedule": json.dumps(schedule),
        "tprl.model": model,
    }
    return pa.table(columns).replace_schema_metadata(metadata)


def reject_table(rejects: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)


def tensor(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-shape tensor column as one ``[rows, *shape]`` numpy array."""
    return column.combine_chunks().to_numpy_ndarray()


def token_grid(data: Path) -> tuple[int, int]:
    """The one token grid ``(rows, cols)`` of every shard of the precompute dataset ``data``."""
    shards = sorted((Path(data) / "shards").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{data}: no precompute shards (run tprl precompute --out {data})")
    grids = set()
    for shard in shards:
        table = pq.read_table(shard, columns=["grid_rows", "grid_cols"])
        grids |= set(zip(table["grid_rows"].to_pylist(), table["grid_cols"].to_pylist()))
    if len(grids) != 1:
        raise ValueError(f"{data}: the policy needs one token grid, the shards have {sorted(grids)}")
    return next(iter(grids))
