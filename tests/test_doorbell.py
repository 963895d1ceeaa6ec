"""Doorbells wake a listener at once, and ringing with nobody listening is harmless."""
from __future__ import annotations

import threading

from shared.doorbell import listen, ring


def test_a_ring_wakes_every_event_of_the_listener(tmp_path):
    ring(tmp_path, "submitter")                       # nobody listens yet: nothing happens
    first, second = threading.Event(), threading.Event()
    listen(tmp_path, "submitter", first, second)
    ring(tmp_path, "submitter")
    assert first.wait(2) and second.wait(2)


def test_many_rings_never_block(tmp_path):
    wake = threading.Event()
    listen(tmp_path, "poller", wake)
    for _ in range(100_000):                         # more than a pipe holds
        ring(tmp_path, "poller")
    assert wake.wait(2)
