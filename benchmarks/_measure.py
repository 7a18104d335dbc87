"""Shared helpers of the benchmark scripts: run a child process and measure its wall time and memory.

Not a test module and not part of the package. The scripts put the checkout on sys.path and on the
children's PYTHONPATH themselves, so they run from a clean checkout without installing anything.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass
class Run:
    """One finished child process."""

    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss: int  # bytes: the kernel's high-water mark of this one child (wait4 ru_maxrss)
    peak_anon: int = 0  # bytes: highest RssAnon seen by polling /proc (0 where /proc is absent)
    peak_file: int = 0  # bytes: highest RssFile seen by polling (file-backed pages, e.g. mmap'd weights)
    stdout: str = ""
    stderr: str = ""
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, anon, file)

    def check(self) -> Run:
        if self.returncode != 0:
            tail = "\n".join((self.stdout + self.stderr).strip().splitlines()[-15:])
            raise SystemExit(f"command failed (exit {self.returncode}): {' '.join(self.cmd)}\n{tail}")
        return self


def child_env(extra: dict[str, str] | None = None, *, pythonpath: bool = True) -> dict[str, str]:
    """os.environ, with the checkout on PYTHONPATH (or no PYTHONPATH at all) and `extra` on top."""
    from opensci_patch._util import procs

    return procs.child_env(extra, source=pythonpath)


def _status_kib(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return anon, file


def run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    poll_s: float = 0.05,
    timeout: float | None = None,
) -> Run:
    """Run `cmd`, returning its wall time, its own peak RSS (os.wait4) and polled RssAnon/RssFile peaks."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        samples: list[tuple[float, int, int]] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                anon, file = _status_kib(proc.pid)
                if anon or file:
                    samples.append((time.perf_counter() - start, anon * 1024, file * 1024))
                done.wait(poll_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        deadline = None if timeout is None else start + timeout
        status = None
        rusage = None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - start
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is reaped
        out.seek(0)
        err.seek(0)
        maxrss = rusage.ru_maxrss if sys.platform == "darwin" else rusage.ru_maxrss * 1024
        return Run(
            cmd,
            proc.returncode,
            wall,
            maxrss,
            max((s[1] for s in samples), default=0),
            max((s[2] for s in samples), default=0),
            out.read(),
            err.read(),
            samples,
        )


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def median(values: list[float]) -> float:
    return statistics.median(values)


def pip_find_links() -> list[str]:
    """PIP_FIND_LINKS and pip.conf find-links, as uv arguments (uv does not read pip's configuration)."""
    from opensci_patch.matrix.torch_links import find_links

    args: list[str] = []
    for link in find_links():
        args += ["--find-links", link]
    return args


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def load_note() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews wall times."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average: n/a"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def make_workdir(path: Path | None, prefix: str) -> tuple[Path, bool]:
    """(`path`, False) once it exists, or (a new temporary directory, True): the caller removes a temporary one."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix=prefix)), True
    path.mkdir(parents=True, exist_ok=True)
    return path, False


def interpreters(versions: list[str], torch_build: str) -> list[tuple[str, str]]:
    """(label, python executable) to measure in: this interpreter, or the per-release env of each version."""
    if not versions:
        try:
            installed = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            installed = "not installed"
        return [(f"this interpreter (transformers {installed})", sys.executable)]
    from opensci_patch.matrix.envs import ensure_env

    say = lambda m: print(f"    {m}", flush=True)  # noqa: E731
    return [(f"env tf{v}-{torch_build}", str(ensure_env(v, torch_build, log=say).python)) for v in versions]
