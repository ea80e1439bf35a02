"""Mixed-batch benchmark: peftkit against the reference (🤗 PEFT) with 1-64 LoRA adapters routed per row.

How to run (from the repo root, with the project venv)::

    .venv/bin/python bench/mixed_batch.py                       # full run: N = 1 4 16 64, 3 reps x 2 rounds
    .venv/bin/python bench/mixed_batch.py --counts 16 64 --reps 5 --rounds 3 --json out.json
    .venv/bin/python bench/mixed_batch.py --quick               # tiny smoke run (seconds; CI)

What it measures. A Llama-style model built from ``LlamaConfig`` with ``torch.manual_seed(0)`` (full run: hidden
512, intermediate 1376, 8 layers, 8 heads, vocab 32000 = 58M parameters, fp32, eval mode, frozen base, under
``torch.inference_mode()``) carries N LoRA adapters (r=16, lora_alpha=32, q/k/v/o/gate/up/down_proj, random
non-zero A and B drawn like ``init_lora_weights=False``). The adapters are written once to a temporary directory by
this script (plain safetensors files in the PEFT format) and loaded by each library's own ``from_pretrained`` /
``load_adapter``, so both libraries run identical tensors. A batch of 32 rows x 128 tokens is run as:

- ``single``: adapter ``a0`` active for every row (no ``adapter_names``);
- ``mixed``:  ``adapter_names=["a{i % N}" for row i]``;
- ``base``:   inside ``disable_adapter()`` (context).

Each (library, N) case runs in a fresh subprocess with 1 torch thread (bench/harness.py). Inside it the three
variants are interleaved per repetition after a warm-up; the two libraries' subprocesses run side by side in
rounds (peftkit, peft | peft, peftkit | ...). Times are process CPU time (primary clock: the machine is shared) and
wall time.

How to read it. Per N, a table of tokens/s (median over all repetitions) and the ratios (each a median of ratios
measured side by side: per repetition inside one subprocess, or per round between the two libraries):

- ``peftkit mixed / single`` — cost of routing in peftkit (goal >= 0.9 at N=64);
- ``peftkit mixed / ref mixed`` — peftkit's mixed throughput against the reference's (goal >= 1.0 at every N);
- ``ref mixed / single`` — the same cost in the reference, for context; ``single / base`` for both;
- ``..._base_normalized`` — peftkit mixed / ref mixed with each subprocess's times taken relative to its own
  ``base`` forward (the same transformers code in both): removes subprocess-to-subprocess speed differences,
  which are ±5-10% on a shared machine and larger than the effect being measured.

Correctness (printed, in the JSON): ``max|peftkit mixed - ref mixed|`` of the logits on the same inputs (at 8
token positions of every row, plus the last) and the same for ``single``; and, inside each library, the rows of
the mixed batch routed to ``a0`` against the single-adapter run. Expect ~1e-5 or less. No timing assertions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import harness

LIBS = ("peftkit", "peft")
VARIANTS = ("single", "mixed", "base")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FULL = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
        "vocab_size": 32000, "rows": 32, "tokens": 128}
QUICK = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 256, "rows": 4, "tokens": 8}
RANK, ALPHA = 16, 32


# ----------------------------------------------------------------------------------------- shared parts
def build_base(shape: dict[str, int], device: str | None = None) -> Any:
    """The Llama-style base model (seeded, fp32, eval, frozen)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_attention_heads"], vocab_size=shape["vocab_size"],
        max_position_embeddings=max(256, shape["tokens"]), attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM(config)
    model.eval()
    model.requires_grad_(False)
    return model


