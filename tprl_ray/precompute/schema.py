"""The precompute dataset: a versioned Parquet schema that plain pyarrow reads.

Layout of ``OUT/``::

    manifest.json               schema version, the config that produced it, counts
    shards/shard-00000.parquet  one row per (image, question); absent if every question was rejected
    rejects/shard-00000.parquet questions left out of that shard, with the reason (possibly none)
    rejects/unanswered.parquet  questions the driver left out: without an answer or text,
    rejects/too_long.parquet    or over the question-token cap (backbone.max_question_tokens)

Each file is written atomically (temporary name, then rename); a shard is complete once its rejects
file exists (it is written last), and a re-run skips complete shards.

Columns of a shard (schema version 3; ``N_i`` visual tokens of sample ``i``, ``d_v`` feature width,
``d`` LLM width, ``S`` demonstration steps). Token columns hold one list entry per token, so samples
of one shard may have different token counts and grids (Qwen2.5-VL's dynamic resolution); ``query``
is a canonical ``arrow.fixed_shape_tensor``:

============  =====================================  ===========================================
column        type                                   content
============  =====================================  ===========================================
sample_id     string                                 the question id (``name/id`` in a mixture)
dataset       string                                 the mixture part the sample comes from
image         string                                 image file name in the split
question      string
answer        string                                 the reference answer the scores use
category      string
grid_rows     int32                                  token grid (rows x cols = N_i)
grid_cols     int32
features      list<fixed_size_list<float16>[d_v]>    pre-projector features the policy sees
attention     list<float32>                          the vision encoder's attention signal
query         fixed_shape_tensor<float32>[d]         query embedding (mean of the question's
                                                     LLM input embeddings)
full_logp     float32                                mean answer log-likelihood, every token kept
full_correct  bool                                   greedy decoding reproduces the answer
demo_masks    list<fixed_size_list<uint8>[S]>        per token, the demonstrator's keep bit at
                                                     each step (nested step by step)
llm_tokens    list<fixed_size_list<float16>[d]>      only for models whose LLM tokens cannot be
                                                     rebuilt from ``features`` (Qwen2.5-VL: its
                                                     merger needs every patch): the scorer's input
============  =====================================  ===========================================

Schema metadata: ``tprl.schema_version``, ``tprl.demo_schedule`` (JSON list of pruned fractions per
step), ``tprl.model``. Not stored, by decision: LLaVA's LLM-ready tokens (its scorer recomputes them
with the projector from ``features``, the tower's output up to fp16 rounding) and the autoencoder
codes (a later pass writes them keyed by ``sample_id`` once the autoencoder is trained, so
retraining it never invalidates this dataset). Readers refuse the fixed-shape shards of schema
versions 1-2 with a message; ``tprl precompute`` into a new directory rewrites them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 3  # 2: the dataset column (a mixture's part); 3: token columns as lists (ragged), llm_tokens
TOKENS = {"features": np.float16, "attention": np.float32, "demo_masks": np.uint8, "llm_tokens": np.float16}
TENSORS = {"query": np.float32}
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
OPTIONAL = ("llm_tokens",)
REJECT_SCHEMA = pa.schema({"sample_id": pa.string(), "image": pa.string(), "reason": pa.string()})


class SchemaError(ValueError):
    """A precompute dataset this version cannot read; the message says what to do."""


def token_array(values: list[np.ndarray], dtype) -> pa.Array:
    """Per-row ``[N_i]`` or ``[N_i, k]`` arrays (``k`` the same for every row) as ``list<T>`` or
    ``list<fixed_size_list<T>[k]>``."""
    arrays = [np.asarray(v, dtype) for v in values]
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32))
    if arrays[0].ndim == 1:
        return pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(arrays)))
    width = arrays[0].shape[1]
    if any(a.shape[1:] != (width,) for a in arrays):
        raise ValueError(f"token rows need one width, got {sorted({a.shape[1:] for a in arrays})}")
    flat = np.concatenate([a.reshape(-1, width) for a in arrays]).ravel()
    return pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat), width))


def shard_table(rows: list[dict], schedule: list[float], model: str) -> pa.Table:
    """One shard's rows (numpy arrays for the tensor columns; token columns ``[N_i, ...]``, so
    ``demo_masks`` token-major ``[N_i, S]``) as an Arrow table with the schema metadata."""
    columns = {}
    for name in (*COLUMNS, *(c for c in OPTIONAL if c in rows[0])):
        if name in TOKENS:
            columns[name] = token_array([r[name] for r in rows], TOKENS[name])
        elif name in TENSORS:
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


def tensor(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-shape tensor column as one ``[rows, *shape]`` numpy array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.to_numpy_ndarray()


def check_ragged(kind: pa.DataType) -> None:
    """A ``SchemaError`` for the fixed-shape token columns of schema versions 1-2."""
    if isinstance(kind, pa.FixedShapeTensorType):
        raise SchemaError(
            "this precompute dataset has fixed-shape token columns (schema version 1-2); this version reads "
            f"schema {SCHEMA_VERSION} (ragged token lists): run tprl precompute into a new directory"
        )


def _flat_tokens(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(every row's tokens concatenated ``[sum N_i, ...]``, row offsets ``[rows + 1]``) of a token column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    check_ragged(array.type)
    offsets = array.offsets.to_numpy()
    values = array.flatten()  # the rows' tokens only (flatten honours slices, .values does not)
    if pa.types.is_fixed_size_list(values.type):
        flat = values.flatten().to_numpy(zero_copy_only=False).reshape(-1, values.type.list_size)
    else:
        flat = values.to_numpy(zero_copy_only=False)
    return flat, offsets - offsets[0]


def token_rows(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """A token column as one ``[N_i, ...]`` array per row."""
    flat, offsets = _flat_tokens(column)
    return np.split(flat.copy(), offsets[1:-1])  # writable: torch.from_numpy takes them as they are


def padded_tokens(column: pa.ChunkedArray | pa.Array, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A token column as ``[rows, width, ...]`` (zeros after each row's ``N_i`` tokens; ``width``
    defaults to the longest row) and the counts ``N_i``."""
    flat, offsets = _flat_tokens(column)
    counts = np.diff(offsets)
    width = int(counts.max(initial=0)) if width is None else width
    if counts.max(initial=0) > width:
        raise ValueError(f"a row has {counts.max()} tokens, more than the width {width}")
    out = np.zeros((len(counts), width, *flat.shape[1:]), dtype=flat.dtype)
    slot = np.arange(len(flat)) - np.repeat(offsets[:-1], counts)
    out[np.repeat(np.arange(len(counts)), counts), slot] = flat
    return out, counts


