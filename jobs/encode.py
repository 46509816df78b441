"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/encode.py [options]`.

Takes exactly the options of `galray encode` (see `galray encode --help`) and runs the same library call.
"""

import sys

from galray.cli import main

sys.exit(main(["encode", *sys.argv[1:]]))
