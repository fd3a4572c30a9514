"""`ray job submit --working-dir . -- python pipelines/autoencoder.py --config autoencoder.yaml`.

The autoencoder stage on the cluster (Ray Train workers, one GPU each with `use_gpu: true`); the
same `AutoencoderConfig` as `tprl train autoencoder`.
"""

import sys

from tprl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "autoencoder", *sys.argv[1:]]))
