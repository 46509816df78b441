"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/ingest.py [options]`.

Takes exactly the options of `galray ingest` (see `galray ingest --help`) and runs the same library call.
"""

import sys

from galray.cli import main

sys.exit(main(["ingest", *sys.argv[1:]]))
