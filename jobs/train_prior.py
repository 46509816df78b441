"""Ray job entrypoint for `galray train prior`: takes exactly its options (`galray train prior --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train_prior.py --config jobs/configs/prior.yaml
"""

import sys

from galray.cli import main

sys.exit(main(["train", "prior", *sys.argv[1:]]))
