"""The ``custom_dataset`` of these tasks: their ``dataset_kwargs.data_files`` (JSONL, one
document a line) read relative to this folder, so that the tasks load from any working
directory and never reach for the network (``datasets`` would resolve the names against the
working directory)."""

import json
import pathlib

import datasets

HERE = pathlib.Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata) -> datasets.DatasetDict:
    """{split: file name} -> a DatasetDict of those splits (lm-eval passes the task's
    metadata too: ignored)."""
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list([json.loads(line) for line in
                                           (HERE / name).read_text().splitlines() if line])
        for split, name in data_files.items()})
