"""The researcher's daily loop: two processes on one run folder or one grid, retrying after a
failure, error messages that name the culprit, key=value overrides anywhere on the command
line, and TensorBoard tracking.

Everything runs on a tiny corpus written here (48 + 12 one-second wav clips) and the demo's
tiny backbones, so the whole file stays near two minutes on a shared 2-core CPU. The lock
and launch tests start real ``jobs/train.py`` and ``jobs/launch_grid.py`` processes; the
holder is frozen with SIGSTOP while the second one tries, so no test depends on timing.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from ser_hpc.config import ConfigError, load_config, valid_keys
from ser_hpc.data.audio import AudioError, load_audio
from ser_hpc.data.corpus import CorpusError, check_audio, read_corpus
from ser_hpc.data.labels import EMOSPEECH_LABELS as LABELS
from ser_hpc.locks import LAUNCH_LOCK, RUN_LOCK, FolderLock, LockHeld, run_lock
from ser_hpc.train.run_folder import RunFolder, close_tracking
from tests.conftest import REPO

PY = sys.executable
WORDS = {"neutral": "el informe llega mañana", "disgust": "qué asco me da todo esto",
         "anger": "estoy harto de esta ley", "sadness": "qué pena tan grande",
         "joy": "¡qué alegría verte por aquí!", "fear": "tengo miedo de lo que viene"}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SER_HPC_THREADS": "1",
       "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """48 train + 12 test clips of 1 s (8 + 2 per class) and the four tiny backbones."""
    from ser_hpc.demo.backbones import build_demo_backbones
    root = tmp_path_factory.mktemp("tiny")
    audio = root / "corpus" / "audio"
    audio.mkdir(parents=True)
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    for split, n in (("train", 48), ("test", 12)):
        rows = []
        for i in range(n):
            label = LABELS[i % 6]
            ident = f"{split}{i:04d}.wav"
            wave = 0.3 * np.sin(2 * np.pi * (120 + 40 * (i % 6)) * t) + 0.05 * rng.standard_normal(16000)
            sf.write(audio / ident, wave.astype("float32"), 16000)
            rows.append((ident, label, WORDS[label]))
        with open(root / "corpus" / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "label", "transcription"])
            writer.writerows(rows)
    backbones = build_demo_backbones(root / "backbones", seed=1234, corpus_texts=list(WORDS.values()) * 20)
    return {"root": root, "corpus": root / "corpus", "backbones": backbones}


def run_tree(tiny, **over) -> dict:
    """A run config (no run.dir) that trains in a few seconds."""
    c, bb = tiny["corpus"], tiny["backbones"]
    tree = {"data": {"train_csv": str(c / "train.csv"), "audio_dir": str(c / "audio"), "test_csv": str(c / "test.csv"),
                     "crop_seconds": 0.5, "eval_batch_size": 16, "augment_prob": 0.0},
            "model": {"speech": {"name": str(bb["wav2vec2-tiny"])}, "text": {"name": str(bb["roberta-tiny"])},
                      "head_width": 32, "hidden_layers": 1},
            "train": {"lr": 2e-3, "batch_size": 8, "max_steps": 2, "eval_every": 1, "log_every": 1}}
    for key, value in over.items():
        node = tree
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def job(name: str):
    """A jobs/*.py entry point as a module, so its main(argv) runs in this process."""
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def write_grid(tmp_path: Path, tiny, name="g", axes=None, **extra) -> Path:
    bb = tiny["backbones"]
    write_yaml(tmp_path / "base.yaml", run_tree(tiny))
    grid = {"name": name, "run_config": "base.yaml",
            "backbone_pairs": [{"name": "w2v+roberta", "speech": str(bb["wav2vec2-tiny"]),
                                "text": str(bb["roberta-tiny"])}],
            "axes": axes or {"model.hidden_layers": [1, 2]}, "pack_size": 2,
            "ensemble": {"top_k": 2, "method": "mean"}, "results_dir": str(tmp_path / "results"), **extra}
    return write_yaml(tmp_path / f"{name}.yaml", grid)


# ---------------------------------------------------------------------------- 1. locks: the lock itself

HOLD = ("import sys, time; from ser_hpc.locks import run_lock; lock = run_lock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(float(sys.argv[2])); lock.release()")


def _holder(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([PY, "-c", HOLD, str(folder), str(seconds)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _fake_lock(folder: Path, age_s: float = 0.0, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": "node-17.cluster", "pid": 4242, "slurm_job": "9001", "slurm_restart": 0,
              "started": "2026-01-01T00:00:00+0000", "purpose": "training", "token": "someone-else", **holder}
    path = folder / RUN_LOCK
    path.write_text(json.dumps(record))
    if age_s:
        past = time.time() - age_s
        os.utime(path, (past, past))
    return path


def test_second_holder_is_refused_naming_the_first_and_a_dead_one_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    holder = _holder(run, 60)
    try:
        with pytest.raises(LockHeld) as err:
            run_lock(run).acquire()
        msg = str(err.value)
        assert f"host {socket.gethostname()}" in msg and f"pid {holder.pid}" in msg and "(training)" in msg
        assert err.value.holder["pid"] == holder.pid
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind
        holder.wait()
    assert (run / RUN_LOCK).exists()
    lock = run_lock(run).acquire()  # same host, pid gone: stale, taken over at once
    assert "is no longer running" in caplog.text
    assert json.loads((run / RUN_LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / RUN_LOCK).exists()


def test_other_hosts_lock_is_stale_only_when_its_heartbeat_is(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    run = tmp_path / "run"
    _fake_lock(run, age_s=5)
    with pytest.raises(LockHeld, match=r"host node-17\.cluster, pid 4242, Slurm job 9001.*last heartbeat \d+ s ago"):
        FolderLock(run, stale_after_s=60).acquire()
    _fake_lock(run, age_s=120)  # no heartbeat for 2 min: its node died
    lock = FolderLock(run, stale_after_s=60).acquire()
    assert lock.owned()
    lock.release()


def test_earlier_incarnation_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    _fake_lock(run, slurm_job="77_3", slurm_restart=0)
    with pytest.raises(LockHeld):  # the same incarnation on another node: another rank, alive
        run_lock(run).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the old one cannot be running
    lock = run_lock(run).acquire()
    assert lock.record["slurm_job"] == "77_3" and lock.record["slurm_restart"] == 1
    lock.release()


def test_heartbeat_refreshes_and_a_lost_lock_is_noticed_and_left_alone(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SER_HPC_LOCK_HEARTBEAT_S", "0.1")
    run = tmp_path / "run"
    lock = run_lock(run).acquire()
    os.utime(run / RUN_LOCK, (time.time() - 500, time.time() - 500))
    wait_for(lambda: time.time() - (run / RUN_LOCK).stat().st_mtime < 5, 5, "a heartbeat")
    _fake_lock(run)  # someone took it over (as if this process had stalled past the timeout)
    wait_for(lambda: lock.lost, 5, "the loss to be noticed")
    assert "lost the lock" in caplog.text
    lock.release()
    assert json.loads((run / RUN_LOCK).read_text())["token"] == "someone-else"  # not ours to remove


def test_only_one_of_many_takes_a_stale_lock(tmp_path):
    run = tmp_path / "run"
    _fake_lock(run, age_s=1000)
    race = ("import sys, time; from ser_hpc.locks import run_lock, LockHeld\n"
            "try:\n    lock = run_lock(sys.argv[1]).acquire()\nexcept LockHeld:\n    print('refused')\n"
            "else:\n    print('won', flush=True); time.sleep(3); lock.release()")
    procs = [subprocess.Popen([PY, "-c", race, str(run)], env=ENV, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused"] * 3 + ["won"], outcomes


def test_wait_blocks_until_the_holder_releases(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run, 1.5)
    start = time.monotonic()
    lock = FolderLock(run, heartbeat_s=0.4).acquire(wait=True)
    assert time.monotonic() - start > 0.5 and holder.wait(timeout=10) == 0
    lock.release()


def test_a_second_acquire_in_the_same_process_is_refused_like_any_other(tmp_path):
    """Locks are not re-entrant: a run's lock is taken once, by train_pack."""
    first = run_lock(tmp_path / "run").acquire()
    with pytest.raises(LockHeld) as err:
        run_lock(tmp_path / "run").acquire()
    assert f"pid {os.getpid()}" in str(err.value) and err.value.holder["token"] == first.record["token"]
    assert first.owned()  # the refused attempt left the holder's lock alone
    first.release()
    assert not (tmp_path / "run" / RUN_LOCK).exists()


HOLD_UNTIL = ("import pathlib, sys, time; from ser_hpc.locks import run_lock; lock = run_lock(sys.argv[1]).acquire(); "
              "print('held', flush=True)\nwhile not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.05)\n"
              "lock.release()")


def test_a_pack_of_a_plan_is_refused_or_waits_for_a_held_run_folder(tiny, tmp_path, monkeypatch, capsys):
    """jobs/train.py --plan: exit 3 naming the holder; with --wait, trained once the holder is gone
    (the lock is taken by train_pack alone; --wait travels down through run_pack)."""
    monkeypatch.chdir(tmp_path)
    tree = run_tree(tiny, **{"train.max_steps": 1, "run.dir": "runs/r0", "run.name": "r0"})
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"launch_dir": str(tmp_path), "packs": [["r0"]],
                                "runs": [{"run_id": "r0", "name": "r0", "config": tree}]}))
    run, go = tmp_path / "runs" / "r0", tmp_path / "release"
    holder = subprocess.Popen([PY, "-c", HOLD_UNTIL, str(run), str(go)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"

    class ReleaseWhenWaiting(logging.Handler):  # the holder lets go only once the waiter waits
        def emit(self, record):
            if record.getMessage().startswith("waiting for"):
                go.touch()
    waiting = ReleaseWhenWaiting()
    logging.getLogger("ser_hpc.locks").addHandler(waiting)
    try:
        assert job("train").main(["--plan", str(plan), "--pack", "0"]) == 3
        err = capsys.readouterr().err
        assert "run folder runs/r0 is in use" in err and f"pid {holder.pid}" in err
        assert not (run / "config.yaml").exists() and not go.exists()
        assert job("train").main(["--plan", str(plan), "--pack", "0", "--wait"]) == 0
        assert go.exists() and holder.wait(timeout=30) == 0  # it waited for the holder's release
    finally:
        logging.getLogger("ser_hpc.locks").removeHandler(waiting)
        holder.kill()
        holder.wait()
        close_tracking()
    assert json.loads((run / "final.json").read_text())["status"] == "done"
    assert not (run / RUN_LOCK).exists()


# ---------------------------------------------------------------------------- 1, 3, 5, 7 with jobs/train.py

@pytest.fixture(scope="module")
def train_story(tiny, tmp_path_factory):
    """One run folder through a day: a failed attempt (missing CSV), the corrected command
    (A), a second trainer on the same folder while A holds it (B), and one that waits (C)."""
    tmp = tmp_path_factory.mktemp("story")
    run = tmp / "run"
    cfg = write_yaml(tmp / "run.yaml", run_tree(tiny))
    train = [PY, str(REPO / "jobs" / "train.py")]
    failed = subprocess.run(train + [str(cfg), f"run.dir={run}", f"data.train_csv={tmp / 'missing.csv'}"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    after_failure = sorted(p.name for p in run.iterdir())
    a = subprocess.Popen(train + [str(cfg), f"run.dir={run}"], env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / RUN_LOCK).exists() and json.loads((run / RUN_LOCK).read_text() or "{}").get("pid")
                 == a.pid, 300, "A to lock the run folder", a)
        os.kill(a.pid, signal.SIGSTOP)  # A holds the lock, frozen: B and C find it held whatever the timing
        b = subprocess.run(train + [str(cfg), f"run.dir={run}"], env=ENV, capture_output=True, text=True,
                           timeout=300)
        # key=value after an option (was: "unrecognized arguments").
        c = subprocess.Popen(train + [str(cfg), f"run.dir={run}", "--wait", "train.max_steps=2"], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(8)
        c_waiting = c.poll() is None
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=300)
    c_out, c_err = c.communicate(timeout=300)
    return {"run": run, "failed": failed, "after_failure": after_failure, "a": (a.returncode, a_out, a_err, a.pid),
            "b": b, "c": (c.returncode, c_out, c_err), "c_waiting": c_waiting}


@pytest.mark.slow
def test_second_trainer_on_a_run_folder_is_refused_naming_the_holder(train_story):
    b, (a_rc, _, a_err, a_pid) = train_story["b"], train_story["a"]
    assert b.returncode == 3, b.stderr[-3000:]
    assert f"run folder {train_story['run']} is in use" in b.stderr
    assert f"host {socket.gethostname()}, pid {a_pid}" in b.stderr and "--wait" in b.stderr
    assert "Traceback" not in b.stderr
    assert a_rc == 0, a_err[-3000:]
    assert metric_steps(train_story["run"]) == [1, 2]  # one trainer's evaluations, not two interleaved
    assert not (train_story["run"] / RUN_LOCK).exists()  # released at the end


@pytest.mark.slow
def test_wait_takes_the_folder_after_the_holder_and_finds_it_done(train_story):
    rc, out, err = train_story["c"]
    assert train_story["c_waiting"], err[-3000:]
    assert rc == 0, err[-3000:]
    assert "waiting for" in err and "already done" in err
    assert f"results: {train_story['run'].resolve()}" in out
    assert metric_steps(train_story["run"]) == [1, 2]


@pytest.mark.slow
def test_failed_validation_claims_nothing_and_the_corrected_command_runs(train_story):
    failed, run = train_story["failed"], train_story["run"]
    assert failed.returncode == 2 and "missing.csv" in failed.stderr
    assert "config.yaml" not in train_story["after_failure"]  # nothing claimed before the data was checked
    final = json.loads((run / "final.json").read_text())
    assert final["status"] == "done"
    old = list((run / "attempts").iterdir())
    assert len(old) == 1 and json.loads((old[0] / "final.json").read_text())["status"] == "failed"
    assert "missing.csv" in json.loads((old[0] / "final.json").read_text())["reason"]
    assert "the earlier attempt (failed" in train_story["a"][2]


@pytest.mark.slow
def test_run_writes_tensorboard_events_matching_metrics(train_story):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = train_story["run"]
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "dev/macro_f1", "dev/loss"} <= set(acc.Tags()["scalars"])
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("dev/macro_f1", "dev_macro_f1"), ("train/loss", "train_loss"), ("train/lr", "lr")):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [r["step"] for r in records]
        assert [v for _, v in got] == pytest.approx([r[key] for r in records], rel=1e-6)


# ---------------------------------------------------------------------------- 3. retry rules (RunFolder)

def _cfg(tiny, run_dir, **over):
    from ser_hpc.config import config_from_dict
    return config_from_dict({**run_tree(tiny, **over), "run": {"dir": str(run_dir)}})


def test_another_config_is_refused_once_a_run_reached_a_checkpoint(tiny, tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.claim(_cfg(tiny, folder.path))
    (folder.path / "checkpoint").mkdir()
    (folder.path / "checkpoint" / "latest.json").write_text('{"step": 1, "dir": "step_000001"}')
    folder.write_final({"status": "failed", "reason": "killed"})
    with pytest.raises(ConfigError, match="reached a checkpoint.*different config"):
        folder.check_claim(_cfg(tiny, folder.path, **{"train.lr": 1e-4}))


def test_a_failed_attempt_without_checkpoint_is_moved_aside_not_deleted(tiny, tmp_path):
    folder = RunFolder(tmp_path / "run")
    first = _cfg(tiny, folder.path)
    folder.claim(first)
    folder.log_metrics({"step": 1, "train_loss": 1.0, "lr": 1e-3, "dev_macro_f1": 0.1})
    folder.write_final({"status": "failed", "reason": "BackboneError: bad model"})
    second = _cfg(tiny, folder.path, **{"train.lr": 1e-4})
    folder.claim(second)
    (attempt,) = (folder.path / "attempts").iterdir()
    assert sorted(p.name for p in attempt.iterdir()) == ["config.yaml", "final.json", "metrics.jsonl", "tb"]
    assert yaml.safe_load((attempt / "config.yaml").read_text())["train"]["lr"] == pytest.approx(2e-3)
    assert folder.config.read_text() == second.to_yaml()
    assert not folder.final.exists() and not folder.metrics.exists()
    close_tracking()


def test_missing_backbone_then_corrected_config_in_the_same_folder(tiny, tmp_path, capsys):
    from ser_hpc.models.encoders import BackboneError
    from ser_hpc.train.loop import train_pack
    run = tmp_path / "run"
    with pytest.raises(BackboneError, match=r"the folder .*models/roberta/v2 does not exist, and it is not a "
                                            r"Hugging Face hub id either"):
        train_pack([_cfg(tiny, run, **{"model.text.name": "models/roberta/v2"})])[0]
    assert json.loads((run / "final.json").read_text())["status"] == "failed"
    assert not (run / "config.yaml").exists()
    final = train_pack([_cfg(tiny, run, **{"train.max_steps": 1})])[0]
    assert final["status"] == "done" and len(list((run / "attempts").iterdir())) == 1


def test_training_leaves_the_callers_configs_unchanged(tiny, tmp_path):
    """setup and train_pack work on copies: the caller's config keeps data.labels null, while
    the heads and config.yaml carry the resolved classes; the same config again is the same
    run (skipped), another config is refused."""
    import torch

    from ser_hpc.data.sources import load_splits
    from ser_hpc.train import distributed as D
    from ser_hpc.train.loop import setup, train_pack
    run = tmp_path / "run"
    cfg = _cfg(tiny, run, **{"train.max_steps": 1})
    before = cfg.to_yaml()
    assert cfg.data.labels is None
    final = train_pack([cfg])[0]
    assert final["status"] == "done" and cfg.to_yaml() == before
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["data"]["labels"] == final["labels"] and len(final["labels"]) == 6
    assert recorded == {**yaml.safe_load(before), "data": {**yaml.safe_load(before)["data"], "labels": final["labels"]}}
    again = train_pack([cfg])[0]  # relaunch: the same run, skipped
    assert again == json.loads((run / "final.json").read_text()) and again["status"] == "done"
    assert cfg.to_yaml() == before
    with pytest.raises(ConfigError, match="a finished run with a different config"):
        train_pack([_cfg(tiny, run, **{"train.max_steps": 1, "train.lr": 1e-4})])
    splits = load_splits(cfg.data)
    others = [_cfg(tiny, tmp_path / "other", **{"train.max_steps": 1})]
    _, heads = setup([cfg, *others], splits, D.DistEnv(), torch.device("cpu"))
    assert cfg.to_yaml() == before and others[0].data.labels is None
    assert all(h.cfg is not c and h.cfg.data.labels == list(splits.labels) for h, c in zip(heads, [cfg, *others]))
    close_tracking()


# ---------------------------------------------------------------------------- 1, 5, 7 with jobs/launch_grid.py

@pytest.fixture(scope="module")
def grid_story(tiny, tmp_path_factory):
    """Launch A of a grid (--cluster local, an override after the options), and launch B of the
    same grid while A holds the launch lock."""
    tmp = tmp_path_factory.mktemp("gridstory")
    grid = write_grid(tmp, tiny)
    out = tmp / "results" / "g"
    cmd = [PY, str(REPO / "jobs" / "launch_grid.py"), str(grid), "--cluster", "local", "train.max_steps=2"]
    a = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / LAUNCH_LOCK).exists(), 300, "A to take the launch lock", a)
        os.kill(a.pid, signal.SIGSTOP)  # its pack subprocess goes on; A keeps the launch lock
        b = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=400)
    return {"out": out, "grid": grid, "tmp": tmp, "a": (a.returncode, a_out, a_err, a.pid), "b": b}


@pytest.mark.slow
def test_second_launch_of_a_grid_is_refused_and_the_first_finishes(grid_story):
    b, (a_rc, a_out, a_err, a_pid) = grid_story["b"], grid_story["a"]
    out = grid_story["out"]
    assert b.returncode == 3, b.stderr[-3000:]
    assert "another launch of grid g is in progress" in b.stderr and f"pid {a_pid}" in b.stderr
    assert "nothing was submitted" in b.stderr
    assert a_rc == 0, a_err[-4000:]  # its local pack took run locks while A held the launch lock
    assert f"leaderboard: {out.resolve() / 'ensemble' / 'leaderboard.md'}" in a_out  # the absolute folder
    assert len(json.loads((out / "manifest.json").read_text())["launches"]) == 1  # B submitted nothing
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2 and all(metric_steps(r) == [1, 2] for r in runs)  # max_steps=2 came through
    assert not (out / LAUNCH_LOCK).exists() and not any((r / RUN_LOCK).exists() for r in runs)


@pytest.mark.slow
def test_tensorboard_logdir_of_a_grid_compares_its_runs(grid_story):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(grid_story["out"]))
    mux.Reload()
    runs = sorted(mux.Runs())
    assert len(runs) == 2 and all(r.startswith("runs/") and r.endswith("/tb") for r in runs), runs
    for r in runs:
        assert [e.step for e in mux.Tensors(r, "dev/macro_f1")] == [1, 2]


@pytest.mark.slow
def test_corrupt_head_in_predict_names_the_file_and_member(grid_story, tiny, tmp_path, capsys):
    ens = tmp_path / "ensemble"
    shutil.copytree(grid_story["out"] / "ensemble", ens)
    member = json.loads((ens / "ensemble.json").read_text())["members"][0]
    head = ens / member["head"]
    head.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    clip = tiny["corpus"] / "audio" / "test0000.wav"
    rc = job("predict").main([str(ens), "--audio", str(clip), "--text", "hola", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"member {member['run_id']} (" in err and str(head) in err
    assert "is not a readable safetensors file" in err and "corrupt or truncated" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- 5. overrides on grids

def test_override_of_an_axis_or_pair_key_or_run_dir_is_refused(tiny, tmp_path, capsys):
    from ser_hpc.grid.plan import load_grid
    grid = write_grid(tmp_path, tiny, axes={"train.lr": [1e-3, 2e-3]})
    with pytest.raises(ConfigError, match=r"override train\.lr=5 would be ignored: the grid's axis 'train\.lr'"):
        load_grid(grid, {"train.lr": 5})
    with pytest.raises(ConfigError, match=r"backbone pair\(s\) w2v\+roberta .* set model\.text\.name"):
        load_grid(grid, {"model.text.name": "x"})
    with pytest.raises(ConfigError, match=r"run\.dir='elsewhere' cannot be given to a grid: the grid gives every run"):
        load_grid(grid, {"run.dir": "elsewhere"})
    assert load_grid(grid, {"train.max_steps": 3}).overrides["train.max_steps"] == 3
    # Through the entry point, with the override after the options.
    rc = job("launch_grid").main([str(grid), "--dry-run", "train.lr=5"])
    assert rc == 2 and "axis 'train.lr'" in capsys.readouterr().err
    # A pack of a launched grid takes its configs from the plan: overrides there would be ignored.
    with pytest.raises(SystemExit) as exit_:
        job("train").main(["--plan", str(tmp_path / "plan.json"), "--pack", "0", "train.lr=5"])
    assert exit_.value.code == 2 and "--plan takes no config files or key=value overrides" in capsys.readouterr().err


def test_dry_run_prints_the_absolute_results_folder_and_warns_about_dotdot(tiny, tmp_path, capsys, monkeypatch):
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    grid = write_grid(tmp_path, tiny, results_dir="../elsewhere/results")
    rc = job("launch_grid").main([str(grid), "--dry-run", "--profile", str(REPO / "configs/cluster/local.yaml"),
                                  "train.max_steps=3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"-> {tmp_path / 'elsewhere' / 'results' / 'g'}" in out
    assert "WARNING: ../elsewhere/results/g climbs out of the current directory" in out


# ---------------------------------------------------------------------------- 4. errors that name the culprit

def _latin1_corpus(tiny, tmp_path) -> Path:
    text = (tiny["corpus"] / "train.csv").read_text(encoding="utf-8")
    path = tmp_path / "latin1.csv"
    path.write_bytes(text.encode("latin-1"))
    return path


def test_latin1_csv_names_file_row_and_byte_in_train_and_dry_run(tiny, tmp_path, capsys):
    bad = _latin1_corpus(tiny, tmp_path)
    raw = bad.read_bytes()
    offset = next(i for i, byte in enumerate(raw) if byte >= 0x80)  # the first non-ASCII byte: "ñ" of "mañana"
    line = raw.count(b"\n", 0, offset) + 1
    want = (f"{bad}, row {line} (byte offset {offset}): byte 0x{raw[offset]:02x} is not valid UTF-8; the row reads, "
            "as Latin-1: 'train0000.wav,neutral,el informe llega mañana'")
    cfg = write_yaml(tmp_path / "run.yaml", run_tree(tiny))
    rc = job("train").main([str(cfg), f"run.dir={tmp_path / 'run'}", f"data.train_csv={bad}"])
    err = capsys.readouterr().err
    assert rc == 2 and want in err and "save it as UTF-8" in err and "Traceback" not in err
    grid = write_grid(tmp_path, tiny)
    rc = job("launch_grid").main([str(grid), "--dry-run", f"data.train_csv={bad}"])
    err = capsys.readouterr().err
    assert rc == 2 and want in err and "nothing was submitted" in err


def test_missing_multi_part_model_path_in_dry_run(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bb = tiny["backbones"]
    grid = write_grid(tmp_path, tiny)
    tree = yaml.safe_load(grid.read_text())
    tree["backbone_pairs"] = [{"name": "p", "speech": str(bb["wav2vec2-tiny"]), "text": "models/roberta/v2"}]
    write_yaml(grid, tree)
    rc = job("launch_grid").main([str(grid), "--dry-run", "--profile", str(REPO / "configs/cluster/local.yaml")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert (f"text model 'models/roberta/v2': the folder {tmp_path / 'models/roberta/v2'} does not exist, and it "
            "is not a Hugging Face hub id either") in err
    assert "Repo id must be" not in err and "Traceback" not in err


def _base(tmp_path) -> Path:
    return write_yaml(tmp_path / "r.yaml", {"data": {"train_csv": "t.csv", "audio_dir": "a"},
                                            "model": {"speech": {"name": "s"}, "text": {"name": "t"}}})


def test_nan_and_inf_are_refused_for_every_float_key(tmp_path):
    base = _base(tmp_path)
    cfg = load_config([base])
    flat_floats = [k for k in valid_keys() if isinstance(_get(cfg, k), float)]
    assert {"train.lr", "train.weight_decay", "data.dev_fraction", "model.dropout"} <= set(flat_floats)
    for key in flat_floats:
        for bad in (".nan", "inf", "-.inf"):
            with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number"):
                load_config([base], [f"{key}={bad}"])
    with pytest.raises(ConfigError, match=r"'data\.speeds' must be a finite number"):
        load_config([base], ["data.speeds=[0.9, .nan]"])


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_empty_yaml_says_the_file_is_empty(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        load_config([empty])
    (tmp_path / "comments.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"comments\.yaml: the file is only comments"):
        load_config([tmp_path / "comments.yaml"])
    assert job("train").main([str(empty), "run.dir=x"]) == 2
    assert "the file is empty" in capsys.readouterr().err


def test_empty_or_non_audio_mp3_is_named_as_such(tiny, tmp_path):
    audio = tmp_path / "audio"
    shutil.copytree(tiny["corpus"] / "audio", audio)
    rows = (tiny["corpus"] / "train.csv").read_text(encoding="utf-8").splitlines()
    rows[1] = rows[1].replace("train0000.wav", "empty.mp3")
    rows[2] = rows[2].replace("train0001.wav", "page.mp3")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (audio / "empty.mp3").write_bytes(b"")
    (audio / "page.mp3").write_bytes(b"<html><body>404 Not Found</body></html>\n")
    examples = read_corpus(tmp_path / "t.csv", audio)
    with pytest.raises(CorpusError, match=r"t\.csv, row 2: audio file .*empty\.mp3 is empty \(0 bytes\)"):
        check_audio(examples, tmp_path / "t.csv")
    with pytest.raises(CorpusError, match=r"row 3: unreadable audio file .*page\.mp3 \(40 bytes\): not audio that "
                                          r"can be decoded .* starts with text \('<html>"):
        check_audio(examples[1:], tmp_path / "t.csv")
    for name in ("empty.mp3", "page.mp3"):
        with pytest.raises(AudioError) as err:
            load_audio(audio / name, 16000)
        assert "possibly a pipe" not in str(err.value) and name in str(err.value)


# ---------------------------------------------------------------------------- 7. TensorBoard details

def test_tensorboard_resume_rewrites_replayed_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = RunFolder(tmp_path / "run")
    for step in (1, 2, 3):
        folder.log_metrics({"step": step, "train_loss": 1.0, "lr": 1e-3, "dev_macro_f1": 0.1, "dev_ua": 0.2,
                            "dev_wa": 0.3, "elapsed_s": 1.0})
    folder.truncate_metrics(1)  # resumed from the checkpoint of step 1: steps 2, 3 are redone
    for step in (2, 3):
        folder.log_metrics({"step": step, "train_loss": 0.5, "lr": 1e-3, "dev_macro_f1": 0.4, "dev_ua": 0.5,
                            "dev_wa": 0.6, "elapsed_s": 2.0})
    close_tracking()
    acc = EventAccumulator(str(folder.tb_dir))
    acc.Reload()
    assert [(e.step, round(e.value, 3)) for e in acc.Scalars("dev/macro_f1")] == [(1, 0.1), (2, 0.4), (3, 0.4)]
    assert [e.value for e in acc.Scalars("dev/UA")] == pytest.approx([0.2, 0.5, 0.5])
    assert [e.value for e in acc.Scalars("dev/WA")] == pytest.approx([0.3, 0.6, 0.6])
    assert metric_steps(folder.path) == [1, 2, 3]


def test_tensorboard_failure_never_fails_training(tiny, tmp_path, monkeypatch, caplog):
    import torch.utils.tensorboard as tb
    from ser_hpc.train.loop import train_pack

    class Broken:
        def __init__(self, *a, **k):
            raise OSError("disk quota exceeded")

    monkeypatch.setattr(tb, "SummaryWriter", Broken)
    final = train_pack([_cfg(tiny, tmp_path / "run", **{"train.max_steps": 2})])[0]
    assert final["status"] == "done" and metric_steps(tmp_path / "run") == [1, 2]
    assert caplog.text.count("TensorBoard: cannot write events") == 1  # once, not per evaluation


@pytest.mark.slow
def test_dry_run_of_the_paper_grid_without_data_or_models_prints_the_plan_then_every_problem(tmp_path):
    """From an empty folder with an empty model cache: the 28-run plan first (runs, packs,
    sbatch lines, estimated GPU-hours), then every problem, and a non-zero exit."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_grid.py"),
                          str(REPO / "configs" / "grid" / "emospeech2024.yaml"), "--dry-run"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    out = res.stdout
    assert out.startswith("grid emospeech2024: 28 runs in 7 packs")
    assert "profile marenostrum5" in out  # the grid's cluster profile, found from another folder
    assert sum(line.startswith("  pack ") for line in out.splitlines()) == 28
    assert "  train_1: sbatch --array=" in out and "GPU-hours" in out
    err = res.stderr
    assert "CSV file not found: data/EmoSPeech2024/EmoSPeech_phase_2_train.csv" in err
    assert err.count("no config.json in the hub cache") == 8  # 4 speech + 4 text backbones
    assert "python jobs/prefetch_models.py" in err and "nothing was submitted" in err
    assert "Traceback" not in err
    assert not (tmp_path / "results").exists()
