"""Grid expansion, packs, checks and the launcher without Slurm (debug / local executors)."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ser_hpc.config import ConfigError
from ser_hpc.grid.cluster import load_profile, sbatch_flags, slurm_options
from ser_hpc.grid.plan import expand, load_grid, make_packs
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
    flags = sbatch_flags(slurm_options(prof.train, "j"))
    assert "--exclusive" in flags and "--partition=gpu" in flags and "--comment=a b" in flags
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_submits_nothing(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets)
    res = _launch(path, "--dry-run", "--profile", REPO / "configs/cluster/localhost_slurm.yaml")
    assert res.returncode == 0, res.stderr
    # Array specs are ranges (the issue: "0-319%2", not "0,1,2,...,319%2").
    assert "4 runs in 4 packs" in res.stdout and "sbatch --array=0-3%2" in res.stdout
    assert "--dependency=afterany" in res.stdout and "--partition=debug" in res.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_fine_tuning_runs_get_packs_of_one(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets, pack_size=4, overrides={"model.speech.finetune_top_layers": 1},
                      axes={"model.hidden_layers": [1, 2]})
    runs = expand(load_grid(path))
    assert [len(p) for p in make_packs(runs, 4)] == [1, 1, 1, 1]
    assert ("4 run(s) cannot share a backbone forward (it fine-tunes backbone layers), so each is a pack of one"
            in _launch(path, "--dry-run").stdout)


@pytest.mark.slow
def test_deepspeed_runs_get_packs_of_one(demo_assets, tmp_path):
    path = write_grid(tmp_path, demo_assets, pack_size=4, overrides={"train.strategy": "deepspeed"},
                      axes={"model.hidden_layers": [1, 2]})
    assert [len(p) for p in make_packs(expand(load_grid(path)), 4)] == [1, 1, 1, 1]
    assert "cannot share a backbone forward (it trains under DeepSpeed" in _launch(path, "--dry-run").stdout


@pytest.mark.slow
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
    from ser_hpc.train.pack_task import handle_preemption
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


# ------------------------------------------------------------- big grids: planning speed, arrays split at MaxArraySize

def _fake_grid(tmp_path, name="big", pairs=None, axes=None, pack_size=1, base_model=None, **extra) -> Path:
    """A grid on files that need not exist (a dry run reports them); no demo assets needed."""
    base = {"data": {"train_csv": str(tmp_path / "no" / "train.csv"), "audio_dir": str(tmp_path / "no" / "audio")},
            "model": {"head_width": 32, **(base_model or {})}, "train": {"max_steps": 4, "eval_every": 2}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"name": name, "run_config": "base.yaml",
            "backbone_pairs": pairs or [{"name": "p", "speech": str(tmp_path / "s"), "text": str(tmp_path / "t")}],
            "axes": axes or {"model.hidden_layers": [1, 2]}, "pack_size": pack_size,
            "results_dir": str(tmp_path / "results"), **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _no_scontrol(tmp_path, monkeypatch, output: str | None = None) -> None:
    """A fake scontrol first on PATH: fails (no controller), or prints ``output``."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    body = f"cat <<'EOT'\n{output}\nEOT\n" if output is not None else "echo 'cannot reach the controller' >&2; exit 1\n"
    (bin_dir / "scontrol").write_text("#!/bin/bash\n" + body)
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")


def test_array_specs_are_compressed_ranges():
    from ser_hpc.grid.submit import ArrayChunk, compress
    assert ArrayChunk(0, list(range(320))).spec(2) == "0-319%2"
    assert ArrayChunk(0, [0, 1, 2, 3, 7, 9, 10, 11, 12]).spec(2) == "0-3,7,9-12%2"  # a relaunch: 4-6 and 8 finished
    assert compress([5, 3, 4, 4, 10]) == "3-5,10" and compress([7]) == "7" and compress([1, 3]) == "1,3"
    assert compress([]) == "" and ArrayChunk(0, [0, 1]).spec() == "0-1" and ArrayChunk(5, [5, 7]).spec(3) == "0,2%3"


