"""CI smoke test of the side-by-side benchmark (bench/run.py --quick): every case runs for both libraries and
reports positive numbers, peftkit's LoRA gradients equal a plain implementation's, and the summary carries every
"Done when" row of the performance issue. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBS = ("peftkit", "peft")
DONE_WHEN_KEYS = {
    "train_peak_rss_d0", "train_peak_rss_d0.1", "train_step_time_d0", "train_step_time_d0.1", "train_step_time_compiled",
    "train_grad_max_abs_diff", "generate_unmerged_over_base_peftkit", "generate_unmerged_over_base_peft",
    "from_pretrained", "import", "inject_meta", "moe_step_time", "moe_peak_rss",
}

pytestmark = pytest.mark.interop


def positive(value: object) -> bool:
    return isinstance(value, float) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench") / "run.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_no_task_failed_and_report_printed(quick_run):
    data, stdout = quick_run
    assert data["errors"] == {}
    assert set(data["cases"]) == {"train", "generate", "mixed", "inject", "io", "import", "merge", "moe"}
    assert data["settings"]["machine"]["cpu_model"]
    for heading in ("## train", "## generate", "## mixed", "## inject", "## io", "## merge", "## import", "## moe",
                    "## Done when"):
        assert heading in stdout


def test_train_numbers_and_gradient_check(quick_run):
    train = quick_run[0]["cases"]["train"]
    names = ["-:floor", "-:manual", "-:full", "-:floor_bf16"] + [f"{lib}:{v}" for lib in LIBS for v in ("d0", "d0.1", "bf16", "compiled")]
    assert set(train["variants"]) == set(names)
    for name in names:
        row = train["variants"][name]
        compiled = name.endswith(":compiled")  # torch.compile: no saved-tensor hooks, a compile time instead
        for key in ("step_s", "fwd_s", "bwd_s", "peak_rss_mb", "time_over_floor", "peak_rss_over_floor",
                    "compile_s" if compiled else "saved_activation_mb"):
            assert positive(row[key]), (name, key, row[key])
        if name.split(":")[0] in LIBS or name in ("-:manual", "-:full"):
            assert positive(row["opt_s"]) and row["trainable_params"] > 0, name
    for variant, ratios in train["peftkit_over_ref"].items():
        skip = {"saved_activations"} if variant == "compiled" else set()
        assert all(positive(v) for k, v in ratios.items() if k not in skip), (variant, ratios)
    for name in ("peftkit:d0", "peft:d0", "-:manual"):
        row = train["variants"][name]
        assert row["grad_max_abs"] > 1e-4, row  # the check compares non-trivial gradients
        assert row["grad_max_abs_diff"] <= 1e-6, (name, row["grad_max_abs_diff"])


def test_inference_cases(quick_run):
    cases = quick_run[0]["cases"]
    for lib in LIBS:
        gen = cases["generate"]["libs"][lib]
        assert all(positive(v) for v in gen["tokens_per_s"].values()) and len(gen["tokens_per_s"]) == 4
        assert all(positive(v) for v in gen["over_base"].values())
        assert gen["disabled_tokens_equal_base"]
        for n in ("1", "4"):
            assert all(positive(v) for v in cases["mixed"][n]["tokens_per_s"][lib].values())
    assert cases["generate"]["unmerged_tokens_equal_across_libs"]
    for n in ("1", "4"):
        assert cases["mixed"][n]["max_abs_diff_mixed_logits"] < 1e-4


def test_inject_io_merge_import(quick_run):
    data = quick_run[0]
    cases = data["cases"]
    pair_cases = [("inject", "meta_1b", "get_peft_model"), ("inject", "real_100m", "get_peft_model"),
                  ("io", None, "save_pretrained"), ("io", None, "from_pretrained"), ("merge", None, "merge_and_unload")]
    for case, sub, label in pair_cases:
        summary = cases[case][sub] if sub else cases[case]
        for lib in LIBS:
            entry = summary["libs"][lib][label]
            assert positive(entry["s"]) and positive(entry["floor_s"]) and positive(entry["over_floor"]), (case, lib)
        assert positive(summary["peftkit_over_ref"][label]), (case, label)
    for lib in LIBS:
        io = data["raw"][f"io:{lib}:-"][0]
        assert io["loaded_vs_file_max_abs_diff"] == 0.0 and io["resaved_vs_file_max_abs_diff"] == 0.0
        merge = data["raw"][f"merge:{lib}:-"][0]
        assert merge["adapter_effect"] > 1e-2  # the adapter changes the logits ...
        assert merge["merged_vs_unmerged_max_abs_diff"] < 1e-4  # ... and merging keeps them
        assert merge["merged_vs_raw_max_abs_diff"] < 1e-4
        assert positive(cases["import"]["median_wall_s"][lib]) and positive(cases["import"]["median_maxrss_mb"][lib])
    assert positive(cases["import"]["peftkit_over_peft_wall"])


def test_moe_case(quick_run):
    """MoE training (LoRA on attention and on the experts' 3-D parameters): every row measured, the ratios
    present, and both libraries compute the same loss and LoRA gradients from the same adapter weights."""
    moe = quick_run[0]["cases"]["moe"]
    assert set(moe["variants"]) == {"-:floor", *LIBS}
    for name, row in moe["variants"].items():
        for key in ("step_s", "fwd_s", "bwd_s", "peak_rss_mb", "saved_activation_mb", "time_over_floor"):
            assert positive(row[key]), (name, key, row[key])
        if name in LIBS:
            assert positive(row["opt_s"]) and row["trainable_params"] > 0, name
    ratios = moe["peftkit_over_ref"]
    assert all(positive(ratios[k]) for k in ("step_time", "fwd_time", "bwd_time", "peak_rss", "saved_activations"))
    assert len(ratios["step_time_per_round"]) == len(ratios["peak_rss_per_round"]) == 1
    check = moe["check"]
    assert check["same_trainable_tensors"] and check["trainable_params_equal"]
    assert check["expert_grad_max_abs"] > 1e-4  # the experts' LoRA is trained and the check is not trivial
    # fp32, routed-token update against a materialised W + dW: float32 eps (1.2e-7) x largest gradient (~5e-2)
    # x the longest reduction (ff=128) is ~8e-7; the loss (~ln 256 = 5.5) within ~16 ulps
    assert check["grad_max_abs_diff"] <= 1e-6 and check["loss_abs_diff"] <= 1e-5, check


def test_done_when_summary_has_every_row(quick_run):
    rows = quick_run[0]["done_when"]
    assert {r["key"] for r in rows} == DONE_WHEN_KEYS and len(rows) == len(DONE_WHEN_KEYS)
    for row in rows:
        exact_ok = row["key"] == "train_grad_max_abs_diff" and row["value"] == 0.0  # bit-equal gradients
        assert positive(row["value"]) or exact_ok, row
        assert row["status"] == ("info" if row["target"] is None else "PASS" if row["value"] <= row["target"] else "MISS")
