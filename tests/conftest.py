"""Shared fixtures: a small digits benchmark built once per session."""

from __future__ import annotations

import pytest

from tprl_ray.data.digits import DigitsConfig, build_digits


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A small benchmark (seed 0: the same digit split as the shipped model)."""
    out = tmp_path_factory.mktemp("digits")
    build_digits(DigitsConfig(out=out, seed=0, split_sizes={"train": 40, "val": 10, "test": 30}))
    return out
