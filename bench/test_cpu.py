"""The bench's CPU accounting and figures: ``.venv/bin/pytest bench/test_cpu.py``."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import fraction, lowest, share, spread  # noqa: E402
from proctree import CLOCK_TICKS, CpuMeter, Stat, parse_stat, tree, tree_ticks  # noqa: E402

# A real line's shape, its command name holding a space and parentheses.
STAT = ("4242 (celery (x) w) S 4000 4242 4000 0 -1 4194560 2000 0 0 0 "
        "150 25 7 3 20 0 3 0 1000 300000000 20000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0")


def test_parse_stat_reads_fields_after_the_last_parenthesis():
    assert parse_stat(STAT) == Stat(ppid=4000, cpu_ticks=150 + 25 + 7 + 3)


def test_parse_stat_of_this_process():
    stat = parse_stat(Path("/proc/self/stat").read_text())
    assert stat.ppid == __import__("os").getppid()


def test_tree_sums_descendants_and_nothing_else():
    stats = {
        1: Stat(ppid=0, cpu_ticks=1000),
        10: Stat(ppid=1, cpu_ticks=5),     # the root
        11: Stat(ppid=10, cpu_ticks=7),    # a pool child
        12: Stat(ppid=11, cpu_ticks=11),   # its child
        20: Stat(ppid=1, cpu_ticks=300),   # a stranger
    }
    assert sorted(tree(stats, [10])) == [10, 11, 12]
    assert tree_ticks(stats, [10]) == 23
    assert tree_ticks(stats, [10, 20]) == 323
    assert tree_ticks(stats, [99]) == 0  # gone


# A parent (the tree's root) whose child burns 0.3 CPU-seconds, then ends and is waited for;
# each step when told, each reported on stdout.
PARENT = """
import subprocess, sys
sys.stdin.readline()
child = subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
child.stdout.readline()
print("burnt", flush=True)
sys.stdin.readline()
child.communicate(b"")
print("ended", flush=True)
sys.stdin.readline()
"""
BURN = """
import sys, time
while time.process_time() < 0.3:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


def test_meter_counts_a_child_while_it_lives_and_after_it_ended():
    parent = subprocess.Popen([sys.executable, "-c", PARENT.replace("BURN", repr(BURN))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        meter = CpuMeter({"tree": [parent.pid]})

        def step() -> str:
            parent.stdin.write("\n")
            parent.stdin.flush()
            return parent.stdout.readline().strip()

        assert step() == "burnt"
        assert meter.seconds()["tree"] >= 0.29  # the live child's own time
        assert step() == "ended"
        assert meter.seconds()["tree"] >= 0.29  # now in its parent's cutime
        step()
    finally:
        parent.kill()
        parent.wait()


def test_spread():
    assert spread([]) == "–"
    assert spread([0.5]) == "0.50"
    assert spread([1200.0, 900.0, 1500.0]) == "1,200 (900–1,500)"
    assert spread([0.4, 0.2, 0.3]) == "0.30 (0.20–0.40)"


def test_lowest_ignores_what_was_not_measured():
    assert lowest({"python-prefork": 12.0, "python-threads": 9.0, "python-gevent": float("nan")}) == "python-threads"
    assert lowest({"python-prefork": float("nan")}) is None


def test_fraction_against_a_target():
    assert fraction(0.5, 12.0, 20) == "**1/24.0** (target ≤ 1/20: met)"
    assert fraction(1.0, 12.0, 20) == "**1/12.0** (target ≤ 1/20: not met)"
    assert fraction(float("nan"), 12.0, 20) == "– (not measured)"


def test_share_against_a_target():
    assert share(85.0, 100.0, 80) == "**85 %** (target ≥ 80 %: met)"
    assert share(70.0, 100.0, 80) == "**70 %** (target ≥ 80 %: not met)"
