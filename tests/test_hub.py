"""Hub ids: loading from the Hugging Face cache (offline, ``cache_dir`` / ``HF_HUB_CACHE``, ``revision``,
``subfolder``, typed errors), the online code path against a fake ``hf_hub_download``, and ``push_to_hub`` against
fake ``create_repo`` / ``upload_folder``. Nothing here touches the network.

The cache is laid out as ``huggingface_hub`` writes it (``models--owner--name/{blobs,snapshots/<commit>,refs}``);
``huggingface_hub.scan_cache_dir`` must accept it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import safetensors.torch
import torch
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from models import MLP, causal_lm_inputs, tiny_llama
from numerics import TINY_MODEL_REDUCTION, fp_tol

from peftkit import (
    AdapterLoadError,
    AutoPeftModelForCausalLM,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftModelForCausalLM,
    get_peft_model,
)

# Logits of two models (another instance, library, path or merge) run other kernels on other buffers: float32
# over the tiny models' reductions (see tests/numerics.py)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
REPO = "owner/mlp-lora"


def _mlp() -> MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MLP()


def _x() -> torch.Tensor:
    return torch.randn(3, 10, generator=torch.Generator().manual_seed(1))


def _saved_mlp_adapter(directory: Path, seed: int, **save_kwargs) -> torch.Tensor:
    """Save a random (non-identity) LoRA adapter on ``MLP`` to ``directory``; return its outputs on ``_x()``."""
    torch.manual_seed(seed)
    pm = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False)).eval()
    pm.save_pretrained(directory, **save_kwargs)
    with torch.no_grad():
        return pm(x=_x())


def _put_in_cache(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",),
                  prefix: str = "") -> None:
    """Copy every file under ``source`` into the cache as huggingface_hub does: content-addressed ``blobs/``,
    ``snapshots/<commit>/<prefix><path>`` symlinks to them, and ``refs/<branch>`` holding the commit."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / prefix / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


@pytest.fixture
def offline(monkeypatch):
    """Offline mode on; a ``hf_hub_download`` call without ``local_files_only=True`` fails the test (transformers
    calls it with ``local_files_only=True`` when it loads a base model offline)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    download = huggingface_hub.hf_hub_download

    def cache_only_download(*args, **kwargs):
        assert kwargs.get("local_files_only") is True, f"hf_hub_download called while offline: {args} {kwargs}"
        return download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only_download)


@pytest.fixture
def hub_cache(tmp_path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A cache with ``REPO``: adapter A at commit A (``main``), adapter B at commit B (branch ``v2``), and a copy
    of B under ``sub/`` of commit A. Returns (cache dir, outputs of A, outputs of B)."""
    cache = tmp_path / "hf-cache"
    out_a = _saved_mlp_adapter(tmp_path / "a", seed=1)
    out_b = _saved_mlp_adapter(tmp_path / "b", seed=2)
    _put_in_cache(cache, REPO, tmp_path / "a", COMMIT_A, refs=("main",))
    _put_in_cache(cache, REPO, tmp_path / "b", COMMIT_A, refs=("main",), prefix="sub")
    _put_in_cache(cache, REPO, tmp_path / "b", COMMIT_B, refs=("v2",))
    assert not torch.allclose(out_a, out_b)
    return cache, out_a, out_b


def _run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(x=_x())


# ------------------------------------------------------------------------------------------------ cache, offline


def test_cache_layout_is_what_huggingface_hub_reads(hub_cache):
    cache, _, _ = hub_cache
    info = huggingface_hub.scan_cache_dir(cache)
    (repo,) = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {COMMIT_A, COMMIT_B}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main", "v2"}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({}, "a"), ({"revision": "main"}, "a"), ({"revision": "v2"}, "b"), ({"revision": COMMIT_B}, "b"),
     ({"subfolder": "sub"}, "b"), ({"revision": COMMIT_A, "subfolder": "sub"}, "b")],
    ids=["default", "main", "branch", "commit", "subfolder", "commit-subfolder"],
)
def test_from_pretrained_hub_id_from_cache(offline, hub_cache, kwargs, expected):
    cache, out_a, out_b = hub_cache
    loaded = PeftModel.from_pretrained(_mlp(), REPO, cache_dir=cache, **kwargs)
    torch.testing.assert_close(_run(loaded), out_a if expected == "a" else out_b, rtol=0, atol=0)
    config = PeftConfig.from_pretrained(REPO, cache_dir=cache, **kwargs)
    assert isinstance(config, LoraConfig) and set(config.target_modules) == {"lin0"}


