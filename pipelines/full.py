"""`ray job submit --working-dir . -- python pipelines/full.py [--config full.yaml] [--set KEY=VALUE]`.

The whole pipeline as one job: precompute, autoencoder, LfD, PPO, evaluation and report, the same
`PipelineConfig` as `tprl pipeline` (no config: the embedded model and data, as `make demo`).
"""

import sys

from tprl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
