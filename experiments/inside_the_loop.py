"""`python experiments/inside_the_loop.py [--arms a,b] [--quick] [--out DIR] [--seeds 0,1,2]`:
the same as `mythos-jax experiment inside_the_loop` (see
mythos_jax/experiments/inside_the_loop.py and experiments/README.md)."""

import sys

from mythos_jax.experiments.harness import run_from_command_line

if __name__ == "__main__":
    sys.exit(run_from_command_line("inside_the_loop"))
