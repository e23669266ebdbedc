"""The fault catalogue: every fault a run on a pod (or a laptop) meets, what happens, what is kept,
and the test that makes it happen, most through the CLI as a user would meet it. The README's
table (between ``<!-- faults -->`` markers) is this catalogue, checked here; each listed test
must exist. The faults run in their own modules (a second run here would double the suite's
time), except the torn metrics line, which only this module drives through ``train``."""

import dataclasses
import importlib
import os
import re

import pytest

from mythos_jax.train.trainer import read_metrics

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@dataclasses.dataclass(frozen=True)
class Fault:
    fault: str
    happens: str
    kept: str
    tests: tuple[str, ...]          # "module::test" (parametrised tests by their base name)


FAULTS = (
    Fault("SIGTERM (preemption) to one host of two, or to both at different steps, or during a "
          "save",
          "every host stops at the same agreed step, saves one checkpoint and exits 143",
          "every step up to that one; the rerun continues at the next step, no batch repeated "
          "or skipped",
          ("test_preemption::test_sigterm_on_one_host_then_on_both_at_different_steps_during_a_"
           "save", "test_train::test_sigterm_checkpoints_and_exits_and_the_rerun_continues_at_"
                   "the_next_step")),
    Fault("SIGKILL or a crash", "the run dies",
          "every checkpointed step; the rerun logs the same per-step losses bit for bit",
          ("test_train::test_resume_after_sigkill_gives_the_same_losses",
           "test_checkpoints_training::test_a_save_killed_mid_write_is_never_listed_and_step_"
           "4_resumes")),
    Fault("a TPU VM started without launch.sh (plain gcloud ssh, GKE)",
          "it joins its slice from the metadata server or GKE's variables",
          "one job, not N lone ones writing one workdir",
          ("test_distributed::test_a_tpu_vm_joins_its_slice_from_the_metadata_server",
           "test_distributed::test_a_gke_tpu_pod_joins_from_its_worker_host_names")),
    Fault("a transient storage error reading a checkpoint, on one host or all",
          "every host retries together, 4 times with backoff, then the run stops naming the "
          "error",
          "every checkpoint, untouched",
          ("test_checkpoints_training::test_a_transient_read_error_is_retried_and_moves_"
           "nothing", "test_checkpoints_training::test_a_read_error_that_is_not_damage_stops_"
                      "the_run_naming_it",
           "test_preemption::test_sigterm_on_one_host_then_on_both_at_different_steps_during_a_"
           "save")),
    Fault("a damaged checkpoint (truncated or missing files)",
          "named and set aside in damaged_checkpoints/; the run resumes from the newest "
          "readable one", "every readable checkpoint",
          ("test_checkpoints_training::test_an_unreadable_latest_checkpoint_is_named_and_the_"
           "run_resumes_before_it",)),
    Fault("a full disk during a save", "the run stops naming the step that failed",
          "the previous checkpoint",
          ("test_checkpoints_training::test_a_full_disk_stops_the_run_and_keeps_the_previous_"
           "checkpoint",)),
    Fault("a run that dies before its first checkpoint, then a rerun",
          "the rerun starts its metrics afresh", "no duplicate metric lines",
          ("test_train::test_a_new_run_drops_the_metrics_of_an_attempt_that_never_"
           "checkpointed",)),
    Fault("a kill during a metrics write (a torn last line), then a rerun",
          "the torn line is dropped with a warning; the run resumes",
          "every complete line up to the checkpoint",
          ("test_faults::test_a_torn_metrics_line_is_dropped_when_train_resumes",
           "test_metrics::test_resume_drops_later_steps_and_the_damaged_line_atomically")),
    Fault("a second trainer on a workdir in use (disk or bucket)",
          "refused at once naming the holder; a dead or silent holder's lock is taken over by "
          "one taker", "the running trainer's workdir",
          ("test_workdir_lock::test_a_second_train_command_is_refused_at_once",
           "test_workdir_lock::test_only_one_of_many_racing_takers_of_a_stale_lock_wins",
           "test_buckets::test_only_one_of_many_racing_takers_of_a_stale_bucket_lock_wins")),
    Fault("a failing log upload to a bucket",
          "retried, then kept for the next upload and reported; never raised",
          "every metric line; the hosts stay in step",
          ("test_buckets::test_a_failed_log_upload_is_retried_then_kept_for_the_next_sync",)),
    Fault("a kill while save_model / convert copies into a bucket",
          "no COMMITTED marker: readers refuse it; a new save replaces it",
          "the previous model, until the new one is complete",
          ("test_buckets::test_a_model_checkpoint_in_a_bucket_is_committed_last_and_read_only_"
           "when_committed",)),
    Fault("the training corpus moved away (a workdir copied to a laptop)",
          "export, convert and generate work; eval says it needs the held-out data",
          "the whole model", ("test_checkpoints_load::test_a_workdir_whose_corpus_is_gone_"
                              "still_exports_converts_and_generates",)),
    Fault("the corpus changed (a file grown, added, or edited at the same size)",
          "resume is refused naming what changed (--allow-data-change for training files)",
          "a held-out split that never moves",
          ("test_fingerprint::test_train_command_refuses_changed_data_in_one_line_unless_"
           "allow_data_change", "test_fingerprint::test_a_same_size_edit_is_named",
           "test_fingerprint::test_a_moved_heldout_split_is_refused_even_when_allowed")),
    Fault("a config change the checkpoint cannot take (model shape, optimizer structure)",
          "refused naming the fields that differ", "the checkpoint",
          ("test_train::test_incompatible_checkpoint_is_named",)),
    Fault("prepare-data --overwrite interrupted", "the old output stays until the new one is "
          "complete", "the old output",
          ("test_prepare_data::test_overwrite_keeps_the_old_output_until_the_new_one_is_"
           "complete",)),
    Fault("Ctrl-C on launch.sh --local", "every trainer gets SIGTERM, checkpoints and exits 143",
          "every step up to the stop",
          ("test_tpu_setup::test_local_launch_forwards_a_stop_to_every_process",)),
    Fault("a pod run that ends or fails while nobody watches",
          "launch.sh --delete-when-done deletes the slice (and its queued resource)",
          "the checkpoints in the gs:// workdir",
          ("test_tpu_setup::test_launch_deletes_the_slice_when_the_run_fails",
           "test_tpu_setup::test_delete_finds_the_queued_resource_itself")),
    Fault("a power cut right after a file is written", "nothing: the bytes are synced before "
          "the rename, the folder after it", "the old or the new file, never an empty one",
          ("test_paths::test_local_writes_sync_the_bytes_before_the_rename_and_the_folder_"
           "after",)),
)


