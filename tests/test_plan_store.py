"""libtpu's figures remembered by program (``mythos_jax.plan.compiled``) and the order in which
``mythos-jax plan --experiment`` compiles arms under a budget."""

import json
import threading
import time
from types import SimpleNamespace

import pytest

from mythos_jax.commands.plan import _compile_order
from mythos_jax.plan.compiled import (FIGURES, FROM_LIBTPU, FROM_STORE, CompilerFigures,
                                      program_key)

FIGURES_OF_ONE = {"temporaries": 5 << 30, "generated_code": 1024, "compiler_message": None,
                  "flops": 1.5e12, "bytes_accessed": 3e9, "compile_seconds": 61.0}


def counting_compiler(figures=FIGURES_OF_ONE, wait: float = 0.0):
    calls = []

    def compile_program():
        calls.append(1)
        time.sleep(wait)
        return dict(figures)
    return compile_program, calls


def test_one_key_compiles_once_even_when_asked_by_two_threads_at_once():
    store = CompilerFigures()
    compile_program, calls = counting_compiler(wait=0.3)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(store.get("k", compile_program)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] and answers == [(FIGURES_OF_ONE, FROM_LIBTPU)] * 2 and len(store) == 1


def test_a_failed_or_refused_compile_is_not_remembered():
    store = CompilerFigures()

    def broken():
        raise RuntimeError("libtpu crashed")
    with pytest.raises(RuntimeError, match="libtpu crashed"):
        store.get("k", broken)
    compile_program, calls = counting_compiler()
    assert store.get("k", compile_program, may_compile=lambda: False) is None
    assert calls == [] and len(store) == 0
    assert store.get("k", compile_program) == (FIGURES_OF_ONE, FROM_LIBTPU) and calls == [1]


def test_a_later_session_reads_the_figures_from_the_folder(tmp_path):
    compile_program, calls = counting_compiler()
    CompilerFigures(str(tmp_path)).get("k", compile_program)
    again = CompilerFigures(str(tmp_path)).get("k", compile_program, may_compile=lambda: False)
    assert again == (FIGURES_OF_ONE, FROM_STORE) and calls == [1]
    assert json.loads((tmp_path / "k.json").read_text()) == {"key": "k",
                                                              "figures": FIGURES_OF_ONE}


@pytest.mark.parametrize("text, problem", [
    ("{", "unreadable (JSONDecodeError)"),
    (json.dumps({"key": "other", "figures": FIGURES_OF_ONE}), "not a record of this program"),
    (json.dumps({"key": "k", "figures": {"temporaries": 1}}), "its figures must be exactly"),
    (json.dumps({"key": "k", "figures": {**FIGURES_OF_ONE, "temporaries": -1}}),
     "figures.temporaries must be a finite number >= 0, got -1"),
    (json.dumps({"key": "k", "figures": {**FIGURES_OF_ONE, "generated_code": True}}),
     "figures.generated_code has the wrong type (bool)"),
    (json.dumps({"key": "k", "figures": {**FIGURES_OF_ONE, "compiler_message": ["x"]}}),
     "figures.compiler_message has the wrong type (list)"),
])
def test_a_file_that_is_not_a_record_is_named_and_compiled_again(tmp_path, capsys, text,
                                                                  problem):
    (tmp_path / "k.json").write_text(text)
    compile_program, calls = counting_compiler()
    assert CompilerFigures(str(tmp_path)).get("k", compile_program) == (FIGURES_OF_ONE,
                                                                        FROM_LIBTPU)
    err = capsys.readouterr().err
    assert err.startswith(f"plan store: ignoring {tmp_path / 'k.json'}: {problem}")
    assert err.endswith("; compiling again\n") and err.count("\n") == 1
    assert calls == [1] and json.loads((tmp_path / "k.json").read_text())["key"] == "k"


def test_the_key_moves_with_the_program_the_slice_the_compiler_and_its_flags(monkeypatch):
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    key = program_key("module @main {}", "v4-8", "0.0.50")
    assert key == program_key("module @main {}", "v4-8", "0.0.50")
    others = {program_key("module @other {}", "v4-8", "0.0.50"),
              program_key("module @main {}", "v5p-8", "0.0.50"),
              program_key("module @main {}", "v4-8", "0.0.51")}
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_some_flag=true")
    others.add(program_key("module @main {}", "v4-8", "0.0.50"))
    assert key not in others and len(others) == 4
    assert set(FIGURES) == set(FIGURES_OF_ONE)


def test_the_budget_compiles_each_experiments_largest_first_then_the_rest_largest_first():
    def plan(name, sizes):
        return SimpleNamespace(name=name, specs=sizes,
                               reports=[SimpleNamespace(total=size) for size in sizes])
    a, b = plan("a", [3, 9, 1]), plan("b", [5, 8])
    order = [(p.name, i, must) for p, i, must in _compile_order([a, b], None, True)]
    assert order == [("a", 1, True), ("b", 1, True), ("b", 0, False), ("a", 0, False),
                     ("a", 2, False)]
    assert [(p.name, i) for p, i, _ in _compile_order([a, b], 1, False)] == [("a", 1),
                                                                            ("b", 1)]
    everything = _compile_order([a, b], None, False)
    assert len(everything) == 5 and all(must for _, _, must in everything)
