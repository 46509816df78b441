"""Ray job entrypoint for `galray analyze`: takes exactly its options (`galray analyze --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/analyze.py --input ... --output ...
"""

import sys

from galray.cli import main

sys.exit(main(["analyze", *sys.argv[1:]]))