def write_adapters(shape: dict[str, int], count: int, root: Path, seed: int = 1234) -> list[Path]:
    """Write ``count`` LoRA adapters (``root/a{i}``) in the PEFT file format with seeded random A and B.

    Values follow ``nn.Linear``'s default init as ``init_lora_weights=False`` leaves them: uniform in
    ``±1/sqrt(fan_in)`` for A (fan_in = in_features) and B (fan_in = r).
    """
    import torch
    from safetensors.torch import save_file

    model = build_base(shape, device="meta")
    layers = [(name, m.in_features, m.out_features) for name, m in model.named_modules()
              if name.rsplit(".", 1)[-1] in TARGETS]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": sorted(TARGETS), "bias": "none", "init_lora_weights": False, "fan_in_fan_out": False,
        "use_rslora": False, "inference_mode": True, "base_model_name_or_path": None,
    }
    gen = torch.Generator().manual_seed(seed)
    dirs = []
    for i in range(count):
        tensors = {}
        for name, d_in, d_out in layers:
            a_bound, b_bound = d_in ** -0.5, RANK ** -0.5
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.rand(RANK, d_in, generator=gen) * 2 - 1) * a_bound
            tensors[f"{key}.lora_B.weight"] = (torch.rand(d_out, RANK, generator=gen) * 2 - 1) * b_bound
        path = root / f"a{i}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
        dirs.append(path)
    return dirs


