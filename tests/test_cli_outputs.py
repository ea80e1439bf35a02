"""The outputs people look at: ``peftkit eval`` (classification metrics, loss/perplexity), ``merge`` to a plain
transformers model, ``push`` to the Hub (patched: no network), ``generate`` with sampling, prompt files and
streaming, and the interactive ``chat`` loop.

Adapters are built in-process (``get_peft_model`` on a tiny model loaded from a saved directory, non-identity
init, ``save_pretrained`` + tokenizer), so these tests do not depend on ``peftkit train``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_fixtures import cli, error_line, write_jsonl
from models import _CORPUS, tiny_bert, tiny_llama, tiny_tokenizer
from numerics import TINY_MODEL_REDUCTION, fp_tol

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.cli.evaluate import classification_metrics

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")
SENTIMENT = ["neg", "neu", "pos"]


def save_adapter(base: Any, config: LoraConfig, tokenizer: Any, out: Path) -> Path:
    """``base`` (loaded from a directory, so the adapter records it) + a non-identity adapter, saved with the
    tokenizer."""
    model = get_peft_model(base, config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-outputs")


@pytest.fixture(scope="module")
def llama_dir(work: Path) -> Path:
    path = work / "llama"
    tiny_llama().save_pretrained(path)
    tokenizer = tiny_tokenizer("bpe")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_adapter(work: Path, llama_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    return save_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), config,
                        AutoTokenizer.from_pretrained(llama_dir), work / "lm-adapter")


@pytest.fixture(scope="module")
def bert_cls_dir(work: Path) -> Path:
    """A tiny BERT classifier with three named classes in its config (word-level tokenizer)."""
    path = work / "bert-cls"
    model = tiny_bert("SEQ_CLS")
    model.config.update({"id2label": dict(enumerate(SENTIMENT)), "label2id": {n: i for i, n in enumerate(SENTIMENT)}})
    model.config.num_labels = 3
    model.classifier = torch.nn.Linear(32, 3)
    model.save_pretrained(path)
    tiny_tokenizer("wordlevel").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cls_adapter(work: Path, bert_cls_dir: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["query", "value"])
    return save_adapter(AutoModelForSequenceClassification.from_pretrained(bert_cls_dir), config,
                        AutoTokenizer.from_pretrained(bert_cls_dir), work / "cls-adapter")


# ---------------------------------------------------------------------------------------------------- eval
def test_classification_metrics_match_a_hand_computation() -> None:
    # true:      a a a b b c c c c      predicted: a a b b c c c a a
    # confusion (rows true a, b, c; columns predicted a, b, c): [[2, 1, 0], [0, 1, 1], [2, 0, 2]]
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 0, 0]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [2, 0, 2]]
    assert m["accuracy"] == pytest.approx(5 / 9)
    # precision = diagonal / column sum; recall = diagonal / row sum; f1 = 2pr / (p + r)
    expected = {"a": (2 / 4, 2 / 3, 3), "b": (1 / 2, 1 / 2, 2), "c": (2 / 3, 2 / 4, 4)}
    for name, (p, r, support) in expected.items():
        got = m["per_class"][name]
        assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
        assert got["f1"] == pytest.approx(2 * p * r / (p + r)) and got["support"] == support
    f1s = [2 * p * r / (p + r) for p, r, _ in expected.values()]
    assert m["macro_f1"] == pytest.approx(sum(f1s) / 3)
    # a class never predicted and never true does not count in the macro average; never predicted -> precision 0
    m = classification_metrics([0, 0, 1], [0, 0, 0], ["a", "b", "c"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((2 * (2 / 3) * 1 / (2 / 3 + 1) + 0.0) / 2)


def test_eval_seq_cls_reports_the_models_own_predictions(work: Path, cls_adapter: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = _CORPUS[:7]
    labels = ["pos", "neg", "neu", "pos", "neg", "pos", "neu"]
    data = write_jsonl(work / "cls-eval.jsonl", [{"text": t, "label": lab} for t, lab in zip(texts, labels)])
    report = json.loads(cli("eval", cls_adapter, "--data", data, "--batch-size", "3", "--json", stdout_only=True))
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(work / "bert-cls"),
                                      cls_adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(cls_adapter)
    with torch.no_grad():
        preds = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    truth = [SENTIMENT.index(lab) for lab in labels]
    assert report["task"] == "seq-cls" and report["examples"] == 7 and report["labels"] == SENTIMENT
    assert report["confusion_matrix"] == [[sum(1 for t, p in zip(truth, preds) if (t, p) == (i, j)) for j in range(3)]
                                          for i in range(3)]
    assert report["accuracy"] == pytest.approx(sum(t == p for t, p in zip(truth, preds)) / 7)
    assert set(report["per_class"]) == set(SENTIMENT) and math.isfinite(report["loss"])
    text = cli("eval", cls_adapter, "--data", data)
    assert "accuracy" in text and "macro-F1" in text and "confusion matrix" in text
    bad = write_jsonl(work / "cls-bad.jsonl", [{"text": "x", "label": "happy"}])
    assert "label 'happy'" in error_line(cli("eval", cls_adapter, "--data", bad, code=2))


def test_eval_causal_lm_loss_is_the_token_weighted_mean(work: Path, lm_adapter: Path) -> None:
    from transformers import AutoTokenizer

    from peftkit import AutoPeftModelForCausalLM

    texts = _CORPUS[:5]  # different lengths, so batches of 2 are padded
    data = write_jsonl(work / "lm-eval.jsonl", [{"text": t} for t in texts])
    report = json.loads(cli("eval", lm_adapter, "--data", data, "--batch-size", "2", "--json", stdout_only=True))
    model = AutoPeftModelForCausalLM.from_pretrained(lm_adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_adapter)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[*tokenizer(text)["input_ids"], tokenizer.eos_token_id]])
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert report["task"] == "causal-lm" and report["tokens"] == count
    # padded batches vs one row at a time: same math, other summation order (reductions of the tiny model)
    torch.testing.assert_close(report["loss"], total / count, **fp_tol(torch.float32, TINY_MODEL_REDUCTION))
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert "perplexity" in cli("eval", lm_adapter, "--data", data)


def test_eval_seq2seq_loss_is_the_mean_over_target_tokens(work: Path) -> None:
    from models import tiny_t5
    from transformers import AutoModelForSeq2SeqLM

    base_dir = work / "t5"
    tiny_t5().save_pretrained(base_dir)
    tokenizer = tiny_tokenizer("bpe")
    tokenizer.save_pretrained(base_dir)
    config = LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, init_lora_weights=False, target_modules=["q", "v"])
    adapter = save_adapter(AutoModelForSeq2SeqLM.from_pretrained(base_dir), config, tokenizer, work / "t5-adapter")
    pairs = [(_CORPUS[0], "fox"), (_CORPUS[1], "hello world hello"), (_CORPUS[2], "low rank")]
    data = write_jsonl(work / "s2s.jsonl", [{"text": t, "target": g} for t, g in pairs])
    report = json.loads(cli("eval", adapter, "--data", data, "--batch-size", "2", "--json", stdout_only=True))
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), adapter).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text, target in pairs:
            labels = torch.tensor([tokenizer(text_target=target)["input_ids"]])
            total += float(model(**tokenizer(text, return_tensors="pt"), labels=labels).loss) * labels.shape[1]
            count += labels.shape[1]
    assert report["task"] == "seq2seq-lm" and report["tokens"] == count
    # padded batches vs one row at a time: same math, other summation order (reductions of the tiny model)
    torch.testing.assert_close(report["loss"], total / count, **fp_tol(torch.float32, TINY_MODEL_REDUCTION))


def test_eval_token_cls_counts_one_label_per_word(work: Path) -> None:
    from transformers import AutoModelForTokenClassification

    base_dir = work / "bert-tok"
    tiny_bert("TOKEN_CLS").save_pretrained(base_dir)
    tokenizer = tiny_tokenizer("wordlevel")
    tokenizer.save_pretrained(base_dir)
    config = LoraConfig(task_type="TOKEN_CLS", r=2, init_lora_weights=False, target_modules=["query"])
    adapter = save_adapter(AutoModelForTokenClassification.from_pretrained(base_dir), config, tokenizer,
                           work / "tok-adapter")
    rows = [{"tokens": t.split(), "tags": [i % 3 for i in range(len(t.split()))]} for t in _CORPUS[:3]]
    report = json.loads(cli("eval", adapter, "--data", write_jsonl(work / "tok.jsonl", rows), "--json",
                            stdout_only=True))
    assert report["task"] == "token-cls" and report["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert sum(map(sum, report["confusion_matrix"])) == sum(len(r["tokens"]) for r in rows)


# ---------------------------------------------------------------------------------------------------- merge
def test_merge_writes_a_plain_transformers_model_with_equal_logits(lm_adapter: Path, llama_dir: Path,
                                                                   tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import AutoPeftModelForCausalLM

    out = tmp_path / "merged"
    cli("merge", lm_adapter, "--output", out, "--max-shard-size", "40KB")
    names = {p.name for p in out.iterdir()}
    shards = sorted(p for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith("adapter_") for n in names) and "README.md" not in names
    keys = set()
    for shard in shards:
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
            assert f.metadata() == {"format": "pt"}  # what transformers and vLLM's loaders expect
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert keys == set(base.state_dict())  # the base model's own names: no base_layer, lora_, base_model.model.
    config = json.loads((out / "config.json").read_text())
    assert set(config) == set(json.loads((llama_dir / "config.json").read_text()))  # no extra keys
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(lm_adapter).eval()
    ids = torch.tensor([[5, 17, 33, 9, 60, 2, 40]])
    with torch.no_grad():
        # W + s*B@A merged vs x@W + s*(x@A)@B at run time: same math, another summation order
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   **fp_tol(torch.float32, TINY_MODEL_REDUCTION))
        assert (merged(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE


def test_merge_dtype_and_refuses_a_non_empty_output(lm_adapter: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "half"
    cli("merge", lm_adapter, "--output", out, "--dtype", "bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(out, dtype="auto").parameters()} == {torch.bfloat16}
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = error_line(cli("merge", lm_adapter, "--output", out, code=2))
    assert "is not empty" in line and "--overwrite" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "stale.safetensors").write_bytes(b"x")
    cli("merge", lm_adapter, "--output", out, "--overwrite", "--max-shard-size", "40KB")
    assert not (out / "stale.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    assert "holds the adapter itself" in error_line(cli("merge", lm_adapter, "--output", lm_adapter, "--overwrite",
                                                       code=2))
    assert "--max-shard-size" in error_line(cli("merge", lm_adapter, "--output", tmp_path / "x",
                                               "--max-shard-size", "lots", code=2))


# ---------------------------------------------------------------------------------------------------- push
class FakeHub:
    """Records what ``huggingface_hub.create_repo`` / ``upload_folder`` receive (no network)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, **kwargs: Any) -> Any:
        self.calls.append(("upload_folder", kwargs))
        root = Path(kwargs["folder_path"])
        self.uploaded = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"})()

    def hf_hub_download(self, repo_id: str, filename: str, **kwargs: Any) -> str:
        from huggingface_hub.errors import EntryNotFoundError

        raise EntryNotFoundError(f"{filename} not in {repo_id}")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub()
    for name in ("create_repo", "upload_folder", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, getattr(fake, name))
    return fake