def test_load_adapter_hub_id_and_hf_hub_cache(offline, hub_cache, monkeypatch):
    """Without ``cache_dir`` the default cache (``HF_HUB_CACHE``, read by huggingface_hub at import) is used."""
    cache, out_a, out_b = hub_cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    pm = PeftModel.from_pretrained(_mlp(), REPO)
    pm.load_adapter(REPO, adapter_name="v2", revision="v2")
    assert pm.active_adapter == "default"
    torch.testing.assert_close(_run(pm), out_a, rtol=0, atol=0)
    pm.set_adapter("v2")
    torch.testing.assert_close(_run(pm), out_b, rtol=0, atol=0)


def test_bin_only_repo_falls_back_offline(offline, tmp_path):
    """A cached snapshot without ``adapter_model.safetensors`` is "file absent", not "repo missing"."""
    expected = _saved_mlp_adapter(tmp_path / "bin", seed=3, safe_serialization=False)
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    _put_in_cache(tmp_path / "cache", "owner/bin-only", tmp_path / "bin", COMMIT_A)
    loaded = PeftModel.from_pretrained(_mlp(), "owner/bin-only", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(_run(loaded), expected, rtol=0, atol=0)


def test_local_files_only_reads_the_cache_when_online(hub_cache, monkeypatch):
    cache, out_a, _ = hub_cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: pytest.fail("local_files_only=True must not download"))
    loaded = PeftModel.from_pretrained(_mlp(), REPO, cache_dir=cache, local_files_only=True)
    torch.testing.assert_close(_run(loaded), out_a, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("repo_id", "kwargs", "named"),
    [("owner/missing", {}, "owner/missing"), (REPO, {"revision": "nope"}, "nope")],
    ids=["repo", "revision"],
)
def test_not_cached_offline_is_a_typed_error_naming_the_id(offline, hub_cache, repo_id, kwargs, named):
    cache, _, _ = hub_cache
    model = _mlp()
    with pytest.raises(AdapterLoadError, match=re.escape(named)) as info:
        PeftModel.from_pretrained(model, repo_id, cache_dir=cache, **kwargs)
    assert "offline" in str(info.value) and str(cache) in str(info.value)
    assert type(model.lin0) is torch.nn.Linear
    pm = get_peft_model(_mlp(), LoraConfig(target_modules=["lin1"]))
    with pytest.raises(AdapterLoadError, match=re.escape(named)):
        pm.load_adapter(repo_id, adapter_name="x", cache_dir=cache, **kwargs)
    assert list(pm.peft_config) == ["default"]


def test_missing_subfolder_in_cached_repo(offline, hub_cache):
    cache, _, _ = hub_cache
    with pytest.raises(AdapterLoadError, match=re.escape(f"{REPO}/nowhere")):
        PeftModel.from_pretrained(_mlp(), REPO, cache_dir=cache, subfolder="nowhere")


def test_auto_peft_model_from_hub_ids(offline, tmp_path):
    """Adapter and base model both come from the cache; ``revision`` picks the adapter's revision."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    cache = tmp_path / "cache"
    _put_in_cache(cache, "owner/tiny-llama", tmp_path / "base", COMMIT_A)
    inputs = causal_lm_inputs(2)
    outputs = {}
    for seed, commit, ref in ((1, COMMIT_A, "main"), (2, COMMIT_B, "v2")):
        torch.manual_seed(seed)
        config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                            base_model_name_or_path="owner/tiny-llama")
        pm = get_peft_model(tiny_llama(), config).eval()
        pm.save_pretrained(tmp_path / ref)
        _put_in_cache(cache, "owner/llama-lora", tmp_path / ref, commit, refs=(ref,))
        with torch.no_grad():
            outputs[ref] = pm(**inputs).logits
    for ref in ("main", "v2"):
        loaded = AutoPeftModelForCausalLM.from_pretrained("owner/llama-lora", revision=ref, cache_dir=cache)
        assert type(loaded) is PeftModelForCausalLM
        assert loaded.peft_config["default"].base_model_name_or_path == "owner/tiny-llama"
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, outputs[ref], **TOL)


# ------------------------------------------------------------------------------------------------ online code path


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/fake"))


def test_online_download_arguments_and_errors(tmp_path, monkeypatch):
    """Online, files come from ``hf_hub_download`` with the caller's revision/subfolder/token/cache_dir; a file
    that is not in the repo falls through to ``.bin``; a missing repo is a typed error naming it."""
    expected = _saved_mlp_adapter(tmp_path / "repo", seed=4, safe_serialization=False)
    calls = []

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        calls.append((repo_id, filename, subfolder, kwargs))
        if repo_id != "owner/online":
            raise RepositoryNotFoundError(f"404 {repo_id}", response=_response(404))
        path = tmp_path / "repo" / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = {"revision": "v3", "token": "hf_secret", "cache_dir": str(tmp_path / "c")}
    loaded = PeftModel.from_pretrained(_mlp(), "owner/online", subfolder="s", **hub)
    torch.testing.assert_close(_run(loaded), expected, rtol=0, atol=0)
    assert [c[1] for c in calls] == ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
    assert all(c[0] == "owner/online" and c[2] == "s" and c[3] == hub for c in calls)

    with pytest.raises(AdapterLoadError, match=re.escape("'owner/gone'")):
        PeftModel.from_pretrained(_mlp(), "owner/gone")


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_local_path_that_does_not_exist_never_asks_the_hub(tmp_path, monkeypatch, relative):
    """An absolute path, or a relative one that cannot be a repo id, is a missing directory, named in the error."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the Hub"))
    missing = "runs/no/such/dir" if relative else str(tmp_path / "nope")
    with pytest.raises(AdapterLoadError, match=re.escape(repr(missing))):
        PeftModel.from_pretrained(_mlp(), missing)


