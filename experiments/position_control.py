"""`python experiments/position_control.py [--arms a,b] [--quick] [--out DIR] [--seeds 0,1,2]`: the same as
`mythos-jax experiment position_control` (see mythos_jax/experiments/position_control.py and experiments/README.md)."""

import sys

from mythos_jax.experiments.harness import run_from_command_line

if __name__ == "__main__":
    sys.exit(run_from_command_line("position_control"))
