"""`python experiments/test_time_depth.py [--arms a,b] [--quick] [--out DIR] [--seeds 0,1,2]`: the same as
`mythos-jax experiment test_time_depth` (see mythos_jax/experiments/test_time_depth.py and experiments/README.md)."""

import sys

from mythos_jax.experiments.harness import run_from_command_line

if __name__ == "__main__":
    sys.exit(run_from_command_line("test_time_depth"))
