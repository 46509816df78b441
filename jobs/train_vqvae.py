"""Ray job entrypoint for `galray train vqvae`: takes exactly its options (`galray train vqvae --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train_vqvae.py --config jobs/configs/vqvae.yaml
"""

import sys

from galray.cli import main

sys.exit(main(["train", "vqvae", *sys.argv[1:]]))
