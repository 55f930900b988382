import os
import threading

import pytest

from worker.affinity import bind_process, parse_cores


def test_parse_cores():
    assert parse_cores("1,3") == {1, 3}
    assert parse_cores("") == set()


@pytest.fixture
def restore_affinity():
    before = os.sched_getaffinity(0)
    yield before
    bind_process(before)


def test_binding_moves_threads_that_already_run(restore_affinity):
    """A thread started before the binding (like Ray's or gRPC's in a worker actor) is moved too."""
    started, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (started.set(), stop.wait()))
    thread.start()
    started.wait()
    try:
        core = min(restore_affinity)
        assert bind_process({core}) == {core}
        assert os.sched_getaffinity(thread.native_id) == {core}
        assert os.sched_getaffinity(0) == {core}
    finally:
        stop.set()
        thread.join()


def test_cores_the_process_may_not_use_are_left_out(restore_affinity):
    outside = max(restore_affinity) + 1000
    assert bind_process({outside}) == set()
    assert os.sched_getaffinity(0) == restore_affinity  # unchanged
