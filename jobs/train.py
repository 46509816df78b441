"""Ray job entrypoint for `galray train`: takes exactly its options (`galray train --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --config jobs/configs/sae.yaml
"""

import sys

from galray.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
