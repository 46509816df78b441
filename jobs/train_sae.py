"""Ray job entrypoint for `galray train sae`: takes exactly its options (`galray train sae --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train_sae.py --config jobs/configs/sae.yaml
"""

import sys

from galray.cli import main

sys.exit(main(["train", "sae", *sys.argv[1:]]))