def test_push_uploads_the_adapter_directory(lm_adapter: Path, llama_dir: Path, tmp_path: Path, hub: FakeHub) -> None:
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(lm_adapter, adapter)
    (adapter / "checkpoint-3").mkdir()
    (adapter / "checkpoint-3" / "optimizer.pt").write_bytes(b"big")
    out = cli("push", adapter, "me/tiny-lora", "--private", "--token", "hf_x")
    assert "https://huggingface.co/me/tiny-lora" in out
    create = dict(hub.calls)["create_repo"]
    upload = dict(hub.calls)["upload_folder"]
    assert create["repo_id"] == "me/tiny-lora" and create["private"] is True and create["token"] == "hf_x"
    assert upload["repo_id"] == "me/tiny-lora" and upload["token"] == "hf_x"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= set(hub.uploaded)
    assert not any(name.startswith("checkpoint") for name in hub.uploaded)
    assert hub.uploaded["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert str(llama_dir) not in hub.uploaded["README.md"].decode()  # a local base-model path is not Hub metadata


def test_push_errors_are_one_line(lm_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  hub: FakeHub) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    assert "repo id" in error_line(cli("push", lm_adapter, "not a/valid/id", code=2))
    assert "does not exist" in error_line(cli("push", tmp_path / "absent", "me/x", code=2))

    def no_token(repo_id: str, **kwargs: Any) -> Any:
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.\nYou need to login.")

    monkeypatch.setattr(huggingface_hub, "create_repo", no_token)
    line = error_line(cli("push", lm_adapter, "me/x", code=2))
    assert line.startswith("error: cannot push to 'me/x':") and "token" in line and "hf auth login" in line


# ---------------------------------------------------------------------------------------------------- generate
def _last(out: str, n: int = 1) -> list[str]:
    return out.rstrip("\n").splitlines()[-n:]


def test_generate_max_new_tokens_zero_is_a_one_line_error(lm_adapter: Path) -> None:
    line = error_line(cli("generate", lm_adapter, "--prompt", "the quick", "--max-new-tokens", "0", code=2))
    assert line == "error: --max-new-tokens must be at least 1, got 0"
    for args, expected in ((["--temperature", "0"], "--temperature must be > 0"),
                           (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
                           (["--temperature", "0.7"], "--temperature only applies with --do-sample")):
        assert expected in error_line(cli("generate", lm_adapter, "--prompt", "x", *args, code=2))
    assert "no prompt" in error_line(cli("generate", lm_adapter, code=2))


def test_generate_with_a_bert_style_tokenizer_drops_token_type_ids(work: Path, llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, BertTokenizerFast

    words = sorted({w for t in _CORPUS for w in t.lower().split()})
    vocab = work / "bert-vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words][:128]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    assert "token_type_ids" in tokenizer("the quick")
    adapter = save_adapter(AutoModelForCausalLM.from_pretrained(llama_dir),
                           LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False, target_modules=["q_proj"]), tokenizer,
                           work / "bert-tok-lm")
    out = cli("generate", adapter, "--prompt", "the quick", "--max-new-tokens", "4", stdout_only=True)
    assert _last(out)[0].startswith("the quick")


def test_generate_sampling_is_repeatable_with_a_seed(lm_adapter: Path) -> None:
    args = ["generate", lm_adapter, "--prompt", "the quick", "--max-new-tokens", "12", "--do-sample",
            "--temperature", "3.0", "--top-k", "0", "--top-p", "1.0"]
    first = cli(*args, "--seed", "1", stdout_only=True)
    assert cli(*args, "--seed", "1", stdout_only=True) == first
    assert cli(*args, "--seed", "2", stdout_only=True) != first
    greedy = cli("generate", lm_adapter, "--prompt", "the quick", "--max-new-tokens", "12", stdout_only=True)
    assert cli("generate", lm_adapter, "--prompt", "the quick", "--max-new-tokens", "12", "--repetition-penalty",
               "1.5", stdout_only=True) != greedy


def test_generate_reads_prompts_from_a_file(lm_adapter: Path, tmp_path: Path) -> None:
    prompts = ["the quick brown", "a tiny model", "hello world"]
    expected = cli("generate", lm_adapter, *[a for p in prompts for a in ("--prompt", p)], "--max-new-tokens", "5",
                   stdout_only=True)
    txt = tmp_path / "prompts.txt"
    txt.write_text("the quick brown\n\na tiny model\nhello world\n", encoding="utf-8")
    assert cli("generate", lm_adapter, "--prompts-file", txt, "--max-new-tokens", "5", stdout_only=True) == expected
    jsonl = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompts[0]}, {"text": prompts[1]}, prompts[2]])
    assert cli("generate", lm_adapter, "--prompts-file", jsonl, "--max-new-tokens", "5", stdout_only=True) == expected
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x"}])
    assert "bad.jsonl line 1" in error_line(cli("generate", lm_adapter, "--prompts-file", bad, code=2))