def shard_files(data: Path) -> list[Path]:
    """The Parquet shards of the precompute dataset ``data``, in order; none is an error."""
    shards = sorted((Path(data) / "shards").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{data}: no precompute shards (run tprl precompute --out {data})")
    return shards


def max_tokens(data: Path) -> int:
    """The largest token count of a sample of the precompute dataset ``data`` (from its grid columns)."""
    grids = set()
    for shard in shard_files(data):
        table = pq.read_table(shard, columns=["grid_rows", "grid_cols"])
        grids |= set(zip(table["grid_rows"].to_pylist(), table["grid_cols"].to_pylist()))
    return max(r * c for r, c in grids)


def column_width(data: Path, column: str) -> int:
    """The last dimension of a column of a precompute dataset (``d_v`` for ``features``, ``d`` for
    ``query``), read from its Parquet schema."""
    kind = pq.read_schema(shard_files(data)[0]).field(column).type
    if column in TOKENS:
        check_ragged(kind)
        return int(kind.value_type.list_size)
    return int(kind.shape[-1])


def padded_table(table: pa.Table, width: int) -> pa.Table:
    """``table`` with its token columns as fixed-shape tensors ``[width, ...]`` (zeros after each row's
    tokens) and ``tokens``, each row's count: the batches a torch loop stacks (Ray Data ``map_batches``)."""
    columns = {}
    for name in table.column_names:
        if name in TOKENS:
            values, counts = padded_tokens(table[name], width)
            flat = pa.array(values.reshape(-1))  # a tensor array from its storage: an empty block too
            storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(values.shape[1:])))
            kind = pa.fixed_shape_tensor(flat.type, values.shape[1:])
            columns[name] = pa.ExtensionArray.from_storage(kind, storage)
            columns["tokens"] = pa.array(counts.astype(np.int32))
        else:
            columns[name] = table[name]
    return pa.table(columns)
