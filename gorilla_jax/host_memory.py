"""Transparent huge pages for large host buffers (glibc's ``glibc.malloc.hugetlb=1`` tunable).

On CPU, XLA and PyTorch allocate their large temporaries (the [B, S, V] logits and their
gradient: 131 MB each for the 19M benchmark model) with ``malloc``, which hands anything over
32 MB to ``mmap`` and gives it back on ``free``. Every training step then touches that memory
afresh: measured on the benchmark's train step, about 109,000 page faults and 250 ms of kernel
time per step (of ~1.2 CPU-s). With ``glibc.malloc.hugetlb=1`` glibc asks for transparent huge
pages (``madvise``) on those mappings: 560 faults and 80 ms per step, and the step's wall time
drops from ~650 to ~540 ms (docs/PERFORMANCE.md). PyTorch gains as much, so the benchmark gives
every framework's worker the same setting.

glibc reads tunables only when a process starts, so the ``gorilla-jax`` command re-executes
itself once with the tunable added (:func:`reexec_with_huge_pages`); the process id, arguments,
standard streams and signals are unchanged. Nothing happens when the tunable is already set,
outside Linux, or when ``GORILLA_JAX_HUGE_PAGES=0``. Older glibc (< 2.35) ignores the tunable,
and with transparent huge pages ``never`` in ``/sys/kernel/mm/transparent_hugepage/enabled``
it has no effect.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "GORILLA_JAX_HUGE_PAGES"
_MARK = "GORILLA_JAX_REEXECUTED"


def with_huge_pages(env: Mapping[str, str]) -> dict:
    """A copy of ``env`` whose ``GLIBC_TUNABLES`` asks for huge pages, unless it already names
    the tunable (the user's choice stays) or the user opted out."""
    out = dict(env)
    if out.get(OPT_OUT, "1") == "0":
        return out
    current = out.get("GLIBC_TUNABLES", "")
    names = [t.split("=", 1)[0] for t in current.split(":") if t]
    if TUNABLE not in names:
        out["GLIBC_TUNABLES"] = f"{current}:{SETTING}" if current else SETTING
    return out


def reexec_with_huge_pages(argv: Sequence[str], module: str = "gorilla_jax.cli",
                           env: Optional[Mapping[str, str]] = None) -> None:
    """Replace this process by ``python -m module argv...`` with huge pages on, when they are
    not on yet (see the module docstring); returns only when nothing needs doing."""
    env = os.environ if env is None else env
    if not sys.platform.startswith("linux") or env.get(_MARK):
        return
    new = with_huge_pages(env)
    if new.get("GLIBC_TUNABLES") == env.get("GLIBC_TUNABLES"):
        return
    new[_MARK] = "1"  # never loop, whatever glibc makes of the tunable
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], new)
