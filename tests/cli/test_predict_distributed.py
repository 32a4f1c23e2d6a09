"""``deeplab predict`` under torchrun: inputs sharded across ranks, each rank writes its own
outputs, rank 0 prints the one summary; the masks are those of one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab.cli.predict import output_names
from deeplab.eval.evaluate import shard_indices

from tests.helpers import make_checkpoint


def test_shards_are_disjoint_cover_everything_and_keep_names() -> None:
    files = [Path(f"d{i}/img.png") for i in range(7)]  # clashing stems: names come from the whole list
    names = output_names(files)
    shards = [shard_indices(len(files), 3, r) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(7))
    assert len({names[files[i]] for s in shards for i in s}) == 7


@pytest.mark.spawn
@pytest.mark.slow
def test_torchrun_predict_shards_inputs_and_prints_one_summary(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "best.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 30 + 2 * i, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    (photos / "p9.png").write_bytes(b"\x89PNG broken")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["predict", str(photos), "--checkpoint", str(ckpt), "--quiet", "--threads", "1"]
    single = subprocess.run([sys.executable, "-m", "deeplab.cli.main", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = subprocess.run([*launcher, "-m", "deeplab.cli.main", *args, "--out", str(tmp_path / "two")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 1 and multi.returncode == 1, multi.stderr[-3000:]  # the broken file fails on its rank
    assert multi.stdout.count("done: 5, failed: 1") == 1, multi.stdout  # one summary, all ranks counted
    assert multi.stdout.count("deeplab predict: 6 file(s) on 2 ranks") == 1
    assert "p9.png" in multi.stdout and "p9.png" in multi.stderr
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == one and len(one) == 5
    for name in one:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "two" / name)), np.asarray(Image.open(tmp_path / "one" / name)))
