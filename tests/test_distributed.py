"""Multi-process start-up: a loopback coordinator binds to loopback only; flags go together."""

import jax
import pytest

from mythos_jax.train import distributed


@pytest.mark.parametrize("address, bound", [
    ("127.0.0.1:1234", "127.0.0.1:1234"), ("localhost:99", "localhost:99"),
    ("[::1]:5000", "[::1]:5000"), ("127.3.2.1:8", "127.3.2.1:8"),
    ("10.0.0.2:1234", None), ("node0:1234", None), ("[2001:db8::1]:1", None),
    ("127.0.0.1", None),
])
def test_bind_address_is_the_coordinator_only_when_loopback(address, bound):
    assert distributed.bind_address(address) == bound


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: seen.append(kwargs))
    return seen


def test_local_coordinator_listens_on_loopback(calls):
    distributed.initialize("127.0.0.1:4321", 2, 0)
    assert calls[0]["coordinator_bind_address"] == "127.0.0.1:4321"
    distributed.initialize("node0:4321", 2, 1)
    assert calls[1]["coordinator_bind_address"] is None      # other hosts must reach it


def test_environment_coordinator_on_loopback_binds_there(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:7000")
    distributed.initialize()
    assert calls == [{"coordinator_bind_address": "localhost:7000"}]


def test_partial_flags_are_refused(calls):
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize("127.0.0.1:1", 2)
    assert calls == []
