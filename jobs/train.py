"""Ray job entrypoint: `ray job submit -- python jobs/train.py --config jobs/configs/sae.yaml [--set k=v ...]`.

Takes exactly the options of `galray train` (see `galray train --help`) and runs the same library call;
the config file names the kind (sae, vqvae or prior).
"""

import sys

from galray.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