def test_split_at_max_array_size_keeps_indices_below_it():
    from ser_hpc.grid.submit import dependency, split_by_index
    chunks = split_by_index(list(range(2500)), 1001)
    assert [c.offset for c in chunks] == [0, 1001, 2002]
    assert [len(c.items) for c in chunks] == [1001, 1001, 498]
    assert [c.spec(16) for c in chunks] == ["0-1000%16", "0-1000%16", "0-497%16"]
    assert all(max(c.indices) < 1001 and [c.offset + i for i in c.indices] == c.items for c in chunks)
    assert sum((c.items for c in chunks), []) == list(range(2500))
    # A relaunch: finished packs stay out, the indices of each array stay < MaxArraySize.
    todo = [0, 1, 2, 3, 7, 1500, 1501, 1600, 2600]
    chunks = split_by_index(todo, 1001)
    assert [(c.offset, c.spec(2)) for c in chunks] == [(0, "0-3,7%2"), (1500, "0-1,100%2"), (2600, "0%2")]
    assert split_by_index(list(range(1001)), 1001)[0].spec() == "0-1000"  # exactly MaxArraySize: one array
    assert dependency("afterany", ["11", "12", "13"]) == "afterany:11:12:13"


def test_max_array_size_from_scontrol_else_the_profile_else_1001(tmp_path, monkeypatch):
    from ser_hpc.grid.cluster import ClusterProfile, max_array_size
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"executor": "slurm", "max_array_size": 300}))
    profile = load_profile(prof)
    assert profile.max_array_size == 300
    _no_scontrol(tmp_path, monkeypatch, "Configuration data as of 2026-01-01T00:00:00\nMaxArraySize            = 40001\n"
                                        "MaxJobCount             = 10000")
    assert max_array_size(profile) == (40001, "scontrol show config")
    _no_scontrol(tmp_path, monkeypatch)  # unreachable controller
    assert max_array_size(profile) == (300, "profile p")
    assert max_array_size(ClusterProfile(executor="slurm")) == (1001, "Slurm's default")
    prof.write_text(yaml.safe_dump({"executor": "slurm", "max_array_size": 0}))
    with pytest.raises(ConfigError, match="max_array_size must be an integer >= 1"):
        load_profile(prof)


class _FakeSubmitit:
    """submitit's AutoExecutor, recording what would be submitted (job ids 100, 101, ...)."""

    def __init__(self):
        self.calls, self.next_id = [], 100
        fake = self

        class Job:
            def __init__(self, job_id):
                self.job_id = job_id
                self.paths = SimpleNamespace(stderr=f"logs/{job_id}/{job_id}_0_log.err")

        class AutoExecutor:
            def __init__(self, folder, cluster):
                self.params = {}

            def update_parameters(self, **params):
                self.params.update(params)

            def _id(self):
                fake.next_id += 1
                return str(fake.next_id - 1)

            def submit(self, fn, *args):
                job = self._id()
                fake.calls.append({"kind": fn.__name__, "id": job, "args": [args], "params": dict(self.params)})
                return Job(job)

            def map_array(self, fn, *iterables):
                job, args = self._id(), list(zip(*iterables))
                fake.calls.append({"kind": fn.__name__, "id": job, "args": args, "params": dict(self.params)})
                if len(args) == 1:  # as submitit: one task is a plain job, not an array
                    return [Job(job)]
                return [Job(f"{job}_{i}") for i in range(len(args))]

        self.AutoExecutor = AutoExecutor


