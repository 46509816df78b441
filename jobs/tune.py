"""Ray job entrypoint: `ray job submit -- python jobs/tune.py sae --config jobs/configs/sae.yaml --space
jobs/configs/tune_sae_space.yaml --trials 32 --workers 1 --gpu [--set k=v ...]`.

Takes exactly the options of `galray tune` (see `galray tune --help`) and runs the same library call.
"""

import sys

from galray.cli import main

sys.exit(main(["tune", *sys.argv[1:]]))
