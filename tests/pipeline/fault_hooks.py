"""Fault points inside Ray workers, installed by a job's ``worker_process_setup_hook`` (nothing in the product).

`install` wraps `pipeline.write.publish` in the worker process: with ``PF_FAULT=between`` the first write task
to publish a ``segments`` file is SIGKILLed right after it (before its ``images`` file, the commit record);
with ``PF_FAULT=after``, right after its ``images`` file (committed, but the task never returns). The fault
fires once per ``PF_FAULT_MARKER`` file, which it creates holding the path it struck, so Ray's retry of the
task runs undisturbed.
"""

from __future__ import annotations

import os
import signal


def install() -> None:
    point = os.environ.get("PF_FAULT")
    marker = os.environ.get("PF_FAULT_MARKER")
    if point not in ("between", "after") or not marker:
        return
    import pipeline.write as write

    original = write.publish
    table = "/segments/" if point == "between" else "/images/"

    def publish(fs, path: str, data: bytes) -> int:  # type: ignore[no-untyped-def]
        size = original(fs, path, data)
        if table in path and _claim(marker, path):
            os.kill(os.getpid(), signal.SIGKILL)
        return size

    write.publish = publish  # type: ignore[assignment]


def _claim(marker: str, path: str) -> bool:
    """True for the first caller on this machine (the marker file is created exclusively)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(path)
    return True
