"""Real jobs on the real one-node Slurm cluster (slurm/local_cluster/, tests/slurm_cluster.py)."""

from __future__ import annotations

import os

import submitit

# Also imported by tests/conftest.py; both share one cluster per session.
from tests.slurm_cluster import slurm_cluster  # noqa: F401
import pytest

pytestmark = pytest.mark.slow  # real Slurm / several processes: `pytest -m "not slow"` skips it


def test_sbatch_wrap_runs_and_writes_output(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch("-o", str(out), "--wrap", "echo hello-from-slurm", cwd=tmp_path)
    assert slurm_cluster.wait(job) == "COMPLETED"
    assert out.read_text().strip() == "hello-from-slurm"


def test_failed_job_is_failed_in_sacct(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch("-o", str(tmp_path / "o.txt"), "--wrap", "exit 1", cwd=tmp_path)
    assert slurm_cluster.wait(job) == "FAILED"
    exit_code = slurm_cluster.run(
        "sacct", "-n", "-X", "-P", "-j", job, "-o", "ExitCode"
    ).stdout.strip()
    assert exit_code == "1:0"


def test_submitit_job_returns_result(slurm_cluster, tmp_path, monkeypatch):
    slurm_cluster.apply_env(monkeypatch)  # submitit calls sbatch/sacct with os.environ
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=2, slurm_partition="debug")
    job = executor.submit(pow, 2, 10)  # a builtin: picklable, importable in the job
    assert job.result() == 1024
    assert slurm_cluster.wait(job.job_id) == "COMPLETED"


def test_submitit_array_with_parallelism(slurm_cluster, tmp_path, monkeypatch):
    slurm_cluster.apply_env(monkeypatch)
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=2, slurm_array_parallelism=2)
    jobs = executor.map_array(os.getenv, ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_ID"])
    assert [j.result() for j in jobs] == ["0", "1"]
    array_ids = {j.job_id.split("_")[0] for j in jobs}
    assert len(array_ids) == 1  # one array job with two tasks
    throttle = slurm_cluster.run("scontrol", "show", "job", array_ids.pop()).stdout
    assert "ArrayTaskThrottle=2" in throttle


def test_afterany_runs_after_failed_job(slurm_cluster, tmp_path):
    first = slurm_cluster.sbatch("-o", str(tmp_path / "a.txt"), "--wrap", "sleep 1; exit 3", cwd=tmp_path)
    out = tmp_path / "b.txt"
    second = slurm_cluster.sbatch(
        f"--dependency=afterany:{first}", "-o", str(out), "--wrap", "echo after", cwd=tmp_path
    )
    assert slurm_cluster.wait(second) == "COMPLETED"
    assert slurm_cluster.wait(first) == "FAILED"
    assert out.read_text().strip() == "after"
    times = slurm_cluster.run(
        "sacct", "-n", "-X", "-P", "-j", f"{first},{second}", "-o", "JobID,Start,End"
    ).stdout.split()
    rows = {jid: (start, end) for jid, start, end in (t.split("|") for t in times)}
    assert rows[second][0] >= rows[first][1]  # ISO timestamps compare as strings
