"""`ray job submit --working-dir . -- python pipelines/lfd.py --config lfd.yaml`.

The LfD stage on the cluster (Ray Train workers, one GPU each with `use_gpu: true`); the same
`LfdConfig` as `tprl train lfd`.
"""

import sys

from tprl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "lfd", *sys.argv[1:]]))
