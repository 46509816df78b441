"""Ray job entrypoint for `galray simulate`: takes exactly its options (`galray simulate --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/simulate.py --config jobs/configs/simulate.yaml
"""

import sys

from galray.cli import main

sys.exit(main(["simulate", *sys.argv[1:]]))
