"""Mixed batches, peftkit and the reference side by side IN ONE PROCESS (complements ``mixed_batch.py``).

``mixed_batch.py`` runs each library in its own subprocess, which gives clean peak-RSS numbers but lets
subprocess-to-subprocess speed differences (±5-10% on a shared 2-core machine, larger than the effect measured)
into the cross-library ratio. Here one process per adapter count holds two identical base models, one wrapped by
each library with the same adapter files, and times ``single`` and ``mixed`` of both libraries interleaved per
repetition, so every ratio is a median of ratios measured seconds apart on the same process.

    .venv/bin/python bench/mixed_batch_inprocess.py [--counts 1 4 16 64] [--reps 4] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import harness
from mixed_batch import FULL, QUICK, build_base, write_adapters


def _load(peft_model_cls: Any, shape: dict[str, int], roots: list[Path], count: int) -> Any:
    model = peft_model_cls.from_pretrained(build_base(shape), str(roots[0]), adapter_name="a0")
    for i in range(1, count):
        model.load_adapter(str(roots[i]), adapter_name=f"a{i}")
    model.set_adapter("a0")
    model.eval()
    model.requires_grad_(False)
    return model


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One adapter count, both libraries in this process: interleaved single/mixed timings and a logit check."""
    harness.worker_setup(args.threads)
    import peft
    import torch

    import peftkit

    shape = QUICK if args.quick else FULL
    roots = [Path(p) for p in args.adapter_dirs]
    count = args.counts[0]
    input_ids = torch.randint(0, shape["vocab_size"], (shape["rows"], shape["tokens"]),
                              generator=torch.Generator().manual_seed(4321))
    names = [f"a{i % count}" for i in range(shape["rows"])]
    models = {"peftkit": _load(peftkit.PeftModel, shape, roots, count), "peft": _load(peft.PeftModel, shape, roots, count)}
    variants = {}
    for lib, model in models.items():
        variants[f"{lib}_single"] = lambda m=model: m(input_ids=input_ids, use_cache=False).logits
        variants[f"{lib}_mixed"] = lambda m=model: m(input_ids=input_ids, adapter_names=names, use_cache=False).logits
    kept: dict[str, Any] = {}
    with torch.inference_mode():
        times = harness.interleaved_reps(variants, reps=args.reps, warmup=1,
                                         on_warmup=lambda n, v: kept.__setitem__(n, v[:, -1].clone()))
    diff = float((kept["peftkit_mixed"] - kept["peft_mixed"]).abs().max())
    return {"count": count, "times": times, "max_abs_diff_mixed_last_logits": diff}


def summarize(result: dict[str, Any], n_tok: int) -> dict[str, Any]:
    t = result["times"]
    out: dict[str, Any] = {"count": result["count"], "max_abs_diff": result["max_abs_diff_mixed_last_logits"]}
    for clock in ("cpu", "wall"):
        def ratio(num: str, den: str, clock: str = clock) -> float:  # tokens/s ratio = inverse time ratio
            return harness.median_ratio(t[den][clock], t[num][clock])

        out[clock] = {
            "peftkit_mixed_over_reference_mixed": ratio("peftkit_mixed", "peft_mixed"),
            "peftkit_mixed_over_peftkit_single": ratio("peftkit_mixed", "peftkit_single"),
            "peftkit_single_over_reference_single": ratio("peftkit_single", "peft_single"),
            "reference_mixed_over_reference_single": ratio("peft_mixed", "peft_single"),
        }
        out[clock]["tokens_per_s"] = {k: n_tok / harness.median(v[clock]) for k, v in t.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--counts", type=int, nargs="+", default=None)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--json", default=None)
    parser.add_argument("--adapter-dirs", nargs="+", default=None, help=argparse.SUPPRESS)
    harness.add_worker_args(parser)
    args = parser.parse_args(argv)
    if args.worker:
        harness.write_result(args.result, worker(args))
        return 0
    shape = QUICK if args.quick else FULL
    counts = args.counts or ([1, 4] if args.quick else [1, 4, 16, 64])
    reps = 1 if args.quick else args.reps
    n_tok = shape["rows"] * shape["tokens"]
    summaries = []
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-inproc-") as tmp:
        roots = write_adapters(shape, max(counts), Path(tmp) / "adapters")
        for count in counts:
            extra = ["--counts", str(count), "--reps", str(reps), "--adapter-dirs", *map(str, roots[:count])]
            extra += ["--quick"] if args.quick else []
            result = harness.run_worker(__file__, extra, threads=args.threads)
            summaries.append(summarize(result, n_tok))
            s = summaries[-1]
            print(f"N={count:3d}  peftkit mixed / ref mixed: cpu {s['cpu']['peftkit_mixed_over_reference_mixed']:.3f} "
                  f"wall {s['wall']['peftkit_mixed_over_reference_mixed']:.3f} | peftkit mixed / single: "
                  f"{s['cpu']['peftkit_mixed_over_peftkit_single']:.3f} | ref mixed / single: "
                  f"{s['cpu']['reference_mixed_over_reference_single']:.3f} | max|Δ logits| {s['max_abs_diff']:.1e}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "reps": reps, "results": summaries}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
