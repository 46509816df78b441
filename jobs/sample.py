"""Ray job entrypoint for `galray sample`: takes exactly its options (`galray sample --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/sample.py [options]
"""

import sys

from galray.cli import main

sys.exit(main(["sample", *sys.argv[1:]]))
