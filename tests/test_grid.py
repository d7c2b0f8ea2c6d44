"""Grid expansion, packs, checks and the launcher without Slurm (debug / local executors)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ser_hpc.config import ConfigError
from ser_hpc.grid.cluster import load_profile, sbatch_args
from ser_hpc.grid.expand import expand, make_packs
from ser_hpc.grid.spec import load_grid
from tests.conftest import REPO, run_config_tree

PY = sys.executable


def write_grid(tmp_path, assets, name="g", pairs=None, axes=None, overrides=None, **extra) -> Path:
    base = run_config_tree(assets, "unused")
    del base["run"]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    bb = assets["backbones"]
    grid = {
        "name": name, "run_config": "base.yaml",
        "overrides": overrides or {"train.max_steps": 4, "train.eval_every": 2},
        "backbone_pairs": pairs or [
            {"name": "w2v+roberta", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"])},
            {"name": "wavlm+bert", "speech": str(bb["wavlm-tiny"]), "text": str(bb["bert-tiny"])}],
        "axes": axes or {"model.hidden_layers": [1, 2]},
        "results_dir": str(tmp_path / "results"), **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_expansion_ids_are_stable_and_config_keyed(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets, axes={"model.hidden_layers": [1, 2], "train.weight_decay": [0.01, 0.1]})
    runs = expand(load_grid(path))
    assert len(runs) == 2 * 4
    assert [r.run_id for r in runs] == [r.run_id for r in expand(load_grid(path))]  # stable
    assert len({r.run_id for r in runs}) == 8
    assert runs[0].run_id.startswith("w2v+roberta.hidden_layers1.weight_decay0.01-")
    assert runs[0].config["run"]["dir"].endswith(f"runs/{runs[0].run_id}")
    assert runs[0].overrides["model.speech.name"].endswith("wav2vec2-tiny")
    # Changing any training value changes the id; the name alone does not.
    other = expand(load_grid(path, {"train.lr": 1e-4}))
    assert not {r.run_id for r in runs} & {r.run_id for r in other}


def test_packs_group_head_only_differences(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets, axes={"model.hidden_layers": [1, 2], "train.weight_decay": [0.0, 0.1],
                                                   "train.batch_size": [8, 16]})
    runs = expand(load_grid(path))
    packs = make_packs(runs, pack_size=4)
    assert len(packs) == 2 * 2  # pairs x batch sizes; the 4 head settings share a pack
    for pack in packs:
        assert len({(r.pair, r.config["train"]["batch_size"]) for r in pack}) == 1
    assert len(make_packs(runs, pack_size=3)) == 8  # groups of 4 split into 3 + 1
    assert len(make_packs(runs, pack_size=1)) == 16


def test_any_run_key_can_be_an_axis_and_bad_keys_are_named(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets, axes={"data.crop_seconds": [1.5, 2.0]})
    assert {r.config["data"]["crop_seconds"] for r in expand(load_grid(path))} == {1.5, 2.0}
    bad = write_grid(tmp_path, demo_assets, name="bad", axes={"model.hidden_layer": [1]})
    with pytest.raises(ConfigError, match=r"bad\.yaml: axes: unknown run-config key 'model\.hidden_layer'"):
        load_grid(bad)
    bad_value = write_grid(tmp_path, demo_assets, name="bad2", axes={"model.hidden_layers": ["two"]})
    with pytest.raises(ConfigError, match=r"run 'w2v\+roberta hidden_layers=two'.*must be int"):
        expand(load_grid(bad_value))


def test_unsafe_names_cannot_reach_a_shell(demo_assets, tmp_path):
    bb = demo_assets["backbones"]
    evil = "x'; touch /tmp/pwned; echo \"$(id)"
    path = write_grid(tmp_path, demo_assets, pairs=[{"name": evil, "speech": str(bb["wav2vec2-tiny"]),
                                                     "text": str(bb["roberta-tiny"])}])
    runs = expand(load_grid(path))
    assert all(set(r.run_id) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")
               for r in runs)
    assert runs[0].name.startswith(evil)  # the readable name is kept, in JSON only
    with pytest.raises(ConfigError, match="grid name"):
        load_grid(write_grid(tmp_path, demo_assets, name="a;b"))


def test_cluster_profile_rejects_injection(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text(yaml.safe_dump({"executor": "slurm", "train": {"partition": "gpu", "time_min": 90,
                                                                   "extra_sbatch": ["--exclusive", "--comment=a b"]}}))
    prof = load_profile(good)
    assert "--exclusive" in sbatch_args(prof.train, "j") and "--partition=gpu" in sbatch_args(prof.train, "j")
    for bad in ({"train": {"extra_sbatch": ["--comment=x\n#SBATCH --wrap=rm"]}},
                {"train": {"extra_sbatch": ["; rm -rf /"]}},
                {"train": {"partition": "gpu; rm"}},
                {"env": {"A B": "1"}},
                {"setup": ["module load x\nrm -rf /"]},
                {"train": {"gpus": 1}}):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"executor": "slurm", **bad}))
        with pytest.raises(ConfigError):
            load_profile(path)


def _launch(*args, cwd=REPO):
    return subprocess.run([PY, str(REPO / "jobs" / "launch_grid.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def test_launcher_refuses_bad_input_before_writing_anything(demo_assets, tmp_path):
    import shutil
    corpus = tmp_path / "corpus"
    shutil.copytree(demo_assets["corpus"], corpus)
    victim = sorted((corpus / "audio").iterdir())[5]
    victim.unlink()
    path = write_grid(tmp_path, demo_assets, overrides={"data.train_csv": str(corpus / "train.csv"),
                                                        "data.audio_dir": str(corpus / "audio")})
    res = _launch(path, "--cluster", "debug")
    assert res.returncode == 2
    assert victim.name in res.stderr and "nothing was submitted" in res.stderr
    assert not (tmp_path / "results").exists()
    res = _launch(path, "--cluster", "debug", "train.learning_rate=1")
    assert res.returncode == 2 and "train.learning_rate" in res.stderr
    missing_model = write_grid(tmp_path, demo_assets, name="m", pairs=[{"name": "p", "speech": "org/no-such-model",
                                                                         "text": str(demo_assets["backbones"]["roberta-tiny"])}])
    res = _launch(missing_model, "--cluster", "debug")
    assert res.returncode == 2 and "org/no-such-model" in res.stderr and "prefetch" in res.stderr


def test_dry_run_prints_the_plan_and_submits_nothing(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets)
    res = _launch(path, "--dry-run", "--profile", REPO / "configs/cluster/localhost_slurm.yaml")
    assert res.returncode == 0, res.stderr
    assert "4 runs in 4 packs" in res.stdout and "sbatch --array=0,1,2,3%2" in res.stdout
    assert "--dependency=afterany" in res.stdout and "--partition=debug" in res.stdout
    assert not (tmp_path / "results").exists()


def test_debug_launch_runs_aggregates_and_relaunch_skips(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets, pack_size=2,
                      overrides={"train.max_steps": 4, "train.eval_every": 2,
                                 "data.prepared_dir": str(tmp_path / "prepared")})
    dry = _launch(path, "--dry-run")
    assert "first: a data-preparation job" in dry.stdout
    assert "2 pack(s) train several heads in one process on one backbone forward per batch" in dry.stdout
    res = _launch(path, "--cluster", "debug")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "results" / "g"
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["runs"]) == 4 and len(plan["packs"]) == 2 and all(len(p) == 2 for p in plan["packs"])
    for run in plan["runs"]:
        final = json.loads((out / "runs" / run["run_id"] / "final.json").read_text())
        assert final["status"] == "done" and final["run_id"] == run["run_id"]
    ens = json.loads((out / "ensemble" / "ensemble.json").read_text())
    assert len(ens["members"]) == 3 and ens["n_done"] == 4
    assert (out / "ensemble" / "leaderboard.md").exists() and (out / "ensemble" / "predictions_test.csv").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["launches"][0]["versions"]["torch"] == "2.9.1" and manifest["launches"][0]["git_commit"]
    finals = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/final.json")}
    again = _launch(path, "--cluster", "debug")
    assert again.returncode == 0
    assert "skipping 4 finished run(s)" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/final.json")} == finals
    assert len(json.loads((out / "manifest.json").read_text())["launches"]) == 2
    assert list((tmp_path / "prepared").rglob("*.npy"))  # trained from audio decoded once


def test_fine_tuning_runs_get_packs_of_one(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets, pack_size=4, overrides={"model.speech.finetune_top_layers": 1},
                      axes={"model.hidden_layers": [1, 2]})
    runs = expand(load_grid(path))
    assert [len(p) for p in make_packs(runs, 4)] == [1, 1, 1, 1]
    assert ("4 run(s) cannot share a backbone forward (it fine-tunes backbone layers), so each is a pack of one"
            in _launch(path, "--dry-run").stdout)


def test_deepspeed_runs_get_packs_of_one(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets, pack_size=4, overrides={"train.strategy": "deepspeed"},
                      axes={"model.hidden_layers": [1, 2]})
    assert [len(p) for p in make_packs(expand(load_grid(path)), 4)] == [1, 1, 1, 1]
    assert "cannot share a backbone forward (it trains under DeepSpeed" in _launch(path, "--dry-run").stdout


def test_prefetch_checks_local_folders_and_names_unreachable_models(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets)
    res = subprocess.run([PY, str(REPO / "jobs" / "prefetch_models.py"), str(path)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("local folder; loads offline") == 4
    hub = write_grid(tmp_path, demo_assets, name="hub", pairs=[{"name": "p", "speech": "facebook/not-cached-here",
                                                                 "text": str(demo_assets["backbones"]["roberta-tiny"])}])
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([PY, str(REPO / "jobs" / "prefetch_models.py"), str(hub)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 1 and "facebook/not-cached-here" in res.stderr


def test_requeue_budget_ends_the_run_as_failed(demo_assets, tmp_path, monkeypatch):
    """After train.max_requeues time-limit warnings the run fails with the reason (no scontrol call)."""
    import signal as sig
    from ser_hpc.config import config_from_dict
    from ser_hpc.grid.tasks import handle_preemption
    from ser_hpc.train.preemption import Preempted
    runs = []
    for name in ("r1", "r2", "r3"):
        tree = run_config_tree(demo_assets, tmp_path / "results" / "runs" / name, **{"train.max_requeues": 2})
        runs.append({"run_id": name, "name": name, "config": tree})
    plan = {"launch_dir": str(tmp_path), "runs": runs}
    # r2 finished before the signal: its record must stand.
    (tmp_path / "results" / "runs" / "r2").mkdir(parents=True)
    done = {"run_id": "r2", "status": "done", "dev_macro_f1": 0.5}
    (tmp_path / "results" / "runs" / "r2" / "final.json").write_text(json.dumps(done))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("must not requeue"))
    handle_preemption(Preempted(30, sig.SIGUSR2), config_from_dict(runs[0]["config"]), plan, runs)
    for name in ("r1", "r3"):  # every unfinished run of the pack
        final = json.loads((tmp_path / "results" / "runs" / name / "final.json").read_text())
        assert final["status"] == "failed" and "max_requeues=2" in final["reason"] and final["checkpoint_step"] == 30
    assert json.loads((tmp_path / "results" / "runs" / "r2" / "final.json").read_text()) == done