def probe_positions(tokens: int) -> list[int]:
    """Token positions whose logits are kept for the cross-library check (<= 9 per row)."""
    return sorted(set(range(0, tokens, max(1, tokens // 8))) | {tokens - 1})


# ----------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One library, the adapter counts in ``args.counts``: time single/mixed/base, keep probe logits."""
    harness.worker_setup(args.threads)
    import torch

    if args.lib == "peftkit":
        from peftkit import PeftModel
    else:
        from peft import PeftModel
    shape = QUICK if args.quick else FULL
    roots = [Path(p) for p in args.adapter_dirs]
    rows, tokens = shape["rows"], shape["tokens"]
    gen = torch.Generator().manual_seed(4321)
    input_ids = torch.randint(0, shape["vocab_size"], (rows, tokens), generator=gen)
    positions = probe_positions(tokens)
    out: dict[str, Any] = {"lib": args.lib, "rows": rows, "tokens": tokens, "cases": {}}
    for count in args.counts:
        case = run_count(PeftModel, shape, roots, count, input_ids, args.reps, positions)
        logits_path = Path(args.logits_dir) / f"{args.lib}-{count}.pt"
        torch.save(case.pop("logits"), logits_path)
        out["cases"][str(count)] = {**case, "logits_file": str(logits_path)}
    return out


def run_count(peft_model_cls: Any, shape: dict[str, int], roots: list[Path], count: int, input_ids: Any,
              reps: int, positions: list[int]) -> dict[str, Any]:
    """Load ``count`` adapters on a fresh base and time the three variants (see the module docstring)."""
    import torch

    harness.reset_peak_rss()
    base = build_base(shape)
    load, model = harness.timed(lambda: peft_model_cls.from_pretrained(base, str(roots[0]), adapter_name="a0"))
    for i in range(1, count):
        t, _ = harness.timed(lambda i=i: model.load_adapter(str(roots[i]), adapter_name=f"a{i}"))
        load.cpu, load.wall = load.cpu + t.cpu, load.wall + t.wall
    model.set_adapter("a0")
    model.eval()
    model.requires_grad_(False)
    names = [f"a{i % count}" for i in range(input_ids.shape[0])]

    def single() -> Any:
        return model(input_ids=input_ids, use_cache=False).logits

    def mixed() -> Any:
        return model(input_ids=input_ids, adapter_names=names, use_cache=False).logits

    def base_run() -> Any:
        with model.disable_adapter():
            return model(input_ids=input_ids, use_cache=False).logits

    kept: dict[str, torch.Tensor] = {}

    def keep(name: str, logits: torch.Tensor) -> None:
        kept[name] = logits[:, positions].clone()

    with torch.inference_mode():
        times = harness.interleaved_reps({"single": single, "mixed": mixed, "base": base_run},
                                         reps=reps, warmup=1, on_warmup=keep)
    a0_rows = [i for i, n in enumerate(names) if n == "a0"]
    return {
        "times": times,
        "load_s": {"cpu": load.cpu, "wall": load.wall},
        "peak_rss_mb": harness.peak_rss_mb(),
        "mixed_a0_rows_vs_single": float((kept["mixed"][a0_rows] - kept["single"][a0_rows]).abs().max()),
        "adapter_effect": float((kept["single"] - kept["base"]).abs().max()),  # > 0: the adapter acts
        "logits": {"single": kept["single"], "mixed": kept["mixed"]},
    }


# ----------------------------------------------------------------------------------------- driver
def summarize(runs: harness.RoundResults, counts: list[int], rows: int, tokens: int) -> dict[str, Any]:
    """Tokens/s and ratio table per N from the workers' results (see the module docstring)."""
    return {str(n): summarize_count(runs, n, rows * tokens) for n in counts}


def summarize_count(runs: harness.RoundResults, count: int, n_tok: int) -> dict[str, Any]:
    """The summary of one adapter count."""
    import torch

    per_lib = {lib: [r["cases"][str(count)] for r in runs[(lib, count)]] for lib in LIBS}
    entry: dict[str, Any] = {"tokens_per_s": {}, "ratios": {}, "load_s": {}}
    for lib, cases in per_lib.items():
        entry["tokens_per_s"][lib] = {
            v: {clk: n_tok / harness.median(t for c in cases for t in c["times"][v][clk]) for clk in ("cpu", "wall")}
            for v in VARIANTS
        }
        entry["load_s"][lib] = harness.median(c["load_s"]["cpu"] for c in cases)

    def within(lib: str, num: str, den: str, clk: str) -> float:
        # tokens/s ratio num/den = time(den)/time(num), per repetition, pooled over rounds
        cases = per_lib[lib]
        return harness.median_ratio([t for c in cases for t in c["times"][den][clk]],
                                    [t for c in cases for t in c["times"][num][clk]])

    def across(variant: str, clk: str) -> float:
        # tokens/s ratio peftkit/peft per round (the two subprocesses of a round ran side by side)
        return harness.per_round_ratio([c["times"][variant][clk] for c in per_lib["peft"]],
                                       [c["times"][variant][clk] for c in per_lib["peftkit"]])

    def across_normalized(variant: str, clk: str) -> float:
        # as ``across`` but each subprocess's time relative to its own base forward (median of per-repetition
        # ratios): cancels the speed differences between subprocesses (placement, neighbours' load)
        rel = {lib: [harness.median_ratio(c["times"][variant][clk], c["times"]["base"][clk]) for c in per_lib[lib]]
               for lib in LIBS}
        return harness.median_ratio(rel["peft"], rel["peftkit"])

    for clk in ("cpu", "wall"):
        entry["ratios"][clk] = {
            "peftkit_mixed_over_single": within("peftkit", "mixed", "single", clk),
            "peftkit_mixed_over_reference_mixed": across("mixed", clk),
            "peftkit_mixed_over_reference_mixed_base_normalized": across_normalized("mixed", clk),
            "reference_mixed_over_single": within("peft", "mixed", "single", clk),
            "peftkit_single_over_reference_single": across("single", clk),
            "peftkit_single_over_base": within("peftkit", "single", "base", clk),
            "reference_single_over_base": within("peft", "single", "base", clk),
        }
    ours = torch.load(per_lib["peftkit"][0]["logits_file"], weights_only=True)
    ref = torch.load(per_lib["peft"][0]["logits_file"], weights_only=True)
    entry["max_abs_diff_mixed_logits"] = float((ours["mixed"] - ref["mixed"]).abs().max())
    entry["max_abs_diff_single_logits"] = float((ours["single"] - ref["single"]).abs().max())
    entry["max_abs_logit"] = float(ref["mixed"].abs().max())
    entry["mixed_a0_rows_vs_single"] = {lib: max(c["mixed_a0_rows_vs_single"] for c in per_lib[lib]) for lib in LIBS}
    entry["adapter_effect"] = min(c["adapter_effect"] for lib in LIBS for c in per_lib[lib])
    cpu = entry["ratios"]["cpu"]
    entry["goals"] = {
        "peftkit_mixed_over_reference_mixed>=1.0": cpu["peftkit_mixed_over_reference_mixed"] >= 1.0,
        **({"peftkit_mixed_over_single>=0.9": cpu["peftkit_mixed_over_single"] >= 0.9} if count >= 64 else {}),
    }
    return entry


def report(summary: dict[str, Any]) -> str:
    lines = []
    for count, e in summary.items():
        tps = e["tokens_per_s"]
        lines.append(f"\n## N = {count} adapters\n")
        rows = [[lib, *(tps[lib][v]["cpu"] for v in VARIANTS), *(tps[lib][v]["wall"] for v in VARIANTS),
                 e["load_s"][lib]] for lib in LIBS]
        lines.append(harness.markdown_table(
            ["library", "single tok/s (cpu)", "mixed (cpu)", "base (cpu)", "single (wall)", "mixed (wall)",
             "base (wall)", "load s"], rows))
        lines.append("")
        r = e["ratios"]
        lines.append(harness.markdown_table(["ratio (tokens/s)", "cpu", "wall"],
                                            [[k, r["cpu"][k], r["wall"][k]] for k in r["cpu"]]))
        lines.append(f"\nmax|peftkit mixed - ref mixed| logits = {e['max_abs_diff_mixed_logits']:.3g}; "
                     f"single: {e['max_abs_diff_single_logits']:.3g} (max|logit| {e['max_abs_logit']:.3g}, "
                     f"max|single - base| {e['adapter_effect']:.3g}); "
                     f"mixed a0 rows vs single: " + ", ".join(f"{k} {v:.3g}" for k, v in e["mixed_a0_rows_vs_single"].items()))
        lines.append("goals: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in e["goals"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, N in {1, 4}, 1 repetition (smoke test)")
    parser.add_argument("--counts", type=int, nargs="+", default=None, help="adapter counts (default 1 4 16 64)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per subprocess (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="subprocess rounds per library (default 2)")
    parser.add_argument("--json", type=str, default=None, help="write the summary and raw results here")
    parser.add_argument("--lib", choices=LIBS, help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dirs", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--logits-dir", help=argparse.SUPPRESS)
    harness.add_worker_args(parser)
    args = parser.parse_args(argv)
    counts = args.counts or ([1, 4] if args.quick else [1, 4, 16, 64])
    reps = args.reps or (1 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 2)
    if args.worker:
        args.counts, args.reps = counts, reps
        harness.write_result(args.result, worker(args))
        return 0

    shape = QUICK if args.quick else FULL

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="peftkit-bench-mixed-") as tmp:
        dirs = write_adapters(shape, max(counts), Path(tmp) / "adapters")
        logits_dir = Path(tmp) / "logits"
        logits_dir.mkdir()
        common = ["--reps", str(reps), "--adapter-dirs", *map(str, dirs), "--logits-dir", str(logits_dir)]
        if args.quick:  # one subprocess per library for all counts: start-up dominates tiny shapes
            common.append("--quick")
            groups = [[harness.Job((lib,), ["--lib", lib, "--counts", *map(str, counts), *common]) for lib in LIBS]]
        else:
            groups = [[harness.Job((lib, n), ["--lib", lib, "--counts", str(n), *common]) for lib in LIBS]
                      for n in counts]
        raw = harness.run_rounds(Path(__file__), groups, rounds, threads=args.threads, log=log)
        if args.quick:
            raw = harness.RoundResults({(lib, n): raw[(lib,)] for lib in LIBS for n in counts})
        summary = summarize(raw, counts, shape["rows"], shape["tokens"])
    settings = {"shape": shape, "counts": counts, "reps": reps, "rounds": rounds, "threads": args.threads,
                "rank": RANK, "lora_alpha": ALPHA, "targets": list(TARGETS), "machine": harness.machine_info()}
    print(f"# mixed-batch benchmark: {settings}")
    print(report(summary))
    if args.json:
        raw_out = {f"{k[0]}-{k[1]}": v for k, v in raw.results.items()}
        Path(args.json).write_text(json.dumps({"settings": settings, "counts": summary, "raw": raw_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
