"""Ray job entrypoint for `galray ingest`: takes exactly its options (`galray ingest --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/ingest.py [options]
"""

import sys

from galray.cli import main

sys.exit(main(["ingest", *sys.argv[1:]]))
