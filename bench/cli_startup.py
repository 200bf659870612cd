"""How fast do the commands that need no model start? Target: well under 0.5 s.

    $ python bench/cli_startup.py [--runs 10]

Each command runs as a fresh process (`python -m ftkit ...`), as a user would run it; the table
shows the median and best wall time over the runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["--version"], ["tasks"], ["tasks", "--json"], ["plugins"], ["tasks", "show", "emotion"]]
EXTRA = [["estimate", "--model", "1.5B", "--seq", "256", "--batch", "4"], ["probe"]]


def time_command(args: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ftkit", *args], capture_output=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"ftkit {' '.join(args)} failed: {done.stderr.decode()}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    from ftkit.cli import main as cli

    commands = COMMANDS + [c for c in EXTRA if c[0] in cli.commands]
    print(f"{'command':<50} {'median s':>9} {'best s':>7}")
    for args in commands:
        times = time_command(args, runs)
        print(f"{'ftkit ' + ' '.join(args):<50} {statistics.median(times):>9.3f} {min(times):>7.3f}")


if __name__ == "__main__":
    main()