# ------------------------------------------------------------------------------------------------ push_to_hub


class _FakeHub:
    """Records ``create_repo`` / ``upload_folder`` calls and the uploaded files' bytes."""

    def __init__(self) -> None:
        self.created: list[tuple[str, dict]] = []
        self.uploads: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.remote_readme: Path | None = None  # a README.md already in the repo
        self.downloads: list[tuple[str, str, dict]] = []

    def hf_hub_download(self, repo_id, filename, **kwargs):
        self.downloads.append((repo_id, filename, kwargs))
        if filename != "README.md" or self.remote_readme is None:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(self.remote_readme)

    def create_repo(self, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, folder_path, **kwargs):
        self.uploads.append(kwargs)
        root = Path(folder_path)
        self.files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return "commit-info"


@pytest.fixture
def fake_hub(monkeypatch) -> _FakeHub:
    hub = _FakeHub()
    monkeypatch.setattr(huggingface_hub, "create_repo", hub.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", hub.upload_folder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    return hub


def _header(readme: bytes) -> list[str]:
    text = readme.decode()
    assert text.startswith("---\n")
    return text.split("---\n")[1].splitlines()


def test_push_to_hub_uploads_adapter_files_and_model_card(fake_hub):
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        base_model_name_or_path="owner/tiny-llama")
    pm = get_peft_model(tiny_llama(), config)
    pm.add_adapter("other", LoraConfig(task_type="CAUSAL_LM", target_modules=["k_proj"], r=2))
    result = pm.push_to_hub("me/llama-lora", commit_message="first", private=True, token="hf_x", revision="dev",
                            create_pr=True, tags=["my-tag", "lora"])
    assert result == "commit-info"
    assert fake_hub.created == [("me/llama-lora", {"private": True, "token": "hf_x", "exist_ok": True,
                                                   "repo_type": "model"})]
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "me/llama-lora" and upload["commit_message"] == "first"
    assert (upload["token"], upload["revision"], upload["create_pr"]) == ("hf_x", "dev", True)
    assert set(fake_hub.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors",
                                   "other/adapter_config.json", "other/adapter_model.safetensors"}
    weights = safetensors.torch.load(fake_hub.files["adapter_model.safetensors"])
    assert set(weights) == {k.replace(".default", "") for k, v in pm.state_dict().items()
                            if ".lora_" in k and ".default." in k}
    header = _header(fake_hub.files["README.md"])
    assert "library_name: peft" in header and "base_model: owner/tiny-llama" in header
    tags = header[header.index("tags:") + 1:]
    assert tags == sorted(tags)
    assert {t[2:] for t in tags} == {"base_model:adapter:owner/tiny-llama", "lora", "transformers", "my-tag"}


def test_push_to_hub_drops_a_local_base_path_and_passes_save_kwargs(fake_hub, tmp_path):
    base_dir = tmp_path / "local-base"
    base_dir.mkdir()
    pm = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"], base_model_name_or_path=str(base_dir)))
    pm.push_to_hub("me/mlp", safe_serialization=False)
    assert set(fake_hub.files) == {"README.md", "adapter_config.json", "adapter_model.bin"}
    assert fake_hub.uploads[0]["commit_message"] == "Upload model"
    header = _header(fake_hub.files["README.md"])
    assert "library_name: peft" in header
    assert not any("base_model" in line or str(base_dir) in line for line in header)
    assert "- lora" in header


def test_push_to_hub_keeps_the_card_already_in_the_repo(fake_hub, tmp_path):
    fake_hub.remote_readme = tmp_path / "remote.md"
    fake_hub.remote_readme.write_text("---\nlicense: mit\ntags:\n- old\n---\n\n# My adapter\n\nHand-written.\n")
    pm = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"]))
    pm.push_to_hub("me/mlp", token="hf_y", revision="dev", tags=["new"])
    assert fake_hub.downloads == [("me/mlp", "README.md", {"token": "hf_y", "revision": "dev"})]
    readme = fake_hub.files["README.md"].decode()
    assert readme.endswith("\n# My adapter\n\nHand-written.\n")
    assert _header(fake_hub.files["README.md"]) == ["license: mit", "tags:", "- new", "- old"]
