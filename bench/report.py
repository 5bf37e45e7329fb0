"""Markdown report of a pytest-benchmark JSON file: every provider against "eager".

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    python bench/report.py bench.json [-o bench.md]

Follows the conventions of ``benchutil``: ``group`` names one comparison,
``extra_info["provider"]`` what was timed, ``"eager"`` is the baseline. The speedup of a
provider is the eager median time divided by its median time, both from the same run and
group (> 1: faster than eager). Medians, not means: on a shared VM a few rounds stall
(the host steals the CPU), and one stalled round moves a mean by more than the
differences being measured. Derived figures (img/s, TFLOP/s, GB/s, peak memory)
come from ``extra_info``. The output opens with the run's conditions (date, machine,
commit), then a summary (one row per group, one column per provider), then a table per
group.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINE = "eager"
# extra_info key -> (column title, format)
FIGURES = {
    "img_per_s": ("img/s", "{:.1f}"),
    "tflops": ("TFLOP/s", "{:.3g}"),
    "gb_per_s": ("GB/s", "{:.3g}"),
    "peak_mem_mb": ("peak MiB", "{:.0f}"),
    "parity_max_diff": ("max abs diff", "{:.2e}"),
}


def load(path) -> dict:
    """Read and sanity-check a ``--benchmark-json`` file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no benchmark JSON at {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list); "
                         "write one with `pytest bench/ --benchmark-only --benchmark-json=FILE`")
    return data


def _provider(bench: dict) -> str:
    return (bench.get("extra_info") or {}).get("provider") or bench.get("name", "?")


def _median(bench: dict) -> float:
    stats = bench["stats"]
    return stats.get("median", stats["mean"])


def _interleaved(bench: dict) -> dict | None:
    """Per-provider figures of a benchmark that timed its providers interleaved (the model
    benchmarks: one benchmark per case, ``extra_info["interleaved"]``), else None."""
    return (bench.get("extra_info") or {}).get("interleaved")


def groups(data: dict) -> dict[str, list[dict]]:
    """Benchmarks by group, the baseline first, then fastest first; each with 'speedup'.
    Interleaved benchmarks are left out (``render_interleaved`` reports them)."""
    out: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        if _interleaved(bench) is not None:
            continue
        out.setdefault(bench.get("group") or bench.get("name", "?"), []).append(dict(bench))
    for rows in out.values():
        base = next((b for b in rows if _provider(b) == BASELINE), None)
        for bench in rows:
            median = _median(bench)
            bench["speedup"] = _median(base) / median if base and median > 0 else None
        rows.sort(key=lambda b: (_provider(b) != BASELINE, _median(b)))
    return dict(sorted(out.items()))


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (TypeError, ValueError):
        return str(value)


