"""The RL state's per-sample inputs: frozen autoencoder codes of every token, keyed by ``sample_id``.

A pass over a precompute dataset writes ``OUT/codes/shard-NNNNN.parquet`` (one per precompute shard,
atomically) with ``sample_id``, ``codes`` (``fixed_shape_tensor<float16>[N, d_latent]``), ``query``,
``full_logp``, ``full_correct``, the token grid (``grid_rows``, ``grid_cols``) and the sample's
``dataset`` (a mixture's part; "" from a precompute of schema version 1). Shards are tagged
with the autoencoder's checksum, so a re-run skips the shards already encoded with the same
autoencoder and redoes the others. The environment holds only these codes; the features stay with
the scorer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from tprl_ray.artifacts.atomic import write_parquet
from tprl_ray.artifacts.export import load_exported
from tprl_ray.precompute.schema import tensor

CHECKSUM_KEY = b"tprl.autoencoder_sha256"
CODES_VERSION = b"3"  # 2: the token grid columns; 3: the dataset column
PASSED = ("sample_id", "query", "full_logp", "full_correct", "grid_rows", "grid_cols")


def autoencoder_checksum(directory: Path) -> str:
    """The tag of shards encoded with this autoencoder (and this codes layout)."""
    weights = (Path(directory) / "autoencoder.safetensors").read_bytes()
    return hashlib.sha256(CODES_VERSION + weights).hexdigest()


def write_codes(data: Path, autoencoder: Path, out: Path, progress: bool = True) -> Path:
    """Encode every sample of the precompute dataset ``data``; returns ``out`` (the codes directory)."""
    from tprl_ray.policy.autoencoder import TokenAutoencoder

    encoder, _ = load_exported(TokenAutoencoder, Path(autoencoder), "autoencoder")
    checksum = autoencoder_checksum(autoencoder).encode()
    shards = sorted((Path(data) / "shards").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{data}: no precompute shards (run tprl precompute --out {data})")
    for shard in tqdm(shards, desc="codes", disable=not progress):
        target = Path(out) / shard.name
        if target.is_file() and (pq.read_schema(target).metadata or {}).get(CHECKSUM_KEY) == checksum:
            continue
        has_dataset = "dataset" in pq.read_schema(shard).names
        table = pq.read_table(shard, columns=["features", *PASSED, *(["dataset"] if has_dataset else [])])
        with torch.no_grad():
            codes = encoder.encode(torch.from_numpy(tensor(table["features"]).astype(np.float32)))
        columns = {name: table[name] for name in PASSED}
        columns["dataset"] = table["dataset"] if has_dataset else pa.array([""] * len(table), pa.string())
        columns["codes"] = pa.FixedShapeTensorArray.from_numpy_ndarray(codes.numpy().astype(np.float16))
        write_parquet(pa.table(columns).replace_schema_metadata({CHECKSUM_KEY: checksum}), target)
    return Path(out)


@dataclass
class Codes:
    """A codes dataset in memory: ``ids[M]``, ``codes[M, N, d_l]`` (fp16), ``query[M, d_q]``,
    ``full_logp[M]``, ``full_correct[M]``, the token grid ``(rows, cols)`` of the ``N`` tokens and
    each sample's ``dataset[M]``."""

    ids: np.ndarray
    codes: np.ndarray
    query: np.ndarray
    full_logp: np.ndarray
    full_correct: np.ndarray
    grid: tuple[int, int]
    dataset: np.ndarray | None = None

    def __post_init__(self):
        if self.dataset is None:
            self.dataset = np.full(len(self.ids), "", dtype=object)

    @classmethod
    def load(cls, directory: Path) -> Codes:
        shards = sorted(Path(directory).glob("*.parquet"))
        if not shards:
            raise FileNotFoundError(f"{directory}: no codes shards (see tprl_ray.rl.codes.write_codes)")
        table = pa.concat_tables([pq.read_table(s) for s in shards])
        return cls(
            np.asarray(table["sample_id"].to_pylist()),
            tensor(table["codes"]),
            tensor(table["query"]).astype(np.float32),
            table["full_logp"].to_numpy().astype(np.float32),
            table["full_correct"].to_numpy(zero_copy_only=False).astype(bool),
            (int(table["grid_rows"][0].as_py()), int(table["grid_cols"][0].as_py())),
            np.asarray(table["dataset"].to_pylist(), dtype=object),
        )
