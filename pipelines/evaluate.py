"""`ray job submit --working-dir . -- python pipelines/evaluate.py --config evaluate.yaml`.

A benchmark evaluated unpruned and pruned on a Ray Data actor pool (one GPU per model replica when
the cluster has GPUs); the same `EvalConfig` as `tprl eval`.
"""

import sys

from tprl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
