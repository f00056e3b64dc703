"""What a run is: its label (default: the workload file's stem) and the metadata every Result records (package
version, git commit, date, command line, hardware profile name and content hash)."""

from __future__ import annotations

import datetime
import hashlib
import json
import shlex
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from alisa_sim.hardware import HardwareProfile

PACKAGE = "alisa"
REPO_ROOT = Path(__file__).resolve().parent.parent
_command: list[str] | None = None
_last_profile_hash: tuple[HardwareProfile, str] | None = None


def record_command(program: str, argv: list[str]) -> None:
    """The command line a CLI entry point was given (main(argv) may be called without sys.argv, as in tests)."""
    global _command
    _command = [program, *argv]


@lru_cache(maxsize=1)
def package_version() -> str | None:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> dict | None:
    """{"commit", "dirty"} of the checkout the code runs from, or None outside a git checkout (an installed copy)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def profile_hash(profile: HardwareProfile) -> str:
    """sha256 of the profile's canonical JSON: two Results share it only when every number of the profile agrees.
    The last profile's hash is kept: sweeps and calibrations build many Results of one profile in a row."""
    global _last_profile_hash
    if _last_profile_hash is None or _last_profile_hash[0] is not profile:
        text = json.dumps(profile.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        _last_profile_hash = (profile, hashlib.sha256(text.encode()).hexdigest())
    return _last_profile_hash[1]


def run_metadata(profile: HardwareProfile, device: str | None = None) -> dict:
    """The `run` block of a Result; `device` "cpu" or "gpu" (default: the profile's)."""
    command = _command if _command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]
    return {
        "version": package_version(),
        "git": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command),
        "profile": {"name": profile.name, "sha256": profile_hash(profile)},
        "device": device or ("cpu" if profile.device_kind == "cpu" else "gpu"),
    }


def default_label(workload_path: str | Path) -> str:
    """A run's label when none is given: a Result or plan JSON's own label, else the workload file's stem."""
    path = Path(workload_path)
    if path.suffix == ".json":
        try:
            label = json.loads(path.read_text()).get("label")
        except (OSError, ValueError, AttributeError):
            label = None
        if isinstance(label, str) and label:
            return label
    return path.stem
