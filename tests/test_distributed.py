"""Resume, torn checkpoints, DDP (torchrun and srun) and DeepSpeed ZeRO-2 on CPU."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, run_config_tree, shared_folder
from tests.run_compare import assert_same_run, read_final as _final, read_metrics as _metrics

pytestmark = pytest.mark.slow  # real Slurm / several processes: `pytest -m "not slow"` skips it

TRAIN = str(REPO / "jobs" / "train.py")
TORCHRUN = str(REPO / ".venv" / "bin" / "torchrun") if (REPO / ".venv" / "bin" / "torchrun").exists() else "torchrun"


def _write_cfg(assets, tmp_path, name, **over):
    tree = run_config_tree(assets, tmp_path / name, **over)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _free_port() -> int:
    """A port no one listens on now: torchrun tests may run at once on two xdist workers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", **extra)
    return env


LONG = {"train.max_steps": 40, "train.eval_every": 8, "train.checkpoint_every": 4, "train.log_every": 4}
# Same global batch, with dropout and augmentation: one process and two ranks see the same
# crops, the same augmentations and the same dropout masks (drawn for the global batch).
SAME = {"train.max_steps": 8, "train.eval_every": 4, "model.dropout": 0.1, "data.augment_prob": 0.3,
        "train.batch_size": 8}


@pytest.fixture(scope="session")
def reference(tmp_path_factory, demo_assets):
    """reference(name, overrides) -> the folder of an uninterrupted one-process run, trained
    once per test session (and xdist run) for all the tests that compare against it."""
    def run(name: str, over: dict):
        with shared_folder(tmp_path_factory, "reference_runs") as root:
            if not (root / name / "final.json").exists():
                cfg = _write_cfg(demo_assets, root, name, **over)
                subprocess.run([sys.executable, TRAIN, str(cfg)], env=_env(), check=True, capture_output=True,
                               timeout=900)
            return root / name
    return run


