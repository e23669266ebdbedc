"""`python experiments/looped_vs_standard.py [--arms a,b] [--quick] [--out DIR] [--seeds 0,1,2]`:
the same as `mythos-jax experiment looped_vs_standard` (see
mythos_jax/experiments/looped_vs_standard.py and experiments/README.md)."""

import sys

from mythos_jax.experiments.harness import run_from_command_line

if __name__ == "__main__":
    sys.exit(run_from_command_line("looped_vs_standard"))
