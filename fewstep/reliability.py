"""Losing no progress and failing loudly: exit codes, stop signals, the run-folder lock, resume config
checks and the non-finite guard's helpers (docs/RELIABILITY.md).

Only the standard library at import time (the CLI imports this module before torch).
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

# Exit codes of `fewstep distill` (README "Exit codes"). 75 is EX_TEMPFAIL of sysexits.h: "try again later";
# 143 (128 + SIGTERM) would be ambiguous with a process killed before it could write anything.
EXIT_OK = 0
EXIT_USAGE = 2  # a bad recipe, argument or input file, found before or during the run: one message, no traceback
EXIT_DIVERGED = 3  # non-finite loss, gradients or weights: stopped; the last finite checkpoint is kept
EXIT_RESUMABLE = 75  # stopped early on request (SIGTERM, SIGUSR1, Ctrl-C, train.max_wall_s): checkpoint written
EXIT_ABORTED = 130  # a second Ctrl-C: stopped at once, progress since the last checkpoint is lost


def is_main_process() -> bool:
    """Whether this is the process that prints and writes files, known before accelerate starts: RANK is set
    by torchrun and accelerate launch for every process of a multi-process run."""
    return int(os.environ.get("RANK", "0")) == 0


class RunStopped(Exception):
    """Training stopped early at a step boundary after writing a checkpoint; ``--resume`` continues it."""

    def __init__(self, reason: str, nimg: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by {reason} at {nimg} images; checkpoint {checkpoint} written; continue with "
                         "the same command plus --resume")
        self.reason, self.nimg, self.checkpoint = reason, nimg, checkpoint


class NonFiniteError(RuntimeError):
    """Non-finite loss, gradients or weights under ``train.nonfinite: stop`` (or after too many skips)."""


class RunLockError(RuntimeError):
    """Another process holds the run folder."""


# ------------------------------------------------------------------------------------------ signals
class StopSignals:
    """Turns SIGTERM, SIGUSR1 (what SLURM sends before pre-emption with ``--signal``) and a first Ctrl-C into
    a request to stop at the next step boundary; a second Ctrl-C raises KeyboardInterrupt at once.

    A context manager: handlers are installed on entry (main thread only: Python delivers signals
    there) and the previous ones restored on exit. ``received`` is the first signal's name, or None."""

    NAMES = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if (sig := getattr(signal, name, None)) is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received is not None:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = name
            if not is_main_process():
                return
            hint = " (Ctrl-C again to abort without one)" if name == "SIGINT" else ""
            print(f"fewstep: {name}: writing a checkpoint at the next step boundary, then stopping{hint}",
                  file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ lock
class RunLock:
    """An advisory lock on a run folder (``RUN/run.lock``, flock) recording the owner's pid, host and start
    time. The kernel drops a flock when its process dies (also on kill -9), so a lock file whose owner is gone
    is taken over; the file's leftover owner record says so. On network file systems flock's reliability
    depends on the server (unverified here: tested on local disks only)."""

    NAME = "run.lock"

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None
        self.stale_owner: dict[str, Any] | None = None  # the previous owner when its lock was taken over

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            owner = _read_owner(self.path)
            who = (f"pid {owner.get('pid')} on host {owner.get('host')} (since {owner.get('started')})"
                   if owner else "another process")
            raise RunLockError(f"run folder {self.path.parent} is in use by {who}; wait for that run to finish, "
                               "stop it, or pass another --run-dir") from None
        self.stale_owner = _read_owner(self.path)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file means "released cleanly"; a record left behind means stale
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text().strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------ resume
# Fields that a resumed run may change without breaking exact replay: they change what is logged, kept or
# evaluated, or where the work runs, never the images, noise or maths of a step.
REPLAY_SAFE = ("train.progress_bar", "train.log_every_nimg", "train.checkpoint_every_nimg",
               "train.checkpoint_every_s", "train.max_wall_s", "train.keep_checkpoints", "train.nonfinite",
               "train.max_nonfinite_skips", "train.cpu", "train.gradient_checkpointing",
               "validation.", "export.", "eval.")
CHANGES_FILE = "config-changes.jsonl"
_ABSENT = "(absent)"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Every leaf field that differs between two resolved configs, with whether it is replay-safe."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        before, after = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if key == "data.class_conditional" and {before, after} <= {False, None}:
            continue  # runs written before it defaulted to None (follow the teacher) saved false for the same run
        if before != after:
            safe = any(key == f or (f.endswith(".") and key.startswith(f)) for f in REPLAY_SAFE)
            changes.append({"field": key, "old": before, "new": after, "replay_safe": safe})
    return changes


def check_resume_config(run_dir: Path, new: dict[str, Any], *, allow_change: bool, checkpoint: str | None,
                        record: bool = True, length_use: str | None = None) -> list[dict[str, Any]]:
    """Compare a resumed run's resolved config with ``RUN/config.yaml`` (which is never rewritten).

    Raises ConfigError for changes that break exact replay unless ``allow_change``; records (when ``record``)
    every accepted change as one JSON line in ``RUN/config-changes.jsonl`` and returns them. ``length_use``: what
    the method reads from ``train.total_nimg`` (``MethodConfig.run_length_use``), named in the refusal when the
    length changes."""
    from fewstep.config import ConfigError

    saved_path = Path(run_dir) / "config.yaml"
    saved: dict[str, Any] = {}
    if saved_path.is_file():
        try:
            saved = yaml.safe_load(saved_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{saved_path} (the run's original config) is not valid YAML: {exc}; restore it, or "
                              "start a new run with another --run-dir") from None
    elif not allow_change:
        raise ConfigError(f"--resume: {saved_path} (the run's original config) is missing, so the recipe cannot "
                          "be checked against the run; restore it, or pass --allow-config-change to accept this "
                          "recipe as the run's")
    changes = config_changes(saved, new)
    breaking = [c for c in changes if not c["replay_safe"]]
    if breaking and not allow_change:
        listed = "\n  ".join(f"{c['field']}: {c['old']!r} -> {c['new']!r}" for c in breaking)
        length = length_change_note(changes, new, length_use)
        length = f"{length}\n" if length else ""
        raise ConfigError(f"--resume: the recipe differs from the run's {saved_path} in fields that change the "
                          f"images, noise or maths of later steps, so the run would no longer replay exactly:\n  "
                          f"{listed}\n{length}resume with the original settings, or pass --allow-config-change to "
                          f"accept them (recorded in {Path(run_dir) / CHANGES_FILE})")
    changes_path = Path(run_dir) / CHANGES_FILE
    if record and (changes or changes_path.is_file()):  # an empty line: this resume is back to config.yaml
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": checkpoint, "changes": changes}
        with open(changes_path, "a") as f:
            f.write(json.dumps(line) + "\n")
    return changes


def length_change_note(changes: list[dict[str, Any]], new: dict[str, Any], length_use: str | None) -> str | None:
    """A sentence for a resume that changes ``train.total_nimg`` of a method that reads it, else None."""
    change = next((c for c in changes if c["field"] == "train.total_nimg"), None)
    if change is None or length_use is None:
        return None
    return (f"train.total_nimg {change['old']} -> {change['new']}: method {new['method']['name']} reads the run's "
            f"length ({length_use}), so the steps already taken followed the old length and the resumed run is not "
            "the run a fresh start with the new length makes")


def current_config(run_dir: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """The run's config as its last resume left it: ``saved`` (``RUN/config.yaml``, the original) with the changes
    of the last line of ``RUN/config-changes.jsonl`` (each line holds every difference between that resume's
    recipe and the original, so the last one alone is the current run; an empty line is the original again)."""
    path = Path(run_dir) / CHANGES_FILE
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    if not lines:
        return saved
    try:
        changes = json.loads(lines[-1])["changes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: the last line is not a record of `--resume --allow-config-change` ({exc}); "
                         "restore it, or delete the file to rebuild the run from config.yaml alone") from None
    data = copy.deepcopy(saved)
    for change in changes:  # sorted by field, so a section is replaced before its own fields are set
        *parents, leaf = change["field"].split(".")
        removed = change["new"] == _ABSENT
        node: Any = data
        for part in parents:
            key = _key(node, part)
            if not isinstance(node.get(key), dict):
                if removed:  # the section became a scalar, set by an earlier change
                    break
                node[key] = {}  # a scalar became a section, or a new section
            node = node[key]
        else:
            if removed:
                node.pop(_key(node, leaf), None)
            else:
                node[_key(node, leaf)] = change["new"]
    return data


def _key(node: dict[Any, Any], part: str) -> Any:
    """The key of ``node`` that the flattened field name ``part`` stands for (YAML keeps integer keys, such as a
    step count's, as integers; ``_flatten`` writes them as text, so a new all-digit key is read back as YAML
    would read it: an integer)."""
    return next((k for k in node if str(k) == part), int(part) if part.isdecimal() else part)


# ------------------------------------------------------------------------------------------ non-finite
def nonfinite_tensors(named: dict[str, Any]) -> list[str]:
    """Names of the tensors in ``named`` (name -> tensor) holding a NaN or an infinity. One host sync for the
    whole set, then one per tensor only when something is wrong."""
    import torch

    tensors = {k: t for k, t in named.items() if t.is_floating_point() and t.numel()}
    if not tensors:
        return []
    if bool(torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all()):
        return []
    return [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
