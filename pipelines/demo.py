"""`ray job submit --working-dir . -- python pipelines/demo.py [--config demo.yaml] [--out DIR]`.

The main job on the embedded default; the same `DemoConfig` as `tprl demo`.
"""

import sys

from tprl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
