"""Reusable benchmark harness: fresh subprocess per case, interleaved repetitions, medians of ratios.

The method follows PERF_BASELINE.md (how the reference numbers were measured):

- every case runs in a **fresh subprocess** with ``--threads 1`` (``OMP/MKL_NUM_THREADS=1`` in its environment
  and ``torch.set_num_threads(1)``), so cases do not share allocator state, caches or thread pools;
- inside a case the **variants are interleaved** per repetition (order rotated each repetition) after a warm-up,
  and each is timed with **process CPU time** (the primary clock on a shared machine) and wall time;
- cases that are compared run **side by side in rounds** (ABBA order: the order is reversed every other round)
  so that drift of the machine affects both;
- ratios are **medians of per-repetition or per-round ratios** between numbers measured side by side, never
  quotients of medians taken at different times.

A benchmark script uses this module twice:

- as the *driver* (parent): :func:`run_rounds` / :func:`run_worker` start ``python script.py <args> --worker
  --threads 1 --result <file>`` and collect the JSON each worker writes;
- as the *worker* (child): :func:`worker_setup` pins threads, :func:`interleaved_reps` times the variants,
  :func:`write_result` writes the JSON.

Summaries: :func:`median`, :func:`median_ratio`, :func:`per_round_ratio`, :func:`markdown_table`. Nothing here
knows about adapters, so later cases (train, generate, inject, io, import, merge) reuse it unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: environment every worker gets (single-threaded math libraries, no network)
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# ------------------------------------------------------------------------------------------ driver side
def run_worker(script: str | Path, args: Sequence[str], *, threads: int = 1, timeout: float | None = None,
               env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``python script <args> --worker --threads N --result <tmp>`` in a fresh process; return its JSON.

    Raises ``RuntimeError`` (with the worker's stderr tail) if it exits non-zero or writes no result.
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *args, "--worker", "--threads", str(threads), "--result", str(result_path)]
        full_env = {**os.environ, **WORKER_ENV, **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
        full_env.update(env or {})
        proc = subprocess.run(cmd, check=False, env=full_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result_path.exists():
            tail = (proc.stderr or proc.stdout)[-4000:]
            raise RuntimeError(f"worker {' '.join(cmd[1:])} exited with {proc.returncode}:\n{tail}")
        return json.loads(result_path.read_text())


@dataclass
class Job:
    """One case to run in a worker: ``key`` identifies it in the results (e.g. ``("peft", 16)``)."""

    key: tuple[Any, ...]
    args: list[str]


@dataclass
class RoundResults:
    """``results[key]``: one worker result per round, in round order."""

    results: dict[tuple[Any, ...], list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, key: tuple[Any, ...], result: dict[str, Any]) -> None:
        self.results.setdefault(key, []).append(result)

    def __getitem__(self, key: tuple[Any, ...]) -> list[dict[str, Any]]:
        return self.results[key]


def run_rounds(script: str | Path, groups: Sequence[Sequence[Job]], rounds: int, *, threads: int = 1,
               timeout: float | None = None, log: Callable[[str], None] | None = None) -> RoundResults:
    """Run every group of jobs ``rounds`` times, each job in a fresh worker.

    Jobs of one group are compared with each other: they run back to back, in the given order in even rounds and
    reversed in odd rounds (ABBA), so slow drift of the machine affects all of them alike. Rounds are the outer
    loop, so the repetitions of one group are spread over the whole run.
    """
    out = RoundResults()
    for r in range(rounds):
        for group in groups:
            ordered = list(group) if r % 2 == 0 else list(reversed(group))
            for job in ordered:
                start = time.perf_counter()
                result = run_worker(script, job.args, threads=threads, timeout=timeout)
                result.setdefault("round", r)
                out.add(job.key, result)
                if log is not None:
                    log(f"round {r + 1}/{rounds} {job.key}: {time.perf_counter() - start:.1f} s")
    return out


# ------------------------------------------------------------------------------------------ worker side
def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """The flags :func:`run_worker` passes (``--worker --threads N --result FILE``)."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--result", type=str, default=None, help=argparse.SUPPRESS)