def test_submitit_path_splits_2500_packs_into_3_arrays_and_aggregation_waits_for_all(tmp_path, monkeypatch):
    from ser_hpc.grid.cluster import ClusterProfile
    from ser_hpc.grid.submit import Chain, split_by_index, submit_slurm
    fake = _FakeSubmitit()
    monkeypatch.setitem(sys.modules, "submitit", fake)
    packs = list(range(2500))

    def chain(packs, prepare=False, features=0, max_array_size=1001):
        return Chain(tmp_path / "plan.json", tmp_path, "g", ClusterProfile(executor="slurm"), packs, prepare, features,
                     max_array_size, tmp_path / "code")
    sub = submit_slurm(chain(packs, prepare=True, features=3))
    kinds = [c["kind"] for c in fake.calls]
    assert kinds == ["run_prepare", "run_features", "run_pack", "run_pack", "run_pack", "run_aggregation"]
    prep, feat, *train, agg = fake.calls
    assert [len(c["args"]) for c in train] == [1001, 1001, 498]
    assert [pack for c in train for _, pack in c["args"]] == packs  # each task gets its own pack
    assert all(c["params"]["slurm_additional_parameters"]["dependency"] == f"afterok:{feat['id']}" for c in train)
    assert feat["params"]["slurm_additional_parameters"]["dependency"] == f"afterok:{prep['id']}"
    assert agg["params"]["slurm_additional_parameters"]["dependency"] == "afterany:" + ":".join(c["id"] for c in train)
    assert sub.job_ids["train"] == train[0]["id"] and [a["job_id"] for a in sub.train_arrays] == [c["id"] for c in train]
    assert (sub.job_ids["prepare"], sub.job_ids["features"], sub.job_ids["aggregate"]) == (prep["id"], feat["id"], agg["id"])
    assert [a["items"][0] for a in sub.train_arrays] == [0, 1001, 2002]
    assert sub.tasks["1001"]["task_id"] == f"{train[1]['id']}_0" and len(sub.tasks) == 2500  # each pack's own task
    # The features job split too: training waits for every one of its arrays.
    fake.calls.clear()
    submit_slurm(chain([0, 1], features=5, max_array_size=2))
    feats = [c for c in fake.calls if c["kind"] == "run_features"]
    assert [[g for _, g in c["args"]] for c in feats] == [[0, 1], [2, 3], [4]]
    train = next(c for c in fake.calls if c["kind"] == "run_pack")
    assert train["params"]["slurm_additional_parameters"]["dependency"] == "afterok:" + ":".join(c["id"] for c in feats)
    # A relaunch with gaps: submitit gets the arrays the dry run and the sbatch script show.
    fake.calls.clear()
    todo = [0, 1, 2, 3, 7, 1500, 1501, 1600, 2600]
    sub = submit_slurm(chain(todo))
    assert [a["items"] for a in sub.train_arrays] == [c.items for c in split_by_index(todo, 1001)]
    assert [[p for _, p in c["args"]] for c in fake.calls if c["kind"] == "run_pack"] == [[0, 1, 2, 3, 7],
                                                                                        [1500, 1501, 1600], [2600]]


