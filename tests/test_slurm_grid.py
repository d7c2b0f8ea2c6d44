"""The demo grid on a real one-node Slurm cluster: through jobs/launch_grid.py (submitit)
and through slurm/submit_grid.sh (plain sbatch)."""
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime

import pytest

from tests.conftest import REPO
from tests.test_grid import write_grid

pytestmark = pytest.mark.slow  # real Slurm / several processes: `pytest -m "not slow"` skips it

PROFILE = REPO / "configs" / "cluster" / "localhost_slurm.yaml"


def _sacct(cluster, job_id):
    out = cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,Start,End").stdout
    rows = {}
    for line in out.splitlines():
        jid, state, start, end = line.split("|")
        rows[jid] = (state.split()[0], start, end)
    return rows


def _when(stamp):
    return datetime.fromisoformat(stamp)


def _check_grid_results(out, n_runs):
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["runs"]) == n_runs
    for run in plan["runs"]:
        final = json.loads((out / "runs" / run["run_id"] / "final.json").read_text())
        assert final["status"] == "done", final
    ens = json.loads((out / "ensemble" / "ensemble.json").read_text())
    assert ens["n_done"] == n_runs and len(ens["members"]) == min(3, n_runs)
    for name in ("leaderboard.md", "leaderboard.csv", "predictions_test.csv", "confusion_matrix.png"):
        assert (out / "ensemble" / name).stat().st_size > 0, name


def _check_array_then_aggregate(cluster, train_job, agg_job, n_tasks):
    tasks = _sacct(cluster, train_job)
    array_tasks = {k: v for k, v in tasks.items() if re.fullmatch(rf"{train_job}_\d+", k)}
    assert len(array_tasks) == n_tasks, tasks  # ONE array job, a task per pack
    # submitit returns once the job's result file is written; Slurm may still say RUNNING.
    assert cluster.wait(agg_job, timeout=60) == "COMPLETED"
    agg = _sacct(cluster, agg_job)[agg_job]
    last_end = max(_when(end) for _, _, end in array_tasks.values())
    assert _when(agg[1]) >= last_end  # started only after the whole array ended


def test_launch_grid_on_slurm_then_relaunch_skips(slurm_cluster, demo_assets, tmp_path):
    # pack_size 2: each array task trains the 2 head settings of a pair in one process.
    path = write_grid(tmp_path, demo_assets, pack_size=2,
                      overrides={"train.max_steps": 4, "train.eval_every": 2,
                                 "data.prepared_dir": str(tmp_path / "prepared")})
    cmd = [sys.executable, str(REPO / "jobs" / "launch_grid.py"), str(path), "--cluster", "slurm",
           "--profile", str(PROFILE), "--wait"]
    res = subprocess.run(cmd, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    out = tmp_path / "results" / "g"
    _check_grid_results(out, 4)
    manifest = json.loads((out / "manifest.json").read_text())
    jobs = manifest["launches"][0]["job_ids"]
    _check_array_then_aggregate(slurm_cluster, jobs["train_array"], jobs["aggregate"], 2)
    logs = "".join(p.read_text() for p in (out / "logs").glob(f"{jobs['train_array']}_*/*_log.err"))
    assert logs.count("pack of 2 run(s)") == 2 and "one shared backbone forward" in logs
    # The audio was decoded once, by the preparation job, before any training task started.
    prep = _sacct(slurm_cluster, jobs["prepare"])[jobs["prepare"]]
    assert prep[0] == "COMPLETED"
    first_start = min(_when(start) for jid, (_, start, _) in _sacct(slurm_cluster, jobs["train_array"]).items()
                      if "_" in jid)
    assert first_start >= _when(prep[2])
    assert list((tmp_path / "prepared").rglob("*.npy"))
    assert list((out / "logs").glob(f"{jobs['train_array']}_*/*_log.out"))  # submitit logs per task

    res = subprocess.run(cmd, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping 4 finished run(s)" in res.stderr
    assert "train array (nothing to train)" in res.stdout
    second = json.loads((out / "manifest.json").read_text())["launches"][1]["job_ids"]
    assert second["train_array"] is None and second["prepare"] is None


def test_submit_grid_script_and_a_failing_run(slurm_cluster, demo_assets, tmp_path):
    # A second corpus whose audio is corrupted after it was written: files exist, so the
    # --quick-check launch accepts it; the runs on it fail in their task, the rest finish.
    bad = tmp_path / "bad_corpus"
    shutil.copytree(demo_assets["corpus"], bad)
    for clip in sorted((bad / "audio").iterdir())[:3]:
        clip.write_bytes(b"\x00garbage" * 50)
    good = demo_assets["corpus"]
    path = write_grid(tmp_path, demo_assets, name="mixed", pairs=[
        {"name": "w2v+roberta", "speech": str(demo_assets["backbones"]["wav2vec2-tiny"]),
         "text": str(demo_assets["backbones"]["roberta-tiny"])}],
        axes={"data.audio_dir": [str(good / "audio"), str(bad / "audio")], "model.hidden_layers": [1, 2]})
    env = {**slurm_cluster.env, "SER_HPC_PYTHON": sys.executable}
    res = subprocess.run(["bash", str(REPO / "slurm" / "submit_grid.sh"), str(path), "--profile", str(PROFILE),
                          "--quick-check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    train_job = re.search(r"train array: (\d+)", res.stdout).group(1)
    agg_job = re.search(r"aggregation: (\d+)", res.stdout).group(1)
    assert slurm_cluster.wait(agg_job, timeout=600) == "COMPLETED"
    _check_array_then_aggregate(slurm_cluster, train_job, agg_job, 4)
    out = tmp_path / "results" / "mixed"
    states = _sacct(slurm_cluster, train_job)
    assert sorted(s for s, _, _ in states.values() if s) .count("FAILED") == 2  # the two packs on bad audio
    ens = json.loads((out / "ensemble" / "ensemble.json").read_text())
    assert ens["n_done"] == 2 and ens["n_failed"] == 2 and len(ens["members"]) == 2
    assert all("unreadable audio" in f["reason"] for f in ens["failed"])
    board = (out / "ensemble" / "leaderboard.md").read_text()
    assert "unreadable audio" in board
    assert list((out / "logs").glob(f"{train_job}_*.out"))