def worker_setup(threads: int) -> None:
    """Pin torch to ``threads`` intra-op threads (and 1 inter-op thread)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set or parallel work has started
        pass


@dataclass
class Timing:
    """Process CPU seconds and wall seconds of one call."""

    cpu: float
    wall: float


def timed(fn: Callable[[], Any]) -> tuple[Timing, Any]:
    """Call ``fn()`` once; return its :class:`Timing` and its value."""
    c0, w0 = time.process_time(), time.perf_counter()
    value = fn()
    c1, w1 = time.process_time(), time.perf_counter()
    return Timing(c1 - c0, w1 - w0), value


def interleaved_reps(variants: Mapping[str, Callable[..., Any]], reps: int, warmup: int = 1,
                     on_warmup: Callable[[str, Any], None] | None = None,
                     setup: Mapping[str, Callable[[], Any]] | None = None) -> dict[str, dict[str, list[float]]]:
    """Time each variant ``reps`` times, interleaved, after ``warmup`` untimed calls of each.

    Repetition ``i`` runs the variants in the given order rotated by ``i`` (a, b, c / b, c, a / ...), so no
    variant always runs first. ``on_warmup(name, value)`` sees each warm-up result (e.g. to keep outputs for
    correctness checks). ``setup[name]``, where given, is called untimed before every call of that variant and
    its value passed as the variant's only argument (e.g. a fresh model for a variant that consumes it).
    Returns ``{name: {"cpu": [s, ...], "wall": [s, ...]}}``.
    """
    names = list(variants)
    setup = setup or {}

    def call(name: str) -> Callable[[], Any]:
        if name not in setup:
            return variants[name]
        state = setup[name]()
        return lambda: variants[name](state)

    for _ in range(warmup):
        for name in names:
            value = call(name)()
            if on_warmup is not None:
                on_warmup(name, value)
            del value
    out: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": []} for name in names}
    for i in range(reps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            fn = call(name)
            timing, value = timed(fn)
            del value, fn
            out[name]["cpu"].append(timing.cpu)
            out[name]["wall"].append(timing.wall)
    return out


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs``); no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MB (``VmHWM``), or None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    """Current resident set size of this process in MB (``VmRSS``), or None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def time_command(cmd: Sequence[str], *, env: Mapping[str, str] | None = None) -> tuple[dict[str, float], str]:
    """Run ``cmd`` to completion in a fresh process; return ``({"wall": s, "cpu": s}, stdout)`` with the child's
    user + system CPU seconds. (Its ``ru_maxrss`` is not reported: on Linux it includes the forking parent's
    memory; let the command print its own ``VmHWM`` instead.) Raises ``RuntimeError`` if it exits non-zero."""
    full_env = {**os.environ, **WORKER_ENV, **(env or {})}
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=full_env, stdout=out_file, stderr=err_file)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        err_file.seek(0)
        stdout, stderr = out_file.read().decode(errors="replace"), err_file.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {stderr[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime}, stdout


def write_result(path: str | Path | None, result: Mapping[str, Any]) -> None:
    """Write the worker's JSON result (to stdout when ``path`` is None)."""
    text = json.dumps(result, indent=1, sort_keys=True)
    if path is None:
        print(text)
    else:
        Path(path).write_text(text)


# ------------------------------------------------------------------------------------------ summaries
def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of the element-wise ratios of two series measured side by side (same length)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need two non-empty series of equal length, got {len(numerators)} and {len(denominators)}")
    return median(a / b for a, b in zip(numerators, denominators))


def per_round_ratio(num_rounds: Sequence[Sequence[float]], den_rounds: Sequence[Sequence[float]]) -> float:
    """Median over rounds of ``median(numerator samples) / median(denominator samples)`` of that round."""
    return median_ratio([median(s) for s in num_rounds], [median(s) for s in den_rounds])


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.0f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table; floats are formatted with :func:`fmt`."""
    cells = [[fmt(c) if isinstance(c, float) or c is None else str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; ``platform.processor()`` elsewhere), or "unknown"."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Python/torch versions, CPU model and count, and load average (for the report header)."""
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "cpu_model": cpu_model(), "cpus": os.cpu_count()}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info
