"""The whole pipeline: `tprl pipeline`, `pipelines/full.py`, `make demo`."""
