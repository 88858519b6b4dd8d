"""Fault points inside Ray workers, installed by a job's ``worker_process_setup_hook`` (nothing in the product).

`install` wraps functions in the worker process:

- ``PF_FAULT=between``: the first write task to publish a ``segments`` file is SIGKILLed right after it (before
  its ``images`` file, the commit record);
- ``PF_FAULT=after``: the same right after its ``images`` file (committed, but the task never returns);
- ``PF_FAULT=actor``: the model actor is SIGKILLed in the middle of its second model batch (the first went
  through), so Ray restarts it and retries the block call it was on;
- ``PF_FAULT=pause``: the first commit of an ``images`` file holds, right after it, until the file
  ``PF_FAULT_RELEASE`` exists (at most ``PAUSE_LIMIT_S``): a job held mid-run, deterministically;
- ``PF_FAULT=poison``: inputs that strike every time they are handled (`install_poison`): bytes ending in
  `POISON_DECODE` kill the process that decodes them (SIGSEGV, as a crashing codec), in `RAISE_DECODE` make the
  decode raise a RuntimeError; an image id holding `POISON_MODEL` kills the model's process (``os._exit``), one
  holding `HANG_MODEL` hangs its model batch. Each strike appends a line to ``PF_FAULT_MARKER``.

The fault fires once per ``PF_FAULT_MARKER`` file, which it creates holding what it struck, so Ray's retry runs
undisturbed.
"""

from __future__ import annotations

import os
import signal
import threading
import time


def install() -> None:
    point = os.environ.get("PF_FAULT")
    marker = os.environ.get("PF_FAULT_MARKER")
    if point == "actor" and marker:
        _kill_the_actor_on_its_second_batch(marker)
    if point == "poison" and marker:
        install_poison(marker)
    if point not in ("between", "after", "pause") or not marker:
        return
    import pipeline.exactly_once.commit as commit

    original = commit.publish
    table = "/segments/" if point == "between" else "/images/"
    release = os.environ.get("PF_FAULT_RELEASE", "")

    def publish(fs, path: str, data: bytes) -> int:  # type: ignore[no-untyped-def]
        size = original(fs, path, data)
        if table in path and _claim(marker, path):
            if point == "pause":
                _wait_for(release)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return size

    commit.publish = publish  # type: ignore[assignment]


PAUSE_LIMIT_S = 600.0


def _wait_for(release: str) -> None:
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_the_actor_on_its_second_batch(marker: str) -> None:
    from pipeline.segmenting.predict import PanopticSegmenter

    original = PanopticSegmenter.segment
    calls = [0]

    def call(self, batch):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 2 and _claim(marker, f"actor pid {os.getpid()}, batch of {len(batch['image_id'])}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, batch)

    PanopticSegmenter.segment = call  # type: ignore[method-assign]


def _claim(marker: str, path: str) -> bool:
    """True for the first caller on this machine (the marker file is created exclusively)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(path)
    return True


POISON_DECODE = b"PF-POISON-DECODE"
RAISE_DECODE = b"PF-RAISE-DECODE"
POISON_MODEL = "poison-model"
HANG_MODEL = "hang-model"


def install_poison(marker: str) -> None:
    """``PF_FAULT=poison`` (see the module docstring), in this process."""
    import pipeline.segmenting.block_call as shard
    from pipeline.segmenting.predict import PanopticSegmenter

    decode, segment = shard.decode_input, PanopticSegmenter.segment

    def decode_input(data, **kwargs):  # type: ignore[no-untyped-def]
        if data.endswith(POISON_DECODE):
            _strike(marker, f"decode-kill {os.getpid()}")
            signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)  # this thread, as a codec's crash would
            time.sleep(PAUSE_LIMIT_S)  # never goes on (a handler that returns must not let the decode go on)
        if data.endswith(RAISE_DECODE):
            _strike(marker, f"decode-raise {os.getpid()}")
            raise RuntimeError("a codec plugin's own exception")
        return decode(data, **kwargs)

    def call(self, batch):  # type: ignore[no-untyped-def]
        ids = [str(i) for i, error in zip(batch["image_id"], batch["error"]) if not str(error)]  # what it segments
        if any(POISON_MODEL in i for i in ids):
            _strike(marker, f"model-kill {os.getpid()} batch of {len(ids)}")
            os._exit(1)
        if any(HANG_MODEL in i for i in ids):
            _strike(marker, f"model-hang {os.getpid()} batch of {len(ids)}")
            time.sleep(PAUSE_LIMIT_S)
        return segment(self, batch)

    shard.decode_input = decode_input  # type: ignore[assignment]
    PanopticSegmenter.segment = call  # type: ignore[method-assign]


def _strike(marker: str, what: str) -> None:
    with open(marker, "a") as f:
        f.write(what + "\n")
