"""The demo grid on a real one-node Slurm cluster: through jobs/launch_grid.py (submitit)
and through slurm/submit_grid.sh (plain sbatch)."""
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

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


def _launch(cluster, path, *extra, cwd=REPO, launcher=REPO / "jobs" / "launch_grid.py", timeout=600):
    res = subprocess.run([sys.executable, str(launcher), str(path), "--cluster", "slurm", *extra], cwd=cwd,
                         env=cluster.env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    return res


def _job_ids(out):
    launches = json.loads((out / "manifest.json").read_text())["launches"]
    return [j for x in launches for j in x["job_ids"].values() if j]


@pytest.mark.parametrize("pack_size", [2, 4])
def test_status_shows_every_run_of_a_running_pack_running(slurm_cluster, demo_assets, tmp_path, monkeypatch, capsys,
                                                         pack_size):
    """2 packs of 2 (two array tasks at once) and 1 pack of 4 (submitit submits a lone task as a
    plain job, "N" not "N_0"): every run of a running pack is running, with its own steps and
    best dev figure so far, linked to its Slurm task."""
    from ser_hpc.grid.status import grid_status, render
    bb = demo_assets["backbones"]
    path = write_grid(tmp_path, demo_assets, name=f"running{pack_size}", pack_size=pack_size,
                      pairs=[{"name": "w2v+roberta", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"])}],
                      axes={"model.hidden_layers": [1, 2], "train.weight_decay": [0.01, 0.1]},
                      overrides={"train.max_steps": 5000, "train.eval_every": 2, "train.log_every": 100,
                                 "train.checkpoint_every": 5000})
    out = tmp_path / "results" / f"running{pack_size}"
    _launch(slurm_cluster, path, "--profile", str(PROFILE))
    slurm_cluster.apply_env(monkeypatch)
    try:
        deadline, status = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            status = grid_status(out)
            if all(r.state == "running" and r.steps for r in status.runs):
                break
            time.sleep(1)
        text = render(status)
        with capsys.disabled():
            print(f"\n[status, {4 // pack_size} pack(s) of {pack_size}]\n{text}")
        assert [r.state for r in status.runs] == ["running"] * 4, text
        tasks = {r.pack: r.slurm.split()[0] for r in status.runs}
        assert all(r.slurm.endswith("RUNNING") and r.steps >= 2 and r.dev_macro_f1 is not None for r in status.runs)
        if pack_size == 4:
            assert len(set(tasks.values())) == 1 and "_" not in tasks[0]  # the lone task is a plain job
        else:
            array = tasks[0].split("_")[0]
            assert tasks == {0: f"{array}_0", 1: f"{array}_1"}
        assert "no scheduler info" not in text
    finally:
        for job in _job_ids(out):
            slurm_cluster.run("scancel", job, check=False)


def test_a_queued_job_runs_the_code_submitted_not_the_code_on_disk(slurm_cluster, demo_assets, tmp_path):
    """Launch from a checkout with the training array held, edit the package while it waits,
    release it: the tasks run the snapshot taken at submission. A dry run after the edit says
    that the code changed."""
    checkout = tmp_path / "checkout"
    for part in ("ser_hpc", "jobs", "slurm", "configs"):
        shutil.copytree(REPO / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    profile = tmp_path / "held.yaml"
    profile.write_text(PROFILE.read_text().replace("  signal_delay_s: 30\n", "  signal_delay_s: 30\n"
                                                   "  extra_sbatch: [\"--hold\"]\n"))
    bb = demo_assets["backbones"]
    path = write_grid(tmp_path, demo_assets, name="snap", pack_size=2,
                      pairs=[{"name": "w2v+roberta", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"])}])
    launcher = checkout / "jobs" / "launch_grid.py"
    _launch(slurm_cluster, path, "--profile", str(profile), cwd=checkout, launcher=launcher)
    out = tmp_path / "results" / "snap"
    launch = json.loads((out / "manifest.json").read_text())["launches"][0]
    code = Path(launch["code"]["dir"])
    assert code.parent == out.resolve() / "code" and (code / "ser_hpc" / "train" / "pack_task.py").is_file()
    train = launch["job_ids"]["train_array"]
    assert slurm_cluster.states(train).get(train, "PENDING") == "PENDING"
    # The edit: every pack task of the checkout would now fail.
    tasks = checkout / "ser_hpc" / "train" / "pack_task.py"
    tasks.write_text(tasks.read_text().replace('    plan = job_start(plan_path)\n    if not 0 <= pack_index',
                                               '    raise RuntimeError("the edited checkout ran")\n'
                                               '    plan = job_start(plan_path)\n    if not 0 <= pack_index', 1))
    assert "the edited checkout ran" in tasks.read_text()
    slurm_cluster.run("scontrol", "release", train)
    assert slurm_cluster.wait(launch["job_ids"]["aggregate"], timeout=600) == "COMPLETED"
    _check_grid_results(out, 2)  # both runs done: the tasks ran the snapshot
    logs = "".join(p.read_text(errors="replace") for p in (out / "logs").rglob("*_log.*"))
    assert "the edited checkout ran" not in logs
    dry = subprocess.run([sys.executable, str(launcher), str(path), "--cluster", "slurm", "--profile", str(profile),
                          "--dry-run"], cwd=checkout, env=slurm_cluster.env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert f"the code changed since the last launch, whose jobs run {launch['code']['id']}" in dry.stdout