def readme_table() -> str:
    """The catalogue as the README shows it."""
    rows = ["| fault | what happens | what is kept | tested by |", "|---|---|---|---|"]
    for f in FAULTS:
        tests = ", ".join(f"`{t.split('::')[0]}`" for t in dict.fromkeys(f.tests))
        rows.append(f"| {f.fault} | {f.happens} | {f.kept} | {tests} |")
    return "\n".join(rows)


def test_every_catalogued_test_exists():
    for fault in FAULTS:
        for node in fault.tests:
            module, name = node.split("::")
            assert callable(getattr(importlib.import_module(module), name, None)), node


def test_the_readme_shows_the_catalogue():
    with open(README) as f:
        text = f.read()
    found = re.search(r"<!-- faults -->\n(.*?)\n<!-- /faults -->", text, re.S)
    assert found, "README.md has no <!-- faults --> table"
    assert found.group(1) == readme_table(), (
        "README.md's fault table differs from tests/test_faults.py; paste readme_table():\n"
        + readme_table())


def test_a_torn_metrics_line_is_dropped_when_train_resumes(tmp_path, capsys):
    from mythos_jax.cli import main
    workdir = tmp_path / "run"
    args = ["train", "--config", "tiny", "--workdir", str(workdir)] + [
        a for o in ("checkpoint.every=2", "log.every=1", "eval.loops=[1]", "eval.batches=1",
                    "log.tensorboard=false", "checkpoint.async_save=false")
        for a in ("--set", o)]
    assert main(args + ["--set", "steps=2"]) == 0
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')                  # killed while writing step 3's line
    with pytest.warns(UserWarning, match="metrics.jsonl:.*skipping a damaged last line"):
        assert main(args + ["--set", "steps=4"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(str(workdir)) if "eval" not in r] == [1, 2, 3, 4]
