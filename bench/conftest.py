"""After a benchmark run, print each result as a ratio against its group's baseline.

A benchmark marks itself as its group's baseline with ``benchmark.extra_info["baseline"] = True``.
Ratios are of medians measured in the same run: above 1.0 means slower than the baseline.
Rates (GB/s, frames/s) are derived from ``extra_info["bytes"]`` / ``extra_info["items"]``.
"""

from __future__ import annotations

from collections import defaultdict


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if getattr(b, "stats", None)]
    if not benchmarks:
        return
    groups = defaultdict(list)
    for bench in benchmarks:
        groups[bench.group or "(ungrouped)"].append(bench)
    write = terminalreporter.write_line
    write("")
    write("hintens: medians and ratios against the baseline of each group (same run)")
    for group in sorted(groups):
        members = groups[group]
        base = next((b for b in members if b.extra_info.get("baseline")), None)
        write(f"-- {group}" + (f"  (baseline: {base.name})" if base else ""))
        for bench in sorted(members, key=lambda b: b.stats.median):
            median = bench.stats.median
            ratio = f"{median / base.stats.median:7.3f}x" if base else "      -"
            rate = ""
            if bench.extra_info.get("bytes"):
                rate = f"{bench.extra_info['bytes'] / median / 1e9:8.2f} GB/s"
            elif bench.extra_info.get("items"):
                rate = f"{bench.extra_info['items'] / median / 1e6:8.2f} M/s"
            write(f"   {bench.name:<60} {median * 1e6:12.3f} us {ratio} {rate}")
