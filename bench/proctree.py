"""What a process tree costs, read from ``/proc``: CPU time and resident memory summed over a
process and all its descendants (a worker and its pool's children, gunicorn's master and its
workers).

CPU time of a process counts its own (``utime + stime``) and that of its descendants which ended
and were waited for (``cutime + cstime``): a pool child that exits between two readings moves
its time into its parent's counters instead of losing it. A live descendant is not in those
counters yet, so summing the four over the live tree counts everything once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
PROC = Path("/proc")


@dataclass(frozen=True)
class Stat:
    ppid: int
    cpu_ticks: int  # utime + stime + cutime + cstime


def parse_stat(text: str) -> Stat:
    """The parent and CPU ticks from a ``/proc/<pid>/stat`` line."""
    # The command name (field 2) is in parentheses and may hold spaces and parentheses itself:
    # the fields that follow start after the last ")". There, field 3 (state) is index 0.
    fields = text[text.rindex(")") + 1:].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return Stat(ppid=ppid, cpu_ticks=utime + stime + cutime + cstime)


def snapshot() -> dict[int, Stat]:
    """Every process on the machine now."""
    stats = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = parse_stat((entry / "stat").read_text())
            except (FileNotFoundError, ProcessLookupError):
                pass  # it ended while we looked
    return stats


def tree(stats: dict[int, Stat], roots: list[int]) -> list[int]:
    """``roots`` (those still there) and all their descendants in ``stats``."""
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    found, todo = [], [pid for pid in roots if pid in stats]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_ticks(stats: dict[int, Stat], roots: list[int]) -> int:
    return sum(stats[pid].cpu_ticks for pid in tree(stats, roots))


def cpu_seconds(roots: list[int]) -> float:
    """CPU-seconds ``roots`` and their descendants have used so far."""
    return tree_ticks(snapshot(), roots) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MB."""
    total = 0
    for p in tree(snapshot(), [pid]):
        try:
            total += int((PROC / str(p) / "statm").read_text().split()[1]) * PAGE_BYTES
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / (1024 * 1024)


class CpuMeter:
    """CPU-seconds each named group of process trees uses from the meter's start on."""

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups
        self.started = self.ticks()

    def ticks(self) -> dict[str, int]:
        stats = snapshot()
        return {name: tree_ticks(stats, roots) for name, roots in self.groups.items()}

    def seconds(self, ticks: dict[str, int] | None = None) -> dict[str, float]:
        """Since the start, up to ``ticks`` (a reading of :meth:`ticks`) or now."""
        ticks = ticks if ticks is not None else self.ticks()
        return {name: (ticks[name] - self.started[name]) / CLOCK_TICKS for name in self.groups}
