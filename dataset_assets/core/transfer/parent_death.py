"""The one place that asks Linux to signal a process when its parent dies (``PR_SET_PDEATHSIG``):
s5cmd, the header readers and a multiprocess Dagster step go when what started them goes."""

import ctypes
import sys

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def on_parent_death(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; ``False`` where the
    kernel cannot (not Linux). Allocates nothing: safe in a ``preexec_fn`` between fork and exec."""
    if _LIBC is None:
        return False
    _LIBC.prctl(_PR_SET_PDEATHSIG, sig)
    return True
