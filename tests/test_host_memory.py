"""Huge pages for large host buffers: the GLIBC_TUNABLES edit and the CLI's one re-execution."""
import os
import subprocess
import sys
from pathlib import Path

from gorilla_jax.host_memory import OPT_OUT, SETTING, with_huge_pages

ROOT = Path(__file__).resolve().parents[1]


def test_with_huge_pages_adds_keeps_and_opts_out():
    assert with_huge_pages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # the user's own value for the tunable stays, and nothing is added twice
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.hugetlb=0"
    assert with_huge_pages(with_huge_pages({}))["GLIBC_TUNABLES"] == SETTING
    assert "GLIBC_TUNABLES" not in with_huge_pages({OPT_OUT: "0"})
    env = {"PATH": "/bin"}
    with_huge_pages(env)
    assert env == {"PATH": "/bin"}  # a copy; the caller's mapping is untouched


def _console(tmp_path, env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    """Run the console entry point (``main()`` without arguments, as the installed script does).
    A sitecustomize on PYTHONPATH prints GLIBC_TUNABLES when a process exits normally; a
    process replaced by exec never gets there, so only the final process reports."""
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "atexit.register(lambda: print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''), flush=True))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    code = "import sys; from gorilla_jax import cli; sys.exit(cli.main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_console_command_reexecutes_once_with_the_tunable(tmp_path):
    done = _console(tmp_path, {}, "--version")
    assert done.returncode == 0, done.stderr
    version = __import__("gorilla_jax").__version__
    assert done.stdout.splitlines() == [f"gorilla-jax {version}", "TUNABLES=glibc.malloc.hugetlb=1"]


def test_console_command_respects_opt_out_and_existing_setting(tmp_path):
    assert _console(tmp_path, {OPT_OUT: "0"}, "--version").stdout.splitlines()[-1] == "TUNABLES="
    kept = _console(tmp_path, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "--version")
    assert kept.stdout.splitlines()[-1] == "TUNABLES=glibc.malloc.hugetlb=0"
