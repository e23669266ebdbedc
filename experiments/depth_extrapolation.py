"""`python experiments/depth_extrapolation.py [--arms a,b] [--quick] [--out DIR] [--seeds 0,1,2]`: the same as
`mythos-jax experiment depth_extrapolation` (see mythos_jax/experiments/depth_extrapolation.py and experiments/README.md)."""

import sys

from mythos_jax.experiments.harness import run_from_command_line

if __name__ == "__main__":
    sys.exit(run_from_command_line("depth_extrapolation"))