def test_killed_run_resumes_to_the_same_result(demo_assets, tmp_path, reference):
    ref = reference("long", LONG)
    cfg = _write_cfg(demo_assets, tmp_path, "killed", **LONG)
    proc = subprocess.Popen([sys.executable, TRAIN, str(cfg)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoint" / "latest.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 12:
            break
        time.sleep(0.2)
    time.sleep(0.7)  # somewhere between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final.json").exists()
    killed_at = json.loads(latest.read_text())["step"]
    assert 12 <= killed_at < 40
    subprocess.run([sys.executable, TRAIN, str(cfg)], env=_env(), check=True, capture_output=True, timeout=900)
    assert _final(tmp_path / "killed")["resumed_from"] == [killed_at]
    assert_same_run(ref, tmp_path / "killed")


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(demo_assets, tmp_path, reference):
    ref = reference("long", LONG)
    cfg = _write_cfg(demo_assets, tmp_path, "torn", **LONG)
    res = subprocess.run([sys.executable, TRAIN, str(cfg)], env=_env(SER_HPC_FAULT_KILL_IN_CHECKPOINT="16"),
                         capture_output=True, timeout=900)
    assert res.returncode == -signal.SIGKILL
    ckpt = tmp_path / "torn" / "checkpoint"
    assert (ckpt / ".tmp-step_000016" / "weights.safetensors").exists()  # the torn one
    assert json.loads((ckpt / "latest.json").read_text())["step"] == 12  # still points at the previous
    subprocess.run([sys.executable, TRAIN, str(cfg)], env=_env(), check=True, capture_output=True, timeout=900)
    assert _final(tmp_path / "torn")["resumed_from"] == [12]
    assert not list(ckpt.glob(".tmp-*"))
    assert_same_run(ref, tmp_path / "torn")


def test_ddp_two_ranks_under_torchrun_match_one_process(demo_assets, tmp_path, reference):
    single = reference("same", SAME)
    ddp = _write_cfg(demo_assets, tmp_path, "ddp", **SAME, **{"train.strategy": "ddp"})
    res = subprocess.run([TORCHRUN, "--nproc_per_node=2", f"--master_port={_free_port()}", TRAIN, str(ddp)], env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _final(tmp_path / "ddp")["world_size"] == 2
    assert_same_run(single, tmp_path / "ddp")  # tolerance 1e-5 on losses


def test_cached_features_under_ddp_match_one_process(demo_assets, tmp_path):
    """train.features=cached under 2 DDP ranks: the same run as one process (the store is
    extracted by the single run and reused by the DDP one)."""
    cached = {**SAME, "train.features": "cached", "data.features_dir": str(tmp_path / "feat")}
    single = _write_cfg(demo_assets, tmp_path, "single", **cached)
    ddp = _write_cfg(demo_assets, tmp_path, "ddp", **cached, **{"train.strategy": "ddp"})
    subprocess.run([sys.executable, TRAIN, str(single)], env=_env(), check=True, capture_output=True, timeout=900)
    res = subprocess.run([TORCHRUN, "--nproc_per_node=2", f"--master_port={_free_port()}", TRAIN, str(ddp)], env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _final(tmp_path / "ddp")["world_size"] == 2
    assert len(list((tmp_path / "feat").iterdir())) == 1  # one store, extracted once
    assert_same_run(tmp_path / "single", tmp_path / "ddp")


def test_a_pack_under_ddp_matches_each_run_alone(demo_assets, tmp_path):
    """Two heads in one pack, two DDP ranks (jobs/train.py --plan --pack under torchrun):
    each run ends as it does alone in one process."""
    # Dropout 0.1 (SAME); "b" also has attention dropout (masks per clip, whatever its rank pads it to).
    heads = {"a": {}, "b": {"model.hidden_layers": 2, "train.lr": 1e-3, "model.head_width": 96,
                            "model.fusion_attention_heads": 2}}
    runs = []
    for name, over in heads.items():
        alone = _write_cfg(demo_assets, tmp_path, f"alone-{name}", **SAME, **over)
        subprocess.run([sys.executable, TRAIN, str(alone)], env=_env(), check=True, capture_output=True, timeout=900)
        tree = run_config_tree(demo_assets, tmp_path / f"pack-{name}", **SAME, **over, **{"train.strategy": "ddp"})
        tree["run"]["name"] = name
        runs.append({"run_id": f"pack-{name}", "name": name, "config": tree})
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"launch_dir": str(tmp_path), "packs": [[r["run_id"] for r in runs]], "runs": runs}))
    res = subprocess.run([TORCHRUN, "--nproc_per_node=2", f"--master_port={_free_port()}", TRAIN, "--plan", str(plan),
                          "--pack", "0"], env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in heads:
        assert _final(tmp_path / f"pack-{name}")["world_size"] == 2
        assert_same_run(tmp_path / f"alone-{name}", tmp_path / f"pack-{name}")
    assert _metrics(tmp_path / "pack-a") != _metrics(tmp_path / "pack-b")  # two different heads


def test_ddp_two_ranks_under_srun(slurm_cluster, demo_assets, tmp_path, reference):
    single = reference("same", SAME)
    ddp = _write_cfg(demo_assets, tmp_path, "srun", **SAME, **{"train.strategy": "ddp"})
    job = slurm_cluster.sbatch("--ntasks=2", "--cpus-per-task=1", "--mem-per-cpu=1500", "--time=15",
                               f"--output={tmp_path}/srun.log",
                               "--wrap", f"OMP_NUM_THREADS=1 srun {sys.executable} {TRAIN} {ddp}", cwd=REPO)
    state = slurm_cluster.wait(job, timeout=900)
    assert state == "COMPLETED", (tmp_path / "srun.log").read_text()[-3000:]
    assert _final(tmp_path / "srun")["world_size"] == 2
    assert_same_run(single, tmp_path / "srun")


@pytest.mark.parametrize("unfreeze", [0, 1])
def test_deepspeed_zero2_on_cpu(demo_assets, tmp_path, unfreeze, reference):
    over = {**SAME, "model.speech.finetune_top_layers": unfreeze, "model.text.finetune_top_layers": unfreeze}
    single = reference("unfrozen", over) if unfreeze else reference("same", SAME)
    ds = _write_cfg(demo_assets, tmp_path, "ds", **over, **{"train.strategy": "deepspeed",
                                                           "train.deepspeed_config": str(REPO / "configs/deepspeed/zero2.json")})
    res = subprocess.run([TORCHRUN, "--nproc_per_node=2", f"--master_port={_free_port()}", TRAIN, str(ds)], env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    final = _final(tmp_path / "ds")
    assert final["strategy"] == "deepspeed" and final["world_size"] == 2
    assert_same_run(single, tmp_path / "ds", atol=1e-4)
    ckpt = tmp_path / "ds" / "checkpoint" / "step_000008"
    assert (ckpt / "deepspeed").is_dir()  # the engine's own (ZeRO-partitioned) optimizer state
    assert (tmp_path / "ds" / "best_backbone.safetensors").exists() == bool(unfreeze)


def test_deepspeed_resume_after_kill_matches_uninterrupted(demo_assets, tmp_path, reference):
    over = {**SAME, "train.checkpoint_every": 2, "train.strategy": "deepspeed",
            "train.deepspeed_config": str(REPO / "configs/deepspeed/zero2.json")}
    single = reference("same", SAME)
    ds = _write_cfg(demo_assets, tmp_path, "ds", **over)
    killed = subprocess.run([sys.executable, TRAIN, str(ds)], env=_env(SER_HPC_FAULT_KILL_IN_CHECKPOINT="6"),
                            capture_output=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL
    res = subprocess.run([sys.executable, TRAIN, str(ds)], env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _final(tmp_path / "ds")["resumed_from"] == [4]
    assert_same_run(single, tmp_path / "ds", atol=1e-4)


def test_ddp_as_a_submitit_task_with_two_tasks_per_node(slurm_cluster, demo_assets, tmp_path, reference):
    """launch_grid on Slurm with tasks_per_node=2: submitit starts 2 ranks of the same pack."""
    from tests.test_grid import write_grid
    profile = tmp_path / "two_tasks.yaml"
    profile.write_text(yaml.safe_dump({"executor": "slurm", "array_parallelism": 1,
                                       "train": {"partition": "debug", "tasks_per_node": 2, "cpus_per_task": 1,
                                                 "mem_gb": 3, "time_min": 15},
                                       "aggregate": {"partition": "debug", "mem_gb": 2, "time_min": 10}}))
    bb = demo_assets["backbones"]
    grid = write_grid(tmp_path, demo_assets, name="twotasks", overrides={**SAME, "train.strategy": "ddp"},
                      pairs=[{"name": "w2v+roberta", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"])}],
                      axes={"model.hidden_layers": [2]})
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_grid.py"), str(grid), "--cluster", "slurm",
                          "--profile", str(profile), "--wait"], cwd=REPO, env={**slurm_cluster.env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    run_dir = next((tmp_path / "results" / "twotasks" / "runs").iterdir())
    assert _final(run_dir)["world_size"] == 2
    assert_same_run(reference("same", SAME), run_dir)
