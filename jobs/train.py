"""Ray job entrypoint: `ray job submit -- python jobs/train.py --config jobs/configs/sae.yaml [--set k=v ...]`.

The same library call as `galray train`; the config file names the kind (sae, vqvae or prior).
"""

import argparse

from galray.config import load
from galray.train.config import TrainJob
from galray.train.launch import fit

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--config", required=True, help="YAML file with a TrainJob")
parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
args = parser.parse_args()
print(fit(load(TrainJob, args.config, args.overrides)).format())

