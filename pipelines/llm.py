"""`ray job submit --working-dir . -- python pipelines/llm.py --config llm.yaml`.

The LLM fine-tuning stage on the cluster (Ray Train workers with DDP, one GPU each with `use_gpu: true`);
the same `LlmConfig` as `tprl train llm`.
"""

import sys

from tprl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "llm", *sys.argv[1:]]))
