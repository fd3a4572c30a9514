"""`ray job submit --working-dir . -- python pipelines/ablate.py --config ablate.yaml [--quick]`.

The paper's ablation suite on the cluster; the same `AblateConfig` as `tprl ablate`.
"""

import sys

from tprl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
