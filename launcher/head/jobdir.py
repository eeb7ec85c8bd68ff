"""Where a detached job lives on the head's machine: one private directory per job, under the user's state directory.

``$XDG_STATE_HOME/launcher/jobs/<job id>/`` (``~/.local/state`` without it),
0700, holding: ``job.json`` (what was started, by which head pid, when),
``head.log`` (everything the head said), ``logs/rank-N.log`` (each rank's
output, earlier attempts numbered), ``control.sock`` (the running head's
socket, 0600), ``alive`` (touched by the running head every few seconds:
when it stopped being touched is when a killed head was lost) and, once the
job has ended, ``result.json`` (its ``launcher.result/1`` document). ``ps``,
``status``, ``logs`` and ``stop`` read these; any unique prefix of a job id
names the job.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import NamedTuple

ALIVE_EVERY = 2.0  # seconds between the running head's touches of ``alive``


class JobDirError(Exception):
    """No such job, an ambiguous prefix, a state directory that is not ours; str() is one line with the fix."""


class JobRecord(NamedTuple):
    """What was started: enough for ``ps`` without asking the head. (A NamedTuple and json, not msgspec: ``status``
    loads this module alone, and msgspec's import was a third of its time.)"""

    job_id: str
    pid: int  # the head's
    started: float  # wall clock (time.time())
    command: list[str]  # the launcher's own argv
    hosts: int
    ranks: int


def state_root(env: Mapping[str, str] = os.environ) -> str:
    base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "launcher", "jobs")


class JobDir:
    def __init__(self, root: str, job_id: str):
        self.root, self.job_id = root, job_id
        self.path = os.path.join(root, job_id)
        self.record_path = os.path.join(self.path, "job.json")
        self.log_path = os.path.join(self.path, "head.log")
        self.rank_logs = os.path.join(self.path, "logs")
        self.socket_path = os.path.join(self.path, "control.sock")
        self.alive_path = os.path.join(self.path, "alive")
        self.result_path = os.path.join(self.path, "result.json")

    # --- the head's side ------------------------------------------------------------------------------

    def create(self, record: JobRecord) -> None:
        """Make the job's private directory and write its record (the state root too, 0700, if missing)."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        info = os.lstat(self.root)
        if info.st_uid != os.getuid() or not os.path.isdir(self.root) or os.path.islink(self.root):
            raise JobDirError(f"{self.root} is not a directory of this user; set XDG_STATE_HOME to one that is")
        os.mkdir(self.path, 0o700)
        os.mkdir(self.rank_logs, 0o700)
        self.write_record(record)

    def write_record(self, record: JobRecord) -> None:
        _write_private(self.record_path, json.dumps(record._asdict()).encode())

    def write_result(self, document: dict) -> None:
        _write_private(self.result_path, json.dumps(document).encode())

    def touch_alive(self) -> None:
        with open(os.open(self.alive_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "wb"):
            pass
        os.utime(self.alive_path)

    # --- everyone else's side -------------------------------------------------------------------------

    def record(self) -> JobRecord | None:
        try:
            with open(self.record_path) as f:
                return JobRecord(**json.load(f))
        except (OSError, ValueError, TypeError):
            return None

    def result(self) -> dict | None:
        try:
            with open(self.result_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def state(self) -> tuple[str, float | None]:
        """('running', None), ('ended', when) or ('lost', when the head was last seen alive)."""
        if os.path.exists(self.result_path):
            return "ended", os.path.getmtime(self.result_path)
        record = self.record()
        if record is not None and _alive(record.pid):
            return "running", None
        try:
            return "lost", os.path.getmtime(self.alive_path)
        except OSError:
            return "lost", os.path.getmtime(self.path) if os.path.exists(self.path) else None


def every_job(root: str) -> list[JobDir]:
    """This user's jobs on this machine, oldest first."""
    try:
        names = [n for n in os.listdir(root) if len(n) == 16 and all(c in "0123456789abcdef" for c in n)]
    except OSError:
        return []
    jobs = [JobDir(root, n) for n in names]
    return sorted(jobs, key=lambda j: (j.record().started if j.record() else 0.0, j.job_id))


def find(root: str, prefix: str | None) -> JobDir:
    """The job a (unique) id prefix names; without one, the only running job, or the newest."""
    jobs = every_job(root)
    if not jobs:
        raise JobDirError(f"no jobs in {root}; start one with launcher run --detach")
    if prefix is None:
        running = [j for j in jobs if j.state()[0] == "running"]
        return (running or jobs)[-1]
    matches = [j for j in jobs if j.job_id.startswith(prefix.lower())]
    if not matches:
        raise JobDirError(f"no job {prefix!r} in {root}; launcher ps lists them")
    if len(matches) > 1:
        raise JobDirError(f"job {prefix!r} is ambiguous ({', '.join(j.job_id for j in matches[:5])}); give more of its id")
    return matches[0]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _write_private(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, 0600, never through a planted link."""
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def age(seconds_since_epoch: float) -> str:
    """How long ago, for people: '3s', '5m', '2h', '4d'."""
    ago = max(0.0, time.time() - seconds_since_epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if ago >= size:
            return f"{ago / size:.0f}{unit}"
    return f"{ago:.0f}s"
