"""The lock (constraints.txt): the exact versions the test suite last passed with, and the checks around it.

    python .ci/lock.py check            # the running environment is the lock, exactly (CI, after installing)
    python .ci/lock.py diff             # what the running environment has that differs from the lock (--latest)
    python .ci/lock.py write FILE       # FILE: the lock of the running environment (refreshing it)
    python .ci/lock.py oldest FILE      # FILE: pyproject's lower bounds as pins (`.ci/run --oldest`)

torch is not in the lock: the README's commands install `torch==2.13.0` (the CPU build) first, and a GPU machine
brings its own build; `check` says which torch it found. distill itself and pip's own tools are left out.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "constraints.txt"
TORCH = "2.13.0"  # the README's pin; keep the three in sync (README, .ci/run, here)
UNLOCKED = {"distill", "pip", "setuptools", "wheel", "torch"}

HEADER = f"""\
# The exact versions the test suite (`python -m pytest -q`) last passed with: Python 3.11, Linux x86_64, CPU torch.
# Install through it (the README's commands and .ci/run do):
#     pip install torch=={TORCH} && pip install -c constraints.txt -e ".[test]"
# torch is not listed: it is installed first, at {TORCH}. To refresh, run `bash .ci/run --latest`; when it passes it
# leaves the lock of what it tested in .ci-venv-latest/constraints.txt: read `python .ci/lock.py diff`'s list,
# copy that file here and commit it with the versions that changed in the message (docs/install.md).
"""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) not in UNLOCKED:
            found[normalize(name)] = dist.version
    return found


def read_lock(path: Path = LOCK) -> dict[str, str]:
    if not path.is_file():
        raise SystemExit(f"{path}: no lock here (python .ci/lock.py write {path.name} writes one)")
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version:
            raise SystemExit(f"{path}:{number}: expected NAME==VERSION, got {line!r}")
        pins[normalize(name)] = version.strip()
    return pins


def lower_bounds() -> dict[str, str]:
    """name -> version of every `name>=version` among pyproject's core dependencies, torch and triton aside (torch
    is held at its pin, triton comes with it)."""
    import tomllib

    project = tomllib.loads((LOCK.parent / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", requirement.split(";")[0].strip())
        if match and normalize(match[1]) not in ("torch", "triton"):
            pins[normalize(match[1])] = match[2]
    return pins


def differences(have: dict[str, str], lock: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(have) | set(lock)):
        if name not in lock:
            lines.append(f"  {name} {have[name]}: not in the lock")
        elif name not in have:
            lines.append(f"  {name}: locked at {lock[name]}, not installed")
        elif have[name] != lock[name]:
            lines.append(f"  {name} {have[name]}: locked at {lock[name]}")
    return lines


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("check", "diff", "write", "oldest"):
        print(__doc__, file=sys.stderr)
        return 2
    command = argv[0]
    if command == "oldest":
        if len(argv) != 2:
            print("usage: python .ci/lock.py oldest FILE", file=sys.stderr)
            return 2
        pins = lower_bounds()
        Path(argv[1]).write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
        print(f"wrote {argv[1]}: " + ", ".join(f"{n}=={v}" for n, v in pins.items()))
        return 0
    if command == "write":
        if len(argv) != 2:
            print("usage: python .ci/lock.py write FILE", file=sys.stderr)
            return 2
        pins = "".join(f"{name}=={version}\n" for name, version in sorted(installed().items()))
        Path(argv[1]).write_text(HEADER + pins)
        print(f"wrote {argv[1]}: {len(installed())} packages")
        return 0
    torch_version = metadata.version("torch")
    lines = differences(installed(), read_lock())
    if command == "diff":
        print(f"torch {torch_version} (held at the README's pin, {TORCH}); against {LOCK.name}:")
        print("\n".join(lines) if lines else "  nothing differs")
        return 0
    problems = list(lines)
    if torch_version.split("+")[0] != TORCH:
        problems.append(f"  torch {torch_version}: the README pins {TORCH}")
    if problems:
        print(f"the environment is not {LOCK.name}:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    print(f"environment = {LOCK.name} ({len(read_lock())} packages) + torch {torch_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
