"""Ray job entrypoint for `galray encode`: takes exactly its options (`galray encode --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/encode.py [options]
"""

import sys

from galray.cli import main

sys.exit(main(["encode", *sys.argv[1:]]))
