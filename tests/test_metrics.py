"""The training progress line: elapsed time and ETA."""

from mythos_jax.train.metrics import progress_line

SUMMARY = {"loss": 2.5, "tokens_per_s": 1234.0, "mfu": 0.1, "loops": 2.0,
           "load_max_over_mean": 1.5, "finite": 1.0}


def test_progress_line_shows_elapsed_time_and_eta():
    line = progress_line(50, 200, SUMMARY, elapsed=75.0, eta=3725.0)
    assert line.startswith("[#####...............] step 50/200  loss 2.5000")
    assert line.endswith("elapsed 1:15  ETA 1:02:05")
