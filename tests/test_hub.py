"""deeplab.hub against a Hugging Face Hub on 127.0.0.1 (tests/fake_hub.py): save -> push -> load.

huggingface_hub does the real HTTP work (create_repo, preupload, LFS batch + PUT, commit; HEAD/GET
resolve into its own cache), pointed at the local server with HF_ENDPOINT.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("huggingface_hub")
pytest.importorskip("safetensors")

import deeplab  # noqa: E402
from deeplab import hub  # noqa: E402
from deeplab.checkpoint import save_checkpoint  # noqa: E402
from deeplab.config import TrainConfig  # noqa: E402
from deeplab.hub import HubError  # noqa: E402

from . import fake_hub  # noqa: E402

CLASSES = ["background", "cat", "dog"]


@pytest.fixture(scope="module")
def server() -> Iterator[fake_hub.FakeHub]:
    hub_server = fake_hub.serve()
    yield hub_server
    assert hub_server.server is not None
    hub_server.server.shutdown()


@pytest.fixture(autouse=True)
def hub_env(server: fake_hub.FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test: the fake Hub, an empty Hub cache and TORCH_HOME of its own, online."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hf-cache"


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = deeplab.build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=3)
    with torch.no_grad():  # non-default BatchNorm statistics: buffers must travel too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def push(model: torch.nn.Module, folder: Path, repo: str, **kw: Any) -> hub.PushResult:
    hub.save_pretrained(model, folder, classes=CLASSES, dataset={"dataset": "voc"}, metrics={"mIoU": 0.5})
    return hub.push_to_hub(folder, repo, **kw)


def test_round_trip_is_bit_for_bit(server: fake_hub.FakeHub, tmp_path: Path) -> None:
    model = small_model(0)
    result = push(model, tmp_path / "saved", "org/round-trip")
    assert re.fullmatch(r"[0-9a-f]{40}", result.commit) and result.url == f"{server.url}/org/round-trip"
    # the weights went through the LFS protocol, the card and config as regular files
    assert ("POST", "/org/round-trip.git/info/lfs/objects/batch") in server.requests
    assert server.repos["org/round-trip"].commits[result.commit].lfs == {
        "model.safetensors": True, "config.json": False, "README.md": False}

    loaded = deeplab.from_pretrained("org/round-trip")  # the top-level name, as a user types it
    assert_same_weights(model, loaded)
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # hf:// spelling and the full loader: classes, palette, normalisation, the commit it came from
    full = hub.load_from_hub("hf://org/round-trip")
    assert full.classes == CLASSES and full.revision == result.commit
    assert full.normalization == model.normalization.to_dict()
    # the uploaded files are exactly the saved ones
    files = server.repos["org/round-trip"].commits[result.commit].files
    for name in ("config.json", "model.safetensors", "README.md"):
        assert files[name] == (tmp_path / "saved" / name).read_bytes()


def test_revision_pinning(server: fake_hub.FakeHub, tmp_path: Path) -> None:
    first, second = small_model(1), small_model(2)
    v1 = push(first, tmp_path / "v1", "org/pinned")
    v2 = push(second, tmp_path / "v2", "org/pinned")
    assert v1.commit != v2.commit
    assert_same_weights(second, deeplab.from_pretrained("org/pinned"))           # main = newest
    assert_same_weights(first, deeplab.from_pretrained(f"org/pinned@{v1.commit}"))  # pinned commit
    assert_same_weights(first, hub.from_pretrained("org/pinned", revision=v1.commit))
    # a branch
    dev = push(first, tmp_path / "dev", "org/pinned", revision="dev")
    assert dev.revision == "dev"
    assert_same_weights(first, deeplab.from_pretrained("hf://org/pinned@dev"))
    assert_same_weights(second, deeplab.from_pretrained("org/pinned@main"))
    with pytest.raises(HubError, match=r"no revision 'nope'"):
        deeplab.from_pretrained("org/pinned@nope")
    with pytest.raises(HubError, match="no such model repo"):
        deeplab.from_pretrained("org/missing")


def test_offline_with_and_without_cache(server: fake_hub.FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_model(3)
    push(model, tmp_path / "saved", "org/offline")
    deeplab.from_pretrained("org/offline")  # fills the cache
    seen = len(server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert_same_weights(model, deeplab.from_pretrained("org/offline"))
    assert len(server.requests) == seen  # not one request
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HubError) as info:
        deeplab.from_pretrained("org/offline")
    message = str(info.value)
    assert "\n" not in message
    assert "config.json is not in the Hub cache" in message and "HF_HUB_OFFLINE=1" in message
    assert str(tmp_path / "empty-cache") in message


def flip_one_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]


@pytest.mark.parametrize("how", ["hash", "size"])
def test_tampered_weights_on_the_hub_are_refused(server: fake_hub.FakeHub, tmp_path: Path, how: str) -> None:
    repo = f"org/tampered-{how}"
    push(small_model(4), tmp_path / "saved", repo)
    original = (tmp_path / "saved" / "model.safetensors").read_bytes()
    server.tamper(repo, "model.safetensors", flip_one_byte(original) if how == "hash" else original[:-8])
    with pytest.raises(HubError) as info:
        deeplab.from_pretrained(repo)
    expected = "has sha256" if how == "hash" else "bytes but config.json records"
    assert expected in str(info.value) and "refusing to load" in str(info.value)


def test_tampered_cache_is_refused(server: fake_hub.FakeHub, tmp_path: Path, hub_env: Path) -> None:
    push(small_model(5), tmp_path / "saved", "org/cache-tamper")
    deeplab.from_pretrained("org/cache-tamper")
    blobs = [p for p in (hub_env / "models--org--cache-tamper" / "blobs").iterdir() if p.stat().st_size > 100_000]
    assert len(blobs) == 1
    blobs[0].write_bytes(flip_one_byte(blobs[0].read_bytes()))
    with pytest.raises(HubError, match="has sha256"):
        deeplab.from_pretrained("org/cache-tamper")
    # force_download replaces the bad copy
    assert isinstance(hub.from_pretrained("org/cache-tamper", force_download=True), torch.nn.Module)


def test_strict_load_and_foreign_repos(tmp_path: Path) -> None:
    folder = hub.save_pretrained(small_model(6), tmp_path / "m", classes=CLASSES)
    config = json.loads((folder / "config.json").read_text())
    config["model_config"]["decoder_channels"] = 128  # weights no longer fit the rebuilt model
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HubError, match="do not fit"):
        hub.load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"architectures": ["SegformerForSemanticSegmentation"]}))
    with pytest.raises(HubError, match="not a deeplab model config"):
        hub.load_pretrained(folder)
    with pytest.raises(HubError, match="not a Hub model id"):
        hub.parse_hub_id("hf://just-a-name")
    assert hub.parse_hub_id("hf://org/name@v1") == ("org/name", "v1")


def write_checkpoint(path: Path, model: torch.nn.Module, **extra: Any) -> Path:
    payload: Dict[str, Any] = {"model": model.state_dict(), "config": model.config.to_dict(), "classes": CLASSES,
                               "palette": [[0, 0, 0], [200, 0, 0], [0, 200, 0]],
                               "normalization": model.normalization.to_dict()}
    payload.update(extra)
    return save_checkpoint(path, payload)


def test_model_card_figures(tmp_path: Path) -> None:
    model = small_model(7)
    ckpt = write_checkpoint(
        tmp_path / "best.pt", model, step=3000,
        train_config=TrainConfig(max_steps=3000, batch_size=8, lr=0.01).to_dict(),
        dataset={"dataset": "voc", "train_split": "train_aug", "val_split": "val"},
        metrics={"mIoU": 0.6012, "pixel_accuracy": 0.9034}, best={"metric": "mIoU", "value": 0.6123, "step": 2500},
    )
    folder = hub.save_pretrained_from_checkpoint(ckpt, tmp_path / "card")
    card = (folder / "README.md").read_text()
    assert "| mIoU | 61.23 | val | output stride 16, scale 1.0, whole image | deeplab train" in card
    assert "| pixel_accuracy | 90.34 | val |" in card
    assert "Measured at training step 2500." in card
    assert "value: 61.23" in card and "datasets:\n- voc" in card  # the Hub's YAML header
    assert "Trained on **voc** (train_split `train_aug`, val_split `val`)." in card
    assert "| max_steps | 3000 |" in card and "| batch_size | 8 |" in card and "| lr | 0.01 |" in card
    assert "Encoder-Decoder with Atrous Separable Convolution" in card
    assert "`mobilenet_v2`" in card and "deeplab.from_pretrained" in card and "## Limitations" in card
    config = json.loads((folder / "config.json").read_text())
    assert config["classes"] == CLASSES and config["palette"][1] == [200, 0, 0]
    assert config["dataset"]["dataset"] == "voc" and config["metrics"]["mIoU"] == pytest.approx(0.6123)

    # a converted TF zoo model: the card cites the reference and the zoo's own figure and setting
    zoo = deeplab.zoo.get_entry("xception65_coco_voc_trainaug").to_dict()
    converted = write_checkpoint(tmp_path / "zoo.pt", model, zoo=zoo,
                                 converted_from={"url": "http://x/t.tar.gz", "sha256": "ab" * 32},
                                 dataset={"dataset": "voc", "source": "tensorflow model zoo"})
    card = (hub.save_pretrained_from_checkpoint(converted, tmp_path / "zoo-card") / "README.md").read_text()
    assert "# xception65_coco_voc_trainaug" in card
    assert "| mIoU | 82.20 | val | output stride 16, scale 1.0, whole image | the TF reference (model_zoo.md) |" in card
    assert "tensorflow/models/tree/master/research/deeplab" in card and f"sha256 `{'ab' * 32}`" in card


def test_cli_push_then_load_by_name(server: fake_hub.FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deeplab.cli.main import main

    model = small_model(8)
    ckpt = write_checkpoint(tmp_path / "best.pt", model)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "hub", "--out", str(tmp_path / "exported")]) == 0
    assert "equal bit for bit" in capsys.readouterr().out
    assert main(["push", "--folder", str(tmp_path / "exported"), "--repo", "org/cli"]) == 0
    out = capsys.readouterr().out
    assert f"pushed to {server.url}/org/cli" in out
    assert main(["push", "--checkpoint", str(ckpt), "--repo", "org/cli2"]) == 0
    # the Segmenter and --model hf:// load it by name and predict what the checkpoint predicts
    image = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    ours = deeplab.Segmenter.from_checkpoint(ckpt).predict(image)
    assert np.array_equal(deeplab.Segmenter.from_pretrained("hf://org/cli2").predict(image), ours)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "photo.png")
    assert main(["predict", str(tmp_path / "photo.png"), "--model", "hf://org/cli", "--out", str(tmp_path / "pred")]) == 0
    masks = [p for p in (tmp_path / "pred").rglob("*.png") if "photo" in p.name]
    assert masks
    # a push without a token is refused with one line
    os.environ.pop("HF_TOKEN")
    assert main(["push", "--folder", str(tmp_path / "exported"), "--repo", "org/cli3"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of earlier steps
    assert last.startswith("deeplab push: error: the Hub refused the upload to org/cli3: 401")
