"""Fault tolerance under torchrun: a worker killed at a chosen point, the job restarts and
finishes with the weights of an uninterrupted run; a wedged peer ends the job with the timeout
message; SIGTERM ends a rank blocked in a collective; two agents on loopback, one killed and
started again, rejoin.

Workers are killed at exact points by the test-only hook ``DEEPLAB_TEST_KILL_AT``
(:func:`deeplab._utils.fault_point`), which fires in the first generation only. Every
subprocess has a timeout, so a hang fails the test instead of stalling CI. The model is
DeepLabv3+ MobileNetV2 on 33-pixel crops of 4 written images, 2 CPU ranks (gloo), 6 steps with
a checkpoint every 2: most of each test's time is process start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch

from deeplab.checkpoint import load_checkpoint, save_checkpoint
from deeplab.distributed import find_free_port
from deeplab.train.logging import truncate_records
from deeplab.train.resume import complete_checkpoint, keep_previous, previous_path

from tests.data_fixtures import save_image, save_mask

STEPS, CKPT_EVERY = 6, 2
RUN_TIMEOUT = 300  # seconds; a healthy run takes well under 100 s on 2 shared cores
spawn = [pytest.mark.slow, pytest.mark.spawn]


def _write_data(root: Path) -> Path:
    """A folder dataset: 4 images of 40 x 48 with two classes and an ignore border."""
    (root / "splits").mkdir(parents=True, exist_ok=True)
    names = [f"im{i}" for i in range(4)]
    for i, name in enumerate(names):
        save_image(root / "images" / f"{name}.png", seed=i, h=40, w=48)
        labels = np.zeros((40, 48), dtype=np.int64)
        labels[:, 16 + 4 * i:] = 1
        labels[: 2 + 3 * i] = 255
        save_mask(root / "masks" / f"{name}.png", labels)
    (root / "classes.txt").write_text("background\nthing\n")
    (root / "splits" / "train.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def _train_args(data: Path, out: Path, *extra: str) -> List[str]:
    return ["-m", "deeplab.cli.main", "train", "--dataset", "folder", "--data-root", str(data), "--val-split", "none",
            "--backbone", "mobilenet_v2", "--pretrained-backbone", "none", "--crop-size", "33", "--batch-size", "4",
            "--max-steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY), "--log-every", "1", "--num-workers", "0",
            "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def _env(kill: Optional[str] = None) -> Dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DEEPLAB_TEST_KILL_AT", None)
    if kill:
        env["DEEPLAB_TEST_KILL_AT"] = kill
    return env


def _torchrun(*args: str, max_restarts: int = 2, nodes: Optional[List[str]] = None) -> List[str]:
    topology = nodes or ["--standalone", "--nproc_per_node", "2"]
    return [sys.executable, "-m", "torch.distributed.run", *topology, "--max-restarts", str(max_restarts), *args]


def _run(cmd: List[str], env: Dict[str, str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        pytest.fail(f"torchrun did not finish within {timeout} s (a hang): {tail!r}")


def _records(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, torch.Tensor]:
    """The weights of an uninterrupted 2-rank run."""
    tmp = tmp_path_factory.mktemp("elastic_ref")
    data = _write_data(tmp / "data")
    proc = _run(_torchrun(*_train_args(data, tmp / "run")), _env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "survived 0 restart(s)" in proc.stdout
    return load_checkpoint(tmp / "run" / "last.pt")["model"]


def _assert_exact(reference: Dict[str, torch.Tensor], run_dir: Path, *, resumed_from: int) -> None:
    model = load_checkpoint(run_dir / "last.pt")["model"]
    assert model.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(model[k], reference[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    records = _records(run_dir)
    # Every step logged exactly once, although the steps after the checkpoint ran twice.
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    resumes = [r for r in records if r["kind"] == "resume"]
    assert [(r["step"], r["restarts"]) for r in resumes] == [(resumed_from, 1)]


def _restart_seconds(stderr: str, run_dir: Path) -> float:
    """From the hook's kill line to the restarted generation's first step (its "resume" line)."""
    died = float(re.search(r"DEEPLAB_TEST_KILL_AT: .* time=([0-9.]+)", stderr).group(1))  # type: ignore[union-attr]
    resumed = [r for r in _records(run_dir) if r["kind"] == "resume"][0]["time"]
    return resumed - died


@pytest.mark.parametrize(
    "kill, resumed_from",
    [
        ("after_ckpt:2:1", 2),  # rank 1 dies right after last.pt of step 2 is written
        ("backward:3:1", 2),  # rank 1 dies mid-step: rank 0 is inside SyncBatchNorm/DDP collectives
        ("write_last:4:0", 2),  # rank 0 dies while writing last.pt of step 4: step 2's is used
    ],
    ids=["after-checkpoint", "in-collective", "mid-checkpoint-write"],
)
@pytest.mark.slow
@pytest.mark.spawn
def test_killed_worker_restarts_and_finishes_exactly(tmp_path: Path, reference: Dict[str, torch.Tensor],
                                                     kill: str, resumed_from: int) -> None:
    data = _write_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = _run(_torchrun(*_train_args(data, run_dir)), _env(kill))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "survived 1 restart(s)" in proc.stdout
    # The surviving rank says in one line what happened (no C++ traceback).
    assert re.search(r"deeplab train: error: rank \d: a peer process failed after step \d", proc.stderr), proc.stderr[-3000:]
    _assert_exact(reference, run_dir, resumed_from=resumed_from)
    print(f"{kill}: death to first step of the restart {_restart_seconds(proc.stderr, run_dir):.1f} s")


@pytest.mark.slow
@pytest.mark.spawn
def test_wedged_peer_ends_the_job_with_the_timeout_message(tmp_path: Path) -> None:
    """Rank 1 stops answering (SIGSTOP) mid-step; without restarts left the job must end.

    Bound: rank 0 fails after --dist-timeout (10 s); torchrun then waits its fixed 30 s for the
    stopped rank before SIGKILL. Start-up and 2 steps add well under a minute.
    """
    data = _write_data(tmp_path / "data")
    start = time.monotonic()
    proc = _run(_torchrun(*_train_args(data, tmp_path / "run", "--dist-timeout", "10"), max_restarts=0),
                _env("backward:3:1:stop"), timeout=200)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert re.search(r"deeplab train: error: rank 0: a peer stopped answering \(timed out after --dist-timeout 10 s\)",
                     proc.stderr), proc.stderr[-3000:]
    assert elapsed < 150, f"the job took {elapsed:.0f} s to give up"


def _children(pid: int) -> List[int]:
    """Descendant pids of ``pid`` (from /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == parent:
                    found.append(int(entry.name))
                    frontier.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def _logged_step(run_dir: Path) -> int:
    try:
        steps = [r["step"] for r in _records(run_dir) if r["kind"] == "train"]
    except (OSError, ValueError):
        return 0
    return max(steps, default=0)


@pytest.mark.slow
@pytest.mark.spawn
def test_sigterm_ends_a_rank_blocked_in_a_collective_within_seconds(tmp_path: Path) -> None:
    """Rank 1 wedges mid-step 3; rank 0 blocks in the collective (timeout 600 s, the default).
    SIGTERM, as torchrun's agent sends it, must end rank 0 within the 5 s grace + slack."""
    data = _write_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    agent = subprocess.Popen(_torchrun(*_train_args(data, run_dir), max_restarts=0), env=_env("backward:3:1:stop"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: _logged_step(run_dir) >= 2, 200, "step 2")
        time.sleep(3)  # rank 0 is now waiting for the stopped rank 1 in step 3
        workers = _children(agent.pid)
        ranks = [p for p in workers if "deeplab.cli.main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(ranks) == 2, ranks
        stopped = [p for p in ranks if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"]
        assert len(stopped) == 1
        (blocked,) = [p for p in ranks if p not in stopped]
        sent = time.monotonic()
        os.kill(blocked, signal.SIGTERM)
        _wait_for(lambda: not _alive(blocked), 20, "the blocked rank to exit after SIGTERM")
        took = time.monotonic() - sent
        time.sleep(1)  # the agent relays the rank's last line; then end the wait for the stopped rank
        for pid in [*workers, agent.pid]:  # the workers may sit in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, stderr = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    assert "got SIGTERM and did not stop within 5 s" in stderr, stderr[-3000:]
    assert took < 10, f"the blocked rank took {took:.1f} s to honour SIGTERM"


@pytest.mark.slow
@pytest.mark.spawn
def test_two_agents_on_loopback_one_killed_and_restarted_rejoin_exactly(
        tmp_path: Path, reference: Dict[str, torch.Tensor]) -> None:
    """``--nnodes 2``, c10d rendezvous on 127.0.0.1, one process per "node". Agent B (not the
    store's host) is SIGKILLed with its worker after step 2, then started again."""
    data = _write_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    port = find_free_port()
    nodes = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", "elastic-test"]
    cmd = _torchrun(*_train_args(data, run_dir), nodes=nodes)
    logs = tmp_path / "logs"
    logs.mkdir()

    # torch keeps rank 0's rendezvous bootstrap info from the first round when agents share
    # its TCPStore (the default), so a restarted agent waits forever for the new round's
    # MASTER_ADDR; without sharing, every round publishes a fresh store (README: Fault tolerance).
    env = {**_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, stdout=open(logs / f"{name}.out", "w"),
                                stderr=open(logs / f"{name}.err", "w"), text=True, start_new_session=True)

    agents: List[subprocess.Popen] = []
    try:
        agents.append(start("a"))
        time.sleep(2)  # agent A hosts the rendezvous store
        agents.append(start("b1"))
        _wait_for(lambda: _logged_step(run_dir) >= 2, 200, "step 2")
        for pid in [*_children(agents[1].pid), agents[1].pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        agents[1].wait(timeout=30)
        agents.append(start("b2"))
        for agent in (agents[0], agents[2]):
            agent.wait(timeout=RUN_TIMEOUT)
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    out = {p.stem + p.suffix: p.read_text() for p in logs.iterdir()}
    assert agents[0].returncode == 0 and agents[2].returncode == 0, (out["a.err"][-2000:], out["b2.err"][-2000:])
    assert "finished at step 6" in out["a.out"] + out["b2.out"]
    model = load_checkpoint(run_dir / "last.pt")["model"]
    different = [k for k in reference if not torch.equal(model[k], reference[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    records = _records(run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert [r["kind"] for r in records].count("resume") == 1  # B's loss really restarted the job


# --------------------------------------------------------------------------- fast unit tests (no processes)


def _payload(step: int) -> dict:
    from deeplab.config import TrainConfig

    return {"model": {"w": torch.full((2,), float(step))}, "config": None, "step": step, "optimizer": {},
            "scheduler": {}, "scaler": {}, "rng": {}, "train_config": TrainConfig().to_dict()}


def test_a_torn_last_checkpoint_falls_back_to_the_previous_complete_one(tmp_path: Path) -> None:
    last = tmp_path / "last.pt"
    for step in (2, 4):
        keep_previous(last)
        save_checkpoint(last, _payload(step))
    assert load_checkpoint(previous_path(last))["step"] == 2
    assert complete_checkpoint(last) == last
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a torn copy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert complete_checkpoint(last) == previous_path(last)
    assert any("previous complete checkpoint" in str(w.message) for w in caught)
    assert complete_checkpoint(tmp_path / "none.pt") is None


def test_resume_truncates_the_records_past_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "start", "step": 0}] + [{"kind": "train", "step": s} for s in range(1, 6)]
    lines.append({"kind": "eval", "step": 4})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tra')  # torn last line
    assert truncate_records(path, after_step=2) == 5
    assert [(r["kind"], r["step"]) for r in map(json.loads, path.read_text().splitlines())] == [
        ("start", 0), ("train", 1), ("train", 2)]


def test_a_fresh_start_after_a_killed_generation_drops_its_records(tmp_path: Path) -> None:
    """A generation killed before its first checkpoint leaves records the restart logs again."""
    from deeplab.train.logging import RunLog

    (tmp_path / "metrics.jsonl").write_text('{"kind": "start", "step": 0}\n{"kind": "train", "step": 1}\n')
    log = RunLog(tmp_path, enabled=True, tensorboard=False, resume_step=0)
    log.write({"kind": "start", "step": 0})
    log.close()
    assert [r["kind"] for r in _records(tmp_path)] == ["start", "start"]


def test_each_generation_gets_its_own_store_keys_despite_stale_ones() -> None:
    """generation_store: one token per generation, agreed by all ranks, never an earlier one's."""
    import threading

    import torch.distributed as dist

    from deeplab.distributed import generation_store

    port = find_free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    for generation in range(3):
        views: Dict[int, "dist.Store"] = {}

        def join(rank: int, views: Dict[int, "dist.Store"] = views) -> None:
            views[rank] = generation_store("127.0.0.1", port, rank=rank, world_size=3, timeout_s=20)

        threads = [threading.Thread(target=join, args=(r,)) for r in (2, 1, 0)]  # late rank 0: stale keys read first
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(views) == [0, 1, 2]
        views[0].set("probe", "x")
        assert views[1].get("probe") == views[2].get("probe") == b"x"
        views[0].set(f"gen-{generation}", "1")
        if generation:
            assert not views[1].check([f"gen-{generation - 1}"])  # an earlier generation's key is invisible
    del server
