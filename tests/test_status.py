"""jobs/status.py: run states from the results tree, merged with Slurm's view.

A synthetic tree of 300 runs covers every state the tree alone can show; fake squeue /
sacct binaries (canned output in the real formats) cover the merge rules; and one test
asks a real Slurm cluster about a real array that fails, runs, waits and is requeued.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from ser_hpc.grid.status import grid_status, render
from ser_hpc.slurm import expand_ids, query
from tests.conftest import REPO

PY = sys.executable
KINDS = ("done", "done", "done", "done", "done", "failed", "running", "pending", "retry", "started")


def kind(i: int) -> str:
    return KINDS[i % len(KINDS)]


def write_run(root: Path, run_id: str, what: str, i: int = 0, *, final_age: float = 0.0) -> None:
    """One run folder as a training job leaves it at the given stage."""
    d = root / "runs" / run_id
    if what == "pending":
        return
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text("run: {}\n")
    if what in ("done", "failed", "retry"):
        final = {"run_id": run_id, "status": "done" if what == "done" else "failed",
                 "reason": None if what == "done" else "CUDA out of memory\nTraceback (most recent call last): ...",
                 "dev_macro_f1": 0.3 + i / 10000 if what == "done" else None,
                 "steps": 300 if what == "done" else 40, "elapsed_s": 100.0 + i,
                 "resumed_from": [120] if what == "done" and i % 20 == 0 else []}
        (d / "final.json").write_text(json.dumps(final))
        if final_age:
            t = time.time() - final_age
            os.utime(d / "final.json", (t, t))
    if what in ("running", "retry"):
        lines = [{"step": 50 * k, "dev_macro_f1": f1, "elapsed_s": 10.0 * k, "train_loss": 1.0}
                 for k, f1 in ((1, 0.2), (2, 0.35), (3, 0.3))]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def make_grid(root: Path, kinds: list[str], pack_size: int = 3, launch: dict | None = None) -> list[str]:
    runs = [{"run_id": f"pair{i % 7}.hidden_layers{i % 3}-{i:08x}", "name": f"run {i}", "pair": f"pair{i % 7}",
             "pack": i // pack_size, "overrides": {}, "config": {"train": {"max_steps": 300}}}
            for i in range(len(kinds))]
    n_packs = -(-len(kinds) // pack_size)
    plan = {"grid_name": "big", "launch_dir": str(root), "results_dir": str(root), "runs": runs,
            "packs": [[r["run_id"] for r in runs if r["pack"] == p] for p in range(n_packs)]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps(plan))
    launch = launch or {"executor": "local", "job_ids": {"train_array": None, "aggregate": None},  # as run_here records
                        "tasks": {str(p): {"task_id": None, "log": str(root / "logs" / f"local_pack{p}.log")}
                                  for p in range(n_packs)}}
    launch.setdefault("packs", list(range(n_packs)))
    (root / "manifest.json").write_text(json.dumps({"grid_name": "big", "launches": [launch]}))
    for i, (r, k) in enumerate(zip(runs, kinds)):
        write_run(root, r["run_id"], k, i, final_age=3600 if k == "retry" else 0)
    return [r["run_id"] for r in runs]


EXPECTED = {"done": "done", "failed": "failed", "running": "running", "pending": "pending",
            "retry": "running", "started": "running"}


def test_300_runs_from_the_tree_alone_fast_and_correct(tmp_path, capsys):
    root = tmp_path / "big"
    kinds = [kind(i) for i in range(300)]
    ids = make_grid(root, kinds)
    start = time.perf_counter()
    status = grid_status(root)
    text = render(status)
    took = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[status] 300 runs: {1000 * took:.0f} ms")
    assert took < 2.0
    assert "no Slurm job ids" in status.slurm
    by_id = {r.run_id: r for r in status.runs}
    assert [r.run_id for r in status.runs] == ids
    for i, (rid, k) in enumerate(zip(ids, kinds)):
        row = by_id[rid]
        assert row.state == EXPECTED[k], (i, k, row)
        assert row.pack == i // 3
        if k == "done":
            assert row.dev_macro_f1 == pytest.approx(0.3 + i / 10000) and row.steps == 300
            assert row.elapsed_s == 100.0 + i and row.reason is None and row.log is None
            assert row.info == ("resumed at step 120" if i % 20 == 0 else None)
        elif k == "failed":
            assert row.reason == "CUDA out of memory"  # first line only; the traceback is in the log
            assert row.log == str(root / "logs" / f"local_pack{i // 3}.log")
        elif k in ("running", "retry"):  # best dev F1 so far, not the last one
            assert row.dev_macro_f1 == 0.35 and row.steps == 150 and row.elapsed_s == 30.0
            assert "last write" in row.info
        else:
            assert row.dev_macro_f1 is None and row.steps is None
    assert status.counts() == {"pending": 30, "running": 90, "requeued": 0, "done": 150, "failed": 30}
    assert "300 runs, 30 pending, 90 running, 0 requeued, 150 done, 30 failed" in text
    line = next(x for x in text.splitlines() if x.startswith(ids[5]))
    assert "failed" in line and "CUDA out of memory" in line and "local_pack1.log" in line
    assert "150/300" in next(x for x in text.splitlines() if x.startswith(ids[6]))


def test_cli_filters_and_json(tmp_path):
    root = tmp_path / "big"
    ids = make_grid(root, [kind(i) for i in range(30)])
    res = subprocess.run([PY, str(REPO / "jobs" / "status.py"), str(root), "--state", "failed"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    listed = [line.split()[0] for line in res.stdout.splitlines()[2:]]
    assert listed == [ids[i] for i in range(30) if kind(i) == "failed"]
    res = subprocess.run([PY, str(REPO / "jobs" / "status.py"), str(root), "--json", "--no-slurm"],
                         capture_output=True, text=True, timeout=60)
    data = json.loads(res.stdout)
    assert data["counts"]["done"] == 15 and len(data["runs"]) == 30
    bad = subprocess.run([PY, str(REPO / "jobs" / "status.py"), str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "plan.json" in bad.stderr


def _fake_slurm(bin_dir: Path, squeue: str, sacct: str, rc: int = 0) -> None:
    bin_dir.mkdir(exist_ok=True)
    for name, out in (("squeue", squeue), ("sacct", sacct)):
        (bin_dir / f"{name}.txt").write_text(out)
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\ncat '{bin_dir / (name + '.txt')}'\nexit {rc}\n")
        script.chmod(0o755)


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t).isoformat(timespec="seconds")  # Slurm prints local time


def test_slurm_states_are_merged(tmp_path, monkeypatch):
    root = tmp_path / "g"
    # pack 0 all done; pack 1 timed out after its first run; pack 2 requeued and waiting;
    # pack 3 running (a task trains all its runs at once): its first run failed in this
    # attempt, its second had failed in an earlier launch and is being retried now, its
    # third has not written anything yet.
    kinds = ["done"] * 3 + ["done", "started", "pending"] + ["pending"] * 3 + ["failed", "retry", "pending"]
    tasks = {str(p): {"task_id": f"500_{p}", "log": str(root / "logs" / f"500_{p}" / f"500_{p}_0_log.err")}
             for p in range(4)}
    ids = make_grid(root, kinds, launch={"executor": "slurm", "tasks": tasks,
                                                          "job_ids": {"prepare": "499", "train_array": "500",
                                                                      "aggregate": "501"}})
    started = time.time() - 600
    for rid in ids[9:11]:  # fresh failure (after the task started) vs stale one (before)
        t = started + 60 if rid == ids[9] else started - 3600
        os.utime(root / "runs" / rid / "final.json", (t, t))
    (root / "logs" / "500_1").mkdir(parents=True)
    (root / "logs" / "500_1" / "500_1_0_log.err").write_text("Traceback ...\n")
    sacct = "\n".join(["499|COMPLETED|2026-01-01T09:00:00|None", "500_0|COMPLETED|2026-01-01T10:00:00|None", "500_1|TIMEOUT|2026-01-01T10:00:00|None",
                       "500_2|REQUEUED|2026-01-01T10:00:00|None", f"500_3|RUNNING|{_stamp(started)}|None",
                       "500_2|PENDING|Unknown|BeginTime", "500_[4-5%2]|PENDING|Unknown|JobArrayTaskLimit",
                       "501|PENDING|Unknown|Dependency"]) + "\n"
    squeue = "\n".join(["500_2|PENDING|BeginTime|2099-01-01T00:00:00|1|", f"500_3|RUNNING|None|{_stamp(started)}|0|",
                        "501|PENDING|Dependency|N/A|0|"]) + "\n"
    _fake_slurm(tmp_path / "bin", squeue, sacct)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    status = grid_status(root)
    assert status.slurm == "squeue/sacct"
    states = [r.state for r in status.runs]
    assert states == ["done"] * 3 + ["done", "failed", "failed"] + ["requeued"] * 3 + ["failed", "running", "running"]
    rows = status.runs
    assert rows[4].reason == "no final.json: Slurm task 500_1 ended TIMEOUT"
    assert rows[4].log == str(root / "logs" / "500_1" / "500_1_0_log.err")
    assert "requeued 1x" in rows[6].slurm and "BeginTime" in rows[6].slurm
    assert rows[9].reason == "CUDA out of memory" and rows[10].dev_macro_f1 == 0.35
    assert status.jobs == {"prepare": "499 COMPLETED", "aggregate": "501 PENDING (Dependency)"}
    assert "aggregate job 501 PENDING (Dependency)" in render(status)
    # Slurm unreachable: the same tree, judged from files alone.
    _fake_slurm(tmp_path / "bin", "", "", rc=1)
    status = grid_status(root)
    assert "did not answer" in status.slurm
    assert [r.state for r in status.runs] == [EXPECTED[k] for k in kinds]


def test_expand_compact_array_ids():
    assert expand_ids("12_[0-2%1]") == ["12_0", "12_1", "12_2"]
    assert expand_ids("7_[1,4-5]") == ["7_1", "7_4", "7_5"]
    assert expand_ids("12_3") == ["12_3"]


def _wait_for(cluster, array: str, want: dict[str, str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = query([array])
        if got and all(got.get(k) and got[k].state == v for k, v in want.items()):
            return got
        time.sleep(0.5)
    raise TimeoutError(f"{array}: wanted {want}, got {got}")


@pytest.mark.slow
def test_real_slurm_failed_running_pending_requeued(slurm_cluster, tmp_path, monkeypatch):
    slurm_cluster.apply_env(monkeypatch)
    root = tmp_path / "g"
    script = tmp_path / "task.sh"
    script.write_text("#!/bin/bash\n[[ $SLURM_ARRAY_TASK_ID == 0 ]] && exit 3\nsleep 120\n")
    array = slurm_cluster.sbatch("--array=0-2%1", "--mem=50M", "--time=5", f"--output={tmp_path}/%A_%a.out",
                                 str(script))
    try:
        make_grid(root, ["pending"] * 3, pack_size=1,
                        launch={"executor": "slurm", "job_ids": {"train_array": array, "aggregate": None},
                                "tasks": {str(p): {"task_id": f"{array}_{p}", "log": None} for p in range(3)}})
        _wait_for(slurm_cluster, array, {f"{array}_0": "FAILED", f"{array}_1": "RUNNING"})
        status = grid_status(root)
        assert status.slurm == "squeue/sacct"
        assert [r.state for r in status.runs] == ["failed", "running", "pending"], render(status)
        assert status.runs[0].reason == f"no final.json: Slurm task {array}_0 ended FAILED"
        assert "JobArrayTaskLimit" in status.runs[2].slurm
        slurm_cluster.run("scontrol", "requeue", f"{array}_1")
        _wait_for(slurm_cluster, array, {f"{array}_1": "PENDING"})
        status = grid_status(root)
        assert status.runs[1].state == "requeued", render(status)
        assert "requeued 1x" in status.runs[1].slurm
    finally:
        slurm_cluster.run("scancel", array, check=False)
