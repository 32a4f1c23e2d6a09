"""``--augment FILE.yaml``: an albumentations pipeline, seeded from the sample generator, checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab.data import DatasetError, TrainTransform
from deeplab.data.augment import AlbumentationsTransform

A = pytest.importorskip("albumentations")


def save_pipeline(path: Path, *transforms: object) -> Path:
    A.save(A.Compose(list(transforms)), str(path), data_format="yaml")
    return path


def sample(seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 5:25] = 1
    mask[:, 40:] = 2
    return image, mask


def test_same_generator_seed_gives_the_same_sample(tmp_path: Path) -> None:
    path = save_pipeline(tmp_path / "aug.yaml", A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=1.0),
                         A.Affine(rotate=(-20, 20), p=1.0, mask_interpolation=0, fill_mask=255))
    t = AlbumentationsTransform(str(path), then=TrainTransform(crop_size=33, flip=False))
    image, mask = sample()
    a = t(image, mask, generator=torch.Generator().manual_seed(7))
    b = t(image, mask, generator=torch.Generator().manual_seed(7))
    c = t(image, mask, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 33, 33) and set(torch.unique(a[1]).tolist()) <= {0, 1, 2, 255}
    # the order of calls does not matter: a fresh transform (another worker) reproduces it
    other = AlbumentationsTransform(str(path), then=TrainTransform(crop_size=33, flip=False))
    other(image, mask, generator=torch.Generator().manual_seed(1))
    d = other(image, mask, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a[0], d[0], rtol=0, atol=0)


def test_interpolated_mask_is_a_clear_error(tmp_path: Path) -> None:
    path = save_pipeline(tmp_path / "bad.yaml", A.Affine(rotate=(30, 30), p=1.0, mask_interpolation=1))
    image = Image.fromarray(np.zeros((40, 40, 3), np.uint8))
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 20:] = 10
    with pytest.raises(DatasetError, match=r"bad.yaml changed the mask's values.*mask_interpolation: 0"):
        AlbumentationsTransform(str(path))(image, mask, generator=torch.Generator().manual_seed(0))


def test_mask_size_change_is_a_clear_error(tmp_path: Path) -> None:
    path = save_pipeline(tmp_path / "ok.yaml", A.HorizontalFlip(p=1.0))
    t = AlbumentationsTransform(str(path))

    class ImageOnlyResize:
        def set_random_seed(self, seed: int) -> None:
            pass

        def __call__(self, image: np.ndarray, mask: np.ndarray) -> dict:
            return {"image": image[::2, ::2], "mask": mask}

    t.pipeline = ImageOnlyResize()
    image, mask = sample()
    with pytest.raises(DatasetError, match="changed their sizes differently"):
        t(image, mask)


def test_missing_or_bad_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        AlbumentationsTransform(str(tmp_path / "nope.yaml"))
    (tmp_path / "junk.yaml").write_text("just: text\n")
    with pytest.raises(DatasetError, match="not a serialized albumentations pipeline"):
        AlbumentationsTransform(str(tmp_path / "junk.yaml"))


def test_train_cli_takes_augment(tmp_path: Path) -> None:
    from deeplab.checkpoint import load_checkpoint
    from deeplab.cli import main as cli

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nthing\nother\n")
    for i in range(2):
        image, mask = sample(i)
        image.save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    path = save_pipeline(tmp_path / "aug.yaml", A.HorizontalFlip(p=0.5), A.GaussNoise(p=1.0))
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "folder", "--data-root", str(root), "--train-split", "all",
                     "--val-split", "none", "--max-steps", "1", "--augment", str(path), "--loss", "ce:1,dice:0.5",
                     "--class-weights", "auto", "--backbone", "mobilenet_v2", "--pretrained-backbone", "none",
                     "--crop-size", "17", "--batch-size", "2", "--num-workers", "0", "--device", "cpu",
                     "--no-progress", "--out", str(run)]) == 0
    cfg = load_checkpoint(run / "last.pt")["train_config"]
    assert cfg["augment"] == str(path) and cfg["loss"] == "ce:1,dice:0.5"
    assert len(cfg["class_weights"]) == 3 and min(cfg["class_weights"]) > 0


class PairData(torch.utils.data.Dataset):
    """Raw ``(PIL image, mask)`` pairs, as a dataset yields them before the transform."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple:
        return sample(i)


def test_exact_resume_with_augment_and_a_composite_loss(tmp_path: Path) -> None:
    from deeplab.checkpoint import load_checkpoint
    from deeplab.config import ModelConfig, TrainConfig
    from deeplab.train import train

    path = save_pipeline(tmp_path / "aug.yaml", A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=1.0),
                         A.Affine(rotate=(-20, 20), p=1.0, mask_interpolation=0, fill_mask=255))

    def go(run_dir: Path, **kw: object) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                    torch.nn.Dropout2d(0.2), torch.nn.Conv2d(8, 3, 1))
        cfg = TrainConfig(lr=0.05, max_steps=5, batch_size=2, crop_size=16, num_workers=0, device="cpu",
                          run_dir=str(run_dir), eval_every=0, ckpt_every=0, log_every=1, seed=4,
                          loss="ce:1,lovasz:0.5", class_weights=(0.5, 1.0, 2.0), augment=str(path),
                          resume_from=kw.pop("resume_from", None))  # type: ignore[arg-type]
        transform = AlbumentationsTransform(str(path), then=TrainTransform(crop_size=16, flip=False))
        train(model, PairData(), cfg, transform=transform, model_config=ModelConfig(num_classes=3,
              backbone="mobilenet_v2"), progress=False, **kw)  # type: ignore[arg-type]
        return model

    ref = go(tmp_path / "ref")
    go(tmp_path / "split", stop_at=2)
    resumed = go(tmp_path / "split", resume_from="auto")
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 5
