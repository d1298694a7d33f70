"""How the report writes a figure: a cell as median (min–max) of the repetitions, and our cost
as a fraction of another's against a target."""

from __future__ import annotations

import math
import statistics


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], whole: bool = False) -> str:
    """``median (min–max)``, or the one value; thousands separated from 100 up (or always, for
    ``whole`` numbers such as counts), else two decimals."""
    if not values:
        return "–"
    med = statistics.median(values)
    fmt = (lambda v: f"{v:,.0f}") if med >= 100 or whole else (lambda v: f"{v:.2f}")
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


def lowest(medians: dict[str, float]) -> str | None:
    """The name with the lowest median (the cheapest system), ignoring those not measured."""
    measured = {name: value for name, value in medians.items() if not math.isnan(value)}
    return min(measured, key=measured.get) if measured else None


def fraction(ours: float, theirs: float, target: float) -> str:
    """Our cost as a fraction of theirs, ``1/N``, and whether it is at most ``1/target``."""
    if math.isnan(ours) or math.isnan(theirs) or ours <= 0:
        return "– (not measured)"
    times = theirs / ours
    verdict = "met" if times >= target else "not met"
    return f"**1/{times:.1f}** (target ≤ 1/{target:g}: {verdict})"


def share(part: float, whole: float, target_percent: float) -> str:
    """``part`` as a percentage of ``whole``, and whether it reaches ``target_percent``."""
    if math.isnan(part) or math.isnan(whole) or whole <= 0:
        return "– (not measured)"
    percent = 100 * part / whole
    verdict = "met" if percent >= target_percent else "not met"
    return f"**{percent:.0f} %** (target ≥ {target_percent:g} %: {verdict})"
