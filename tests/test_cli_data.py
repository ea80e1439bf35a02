"""The data ``peftkit train`` reads: files of every supported type, ``datasets`` datasets, causal-LM instruction
formats (alpaca, chat messages, prompt/completion) with the prompt masked out of the loss, packing, and the
one-line errors for rows, files and tokenizers that do not fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from models import FFN, HIDDEN, LAYERS, tiny_llama, tiny_tokenizer
from numerics import fp_tol

from peftkit.cli.common import CliError
from peftkit.cli.data import DATA_HELP, ROW_FORMATS, Row, read_rows
from peftkit.cli.tasks import (
    TASK_SPECS,
    DataOptions,
    collate,
    encode_rows,
    load_rows,
    pack,
)

ROWS = [{"text": "the quick brown fox", "label": "pos"}, {"text": "the lazy dog", "label": "neg"},
        {"text": "hello world", "label": "pos"}]
#: the fields every row must have for seq-cls (as train.py asks: the task's checks)
CLS_CHECKS = TASK_SPECS["seq-cls"].checks("text", "label")

#: a small chat template: each turn as "role: content<eos>", and "assistant: " as the generation prompt
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer("bpe")


@pytest.fixture
def chat_tok() -> Any:
    tokenizer = tiny_tokenizer("bpe")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def values(rows: list[Row]) -> list[dict[str, Any]]:
    return [r.values for r in rows]


def encode(tok: Any, values: dict[str, Any], max_length: int = 256, **options: Any) -> dict[str, list[int]]:
    return TASK_SPECS["causal-lm"].encode(Row(1, values), tok, max_length, {}, "text", None, DataOptions(**options))


def ids(tok: Any, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def error_of(call: Any, *args: Any, **kwargs: Any) -> str:
    """The message of the CliError ``call`` raises; it must be one line."""
    with pytest.raises(CliError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------- file types
def _write(path: Path, kind: str) -> Path:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    elif kind == "json-list":
        path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    elif kind == "json-lines":
        path.write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8")
    elif kind in ("csv", "tsv"):
        sep = "," if kind == "csv" else "\t"
        path.write_text("text" + sep + "label\n" + "".join(f"{r['text']}{sep}{r['label']}\n" for r in ROWS),
                        encoding="utf-8")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize(("kind", "suffix"), [("jsonl", ".jsonl"), ("json-list", ".json"), ("json-lines", ".json"),
                                              ("csv", ".csv"), ("tsv", ".tsv"), ("parquet", ".parquet")])
def test_every_file_type_reads_the_same_rows(kind: str, suffix: str, tmp_path: Path) -> None:
    path = _write(tmp_path / f"data{suffix}", kind)
    assert values(read_rows(path, CLS_CHECKS)) == ROWS


def test_save_to_disk_directories_read_as_rows(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert values(read_rows(tmp_path / "single", CLS_CHECKS)) == ROWS
    DatasetDict({"train": Dataset.from_list(ROWS[:2]), "test": Dataset.from_list(ROWS[2:])}).save_to_disk(
        str(tmp_path / "splits"))
    assert values(read_rows(tmp_path / "splits", CLS_CHECKS)) == ROWS[:2]  # train by default
    assert values(read_rows(f"{tmp_path / 'splits'}:test", CLS_CHECKS)) == ROWS[2:]
    assert error_of(read_rows, f"{tmp_path / 'splits'}:dev", CLS_CHECKS) == (
        f"data {str(tmp_path / 'splits') + ':dev'!r} has no split 'dev'; splits: train, test")
    DatasetDict({"a": Dataset.from_list(ROWS), "b": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "ab"))
    assert "has splits a, b; choose one with" in error_of(read_rows, tmp_path / "ab", CLS_CHECKS)
    (tmp_path / "not-a-dataset").mkdir()
    assert error_of(read_rows, tmp_path / "not-a-dataset", CLS_CHECKS).startswith(
        f"data directory {str(tmp_path / 'not-a-dataset')!r} is not a dataset saved with save_to_disk (")
    first_row_error = error_of(read_rows, tmp_path / "single", TASK_SPECS["seq-cls"].checks("text", "lbl"))
    assert first_row_error.endswith("row 1: field 'lbl' is missing (fields present: text, label); choose the field "
                                    "with --text-field / --label-field")


def test_an_unknown_hub_dataset_is_one_line_naming_it() -> None:
    # HF_HUB_OFFLINE=1 (conftest): no network; the error names the id as given
    message = error_of(read_rows, "no-such-org/no-such-dataset:train", CLS_CHECKS)
    assert message.startswith("cannot load dataset 'no-such-org/no-such-dataset:train': not a local file or "
                              "directory, and not loadable from the Hugging Face Hub or its cache")


@pytest.mark.parametrize(("source", "call"), [
    ("tatsu-lab/alpaca", ("tatsu-lab/alpaca", None, "train")),
    ("tatsu-lab/alpaca:test", ("tatsu-lab/alpaca", None, "test")),
    ("nyu-mll/glue:sst2:validation[:10%]", ("nyu-mll/glue", "sst2", "validation[:10%]")),
    ("imdb:train[:100]", ("imdb", None, "train[:100]")),
])
def test_hub_ids_name_config_and_split(source: str, call: tuple[str, str | None, str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def load_dataset(path: str, name: str | None = None, split: str | None = None) -> Any:
        calls.append((path, name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = read_rows(source, CLS_CHECKS)
    assert calls == [call] and values(rows) == ROWS and rows[1].where == "row 2"


def test_a_missing_file_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    assert error_of(read_rows, tmp_path / "nope.parquet", CLS_CHECKS) == (
        f"data file {str(tmp_path / 'nope.parquet')!r} does not exist")
    path = _write(tmp_path / "d.jsonl", "jsonl")
    assert error_of(read_rows, f"{path}:train", CLS_CHECKS) == f"data file {str(path)!r} has no splits; drop ':train'"


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("d.json", '[{"text": "a", "label": "x"},\n {"text": "b" "label": "y"}]',
     "d.json line 2: not valid JSON (Expecting ',' delimiter at column 15)"),
    ("d.json", '[{"text": "a", "label": "x"}, 3]', "d.json row 2: expected a JSON object, got int"),
    ("d.parquet", "not parquet at all", "d.parquet: not a readable Parquet file ("),
    ("d.csv", 'text,label\n"never closed,1\n', "d.csv line 2: field 'label' is missing"),  # the quote ran on
    ("d.txt", "text\n", "unknown format '.txt'"),
    ("d.jsonl", "", "data 'd.jsonl' holds no rows"),
])
def test_malformed_files_are_one_line_errors(name: str, content: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert expected in error_of(read_rows, path, CLS_CHECKS)


# ---------------------------------------------------------------------------------------------------- row formats
def test_alpaca_rows_mask_the_prompt(tok: Any) -> None:
    row = {"instruction": "say the fox", "input": "the quick", "output": "brown fox jumps"}
    feature = encode(tok, row)
    prompt = ids(tok, ALPACA_WITH_INPUT.format(**row), special=True)
    completion = [*ids(tok, row["output"]), tok.eos_token_id]
    assert feature["input_ids"] == prompt + completion
    assert feature["labels"] == [-100] * len(prompt) + completion  # -100 exactly on the prompt
    no_input = encode(tok, {"instruction": "say hello", "input": "", "output": "hello world"})
    prompt = ids(tok, ALPACA_NO_INPUT.format(instruction="say hello"), special=True)
    assert no_input["input_ids"][:len(prompt)] == prompt
    assert no_input["labels"] == [-100] * len(prompt) + [*ids(tok, "hello world"), tok.eos_token_id]


def test_prompt_completion_rows_mask_the_prompt(tok: Any) -> None:
    feature = encode(tok, {"prompt": "the quick brown", "completion": " fox jumps"})
    prompt, completion = ids(tok, "the quick brown", special=True), [*ids(tok, " fox jumps"), tok.eos_token_id]
    assert feature == {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}


def _learned_runs(feature: dict[str, list[int]]) -> list[list[int]]:
    """The contiguous runs of learned label ids (label != -100)."""
    runs: list[list[int]] = []
    previous = -100
    for label in feature["labels"]:
        if label != -100:
            if previous == -100:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick"},
                {"role": "assistant", "content": "brown fox"}, {"role": "user", "content": "and then"},
                {"role": "assistant", "content": "the lazy dog"}]


def test_messages_rows_learn_only_the_assistant_turns(chat_tok: Any) -> None:
    feature = encode(chat_tok, {"messages": CONVERSATION})
    text = chat_tok.apply_chat_template(CONVERSATION, tokenize=False)
    pieces = ["system: be brief<eos>user: the quick<eos>assistant: ", "brown fox<eos>",
              "user: and then<eos>assistant: ", "the lazy dog<eos>"]
    assert "".join(pieces) == text
    piece_ids = [ids(chat_tok, p) for p in pieces]
    assert feature["input_ids"] == [i for p in piece_ids for i in p]  # the template wrote every special token
    expected_labels = [i if n % 2 else -100 for n, p in enumerate(piece_ids) for i in p]
    assert feature["labels"] == expected_labels  # -100 exactly outside the assistant turns
    assert [chat_tok.decode(run) for run in _learned_runs(feature)] == ["brown fox<eos>", "the lazy dog<eos>"]


def test_sharegpt_conversations_equal_messages(chat_tok: Any) -> None:
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": speakers[t["role"]], "value": t["content"]} for t in CONVERSATION]
    assert encode(chat_tok, {"conversations": sharegpt}) == encode(chat_tok, {"messages": CONVERSATION})
    chat_prompt = encode(chat_tok, {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]})
    assert [chat_tok.decode(run) for run in _learned_runs(chat_prompt)] == ["the lazy dog<eos>"]


def test_chat_template_option_replaces_the_tokenizers(tok: Any, chat_tok: Any, tmp_path: Path) -> None:
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(CHAT_TEMPLATE, encoding="utf-8")
    assert tok.chat_template is None
    expected = encode(chat_tok, {"messages": CONVERSATION})
    assert encode(tok, {"messages": CONVERSATION}, chat_template=str(template_file)) == expected
    assert encode(tok, {"messages": CONVERSATION}, chat_template=CHAT_TEMPLATE) == expected


@pytest.mark.parametrize("row", [{"text": "the quick brown fox"}, {"messages": CONVERSATION},
                                 {"instruction": "say hello", "output": "hello world"}])
def test_train_on_prompt_learns_the_whole_text(chat_tok: Any, row: dict[str, Any]) -> None:
    whole = encode(chat_tok, row, train_on_prompt=True)
    assert whole["labels"] == whole["input_ids"]
    assert whole["input_ids"] == encode(chat_tok, row)["input_ids"]


def test_text_rows_are_unchanged(tok: Any) -> None:
    """``text`` rows encode as before this change: the whole text + EOS, learned."""
    expected = [*ids(tok, "the quick brown fox", special=True), tok.eos_token_id]
    assert encode(tok, {"text": "the quick brown fox"}) == {"input_ids": expected, "labels": expected}
    cut = encode(tok, {"text": "the quick brown fox jumps over the lazy dog"}, max_length=4)
    assert len(cut["input_ids"]) == 4 and cut["labels"] == cut["input_ids"] and tok.eos_token_id not in cut["labels"]


def test_format_is_detected_from_the_first_row_and_can_be_forced(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"text": "c"}) + "\n",
                    encoding="utf-8")
    assert error_of(load_rows, path, "causal-lm") == (
        "mixed.jsonl line 2: field 'instruction' is missing (fields present: text); the rows are read as alpaca "
        "(from the first row's fields); choose the format with --format")
    rows = [{"text": "c", "instruction": "a", "output": "b"}]
    path.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    assert values(load_rows(path, "causal-lm", options=DataOptions(format="text"))) == rows


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("row", "expected"), [
    ({"instruction": "x", "input": ""}, ("d.jsonl line 1: field 'output' is missing (fields present: instruction, "
                                        "input)")),
    ({"instruction": "x", "output": 3}, "d.jsonl line 1: field 'output' must be a string, got int 3"),
    ({"messages": [{"role": "user", "content": "hi"}]}, ("d.jsonl line 1: field 'messages' has no assistant turn to "
                                                        "learn (speakers: user)")),
    ({"messages": [{"role": "user", "text": "hi"}]}, ("d.jsonl line 1: field 'messages' turn 0: expected {role, "
                                                     "content} or {from, value}, got keys role, text")),
    ({"conversations": [{"from": "narrator", "value": "hi"}]}, ("d.jsonl line 1: field 'conversations' turn 0: "
                                                               "speaker 'narrator' is not known")),
    ({"prompt": "the quick"}, "d.jsonl line 1: field 'completion' is missing (fields present: prompt)"),
    ({"body": "the quick"}, "d.jsonl line 1: cannot tell the row format from its fields (body); expected 'text'"),
])
def test_rows_that_do_not_fit_are_one_line_errors(row: dict[str, Any], expected: str, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert error_of(load_rows, path, "causal-lm").startswith(expected)


def test_messages_without_a_chat_template_say_what_to_pass(tok: Any) -> None:
    message = error_of(encode_rows, [Row(3, {"messages": CONVERSATION})], "causal-lm", tok, 64, {},
                       source="chat.jsonl")
    assert message == ("chat.jsonl line 3: chat rows need a chat template and the tokenizer has none; pass "
                       "--chat-template <file.jinja or template text>, or a --tokenizer that has one")


def test_option_errors(tmp_path: Path) -> None:
    assert error_of(DataOptions, format="sharegpt4").startswith("--format 'sharegpt4' is not known; allowed: auto,")
    assert error_of(DataOptions, chat_template=str(tmp_path / "none.jinja")).startswith(
        "--chat-template '")
    path = _write(tmp_path / "d.jsonl", "jsonl")
    assert error_of(load_rows, path, "seq-cls", options=DataOptions(packing=True)) == (
        "--packing applies to --task causal-lm only, not seq-cls")


def test_a_broken_template_is_a_one_line_error(tok: Any) -> None:
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}" \
             "{% endif %}{{ m['content'] }}{% endfor %}"
    message = error_of(encode_rows, [Row(2, {"messages": CONVERSATION})], "causal-lm", tok, 64, {},
                       options=DataOptions(chat_template=strict), source="c.jsonl")
    assert message.startswith("c.jsonl line 2: the chat template failed on this conversation (")
    assert "no system turns" in message


# ---------------------------------------------------------------------------------------------------- packing
def _features(tok: Any) -> list[dict[str, list[int]]]:
    rows = [Row(i, {"prompt": f"say {w}:", "completion": f" {w} jumps over the lazy dog"})
            for i, w in enumerate(["the quick fox", "hello", "a tiny model", "low rank", "this movie"], start=1)]
    return encode_rows(rows, "causal-lm", tok, 64, {})


def test_packing_fills_blocks_and_keeps_the_masks(tok: Any) -> None:
    features = _features(tok)
    block = 96
    packed = pack(features, block, pad_id=tok.pad_token_id)
    assert all(len(b["input_ids"]) == len(b["labels"]) == len(b["position_ids"]) == block for b in packed)
    assert len(packed) < len(features)
    assert sum(len(f["input_ids"]) for f in features) <= len(packed) * block
    found = 0
    for b in packed:  # every example sits whole in one block: its ids, its labels (first one -100), positions 0..n-1
        starts = [i for i, p in enumerate(b["position_ids"]) if p == 0]
        for start, end in zip(starts, [*starts[1:], block]):
            piece = b["input_ids"][start:end]
            match = [f for f in features if f["input_ids"] == piece]
            if not match:
                assert set(piece) == {tok.pad_token_id} and set(b["labels"][start:end]) == {-100}  # the filler
                continue
            found += 1
            assert b["labels"][start:end] == [-100, *match[0]["labels"][1:]]
            assert b["position_ids"][start:end] == list(range(end - start))
    assert found == len(features)


def test_encode_rows_packs_when_asked(tok: Any) -> None:
    rows = [Row(1, {"text": "the quick brown fox"}), Row(2, {"text": "hello world"})]
    packed = encode_rows(rows, "causal-lm", tok, 32, {}, options=DataOptions(packing=True))
    assert len(packed) == 1 and len(packed[0]["input_ids"]) == 32


def test_a_packed_batch_scores_each_example_as_if_alone(tok: Any) -> None:
    """The collated packed block has no attention mask, so the model (without a KV cache, as in training) keeps the
    examples apart by their position ids: per-token logits of each example equal its logits alone."""
    model = tiny_llama().eval()
    model.config.use_cache = False  # a cache turns transformers' packed-sequence detection off
    features = _features(tok)[:3]
    packed = pack(features, 96, pad_id=tok.pad_token_id)
    batch = collate(packed, pad_id=tok.pad_token_id)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for b, block in enumerate(packed):
            starts = [i for i, p in enumerate(block["position_ids"]) if p == 0]
            for start, end in zip(starts, [*starts[1:], 96]):
                piece = block["input_ids"][start:end]
                if set(piece) == {tok.pad_token_id}:
                    continue
                alone = model(input_ids=torch.tensor([piece])).logits[0]
                # same math over another sequence length and mask: float32 sums in another order, along the
                # longest path of every layer's matmuls (FFN in, the packed block's attention, hidden out)
                torch.testing.assert_close(logits[b, start:end], alone,
                                           **fp_tol(torch.float32, LAYERS * (HIDDEN + FFN + 96)))


def test_collate_pads_position_ids_with_zero() -> None:
    batch = collate([{"input_ids": [5, 6], "labels": [5, 6], "position_ids": [0, 1]},
                     {"input_ids": [7], "labels": [7], "position_ids": [0]}], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1], [0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]  # unequal lengths: a mask is needed


# ---------------------------------------------------------------------------------------------------- help
def test_every_task_row_format_is_in_the_help() -> None:
    from typer.testing import CliRunner

    from peftkit.cli.app import app

    assert set(ROW_FORMATS) == set(TASK_SPECS)
    for task, fields in ROW_FORMATS.items():
        assert f"{task}: {fields}" in DATA_HELP
        assert TASK_SPECS[task].row_format == fields
    out = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    flat = " ".join(out.replace("│", " ").split())
    for task in ROW_FORMATS:
        assert f"{task}:" in flat
    assert "instruction, input (optional), output (alpaca)" in flat


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama saved with a tokenizer that has a chat template, and the same without one."""
    root = tmp_path_factory.mktemp("data-cli")
    model = tiny_llama()
    for name, template in (("chat", CHAT_TEMPLATE), ("plain", None)):
        tokenizer = tiny_tokenizer("bpe")
        tokenizer.chat_template = template
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root / "chat", root / "plain"


