"""`engine.busy_wait_s` reaches vLLM's shared-memory queues through the plugin vLLM loads in each engine process."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import zmq

from worker.busy_wait import BUSY_WAIT_ENV, RECHECK_MS, install


def test_vllm_finds_the_plugin_in_its_general_plugin_group() -> None:
    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert found.get("pdserve-busy-wait") == "worker.busy_wait:install"


@pytest.fixture
def spin_condition(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from vllm.distributed.device_communicators import shm_broadcast
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    monkeypatch.setattr(SpinCondition, "__init__", SpinCondition.__init__)  # restored after the test
    monkeypatch.setattr(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS", shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS)
    context = zmq.Context()

    def make(address: str) -> tuple[SpinCondition, SpinCondition]:
        """A writer bound to `address` and a reader connected to it, as vLLM pairs them."""
        writer = SpinCondition(is_reader=False, context=context, notify_address=address)
        return writer, SpinCondition(is_reader=True, context=context, notify_address=address)

    yield make
    context.destroy(linger=0)  # closes every socket the conditions opened


def test_readers_spin_for_the_configured_time_once_installed(spin_condition, monkeypatch) -> None:
    monkeypatch.setenv(BUSY_WAIT_ENV, "0.25")
    install()
    install()  # vLLM may load plugins more than once: the second changes nothing
    writer, reader = spin_condition("inproc://configured")
    assert reader.busy_loop_s == 0.25
    assert writer.busy_loop_s == 0  # a writer never waits


def test_without_the_variable_vllm_keeps_its_own_busy_wait(spin_condition, monkeypatch) -> None:
    monkeypatch.delenv(BUSY_WAIT_ENV, raising=False)
    install()
    _, reader = spin_condition("inproc://plain")
    assert reader.busy_loop_s == 1


def _idle_wait_ms() -> int:
    """How long a reader with nothing to read sleeps before it looks at its queue again (no deadline set)."""
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    return MessageQueue.ReadTimeoutWithWarnings(timeout=None, should_warn=False).timeout_ms()


def test_a_dropped_notification_costs_a_sleeping_reader_milliseconds_once_installed(spin_condition, monkeypatch):
    monkeypatch.delenv(BUSY_WAIT_ENV, raising=False)
    install()
    assert _idle_wait_ms() == 5000  # vLLM's own: a dropped notification stalls a sleeping reader 5 s
    monkeypatch.setenv(BUSY_WAIT_ENV, "0")
    install()
    assert _idle_wait_ms() == RECHECK_MS == 5