def _speedup(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _conditions(data: dict) -> list[str]:
    machine = data.get("machine_info") or {}
    commit = data.get("commit_info") or {}
    cpu = machine.get("cpu") or {}
    cpu_name = cpu.get("brand_raw") or cpu.get("brand") or machine.get("processor") or "?"
    devices = sorted({str((b.get("extra_info") or {}).get("device")) for b in data["benchmarks"]
                      if (b.get("extra_info") or {}).get("device")})
    lines = [f"- date: {data.get('datetime', '?')}",
             f"- machine: {machine.get('node', '?')}, {cpu_name}, {cpu.get('count', '?')} CPUs, "
             f"{machine.get('system', '?')} {machine.get('release', '')}".rstrip(),
             f"- python {machine.get('python_version', '?')}, "
             f"pytest-benchmark {data.get('version', '?')}"]
    if devices:
        lines.append(f"- device: {', '.join(devices)}")
    if commit.get("id"):
        dirty = " (uncommitted changes)" if commit.get("dirty") else ""
        lines.append(f"- commit: {commit['id'][:12]}{dirty} on {commit.get('branch', '?')}")
    return lines


def _ratio(stats: dict | None, name: str) -> str:
    if name == BASELINE:
        return "baseline"
    if not stats:
        return "-"
    verdict = "" if stats["rankable"] else " (too wide)"
    return f"{stats['median']:.2f}x [{stats['q1']:.2f}-{stats['q3']:.2f}]{verdict}"


def render_interleaved(data: dict) -> list[str]:
    """Markdown sections of the interleaved benchmarks: per case, one row per provider."""
    lines = []
    for bench in data["benchmarks"]:
        rows, extra = _interleaved(bench), bench.get("extra_info") or {}
        if rows is None:
            continue
        flags = " ".join(extra.get("cpu_flags") or []) or "-"
        where = f"{extra.get('threads', '?')} threads; CPU flags: {flags}; peak memory: {extra.get('memory_kind')}"
        lines += ["", f"## {bench.get('group') or bench.get('name')} (interleaved)", "", where, "",
                  "| provider | img/s | TFLOP/s | vs eager: median [q1-q3] | rounds | peak MiB | max abs diff "
                  "| status |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, row in rows.items():
            status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
            lines.append(f"| {name} | {_fmt(row.get('img_per_s'), '{:.1f}')} | {_fmt(row.get('tflops'), '{:.3g}')} | "
                         f"{_ratio(row.get('vs_eager'), name)} | {row.get('rounds') or '-'} | "
                         f"{_fmt(row.get('peak_mem_mb'), '{:.0f}')} | {_fmt(row.get('parity_max_diff'), '{:.2e}')} | "
                         f"{status} |")
        for name, reason in (extra.get("left_out") or {}).items():
            lines.append(f"| {name} | - | - | - | - | - | - | left out: {reason} |")
    return lines


def render(data: dict) -> str:
    """The markdown report of a loaded pytest-benchmark JSON document."""
    by_group = groups(data)
    interleaved = render_interleaved(data)
    if not by_group and not interleaved:
        return "# Benchmark report\n\nNo benchmarks in this file (were they all skipped?).\n"
    if not by_group:
        return "\n".join(["# Benchmark report", "", *_conditions(data), *_INTERLEAVED_NOTE, *interleaved]) + "\n"
    providers = []
    for rows in by_group.values():
        for bench in rows:
            if _provider(bench) not in providers:
                providers.append(_provider(bench))
    providers.sort(key=lambda p: p != BASELINE)
    lines = ["# Benchmark report", "", *_conditions(data), "",
             f"Speedup = median time of `{BASELINE}` / median time of the provider, same group, same run "
             "(higher is faster).", "",
             "## Summary: speedup vs eager", "",
             "| group | " + " | ".join(providers) + " |",
             "| --- | " + " | ".join("---:" for _ in providers) + " |"]
    for name, rows in by_group.items():
        cells = {_provider(b): _speedup(b["speedup"]) for b in rows}
        lines.append(f"| {name} | " + " | ".join(cells.get(p, "") for p in providers) + " |")
    for name, rows in by_group.items():
        figures = [k for k in FIGURES if any((b.get("extra_info") or {}).get(k) is not None for b in rows)]
        lines += ["", f"## {name}", ""]
        if not any(_provider(b) == BASELINE for b in rows):
            lines += [f"(no `{BASELINE}` baseline in this group: no speedups)", ""]
        head = ["provider", "mean ms", "stddev ms", "median ms", "rounds", "speedup vs eager"]
        head += [FIGURES[k][0] for k in figures]
        lines += ["| " + " | ".join(head) + " |", "| --- | " + " | ".join("---:" for _ in head[1:]) + " |"]
        for bench in rows:
            stats, extra = bench["stats"], bench.get("extra_info") or {}
            cells = [_provider(bench), f"{stats['mean'] * 1e3:.3f}", f"{stats.get('stddev', 0) * 1e3:.3f}",
                     f"{stats.get('median', stats['mean']) * 1e3:.3f}", str(stats.get("rounds", "?")),
                     _speedup(bench["speedup"])]
            cells += [_fmt(extra.get(k), FIGURES[k][1]) for k in figures]
            lines.append("| " + " | ".join(cells) + " |")
    if interleaved:
        lines += [*_INTERLEAVED_NOTE, *interleaved]
    return "\n".join(lines) + "\n"


_INTERLEAVED_NOTE = ["", "# Interleaved benchmarks", "",
                     "Each round times one step of every provider in turn; img/s from the median step; "
                     "vs eager: the median of the per-round ratios (eager step time / provider step time) "
                     "and their quartiles; \"too wide\" when the quartiles contain 1 (the rounds do not "
                     "agree which is faster)."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("-o", "--output", help="write the markdown here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        text = render(load(args.json))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
