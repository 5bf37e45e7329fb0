"""What gpu_check writes to DIR, as it goes: log.txt, gpu_check.json, summary.md.

The JSON and the summary are rewritten (atomically: a temp file renamed over) after every
result, and the log is flushed line by line, so a kill at any point leaves valid files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from . import targets as target_rules

JSON_NAME, SUMMARY_NAME, LOG_NAME, PYTEST_NAME = "gpu_check.json", "summary.md", "log.txt", "pytest.txt"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(value):
    """JSON-safe: NaN/inf as strings, tuples as lists, unknown objects as their repr."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


class Recorder:
    """The results dict and its files; ``log`` prints and appends to log.txt."""

    def __init__(self, out: Path, smoke: bool, stream=None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stream = stream or sys.stdout
        self._log = open(self.out / LOG_NAME, "a", buffering=1)
        self.start = time.monotonic()
        self.results: dict = {"schema": 1, "smoke": smoke, "status": "running", "env": {},
                              "sections": {}, "tests": {}, "compile": {}, "ops": [], "e2e": [],
                              "autotune": [], "targets": []}

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {message}"
        print(line, file=self.stream, flush=True)
        self._log.write(line + "\n")

    def section(self, name: str, **fields) -> None:
        self.results["sections"].setdefault(name, {}).update(fields)
        self.save()

    def save(self) -> None:
        self.results["targets"] = target_rules.evaluate(self.results)
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        _atomic_write(self.out / JSON_NAME, json.dumps(_clean(self.results), indent=1) + "\n")
        _atomic_write(self.out / SUMMARY_NAME, summary(self.results))

    def mark_interrupted(self) -> None:
        """Rows a stopped section left half done."""
        for row in self.results["e2e"]:
            if row.get("status") == "running":
                row["status"] = "interrupted"
        self.save()

    def close(self, status: str) -> None:
        self.mark_interrupted()
        self.results["status"] = status
        self.save()
        self._log.close()


# ---------------------------------------------------------------------------- summary.md
def _f(value, spec=".2f", missing="-"):
    return missing if value is None or isinstance(value, str) else format(value, spec)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def varlen_table(result: dict) -> list[str]:
    """The mixed-size batch (``varlen.run``'s result) as markdown rows: one per path."""
    rows = result["results"]
    base = rows["packed"]["img_per_s"]
    lines = ["| path | ms / batch | img/s | tokens/s | packed speedup vs it | parity |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        parity = row.get("parity")
        check = "-" if parity is None else f"{'ok' if parity['ok'] else 'FAILED'} {parity['max_diff']:.1e}"
        lines.append(f"| {name} | {row['median_ms']:.1f} | {row['img_per_s']:.1f} | {row['tokens_per_s']:.0f} | "
                     f"{base / row['img_per_s']:.2f} | {check} |")
    return lines


def summary(results: dict) -> str:
    """The markdown summary of whatever ``results`` holds so far."""
    env = results.get("env", {})
    lines = [f"# gpu_check{' --smoke' if results.get('smoke') else ''}: {results.get('status')}", ""]
    if results.get("smoke"):
        lines += ["--smoke: CPU, Triton interpreter, tiny fp32 shapes, one round: it checks the code paths;",
                  "its timings and verdicts mean nothing.", ""]
    commit = env.get("commit") or {}
    commit = f"{commit.get('id', '?')[:12]}{' (dirty)' if commit.get('dirty') else ''}" \
        if isinstance(commit, dict) else commit
    lines += [f"- device: {env.get('device', '?')}; date {env.get('date', '?')}; commit {commit}",
              f"- versions: {', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items())}",
              f"- ceilings measured here: copy {_f(env.get('copy_gb_per_s'), '.0f')} GB/s, "
              f"GEMM {_f(env.get('gemm_tflops'), '.0f')} TFLOP/s; MFU uses the datasheet peak "
              f"{_f(env.get('peak_tflops'), '.0f')} TFLOP/s", f"- elapsed {results.get('elapsed_s')} s", ""]
    lines += ["## Sections", ""]
    lines += _table(["section", "status", "budget s", "used s", "note"],
                    [[n, s.get("status", "?"), _f(s.get("budget_s"), ".0f"), _f(s.get("elapsed_s"), ".1f"),
                      s.get("note", "")] for n, s in results.get("sections", {}).items()])
    targets = results.get("targets", [])
    if targets:
        lines += ["## Issue-15 targets", ""]
        lines += _table(["target", "measured", "needed", "verdict"],
                        [[t["target"], _f(t["value"], ".3g"), t["needed"], t["verdict"]] for t in targets])
    tests = results.get("tests", {})
    if tests:
        lines += ["## Tests", "", f"`{tests.get('command', '')}`", "",
                  f"{tests.get('counts', {})}, rc {tests.get('returncode')}, {_f(tests.get('elapsed_s'), '.0f')} s", ""]
        lines += [f"- {t}" for t in tests.get("failed", [])[:30]] + [""]
    comp = results.get("compile", {})
    if comp:
        lines += ["## torch.compile(fast model, fullgraph)", "", f"{comp}", ""]
    ops = results.get("ops", [])
    if ops:
        lines += ["## Per-op (median of interleaved rounds)", ""]
        rows = []
        for case in ops:
            for name, p in case.get("providers", {}).items():
                rows.append([case["case"], case["direction"], case.get("batch") or "", name,
                             _f(p.get("median_us"), ".1f"), _f(p.get("tflops"), ".1f"), _f(p.get("gb_per_s"), ".0f"),
                             _f(case.get("fast_speedup", {}).get(name), ".2f"), p.get("error", "")[:80]])
        lines += _table(["case", "pass", "batch", "provider", "us", "TFLOP/s", "GB/s", "fast speedup vs it",
                         "error"], rows)
    e2e = results.get("e2e", [])
    if e2e:
        lines += ["## End to end", ""]
        rows = [[r["model"], r["mode"], r["batch"], r["provider"], r.get("status"), _f(r.get("img_per_s"), ".0f"),
                 _f(r.get("peak_mem_mb"), ".0f"), _f(r.get("mfu"), ".3f"), _f(r.get("fast_speedup"), ".2f"),
                 (r.get("parity") or "")[:60] + " " + (r.get("reason") or "")[:100]] for r in e2e]
        lines += _table(["model", "mode", "batch", "provider", "status", "img/s", "peak MiB", "MFU",
                         "fast speedup vs it", "parity / note"], rows)
    mixed = results.get("varlen") or {}
    if mixed.get("results"):
        lines += [f"## Mixed-size batch (issue 20): {mixed['images']} images, sides {mixed['sides_px'][0]}-"
                  f"{mixed['sides_px'][1]} px, {mixed['dtype']}; tokens real {mixed['real_tokens']}, padded "
                  f"{mixed['padded_tokens']}, resized to {mixed['resize_hw']} {mixed['resize_tokens']}", ""]
        lines += varlen_table(mixed) + ["", mixed["caveat"], ""]
    tuned = results.get("autotune", [])
    if tuned:
        lines += ["## Autotuner choices", ""]
        lines += _table(["kernel", "key", "config"], [[a["kernel"], a["key"], a["config"]] for a in tuned])
    return "\n".join(lines) + "\n"