def _train(model: Path, data: Path, out: Path, code: int, *flags: str) -> str:
    from typer.testing import CliRunner

    from peftkit.cli.app import app

    result = CliRunner().invoke(app, ["train", "--model", str(model), "--data", str(data), "--output", str(out),
                                      "--max-steps", "1", "--no-progress", *flags])
    assert result.exit_code == code, result.output
    return result.output


def test_train_reads_alpaca_and_chat_data(llama_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    chat, plain = llama_dirs
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "say hi", "input": "", "output": "hello world"}] * 3))
    _train(plain, alpaca, tmp_path / "a", 0)
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    messages = tmp_path / "chat.jsonl"
    messages.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(3)))
    _train(chat, messages, tmp_path / "m", 0)
    assert (tmp_path / "m" / "adapter_config.json").is_file()
    error = _train(plain, messages, tmp_path / "p", 2).strip().splitlines()[-1]
    assert error == ("error: chat.jsonl line 1: chat rows need a chat template and the tokenizer has none; pass "
                     "--chat-template <file.jinja or template text>, or a --tokenizer that has one")


def test_train_data_flags(llama_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _chat, plain = llama_dirs
    rows = tmp_path / "pc.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"say {w}:", "completion": f" {w} world"}) + "\n"
                            for w in ("hello", "the quick", "a tiny")))
    out = _train(plain, rows, tmp_path / "packed", 0, "--packing", "--max-length", "64", "--train-on-prompt")
    assert "step 1/1" in out
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    messages = tmp_path / "chat.jsonl"
    messages.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    _train(plain, messages, tmp_path / "t", 0, "--chat-template", str(template), "--format", "sharegpt")
    saved = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    assert (saved.get("chat_template") or (tmp_path / "t" / "chat_template.jinja").read_text()) == CHAT_TEMPLATE
    error = _train(plain, rows, tmp_path / "f", 2, "--format", "jsonl").strip().splitlines()[-1]
    assert error.startswith("error: --format 'jsonl' is not known; allowed: auto, text, alpaca, messages")
    error = _train(plain, rows, tmp_path / "c", 2, "--task", "seq-cls", "--packing").strip().splitlines()[-1]
    assert error == "error: --packing applies to --task causal-lm only, not seq-cls"


