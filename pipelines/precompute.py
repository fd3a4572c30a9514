"""`ray job submit --working-dir . -- python pipelines/precompute.py --config precompute.yaml`.

The first stage of the pipeline on the cluster; the same `PrecomputeConfig` as `tprl precompute`.
"""

import sys

from tprl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["precompute", *sys.argv[1:]]))
