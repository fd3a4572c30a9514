"""The RL state's per-sample inputs: frozen autoencoder codes of every token, keyed by ``sample_id``.

A pass over a precompute dataset writes ``OUT/codes/shard-NNNNN.parquet`` (one per precompute shard,
atomically) with ``sample_id``, ``codes`` (``list<fixed_size_list<float16>[d_latent]>``, one entry per
token, as in the precompute schema), ``query``,
``full_logp``, ``full_correct``, the token grid (``grid_rows``, ``grid_cols``) and the sample's
``dataset`` (a mixture's part). Shards are tagged
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
from tprl_ray.precompute.schema import check_ragged, padded_tokens, shard_files, tensor, token_array, token_rows

CHECKSUM_KEY = b"tprl.autoencoder_sha256"
CODES_VERSION = b"4"  # 2: the token grid columns; 3: the dataset column; 4: codes as token lists (ragged)
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
    for shard in tqdm(shard_files(data), desc="codes", disable=not progress):
        target = Path(out) / shard.name
        if target.is_file() and (pq.read_schema(target).metadata or {}).get(CHECKSUM_KEY) == checksum:
            continue
        check_ragged(pq.read_schema(shard).field("features").type)
        table = pq.read_table(shard, columns=["features", *PASSED, "dataset"])
        features = token_rows(table["features"])
        with torch.no_grad():  # token-wise: one pass over every token of the shard
            flat = encoder.encode(torch.from_numpy(np.concatenate(features).astype(np.float32))).numpy()
        codes = np.split(flat.astype(np.float16), np.cumsum([len(f) for f in features])[:-1])
        columns = {name: table[name] for name in PASSED}
        columns["dataset"] = table["dataset"]
        columns["codes"] = token_array(codes, np.float16)
        write_parquet(pa.table(columns).replace_schema_metadata({CHECKSUM_KEY: checksum}), target)
    return Path(out)


@dataclass
class Codes:
    """A codes dataset in memory: ``ids[M]``, ``codes[M, N, d_l]`` (fp16; sample ``i``'s
    ``counts[i]`` tokens first, zeros after them up to the longest sample's ``N``), ``query[M, d_q]``,
    ``full_logp[M]``, ``full_correct[M]``, each sample's token grid ``grids[M] = (rows, cols)``
    (``rows * cols = counts``; one grid stands for all) and its ``dataset[M]``."""

    ids: np.ndarray
    codes: np.ndarray
    query: np.ndarray
    full_logp: np.ndarray
    full_correct: np.ndarray
    grids: np.ndarray
    dataset: np.ndarray | None = None

    def __post_init__(self):
        grids = np.asarray(self.grids, dtype=np.int64).reshape(-1, 2)  # one grid for all, or one each
        self.grids = np.broadcast_to(grids, (len(self.ids), 2)).copy()
        if self.dataset is None:
            self.dataset = np.full(len(self.ids), "", dtype=object)

    @property
    def counts(self) -> np.ndarray:
        """Each sample's token count ``[M]``."""
        return self.grids.prod(axis=1)

    def token_mask(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """``[len(index), N]``: which slots of the padded codes hold a token."""
        return np.arange(self.codes.shape[1])[None, :] < self.counts[index][:, None]

    @classmethod
    def load(cls, directory: Path) -> Codes:
        shards = sorted(Path(directory).glob("*.parquet"))
        if not shards:
            raise FileNotFoundError(f"{directory}: no codes shards (see tprl_ray.rl.codes.write_codes)")
        table = pa.concat_tables([pq.read_table(s) for s in shards])
        codes, counts = padded_tokens(table["codes"])
        grids = np.stack([table["grid_rows"].to_numpy(), table["grid_cols"].to_numpy()], axis=1)
        if (grids.prod(axis=1) != counts).any():
            raise ValueError(f"{directory}: a sample's codes do not fill its token grid (written by another version?)")
        return cls(
            np.asarray(table["sample_id"].to_pylist()),
            codes,
            tensor(table["query"]).astype(np.float32),
            table["full_logp"].to_numpy().astype(np.float32),
            table["full_correct"].to_numpy(zero_copy_only=False).astype(bool),
            grids,
            np.asarray(table["dataset"].to_pylist(), dtype=object),
        )
