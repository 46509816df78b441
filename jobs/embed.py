"""Ray job entrypoint for `galray embed`: takes exactly its options (`galray embed --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/embed.py --config jobs/configs/embed.yaml
"""

import sys

from galray.cli import main

sys.exit(main(["embed", *sys.argv[1:]]))
