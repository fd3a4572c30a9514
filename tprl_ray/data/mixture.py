"""A training mixture: several named splits, each with a sampling weight, read as one list of samples.

A split directory given alone keeps its question ids and image names. A list of parts (even of
one) prefixes both by the part's name (``gqa/20968666``, ``gqa/n161313.jpg``), so ids never collide across datasets and
:meth:`Mixture.image_path` finds each image in its own split. :meth:`Mixture.dataset` names a
sample's part; the precompute records it per row and the PPO environment samples parts by weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tprl_ray.data.config import DataPart
from tprl_ray.data.layout import DataError, Reject, Sample, read_split


@dataclass(frozen=True)
class Mixture:
    parts: tuple[DataPart, ...]

    prefixed: bool = True

    @classmethod
    def of(cls, data: Path | list[DataPart]) -> Mixture:
        """A mixture from a list of parts (ids prefixed, even for one part) or from a split directory
        (one part, named after the benchmark directory above it; ids as they are)."""
        if isinstance(data, list):
            return cls(tuple(data))
        data = Path(data)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", data.resolve().parent.name).lstrip(".") or "data"
        return cls((DataPart(name=name, path=data),), prefixed=False)

    def read(self, rejects: list[Reject] | None = None, limit: int = 0) -> list[Sample]:
        """Every part's samples (its first ``limit`` if set), part after part; ids and images prefixed
        when there are several parts."""
        samples = []
        for part in self.parts:
            found: list[Reject] | None = None if rejects is None else []
            split = read_split(part.path, check_images=False, rejects=found)[: limit or None]
            if not self.prefixed:
                samples += split
                if rejects is not None:
                    rejects += found
                continue
            samples += [
                Sample(f"{part.name}/{s.question_id}", f"{part.name}/{s.image}", s.text, s.category, s.answer, s.extra)
                for s in split
            ]
            if rejects is not None:
                rejects += [Reject(f"{part.name}/{r.question_id}", f"{part.name}/{r.image}", r.reason) for r in found]
        return samples

    def _part(self, name: str) -> tuple[DataPart, str]:
        if not self.prefixed:
            return self.parts[0], name
        head, _, rest = name.partition("/")
        for part in self.parts:
            if part.name == head:
                return part, rest
        raise DataError(f"{name!r} names no part of the mixture ({', '.join(p.name for p in self.parts)})")

    def dataset(self, sample_id: str) -> str:
        """The name of the part ``sample_id`` comes from."""
        return self._part(sample_id)[0].name

    def image_path(self, image: str) -> Path:
        """The file of a (prefixed, with several parts) image name."""
        part, name = self._part(image)
        return Path(part.path) / "images" / name

    def weights(self) -> dict[str, float]:
        return {part.name: part.weight for part in self.parts}

    def describe(self) -> list[dict]:
        """What the parts read, as JSON values (a precompute's identity: the weights are the env's)."""
        return [{"name": p.name, "path": str(p.path)} for p in self.parts]
