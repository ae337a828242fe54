"""This process's memory as Linux reports it in ``/proc/self/status``: what every benchmark's
``peak_rss_mb`` and ``rss_before_mb`` are read from (one reader for all of them)."""

from __future__ import annotations

import resource


def status_mb(key: str = "VmHWM") -> float:
    """``VmHWM`` (the peak resident set since the process began or since :func:`reset_peak`) or
    ``VmRSS`` (now), MiB. Where ``/proc`` cannot be read, the peak falls back to ``ru_maxrss`` (which
    keeps a parent's peak across ``exec``) and anything else is NaN."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    if key == "VmHWM":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return float("nan")


def peak_mb() -> float:
    """``VmHWM`` in MiB."""
    return status_mb("VmHWM")


def rss_mb() -> float:
    """``VmRSS`` in MiB."""
    return status_mb("VmRSS")


def reset_peak() -> bool:
    """Set ``VmHWM`` back to the current RSS (``/proc/self/clear_refs`` = 5); False where the
    kernel does not allow it (the peak then counts from the process start)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