def test_generate_stream_prints_tokens_as_they_come(lm_adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftkit.cli import infer

    chunks: list[str] = []
    original = infer.StreamPrinter.on_finalized_text

    def record(self: Any, text: str, stream_end: bool = False) -> None:
        chunks.append(text)
        original(self, text, stream_end)

    monkeypatch.setattr(infer.StreamPrinter, "on_finalized_text", record)
    args = ["generate", lm_adapter, "--prompt", "the quick brown", "--max-new-tokens", "16"]
    plain = cli(*args, stdout_only=True)
    assert chunks == []  # not a TTY: no streaming unless asked
    streamed = cli(*args, "--stream", stdout_only=True)
    assert streamed == plain
    assert len([c for c in chunks if c]) >= 2 and "the quick brown" + "".join(chunks) == _last(plain)[0]


# ---------------------------------------------------------------------------------------------------- chat
def test_chat_keeps_history_and_exits_on_slash_exit_or_eof(lm_adapter: Path) -> None:
    from transformers import AutoTokenizer

    from peftkit import AutoPeftModelForCausalLM

    out = cli("chat", lm_adapter, "--max-new-tokens", "5", "--system", "be brief",
              input="hello world\nthe quick fox\n/exit\nnever read\n", stdout_only=True)
    replies = out.rstrip("\n").splitlines()
    tokenizer = AutoTokenizer.from_pretrained(lm_adapter)
    model = AutoPeftModelForCausalLM.from_pretrained(lm_adapter).eval()
    history = [{"role": "system", "content": "be brief"}]
    expected = []
    for message in ("hello world", "the quick fox"):
        history.append({"role": "user", "content": message})
        enc = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
        expected.append(reply)
    assert replies == expected
    eof = cli("chat", lm_adapter, "--max-new-tokens", "5", "--system", "be brief", input="hello world\n",
              stdout_only=True)
    assert eof.rstrip("\n").splitlines() == expected[:1]


def test_chat_needs_a_chat_template(work: Path, llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    adapter = save_adapter(AutoModelForCausalLM.from_pretrained(llama_dir),
                           LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False, target_modules=["q_proj"]),
                           tiny_tokenizer("bpe"), work / "no-template")
    line = error_line(cli("chat", adapter, input="hi\n", code=2))
    assert "no chat template" in line and "--chat-template" in line
    template = tmp_path / "t.jinja"
    template.write_text(CHAT_TEMPLATE, encoding="utf-8")
    assert cli("chat", adapter, "--chat-template", template, "--max-new-tokens", "3", input="hi\n/exit\n")


def test_chat_reset_forgets_the_history_and_ctrl_c_exits_130(lm_adapter: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from peftkit.cli import chat

    out = cli("chat", lm_adapter, "--max-new-tokens", "4", input="hello world\n/reset\n\nhello world\n",
              stdout_only=True)
    first, second = out.rstrip("\n").splitlines()
    assert first == second  # the same message on an empty history gets the same (greedy) reply

    def interrupted(*args: Any, **kwargs: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "generate_reply", interrupted)
    cli("chat", lm_adapter, input="hello\n", code=130)


@pytest.mark.parametrize("command", ["eval", "push", "chat", "generate", "merge"])
def test_output_commands_have_help(command: str) -> None:
    assert f"Usage: peftkit {command}" in " ".join(cli(command, "--help").split())
