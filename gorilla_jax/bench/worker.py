"""One benchmark runner in its own process, driven over stdin/stdout by ``bench compare``.

Why processes: each framework's peak memory is its own process's peak RSS (one process holding
both would mix them), thread settings and CPU affinity apply to one framework at a time, and
the parent can interleave the frameworks round by round (JAX steps, then PyTorch steps, then
JAX again...) so that a change in machine load hits all of them alike. While one worker runs,
the others wait on their stdin (idle).

Protocol: the parent starts ``python -m gorilla_jax.bench.worker`` with one JSON argument
``{"kind": "train" | "decode", "framework": ..., "spec": {...}, "threads": N}``. The worker
pins itself to N CPUs (before importing a framework, so XLA's thread pool is sized to them),
builds the runner, and answers each JSON command line on stdin with one line on stdout
prefixed by ``@@bench ``:

- ``{"cmd": "setup"}`` -> the runner's info (compile time, first loss, ...)
- ``{"cmd": "run", "n": K, ...}`` -> the runner's timings
- ``{"cmd": "peak", "dtype": D}`` -> :func:`gorilla_jax.bench.peak.matmul_peak` of this framework
- ``{"cmd": "profile", "n": K, "trace_dir": D}`` -> [(op, ms per step)] from a profiler trace
- ``{"cmd": "memory"}`` -> peak memory; ``{"cmd": "exit"}`` ends the process.

Errors are answered as ``{"error": "..."}`` lines with the traceback's last lines.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

PREFIX = "@@bench "


def pin_threads(threads: int | None) -> None:
    """Restrict this process to ``threads`` CPUs (XLA sizes its pool by the affinity mask)."""
    if not threads or not hasattr(os, "sched_getaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])


def make_runner(kind: str, framework: str, spec: dict):
    if kind == "train":
        from gorilla_jax.bench.train_bench import TrainBenchSpec, make_train_runner

        return make_train_runner(framework, TrainBenchSpec.from_dict(spec))
    if kind == "decode":
        from gorilla_jax.bench.decode_bench import DecodeBenchSpec, make_decode_runner

        return make_decode_runner(framework, DecodeBenchSpec.from_dict(spec))
    raise ValueError(f"unknown benchmark kind {kind!r}")


def _reply(obj) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(job: dict) -> int:
    pin_threads(job.get("threads"))
    runner = make_runner(job["kind"], job["framework"], job["spec"])
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.get("cmd")
        try:
            if cmd == "exit":
                _reply({"ok": True})
                return 0
            if cmd == "setup":
                _reply(runner.setup())
            elif cmd == "run":
                args = {k: v for k, v in msg.items() if k != "cmd"}
                _reply(runner.run(**args).to_dict())
            elif cmd == "peak":
                from gorilla_jax.bench.peak import matmul_peak

                peak = matmul_peak("jax" if job["framework"] == "jax" else "torch",
                                   dtype=msg.get("dtype", "float32"),
                                   repeats=int(msg.get("repeats", 3)))
                _reply(peak)
            elif cmd == "memory":
                _reply(runner.memory())
            elif cmd == "profile":
                _reply(runner.profile(int(msg["n"]), msg["trace_dir"]))
            else:
                _reply({"error": f"unknown command {cmd!r}"})
        except Exception as e:  # reported to the parent, which raises with the message
            tb = traceback.format_exc().strip().splitlines()
            _reply({"error": f"{type(e).__name__}: {e}", "traceback": tb[-8:]})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return serve(json.loads(argv[0]))


if __name__ == "__main__":
    sys.exit(main())


class WorkerClient:
    """The parent's handle on one worker process (see the module docstring)."""

    def __init__(self, kind: str, framework: str, spec: dict, threads: int | None = None,
                 env: dict | None = None):
        import subprocess
        import tempfile

        self.framework = framework
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        job = json.dumps({"kind": kind, "framework": framework, "spec": spec, "threads": threads})
        from gorilla_jax.host_memory import with_huge_pages

        # every framework's worker gets the same allocator setting (huge pages for big buffers)
        env = with_huge_pages(os.environ if env is None else env)
        self.proc = subprocess.Popen([sys.executable, "-m", "gorilla_jax.bench.worker", job],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, env=env)

    def _stderr_tail(self, n: int = 20) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return "\n".join(lines[-n:])

    def call(self, cmd: str, **kwargs):
        from gorilla_jax.errors import GorillaError

        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                reply = json.loads(line[len(PREFIX):])
                if isinstance(reply, dict) and "error" in reply:
                    detail = "\n".join(reply.get("traceback", []))
                    raise GorillaError(f"{self.framework} benchmark worker, '{cmd}': "
                                       f"{reply['error']}\n{detail}")
                return reply
        self.proc.wait()
        raise GorillaError(f"{self.framework} benchmark worker exited (code {self.proc.returncode}) "
                           f"during '{cmd}':\n{self._stderr_tail()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
