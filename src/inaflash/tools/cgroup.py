"""Run a command under a memory limit on the whole process: a cgroup-v1 child of this process's own memory cgroup.

Pages cached before the limited run are charged to whoever read them first, so callers evict the model file from
the page cache first (`evict_from_page_cache`).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InaflashError

CGROUP_V1 = Path("/sys/fs/cgroup/memory")


class CgroupUnavailable(InaflashError):
    pass


def own_memory_cgroup() -> Path:
    """This process's cgroup-v1 memory directory, or CgroupUnavailable saying why not."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as e:
        raise CgroupUnavailable(f"cannot read /proc/self/cgroup: {e}") from None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = CGROUP_V1 / path.lstrip("/")
            if not (directory / "memory.limit_in_bytes").exists():
                raise CgroupUnavailable(f"{directory} has no memory.limit_in_bytes (not a cgroup-v1 memory "
                                        "hierarchy)")
            if not os.access(directory, os.W_OK):
                raise CgroupUnavailable(f"cannot create a memory cgroup under {directory}: not writable "
                                        "(needs root or a delegated cgroup)")
            return directory
    raise CgroupUnavailable("no cgroup-v1 memory controller for this process (/proc/self/cgroup has no memory line; "
                            "cgroup v2-only systems are not supported)")


@dataclass
class LimitedRun:
    returncode: int
    stdout: str
    stderr: str
    limit_bytes: int
    max_usage_bytes: int  # the cgroup's peak charge (process memory + page cache it read)
    oom_killed: bool
    seconds: float


def run_limited(cmd: list[str], limit_bytes: int, timeout: float, name: str = "inaflash-limit",
                env: dict | None = None) -> LimitedRun:
    """Run `cmd` in a fresh child cgroup limited to `limit_bytes` (swap too, where the kernel accounts it)."""
    parent = own_memory_cgroup()
    group = parent / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
    except OSError as e:
        raise CgroupUnavailable(f"cannot create {group}: {e}") from None
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            try:
                swap.write_text(str(limit_bytes))
            except OSError:
                pass
        # a shell joins the group, then execs the command: limited from its first byte (a preexec_fn would do
        # the same but is unsafe in a process with threads, as torch's)
        enter = ['sh', '-c', 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *cmd]
        t0 = time.perf_counter()
        p = subprocess.Popen(enter, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        seconds = time.perf_counter() - t0
        oom = "oom_kill 1" in _read(group / "memory.oom_control") or p.returncode == -9
        usage = int(_read(group / "memory.max_usage_in_bytes") or 0)
        return LimitedRun(p.returncode, out, err, limit_bytes, usage, oom, seconds)
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def evict_from_page_cache(path: str | Path) -> None:
    """Drop a file's cached pages (so a limited run reads it from the device and is charged for it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
