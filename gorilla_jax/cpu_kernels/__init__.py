"""Native CPU kernels for the train step, called through XLA's FFI.

- :func:`adamw_in_place` (``kernels.cc``): XLA:CPU in jaxlib 0.10.2 has no multi-output fusion,
  so the clipped AdamW update of one parameter is three loops (first moment, second moment,
  parameter), which read the moments twice. The kernel is one pass: it reads gradient sums,
  parameter and moments once and writes the three back in place (the 19M benchmark model:
  17 -> 12 ms alone, about 1.5% of the train step; docs/PERFORMANCE.md).
- causal grouped-query attention with the rotary embedding, forward and backward
  (``attention.cc``, called by :mod:`gorilla_jax.cpu_kernels.attention`).

They run on the calling XLA thread and XLA's intra-op pool (``parallel.h``).

The library is compiled on first use with the system C++ compiler (``$CXX``, else
``c++``/``g++``) against jaxlib's FFI headers, for this CPU (``-march=native``), into a cache
directory keyed by the source, the jaxlib version, the compiler and the CPU
(``$GORILLA_JAX_CACHE`` or ``~/.cache/gorilla_jax``); a build is written to a temporary file and
renamed into place, so no half-written library is ever loaded. Without a compiler, or when the
build fails, :func:`usable` is False (the reason is logged once and given by
:func:`unavailable_reason`) and the train step runs XLA's loops instead.
``GORILLA_JAX_CPU_KERNELS=0`` turns the kernels off.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("kernels.cc", "attention.cc")]
HEADERS = [Path(__file__).with_name("parallel.h")]
ENV_SWITCH = "GORILLA_JAX_CPU_KERNELS"
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC"]
TARGETS = {"gorilla_adamw_in_place": "GorillaAdamWInPlace",
           "gorilla_attention_fwd": "GorillaAttentionFwd",
           "gorilla_attention_bwd": "GorillaAttentionBwd"}

_lock = threading.Lock()
_state: dict = {}  # "lib" (the loaded library) or "error" (why there is none)


def cache_dir() -> Path:
    root = os.environ.get("GORILLA_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gorilla_jax")
    return Path(root) / "cpu_kernels"


def compiler() -> Optional[str]:
    name = os.environ.get("CXX")
    if name:
        return shutil.which(name)
    return shutil.which("c++") or shutil.which("g++")


def _cpu_fingerprint() -> str:
    """The CPU's model and feature flags (-march=native code runs only where they match)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() + platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([
        *(f.read_text() for f in SOURCES + HEADERS), jax.ffi.include_dir(), jax.__version__,
        version, " ".join(FLAGS), _cpu_fingerprint()]).encode()).hexdigest()[:16]
    return cache_dir() / f"kernels-{key}.so"


def build(cxx: str, out: Path) -> Path:
    """Compile the kernel sources to ``out`` (atomically: a temporary file renamed into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load():
    with _lock:
        if "lib" in _state or "error" in _state:
            return _state.get("lib")
        try:
            cxx = compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler ($CXX, c++ or g++) on PATH")
            path = library_path(cxx)
            if not path.exists():
                log.info("building the CPU kernel library: %s", path)
                build(cxx, path)
            lib = ctypes.CDLL(str(path))
            for target, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
            _state["lib"] = lib
        except Exception as e:  # a missing compiler, a failed build or load: XLA's loops instead
            _state["error"] = f"{type(e).__name__}: {e}"
            log.warning("CPU kernel unavailable, the train step uses XLA's loops: %s",
                        _state["error"])
        return _state.get("lib")


def available() -> bool:
    """Whether the library is built (or builds now) and its FFI targets are registered."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    _load()
    return _state.get("error")


def usable() -> bool:
    """Whether the train step uses the kernels: on one CPU device (the active mesh's, else the
    whole process's), unless ``GORILLA_JAX_CPU_KERNELS=0``, with the library available.

    A mesh of several devices keeps XLA's loops, which its partitioner splits over devices.
    Decided when the step is traced.
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    from gorilla_jax.sharding import active_mesh

    mesh = active_mesh()
    if mesh is None:
        platform_, devices = jax.default_backend(), jax.device_count()
    else:
        platform_, devices = mesh.devices.flat[0].platform, mesh.devices.size
    return platform_ == "cpu" and devices == 1 and available()


def adamw_in_place(param, grad_sums, mu, nu, scalars, weight_decay: float):
    """One clipped AdamW step for one float32 parameter: ``(param, mu, nu)`` updated, each
    written over its input when the caller donates it.

    ``scalars`` float32[10]: gradient scale (1 / token count), clip factor, b1, 1 - b1, b2,
    1 - b2, eps, learning rate, ``bc1 = 1 - b1**t``, ``bc2 = 1 - b2**t``. Computes optax's
    clip + adamw + apply_updates, operation for operation: ``g = grad_sums * scale * clip``,
    ``mu = (1 - b1) g + b1 mu``, ``nu = (1 - b2) g^2 + b2 nu``, then
    ``param + (-lr) (mu / bc1 / (sqrt(nu / bc2) + eps) + weight_decay param)``.
    """
    like = jax.ShapeDtypeStruct(param.shape, jnp.float32)
    call = jax.ffi.ffi_call("gorilla_adamw_in_place", (like, like, like),
                            input_output_aliases={0: 0, 2: 1, 3: 2})
    with jax.named_scope("adamw_in_place"):  # its name in profiles (bench train --profile)
        return call(param, grad_sums, mu, nu, scalars, weight_decay=np.float32(weight_decay))
