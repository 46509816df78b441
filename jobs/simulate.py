"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/simulate.py [options]`.

Takes exactly the options of `galray simulate` (see `galray simulate --help`) and runs the same library call.
"""

import sys

from galray.cli import main

sys.exit(main(["simulate", *sys.argv[1:]]))