def _fake_bin(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def test_sbatch_path_splits_arrays_passes_offsets_and_skips_finished_packs(tmp_path, monkeypatch):
    """--emit-sbatch + slurm/submit_grid.sh against a fake sbatch: MaxArraySize 3 (profile key,
    scontrol unreachable), 6 packs of which 2 finished -> 2 arrays with gaps, offsets passed to
    the task, aggregation after both; the task script turns index + offset into the pack. The
    rendered chain is what the dry run shows."""
    import os
    from ser_hpc.grid.launch import describe, emit_sbatch, plan_launch
    from ser_hpc.plan_file import run_folder
    _no_scontrol(tmp_path, monkeypatch)
    prof = tmp_path / "slurm.yaml"
    prof.write_text(yaml.safe_dump({"executor": "slurm", "array_parallelism": 2, "max_array_size": 3}))
    path = _fake_grid(tmp_path, axes={"model.hidden_layers": [1, 2], "train.seed": [1, 2, 3]}, pack_size=2,
                      pairs=[{"name": "a", "speech": str(tmp_path / "s1"), "text": str(tmp_path / "t1")},
                             {"name": "b", "speech": str(tmp_path / "s2"), "text": str(tmp_path / "t2")}])
    lp = plan_launch(str(path), [], None, str(prof))
    assert len(lp.packs) == 6 and lp.max_array_size == 3 and lp.max_array_source == "profile slurm"
    for pack in (1, 4):  # finished in an earlier launch
        for run in lp.packs[pack]:
            folder = run_folder({"launch_dir": os.getcwd()}, {"config": run.config})
            folder.path.mkdir(parents=True)
            (folder.path / "final.json").write_text(json.dumps({"status": "done"}))
    lp = plan_launch(str(path), [], None, str(prof))
    assert lp.to_run == [0, 2, 3, 5]
    text = describe(lp)
    assert "2 training arrays" in text and "MaxArraySize 3 (profile slurm)" in text
    assert "train_1: sbatch --array=0,2%2 " in text and "(task i = pack 3 + i)" in text
    assert "--dependency=afterany:$train_1:$train_2" in text
    lp.features = 4  # as if 4 feature stores were missing: 2 arrays too
    env_file = emit_sbatch(lp, [])
    script = env_file.read_text()
    # The dry run shows the very calls the rendered script makes.
    assert [line.split(": sbatch ", 1)[1].split(" (task i")[0] for line in describe(lp).splitlines()
            if ": sbatch " in line] == [line.split("=$(submit ", 1)[1][:-1]
                                         for line in script.splitlines() if "=$(submit " in line]
    assert script.count("--array=0,2%2 ") == 2 and "--array=0-2 " in script and "--array=0 " in script
    train_2 = next(line for line in script.splitlines() if line.startswith("train_2=$(submit --array=0,2%2 "))
    assert " --dependency=afterok:$features_1:$features_2 " in train_2 and train_2.endswith(" 3)")
    manifest = json.loads((lp.spec.out_dir / "manifest.json").read_text())
    assert [(a["offset"], a["items"]) for a in manifest["launches"][-1]["train_arrays"]] == [(0, [0, 2]), (3, [3, 5])]

    bin_dir = tmp_path / "bin"
    calls = tmp_path / "sbatch_calls"
    _fake_bin(bin_dir, "sbatch", f'n=$(( $(cat {tmp_path}/n 2>/dev/null || echo 200) + 1 )); echo $n > {tmp_path}/n\n'
                                 f'echo "$n $*" >> {calls}\necho "$n"\n')
    fake_py = _fake_bin(tmp_path / "py", "python", f"echo {env_file}\n")
    res = subprocess.run(["bash", str(REPO / "slurm" / "submit_grid.sh"), str(path)], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SER_HPC_PYTHON": str(fake_py)},
                         timeout=60)
    assert res.returncode == 0, res.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 5  # 2 feature arrays, 2 training arrays, aggregation
    f1, f2, t1, t2, agg = lines
    assert "--array=0-2 " in f1 and f1.endswith("slurm/features.sbatch " + str(lp.spec.out_dir.resolve() / "plan.json") + " 0")
    assert "--array=0 " in f2 and f2.endswith(" 3") and "%A_%a_features+3.out" in f2
    for line in (t1, t2):
        assert "--array=0,2%2" in line and "--dependency=afterok:201:202" in line
    assert t1.endswith(" 0") and "--output=" in t1 and "%A_%a.out" in t1
    assert t2.endswith(" 3") and "%A_%a+3.out" in t2
    assert "--dependency=afterany:203:204" in agg and "slurm/aggregate.sbatch" in agg and "--requeue" not in agg
    assert "--requeue" in t1 and "--kill-on-invalid-dep=yes" in t1 and "--job-name=ser-big-train" in t1
    assert "train array: 203\n" in res.stdout and "train array: 204 (task i = pack 3 + i)" in res.stdout

    # The task scripts: array index + offset = the pack (or feature group).
    fake_srun = _fake_bin(tmp_path / "srun_bin", "srun", 'echo "$@"\n')
    out = subprocess.run(["bash", str(REPO / "slurm" / "train_array.sbatch"), "plan.json", "3"], capture_output=True,
                         text=True, timeout=30, cwd=tmp_path,
                         env={**os.environ, "PATH": f"{fake_srun.parent}:{os.environ['PATH']}",
                              "SLURM_ARRAY_TASK_ID": "2", "SER_HPC_PYTHON": "python"})
    assert out.returncode == 0 and out.stdout.split()[-2:] == ["--pack", "5"], out.stderr
    out = subprocess.run(["bash", str(REPO / "slurm" / "features.sbatch"), "plan.json", "3"], capture_output=True,
                         text=True, timeout=30, cwd=tmp_path,
                         env={**os.environ, "SLURM_ARRAY_TASK_ID": "0", "SER_HPC_PYTHON": "echo"})
    assert out.returncode == 0 and out.stdout.split()[-2:] == ["--task", "3"], out.stderr
    out = subprocess.run(["bash", str(REPO / "slurm" / "train_array.sbatch"), "plan.json"], capture_output=True,
                         text=True, timeout=30, cwd=tmp_path,
                         env={**os.environ, "PATH": f"{fake_srun.parent}:{os.environ['PATH']}",
                              "SLURM_ARRAY_TASK_ID": "4", "SER_HPC_PYTHON": "python"})
    assert out.stdout.split()[-2:] == ["--pack", "4"]  # no offset: the index is the pack, as before


def test_status_maps_split_arrays_back_to_packs(tmp_path):
    """Both submission paths record each pack's task in manifest.json; one reader maps them back."""
    from ser_hpc.grid.manifest import append_launch, pack_tasks, read, record_sbatch_job
    # The sbatch path: submit.sh records each array's id; the offset turns pack into index.
    arrays = [{"job_id": None, "offset": 0, "items": [0, 2], "log": str(tmp_path / "logs" / "%A_%a.out")},
              {"job_id": None, "offset": 3, "items": [3, 5], "log": str(tmp_path / "logs" / "%A_%a+3.out")}]
    append_launch(tmp_path, {"launch_id": "L1", "executor": "sbatch", "packs": [0, 2, 3, 5], "tasks": {},
                             "job_ids": {"train_array": None, "aggregate": None}, "train_arrays": arrays})
    record_sbatch_job(tmp_path, "L1", "train_1", "300")
    record_sbatch_job(tmp_path, "L1", "train_2", "301")
    record_sbatch_job(tmp_path, "L1", "aggregate_1", "302")
    tasks, others = pack_tasks(read(tmp_path))
    assert {p: (t.task_id, Path(t.log).name) for p, t in tasks.items()} == {
        0: ("300_0", "300_0.out"), 2: ("300_2", "300_2.out"), 3: ("301_0", "301_0+3.out"), 5: ("301_2", "301_2+3.out")}
    assert others == {"aggregate": "302"} and read(tmp_path)["launches"][0]["job_ids"]["train_array"] == "300"
    # The submitit path: the ids submitit returned, a lone task as a plain job; the latest launch wins.
    launch = {"executor": "slurm", "packs": [0, 1, 2], "job_ids": {"train_array": "500", "aggregate": "502"},
              "tasks": {"0": {"task_id": "500_0", "log": "a"}, "1": {"task_id": "500_1", "log": "b"},
                        "2": {"task_id": "501", "log": "c"}}}
    tasks, others = pack_tasks({"launches": [read(tmp_path)["launches"][0], launch]})
    assert {p: t.task_id for p, t in tasks.items()} == {0: "500_0", 1: "500_1", 2: "501", 3: "301_0", 5: "301_2"}
    assert others == {"aggregate": "502"}


def test_fast_expansion_equals_building_every_run_from_scratch(tmp_path):
    """expand() copies each pair's config and sets only the axis values: the configs must be
    exactly what applying base, overrides, pair and axis values to a fresh Config gives."""
    from ser_hpc.config import Config, apply_tree, config_from_dict, set_key, validate
    path = _fake_grid(tmp_path, axes={"model.hidden_layers": [1, 2], "data.speeds": [[0.9, 1.1], [1.0]],
                                      "train.lr": [1, 2e-3]},
                      pairs=[{"name": "a", "speech": "s1", "text": "t1", "train": {"batch_size": 8}},
                             {"name": "b", "speech": "s2", "text": "t2"}],
                      overrides={"train.weight_decay": 0, "model.dropout": 0.2})
    spec = load_grid(path)
    runs = expand(spec)
    assert len(runs) == 16
    for run in runs:
        cfg = apply_tree(Config(), spec.base, "base")
        for key, value in {**spec.overrides, **next(p for p in spec.pairs if p.name == run.pair).overrides,
                           **{k: v for k, v in run.overrides.items() if k in spec.axes}}.items():
            set_key(cfg, key, value)
        cfg.run.name = run.name
        validate(cfg)
        want = cfg.to_dict()
        want["run"]["dir"] = str(spec.out_dir / "runs" / run.run_id)
        assert run.config == want
        assert config_from_dict(run.config).to_dict() == run.config
    assert isinstance(runs[0].config["train"]["lr"], float)  # coerced as set_key does
    runs[0].config["data"]["speeds"].append(3.0)  # runs share no mutable state
    runs[0].config["model"]["dropout"] = 0.5
    assert all(r.config["data"]["speeds"][-1] != 3.0 and r.config["model"]["dropout"] == 0.2 for r in runs[1:])
    bad = _fake_grid(tmp_path, name="bad", overrides={"train.max_steps": "many"})
    with pytest.raises(ConfigError, match=r"'train\.max_steps' \(.*bad\.yaml: run 'p hidden_layers=1'\) must be int"):
        expand(load_grid(bad))


def test_dry_run_of_a_big_grid_prints_a_summary_and_every_run_with_verbose(tmp_path, monkeypatch):
    from ser_hpc.grid.launch import describe, plan_launch
    _no_scontrol(tmp_path, monkeypatch)
    path = _fake_grid(tmp_path, axes={"model.hidden_layers": [1, 2], "train.seed": list(range(60))}, pack_size=2,
                      pairs=[{"name": "a", "speech": "s1", "text": "t1"}, {"name": "b", "speech": "s2", "text": "t2"}])
    lp = plan_launch(str(path), [], None, str(REPO / "configs" / "cluster" / "localhost_slurm.yaml"))
    assert len(lp.runs) == 240 and len(lp.packs) == 120 and lp.problems  # missing data and models are reported
    text = describe(lp)
    assert text.startswith("grid big: 240 runs in 120 packs")
    assert "  a  120 run(s) in 60 pack(s), 0 finished, 60 pack(s) to submit" in text
    assert "runs (the first and last 10 of 240; --verbose lists every one):" in text
    assert sum(line.startswith("  pack ") for line in text.splitlines()) == 20 and "... 220 more run(s) ..." in text
    assert lp.runs[0].run_id in text and lp.runs[-1].run_id in text and lp.runs[100].run_id not in text
    assert "to submit: 120 pack(s) 0-119;" in text and "sbatch --array=0-119%2 " in text
    assert "one training array (MaxArraySize 1001 (Slurm's default))" in text
    verbose = describe(lp, verbose=True)
    assert sum(line.startswith("  pack ") for line in verbose.splitlines()) == 240


def test_planning_a_big_grid_writes_every_run(tmp_path, monkeypatch):
    """2,000 runs expanded, validated, checked and planned (benchmarks/plan_scale.py prints how
    long 1,000 and 10,000 take: speed is measured there, not asserted here)."""
    from ser_hpc.grid.launch import describe, plan_launch, write_grid_files
    path = _fake_grid(tmp_path, axes={"model.hidden_layers": [1, 2], "model.dropout": [0.0, 0.1, 0.2, 0.3, 0.4],
                                      "train.seed": list(range(50))}, pack_size=4,
                      pairs=[{"name": f"p{i}", "speech": f"s{i}", "text": f"t{i}"} for i in range(4)])
    lp = plan_launch(str(path), [], "local")
    write_grid_files(lp)
    describe(lp)
    assert len(lp.runs) == 2000 and len(lp.packs) == 600
    plan = json.loads((lp.spec.out_dir / "plan.json").read_text())
    assert len(plan["runs"]) == 2000 and plan["runs"][5]["config"] == lp.runs[5].config


# ------------------------------------------------------------- backbone entries with one encoder

@pytest.mark.slow
def test_an_entry_with_one_encoder_trains_that_modality_alone(tmp_path):
    from ser_hpc.grid.checks import backbones_used
    path = _fake_grid(tmp_path, base_model={"text": {"name": "base-text"}, "speech": {"name": "base-speech"}},
                      pairs=[{"name": "both", "speech": "s0", "text": "t0"}, {"name": "w2v", "speech": "s1"},
                             {"name": "beto", "text": "t1"}])
    runs = expand(load_grid(path))
    by_pair = {}
    for r in runs:
        by_pair.setdefault(r.pair, []).append(r.config["model"])
    assert {(m["modalities"], m["speech"]["name"], m["text"]["name"]) for m in by_pair["both"]} == {("audio+text", "s0", "t0")}
    assert {(m["modalities"], m["speech"]["name"], m["text"]["name"]) for m in by_pair["w2v"]} == {("audio", "s1", "")}
    assert {(m["modalities"], m["speech"]["name"], m["text"]["name"]) for m in by_pair["beto"]} == {("text", "", "t1")}
    # Prefetch and the launcher's checks see only the encoders the entries name.
    assert sorted(backbones_used(expand(load_grid(path)))) == [("speech", "s0"), ("speech", "s1"), ("text", "t0"), ("text", "t1")]
    res = _launch(path, "--dry-run", "--cluster", "local", cwd=tmp_path)
    assert res.returncode == 2
    for name in ("s0", "s1", "t0", "t1"):
        assert f"model {name!r}" in res.stderr or f"path does not exist: {name} " in res.stderr, name
    assert "base-text" not in res.stderr and "base-speech" not in res.stderr
    # An entry's own modalities key is kept when it fits.
    ok = _fake_grid(tmp_path, name="ok", pairs=[{"name": "w2v", "speech": "s1", "model.modalities": "audio"}],
                    base_model={"modalities": "audio+text"})
    assert {r.config["model"]["modalities"] for r in expand(load_grid(ok))} == {"audio"}


def test_an_entry_with_one_encoder_refuses_modalities_that_need_the_other(tmp_path):
    def refused(match, cli=None, **grid):
        with pytest.raises(ConfigError, match=match):  # expansion applies the precedence, and refuses
            expand(load_grid(_fake_grid(tmp_path, name="r", **grid), cli))
    speech_only = [{"name": "both", "speech": "s0", "text": "t0"}, {"name": "w2v", "speech": "s1"}]
    refused(r"backbone_pairs\[1\] 'w2v' names only a speech encoder, but model\.modalities is 'audio\+text' "
            r"\(run_config base\.yaml\), which needs a text encoder too.*set model\.modalities: audio in the entry",
            pairs=speech_only, base_model={"modalities": "audio+text"})
    refused(r"backbone_pairs\[1\] 'w2v' .* model\.modalities is 'audio\+text' \(overrides in",
            pairs=speech_only, overrides={"model.modalities": "audio+text"})
    refused(r"'w2v' names only a speech encoder, but model\.modalities is 'text' \(the command-line override",
            cli={"model.modalities": "text"}, pairs=speech_only)
    refused(r"'w2v' .* model\.modalities is 'audio\+text' \(the axis model\.modalities",
            pairs=speech_only, axes={"model.modalities": ["audio", "audio+text"]})
    refused(r"backbone_pairs\[0\] 'beto' names only a text encoder, but model\.modalities is 'audio' \(the entry itself\)"
            r".*needs a speech encoder",
            pairs=[{"name": "beto", "text": "t1", "model": {"modalities": "audio"}}])
    # An axis of modalities that all fit is fine.
    path = _fake_grid(tmp_path, name="fine", pairs=[{"name": "w2v", "speech": "s1"}],
                      axes={"model.modalities": ["audio"], "model.hidden_layers": [1, 2]})
    assert {r.config["model"]["modalities"] for r in expand(load_grid(path))} == {"audio"}
    # A command-line text encoder is not "ignored" for an audio-only entry: it never used one.
    assert load_grid(path, {"model.text.name": "x"}).overrides["model.text.name"] == "x"


def test_an_entry_key_pins_an_axis_for_that_entry(tmp_path):
    """A text-only entry has no use for a fusion axis: setting model.fusion in the entry pins
    it, so the entry gets pooling x seed runs while the fused pair gets the full product."""
    path = _fake_grid(tmp_path, name="pin",
                      pairs=[{"name": "both", "speech": "s0", "text": "t0"},
                             {"name": "text", "text": "t1", "model.fusion": "late"}],
                      axes={"model.fusion": ["early", "late"], "model.pooling": ["attention", "mean"],
                            "train.seed": [1, 2]})
    runs = expand(load_grid(path))
    combos = {}
    for r in runs:
        m = r.config["model"]
        combos.setdefault(r.pair, []).append((m["fusion"], m["pooling"], r.config["train"]["seed"]))
    assert len(combos["both"]) == 8 and len(set(combos["both"])) == 8
    assert sorted(combos["text"]) == [("late", p, s) for p in ("attention", "mean") for s in (1, 2)]
    assert all(r.overrides["model.fusion"] == "late" for r in runs if r.pair == "text")
    assert {r.name for r in runs if r.pair == "text"} == {f"text fusion=late pooling={p} seed={s}"
                                                        for p in ("attention", "mean") for s in (1, 2)}
    # The pair without the key keeps the ids it had before the entry was added.
    alone = _fake_grid(tmp_path, name="pin", pairs=[{"name": "both", "speech": "s0", "text": "t0"}],
                       axes={"model.fusion": ["early", "late"], "model.pooling": ["attention", "mean"],
                             "train.seed": [1, 2]})
    assert [r.run_id for r in expand(load_grid(alone))] == [r.run_id for r in runs if r.pair == "both"]
