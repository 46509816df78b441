"""Ray job entrypoint for `galray report`: takes exactly its options (`galray report --help`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/report.py --run ANALYSIS_DIR
"""

import sys

from galray.cli import main

sys.exit(main(["report", *sys.argv[1:]]))
