"""Break the code the README's guarantees rest on, one small change at a time, and check that a test notices.

Each mutant in `mutants.toml` names a file, an exact piece of its text (`old`, found exactly once),
what replaces it (`new`), and the tests that must fail. The working tree (tracked and untracked files,
not ignored ones) is copied once to a temporary folder; there, for each mutant, the file is changed,
the listed tests run (first on the copy's PYTHONPATH, so child processes run the mutant too), and the
file is restored. Before any mutant, the same tests run on the unchanged copy and must pass.

Fails (exit 1) when a mutant survives (its tests pass), when its `old` text is no longer found once
(the code moved: re-point the mutant), or when one of its tests is skipped or not found.

    python tests/mutants/run.py              # every mutant
    python tests/mutants/run.py lock wilson  # the mutants whose name contains one of these words
    python tests/mutants/run.py --list
    python tests/mutants/run.py --no-baseline  # right after the whole suite passed (CI)

Why not a general tool: mutmut 3.8 on stats.py alone (81 lines) made 172 mutants and ran them in 36 s
(20 s of CPU) against 25 fast tests, which is fine for a pure module (it found four untested edges,
now tested). But it puts its mutated copy on the test process's sys.path only: a tlfeat that a test
starts as a child process (how the lock, resume, disk and exit-code guarantees are tested) imports
the installed code unless PYTHONPATH is pointed at that copy; and it makes hundreds of mutants per
module, which with these 10-50 s process-level tests is hours, where 25 chosen ones take minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    sys.exit("tests/mutants/run.py needs Python 3.11 or later (tomllib)")

ROOT = Path(__file__).resolve().parents[2]
LIST = Path(__file__).with_name("mutants.toml")
TIMEOUT = 600  # seconds for one pytest run; a mutant that hangs its tests counts as noticed, slowly


@dataclass(frozen=True)
class Mutant:
    name: str
    guarantee: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


@dataclass
class Outcome:
    status: str  # killed, SURVIVED, STALE, ERROR
    detail: str
    seconds: float


def load(path: Path = LIST) -> list[Mutant]:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    mutants = [Mutant(**{**m, "tests": tuple(m["tests"])}) for m in data["mutant"]]
    names = [m.name for m in mutants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"{path}: mutant names used twice: {', '.join(duplicates)}")
    return mutants


def copy_tree(dest: Path) -> None:
    """The working tree as it is (committed or not), without ignored files (venvs, caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        src = ROOT / os.fsdecode(raw)
        if src.is_file():
            target = dest / os.fsdecode(raw)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    site = dest / ".mutant-site"  # imports of tlfeat and tlfeat_cli resolve into the copy, in every process
    site.mkdir()
    (site / "tlfeat").symlink_to(dest / "src" / "tlfeat")
    (site / "tlfeat_cli").symlink_to(dest / "cli")


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(copy / ".mutant-site"), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def pytest(copy: Path, tests: tuple[str, ...], stop_first: bool) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "--no-header", *tests]
    if stop_first:
        cmd.insert(4, "-x")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -1, out, time.perf_counter() - t0
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def skipped(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("SKIPPED")]


def check_imports(copy: Path) -> None:
    where = subprocess.run(
        [sys.executable, "-c", "import tlfeat, tlfeat_cli; print(tlfeat.__file__); print(tlfeat_cli.__file__)"],
        cwd=copy,
        env=environment(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in where):
        raise SystemExit(f"tlfeat is imported from {where}, not from the copy {copy}: mutants would not be seen")


def run_one(copy: Path, mutant: Mutant) -> Outcome:
    path = copy / mutant.file
    text = path.read_text()
    found = text.count(mutant.old)
    if found != 1:
        where = "no longer found" if found == 0 else f"found {found} times"
        return Outcome("STALE", f"old text {where} in {mutant.file}: re-point this mutant", 0.0)
    path.write_text(text.replace(mutant.old, mutant.new))
    try:
        code, output, seconds = pytest(copy, mutant.tests, stop_first=True)
    finally:
        path.write_text(text)
    if skipped(output):
        return Outcome("ERROR", "a listed test was skipped: " + skipped(output)[0], seconds)
    if code == -1:
        return Outcome("killed", f"tests timed out after {TIMEOUT} s", seconds)
    if code == 1:
        failed = [line.split()[1] for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return Outcome("killed", failed[0] if failed else "a test failed", seconds)
    if code == 0:
        return Outcome("SURVIVED", "every listed test passed", seconds)
    tail = "\n".join(output.strip().splitlines()[-5:])
    return Outcome("ERROR", f"pytest exit {code}: {tail}", seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("words", nargs="*", help="only mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (the suite just passed)")
    args = parser.parse_args()
    mutants = [m for m in load() if not args.words or any(w in m.name for w in args.words)]
    if args.list or not mutants:
        for m in mutants:
            print(f"{m.name:32} {m.file:28} {m.guarantee}")
        return 0 if mutants else 1
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tlfeat-mutants-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        check_imports(copy)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            code, output, seconds = pytest(copy, tests, stop_first=False)
            print(f"unmutated: {len(tests)} tests, exit {code}, {seconds:.0f} s", flush=True)
            if code != 0 or skipped(output):
                print(output[-3000:])
                print("the listed tests must pass (and run) on the unchanged code before any mutant means anything")
                return 1
        outcomes = []
        for m in mutants:
            outcome = run_one(copy, m)
            outcomes.append(outcome)
            print(f"{m.name:32} {outcome.status:8} {outcome.seconds:6.1f} s  {outcome.detail}", flush=True)
    bad = [(m, o) for m, o in zip(mutants, outcomes, strict=True) if o.status != "killed"]
    total = time.perf_counter() - t_start
    counts = {s: sum(o.status == s for o in outcomes) for s in ("killed", "SURVIVED", "STALE", "ERROR")}
    print(", ".join(f"{n} {s.lower()}" for s, n in counts.items()) + f"; {len(mutants)} mutants in {total:.0f} s")
    for m, o in bad:
        print(f"{o.status}: {m.name} ({m.file}, {m.guarantee}): {o.detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
