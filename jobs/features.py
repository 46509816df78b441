"""Ray job entrypoint for `galray features`: takes exactly its options (`galray features --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/features.py --input ... --output ...
"""

import sys

from galray.cli import main

sys.exit(main(["features", *sys.argv[1:]]))
