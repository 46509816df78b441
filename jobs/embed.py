"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/embed.py [options]`.

Takes exactly the options of `galray embed` (see `galray embed --help`) and runs the same library call.
"""

import sys

from galray.cli import main

sys.exit(main(["embed", *sys.argv[1:]]))
