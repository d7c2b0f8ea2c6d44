"""A demo run on the real local Slurm cluster gets the time-limit warning (USR2) mid-training,
checkpoints, requeues itself, resumes from its checkpoint and ends as if uninterrupted."""
import json
import subprocess
import sys
import time

from ser_hpc.config import config_from_dict
from ser_hpc.train.loop import train_pack
from tests.conftest import REPO
from tests.run_compare import assert_same_run
from tests.test_grid import write_grid
import pytest

pytestmark = pytest.mark.slow  # real Slurm / several processes: `pytest -m "not slow"` skips it

PROFILE = REPO / "configs" / "cluster" / "localhost_slurm.yaml"


def test_usr2_checkpoints_requeues_and_resumes(slurm_cluster, demo_assets, tmp_path):
    bb = demo_assets["backbones"]
    path = write_grid(tmp_path, demo_assets, name="requeue",
                      pairs=[{"name": "w2v+roberta", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"])}],
                      axes={"model.hidden_layers": [1]},
                      overrides={"train.max_steps": 150, "train.eval_every": 25, "train.checkpoint_every": 25,
                                 "train.log_every": 25})
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_grid.py"), str(path), "--cluster", "slurm",
                          "--profile", str(PROFILE)], cwd=REPO, env=slurm_cluster.env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "results" / "requeue"
    plan = json.loads((out / "plan.json").read_text())
    run = plan["runs"][0]
    run_dir = out / "runs" / run["run_id"]
    jobs = json.loads((out / "manifest.json").read_text())["launches"][0]["job_ids"]
    task = jobs["train_array"]  # one pack: submitit submits a plain job, else the array (all its tasks)

    # Wait for training to be under way (first evaluation logged), then send the warning
    # that --signal=USR2@N would send before the time limit.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.3)
    assert (run_dir / "metrics.jsonl").exists(), "training never started"
    sent = slurm_cluster.run("scancel", "--signal=USR2", task, check=False)
    assert sent.returncode == 0, sent.stderr

    assert slurm_cluster.wait(jobs["aggregate"], timeout=900) == "COMPLETED"
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "done", final
    assert len(final["resumed_from"]) == 1 and 25 <= final["resumed_from"][0] < 150  # not from step 0
    history = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", task, "-o", "JobID,State", "--duplicates").stdout
    assert "REQUEUED" in history, history  # the first instance ended by requeue, the second finished
    log_text = "".join(p.read_text(errors="replace") for p in (out / "logs").rglob("*.err"))
    assert "requeueing Slurm job" in log_text and f"resumed from checkpoint at step {final['resumed_from'][0]}" in log_text

    # The same config trained without interruption ends with the same metrics.
    ref = dict(run["config"])
    ref["run"] = {**ref["run"], "dir": str(tmp_path / "uninterrupted")}
    train_pack([config_from_dict(ref)])[0]
    assert_same_run(tmp_path / "uninterrupted", run_dir)
