"""`ray job submit --working-dir . -- python pipelines/ppo.py --config ppo.yaml`.

The PPO stage on the cluster: the same `PpoConfig` as `tprl train ppo`. The driver hosts the
learner; env runners and the Serve scorer replicas (one GPU each when the cluster has GPUs) are
scheduled by Ray, so the autoscaler adds scorer nodes on demand.
"""

import sys

from tprl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "ppo", *sys.argv[1:]]))