def test_examples_whose_prompt_fills_max_length_are_left_out(tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    short = Row(1, {"prompt": "say", "completion": " hello"})
    long = Row(2, {"prompt": "the quick brown fox jumps over the lazy dog " * 3, "completion": " hello"})
    with caplog.at_level("WARNING", logger="peftkit.cli"):
        features = encode_rows([short, long], "causal-lm", tok, 16, {}, source="pc.jsonl")
    assert features == [encode(tok, short.values, max_length=16)]
    assert caplog.messages == [("pc.jsonl: 1 of 2 examples (the first: line 2) have no token to learn within "
                               "--max-length 16 (the prompt fills it); they are left out")]
    assert error_of(encode_rows, [long], "causal-lm", tok, 16, {}, source="pc.jsonl") == (
        "pc.jsonl: no example has a token to learn within --max-length 16 (the prompts fill it); raise --max-length")


def test_data_keys_of_a_yaml_config(llama_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from peftkit.cli.app import app

    _chat, plain = llama_dirs
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a", "prompt": "say hello:", "completion": " hello world"}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {plain}\ndata: {rows}\nformat: prompt-completion\npacking: true\nmax_length: 32\n"
                      f"max_steps: 1\noutput: {tmp_path / 'out'}\nprogress: false\n")
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "out" / "train_config.yaml").read_text()
    assert "format: prompt-completion" in saved and "packing: true" in saved


def test_a_template_that_rewrites_earlier_answers_learns_what_it_renders_as_given(tok: Any) -> None:
    """Reasoning templates drop the thinking (here: up to '; ') from earlier answers: those answers, no longer
    rendered as given, are read only; the last answer is learned with its end-of-turn text."""
    template = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
                "{{ 'A: ' + m.content.split('; ')[-1] + '<eos>' }}{% elif m.role == 'assistant' %}"
                "{{ 'A: ' + m.content + '<eos>' }}{% else %}{{ 'U: ' + m.content + '<eos>' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}A: {% endif %}")
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the quick; hello"},
             {"role": "user", "content": "more"}, {"role": "assistant", "content": "the lazy; world"}]
    feature = encode(tok, {"messages": turns}, chat_template=template)
    assert [tok.decode(run) for run in _learned_runs(feature)] == ["the lazy; world<eos>"]
    hides_earlier = template.replace("m.content.split('; ')[-1]", "'...'")  # earlier answers are not shown at all
    message = error_of(encode, tok, {"messages": turns[:3]}, chat_template=hides_earlier)
    assert message == ("line 1: the chat template does not render the turns to learn as given; pass "
                       "--train-on-prompt to learn the whole text")
