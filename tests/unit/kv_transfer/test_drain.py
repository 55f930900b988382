import queue
import threading

from kv_transfer.drain import drain


def test_drain_takes_everything_queued_without_waiting():
    q: queue.SimpleQueue[int] = queue.SimpleQueue()
    assert drain(q) == []
    for i in range(3):
        q.put(i)
    assert drain(q, timeout=30.0) == [0, 1, 2]  # items there: no wait, however long the timeout
    assert drain(q) == []


def test_drain_waits_for_a_first_item_up_to_its_timeout():
    q: queue.SimpleQueue[str] = queue.SimpleQueue()
    assert drain(q, timeout=0.01) == []  # nothing came
    putter = threading.Thread(target=q.put, args=("landed",))
    putter.start()
    assert drain(q, timeout=30.0) == ["landed"]  # returns as soon as it came, not after the timeout
    putter.join()
