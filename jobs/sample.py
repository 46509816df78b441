"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/sample.py [options]`.

Takes exactly the options of `galray sample` (see `galray sample --help`) and runs the same library call.
"""

import sys

from galray.cli import main

sys.exit(main(["sample", *sys.argv[1:]]))
