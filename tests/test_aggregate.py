"""Aggregation job: leaderboard, top-k and greedy ensembles, intervals and tests, seeds
as configurations, outputs, failures, the atomic switch of ensemble/ and the CLI.

Results trees are built in tmp_path exactly as training jobs write them (the contract in
the results README): run folders with final.json and dev/test probabilities generated
from known labels, so every expected number is computed independently here.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` without an editable install
    sys.path.insert(0, str(REPO))

from ser_hpc.data.labels import EMOSPEECH_LABELS as LABELS
from ser_hpc.ensemble import stats as stats_module
from ser_hpc.ensemble.aggregate import AggregateError, aggregate
from ser_hpc.ensemble.collect import RunRecord
from ser_hpc.ensemble.combine import combine
from ser_hpc.ensemble.leaderboard import rank_runs
from ser_hpc.ensemble.selection import greedy

PYTHON = REPO / ".venv" / "bin" / "python"
if not PYTHON.exists():
    PYTHON = Path(sys.executable)
C = len(LABELS)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- helpers

def macro_f1(y, pred):
    return f1_score(y, pred, labels=list(range(C)), average="macro", zero_division=0)


def noisy_probs(y, quality, rng, shared):
    """Softmax of (quality * one-hot(gold) + shared noise + own noise): higher quality, better run.

    `shared` is noise common to all runs (hard examples are hard for every model); the
    own part is independent, so averaging members cancels some of it and the mean
    ensemble beats each member by a few points, as in the paper.
    """
    logits = quality * np.eye(C)[y] + shared + rng.normal(size=(len(y), C))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def write_probs(path, ids, y, probs, gold=True):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", *LABELS])
        for i, g, p in zip(ids, y, probs):
            w.writerow([i, LABELS[g] if gold else "", *(repr(float(x)) for x in p)])


def write_head(run_dir, n_classes=C, width=4):
    """A small head in the training format (its own key names; a classifier with a row per
    class), with values of its own: each run's head differs from the others'."""
    import zlib

    import torch
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(zlib.crc32(run_dir.name.encode()))
    save_file({"classifier.0.weight": torch.randn(width, width, generator=gen), "classifier.0.bias": torch.zeros(width),
               "classifier.3.weight": torch.randn(n_classes, width, generator=gen),
               "classifier.3.bias": torch.zeros(n_classes)}, str(run_dir / "best_head.safetensors"))


def write_run(root, run_id, name, *, dev=None, test=None, test_gold=True, status="done", reason=None):
    """One run folder as a training job leaves it. dev/test: (ids, labels, probs) or None."""
    d = root / "runs" / run_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(f"run:\n  name: {name}\n")
    if status == "done":
        write_head(d)
    if status is None:  # missing: the job died before writing final.json
        return d
    final = {"run_id": run_id, "name": name, "status": status, "reason": reason, "dev_macro_f1": None,
             "best_step": None, "best_epoch": None, "steps": 0, "epochs": 0, "labels": list(LABELS),
             "per_class_f1": {}, "confusion_matrix": None, "test_macro_f1": None, "elapsed_s": 12.5}
    if dev is not None:
        ids, y, p = dev
        pred = p.argmax(1)
        final.update(dev_macro_f1=macro_f1(y, pred), best_step=200, best_epoch=2, steps=300, epochs=3,
                     per_class_f1=dict(zip(LABELS, f1_score(y, pred, labels=list(range(C)), average=None,
                                                            zero_division=0).tolist())),
                     confusion_matrix=confusion_matrix(y, pred, labels=list(range(C))).tolist())
        write_probs(d / "dev_probs.csv", ids, y, p)
    if test is not None:
        ids, y, p = test
        write_probs(d / "test_probs.csv", ids, y, p, gold=test_gold)
        if test_gold:
            final["test_macro_f1"] = macro_f1(y, p.argmax(1))
    (d / "final.json").write_text(json.dumps(final))
    return d


QUALITY = {"r0": 2.6, "r1": 3.5, "r2": 3.0, "r3": 3.2}  # r1 best, r0 worst


def make_tree(root, *, with_test=True, test_gold=True, plan_top_k=3, seed=0):
    """4 done runs of differing quality, 1 failed, 1 missing; returns the generated data."""
    rng = np.random.default_rng(seed)
    dev_ids = [f"dev-{i:04d}.mp3" for i in range(360)]
    test_ids = [f"test-{i:04d}.mp3" for i in range(240)]
    dev_y = rng.permutation(np.arange(len(dev_ids)) % C)
    test_y = rng.permutation(np.arange(len(test_ids)) % C)
    dev_shared, test_shared = rng.normal(size=(len(dev_y), C)), rng.normal(size=(len(test_y), C))
    plan_runs, data = [], {}
    for n, (run_id, q) in enumerate(QUALITY.items()):
        dev_p, test_p = noisy_probs(dev_y, q, rng, dev_shared), noisy_probs(test_y, q, rng, test_shared)
        # Rows shuffled per run: the ensemble must align by id, not by row position.
        perm = rng.permutation(len(dev_ids))
        write_run(root, run_id, f"pair{n}",
                  dev=([dev_ids[i] for i in perm], dev_y[perm], dev_p[perm]),
                  test=(test_ids, test_y, test_p) if with_test else None, test_gold=test_gold)
        data[run_id] = {"dev": dev_p, "test": test_p}
        plan_runs.append({"run_id": run_id, "name": f"pair{n}", "pack": 0,
                          "overrides": {"model.head.num_layers": 2 + n % 2, "train.weight_decay": 0.01 * (n + 1)}})
    write_run(root, "r4", "pair4", status="failed", reason="CUDA out of memory")
    write_run(root, "r5", "pair5", status=None)
    plan_runs += [{"run_id": "r4", "name": "pair4", "pack": 1, "overrides": {"model.head.num_layers": 3}},
                  {"run_id": "r5", "name": "pair5", "pack": 1, "overrides": {"model.head.num_layers": 4}}]
    plan = {"grid_name": "demo", "runs": plan_runs, "ensemble": {"top_k": plan_top_k, "method": "mean"}}
    (root / "plan.json").write_text(json.dumps(plan))
    return {"dev_ids": dev_ids, "dev_y": dev_y, "test_ids": test_ids, "test_y": test_y, "probs": data}


def dev_f1(data, run_id):
    return macro_f1(data["dev_y"], data["probs"][run_id]["dev"].argmax(1))


def ranked_ids(data):
    return sorted(QUALITY, key=lambda r: -dev_f1(data, r))


def hand_vote(member_probs):
    """Independent majority vote: most votes, ties by highest mean probability."""
    mean = np.mean(member_probs, axis=0)
    out = []
    for row in range(mean.shape[0]):
        votes = [0] * C
        for p in member_probs:
            votes[int(np.argmax(p[row]))] += 1
        best = max(votes)
        tied = [c for c in range(C) if votes[c] == best]
        out.append(max(tied, key=lambda c: (mean[row, c], -c)))
    return np.array(out)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "demo"
    return root, make_tree(root)


# ------------------------------------------------------------------------------- tests

def test_generated_data_has_the_intended_shape(tree):
    """Guard for the fixture itself: the runs differ and the mean of the top 3 beats each."""
    _, data = tree
    top = ranked_ids(data)[:3]
    assert top[0] == "r1" and ranked_ids(data)[-1] == "r0"
    ens = macro_f1(data["dev_y"], np.mean([data["probs"][r]["dev"] for r in top], 0).argmax(1))
    assert ens > max(dev_f1(data, r) for r in top)


def test_leaderboard_ranking_and_status(tree):
    root, data = tree
    aggregate(root)
    rows = read_csv(root / "ensemble" / "leaderboard.csv")
    done = [r for r in rows if r["status"] == "done"]
    assert [r["run_id"] for r in done] == ranked_ids(data)
    assert [r["rank"] for r in done] == ["1", "2", "3", "4"]
    f1s = [float(r["dev_macro_f1"]) for r in done]
    assert f1s == sorted(f1s, reverse=True)
    assert f1s[0] == pytest.approx(dev_f1(data, done[0]["run_id"]), abs=1e-6)
    assert done[0]["test_macro_f1"] != "" and done[0]["best_step"] == "200"
    # plan overrides become columns
    assert {"model.head.num_layers", "train.weight_decay"} <= set(rows[0])
    by_id = {r["run_id"]: r for r in rows}
    assert by_id["r1"]["model.head.num_layers"] == "3" and by_id["r1"]["train.weight_decay"] == "0.02"
    assert by_id["r4"]["status"] == "failed" and by_id["r4"]["reason"] == "CUDA out of memory"
    assert by_id["r4"]["rank"] == "" and by_id["r5"]["status"] == "missing"
    md = (root / "ensemble" / "leaderboard.md").read_text()
    head, tail = md.split("## Failed and missing runs")
    assert head.index("| r1 |") < head.index("| r0 |")
    assert "1 * | r1 |" in head  # ensemble members starred
    assert "r4" in tail and "CUDA out of memory" in tail and "r5" in tail and "missing" in tail


def test_rank_ties_broken_by_name():
    recs = [RunRecord("a", "zeta", "done", dev_macro_f1=0.8), RunRecord("b", "alpha", "done", dev_macro_f1=0.8),
            RunRecord("c", "mid", "done", dev_macro_f1=0.9), RunRecord("d", "x", "failed", reason="boom")]
    assert [r.run_id for r in rank_runs(recs)] == ["c", "b", "a"]


def test_mean_ensemble_matches_hand_computation(tree):
    root, data = tree
    res = aggregate(root)
    top = ranked_ids(data)[:3]
    assert [m["run_id"] for m in res["members"]] == top
    mean = np.mean([data["probs"][r]["dev"] for r in top], axis=0)
    pred = mean.argmax(1)
    y = data["dev_y"]
    assert res["method"] == "mean" and res["top_k"] == 3
    assert res["dev_macro_f1"] == pytest.approx(macro_f1(y, pred), abs=1e-12)
    assert res["dev_macro_f1"] > max(m["dev_macro_f1"] for m in res["members"])
    assert res["confusion_matrix_dev"] == confusion_matrix(y, pred, labels=list(range(C))).tolist()
    per = f1_score(y, pred, labels=list(range(C)), average=None, zero_division=0)
    assert list(res["per_class_f1_dev"]) == list(LABELS)
    assert list(res["per_class_f1_dev"].values()) == pytest.approx(per.tolist())
    # ensemble/dev_probs.csv: same format as a run's, rows in the top run's order, mean probs
    rows = read_csv(root / "ensemble" / "dev_probs.csv")
    assert list(rows[0]) == ["id", "label", *LABELS]
    idx = {i: k for k, i in enumerate(data["dev_ids"])}
    got = np.array([[float(r[c]) for c in LABELS] for r in rows])
    want = mean[[idx[r["id"]] for r in rows]]
    assert got == pytest.approx(want, abs=1e-6)
    assert [r["label"] for r in rows] == [LABELS[data["dev_y"][idx[r["id"]]]] for r in rows]


@pytest.mark.slow
def test_vote_matches_hand_vote_and_differs_from_mean(tree):
    root, data = tree
    res_vote = aggregate(root, method="vote")
    top = ranked_ids(data)[:3]
    members = [data["probs"][r]["dev"] for r in top]
    vote_pred = hand_vote(members)
    assert res_vote["method"] == "vote"
    assert res_vote["dev_macro_f1"] == pytest.approx(macro_f1(data["dev_y"], vote_pred), abs=1e-12)
    mean_pred = np.mean(members, 0).argmax(1)
    assert (vote_pred != mean_pred).any()  # the two methods really are different here
    assert aggregate(root, method="mean")["dev_macro_f1"] == pytest.approx(macro_f1(data["dev_y"], mean_pred))
    # test predictions follow the vote too
    aggregate(root, method="vote")
    preds = read_csv(root / "ensemble" / "predictions_test.csv")
    tvote = hand_vote([data["probs"][r]["test"] for r in top])
    assert [p["label"] for p in preds] == [LABELS[c] for c in tvote]


def test_vote_tie_break_and_disagreement_with_mean():
    # Two members, one vote each: the tie goes to the class with the higher mean probability.
    a = np.array([[0.6, 0.4, 0, 0, 0, 0]])
    b = np.array([[0.1, 0.9, 0, 0, 0, 0]])
    _, pred = combine(np.stack([a, b]), "vote")
    assert pred.tolist() == [1]
    # Three members: two weak votes for class 2 beat one confident vote for class 0 ...
    m1 = np.array([[0.95, 0.01, 0.01, 0.01, 0.01, 0.01]])
    m2 = np.array([[0.40, 0.0, 0.45, 0.05, 0.05, 0.05]])
    stacked = np.stack([m1, m2, m2])
    scores, pred = combine(stacked, "vote")
    assert pred.tolist() == [2] and scores[0].tolist() == pytest.approx([1 / 3, 0, 2 / 3, 0, 0, 0])
    # ... while the mean of probabilities picks class 0.
    assert combine(stacked, "mean")[1].tolist() == [0]
    # A full tie (same probabilities) resolves to the lowest class id, deterministically.
    flat = np.full((1, 1, C), 1 / C)
    assert combine(flat, "vote")[1].tolist() == [0] and combine(flat, "mean")[1].tolist() == [0]


def test_test_metrics_and_predictions_with_gold_labels(tree):
    root, data = tree
    res = aggregate(root)
    top = ranked_ids(data)[:3]
    tpred = np.mean([data["probs"][r]["test"] for r in top], 0).argmax(1)
    assert res["test_macro_f1"] == pytest.approx(macro_f1(data["test_y"], tpred), abs=1e-12)
    assert set(res["per_class_f1_test"]) == set(LABELS)
    text = (root / "ensemble" / "predictions_test.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == "id,label"
    assert len(lines) == 1 + len(data["test_ids"])
    assert lines[1:] == [f"{i},{LABELS[c]}" for i, c in zip(data["test_ids"], tpred)]
    assert (root / "ensemble" / "test_probs.csv").exists()
    assert (root / "ensemble" / "confusion_matrix_test.png").exists()


def test_no_test_gold_gives_predictions_but_no_test_score(tmp_path):
    root = tmp_path / "g"
    data = make_tree(root, test_gold=False)
    res = aggregate(root)
    assert res["test_macro_f1"] is None and res["per_class_f1_test"] is None
    preds = read_csv(root / "ensemble" / "predictions_test.csv")
    assert [p["id"] for p in preds] == data["test_ids"]
    assert all(p["label"] in LABELS for p in preds)
    assert all(r["label"] == "" for r in read_csv(root / "ensemble" / "test_probs.csv"))
    assert not (root / "ensemble" / "confusion_matrix_test.png").exists()


def test_no_test_set_writes_no_test_outputs(tmp_path):
    root = tmp_path / "g"
    make_tree(root, with_test=False)
    res = aggregate(root)
    assert res["test_macro_f1"] is None
    for name in ("predictions_test.csv", "test_probs.csv", "confusion_matrix_test.png"):
        assert not (root / "ensemble" / name).exists()
    assert (root / "ensemble" / "dev_probs.csv").exists()


def test_failed_and_missing_are_reported(tree, capsys):
    root, _ = tree
    res = aggregate(root)
    assert (res["n_done"], res["n_failed"], res["n_missing"]) == (4, 1, 1)
    assert res["failed"] == [{"run_id": "r4", "reason": "CUDA out of memory"}]
    assert res["missing"] == ["r5"]
    out = capsys.readouterr().out
    assert "r4" in out and "CUDA out of memory" in out and "r5" in out
    assert "dev macro-F1" in out
    saved = json.loads((root / "ensemble" / "ensemble.json").read_text())
    assert saved["failed"] == res["failed"] and saved["missing"] == ["r5"]


def test_top_k_from_plan_then_argument(tmp_path):
    root = tmp_path / "g"
    data = make_tree(root, plan_top_k=2)
    assert [m["run_id"] for m in aggregate(root)["members"]] == ranked_ids(data)[:2]
    assert [m["run_id"] for m in aggregate(root, top_k=1)["members"]] == ranked_ids(data)[:1]


def test_top_k_larger_than_done_runs(tree, capsys):
    root, data = tree
    res = aggregate(root, top_k=10)
    assert res["top_k"] == 10 and res["n_members"] == 4
    assert [m["run_id"] for m in res["members"]] == ranked_ids(data)
    assert any("only 4 run(s) done" in n for n in res["notes"])
    assert "only 4 run(s) done" in capsys.readouterr().out


def test_mismatched_dev_ids_name_the_run(tree):
    root, data = tree
    second = ranked_ids(data)[1]
    path = root / "runs" / second / "dev_probs.csv"
    path.write_text(path.read_text().replace("dev-0007.mp3", "intruder.mp3"))
    with pytest.raises(AggregateError) as err:
        aggregate(root)
    msg = str(err.value)
    assert second in msg and "intruder.mp3" in msg and "dev-0007.mp3" in msg
    # the leaderboard is still written; no ensemble.json claims a result
    assert (root / "ensemble" / "leaderboard.md").exists()
    assert not (root / "ensemble" / "ensemble.json").exists()


def test_zero_done_runs_writes_leaderboard_and_raises(tmp_path):
    root = tmp_path / "g"
    write_run(root, "a", "first", status="failed", reason="NaN loss")
    write_run(root, "b", "second", status=None)
    with pytest.raises(AggregateError, match="no finished run"):
        aggregate(root)
    md = (root / "ensemble" / "leaderboard.md").read_text()
    assert "NaN loss" in md and "| b |" in md
    assert {r["status"] for r in read_csv(root / "ensemble" / "leaderboard.csv")} == {"failed", "missing"}


def test_stale_outputs_removed_when_test_set_disappears(tree):
    root, _ = tree
    aggregate(root)
    assert (root / "ensemble" / "predictions_test.csv").exists()
    for d in (root / "runs").iterdir():
        (d / "test_probs.csv").unlink(missing_ok=True)
    aggregate(root)
    assert not (root / "ensemble" / "predictions_test.csv").exists()
    assert not (root / "ensemble" / "confusion_matrix_test.png").exists()


def test_pngs_are_valid(tree):
    root, _ = tree
    aggregate(root)
    for name in ("confusion_matrix.png", "confusion_matrix_test.png"):
        raw = (root / "ensemble" / name).read_bytes()
        assert raw[:8] == PNG_MAGIC
        assert len(raw) > 10_000  # two annotated heatmaps, not an empty canvas


def test_rerun_is_identical_apart_from_created(tree):
    root, _ = tree
    aggregate(root)
    ens = root / "ensemble"
    first = {str(p.relative_to(ens)): p.read_bytes() for p in ens.rglob("*") if p.is_file()}
    aggregate(root)
    second = {str(p.relative_to(ens)): p.read_bytes() for p in ens.rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    assert not [n for n in first if n.startswith(".")]  # no temp files left behind
    a, b = json.loads(first.pop("ensemble.json")), json.loads(second.pop("ensemble.json"))
    a.pop("created"), b.pop("created")
    assert a == b
    assert first == second  # leaderboards, probs, predictions and PNGs byte-identical


@pytest.mark.slow
def test_cli_exit_codes(tree, tmp_path):
    root, _ = tree
    cmd = [str(PYTHON), "jobs/aggregate.py"]
    ok = subprocess.run([*cmd, str(root), "--top-k", "2", "--method", "vote"], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "dev macro-F1" in ok.stdout
    res = json.loads((root / "ensemble" / "ensemble.json").read_text())
    assert res["method"] == "vote" and res["n_members"] == 2

    empty = tmp_path / "empty"
    write_run(empty, "a", "first", status="failed", reason="NaN loss")
    bad = subprocess.run([*cmd, str(empty)], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "no finished run" in bad.stderr
    assert (empty / "ensemble" / "leaderboard.md").exists()

    nodir = subprocess.run([*cmd, str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True)
    assert nodir.returncode == 1 and "does not exist" in nodir.stderr

    usage = subprocess.run([*cmd, str(root), "--method", "median"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 2


# ------------------------------------------------------ statistics, selection, seeds, switch


def make_grid_tree(root, runs, *, seed=0, n_dev=360, n_test=240, test_gold=True):
    """Runs from (run_id, name, overrides, quality); every run writes dev and test probs."""
    rng = np.random.default_rng(seed)
    dev_ids = [f"dev-{i:04d}.mp3" for i in range(n_dev)]
    test_ids = [f"test-{i:04d}.mp3" for i in range(n_test)]
    dev_y, test_y = rng.permutation(np.arange(n_dev) % C), rng.permutation(np.arange(n_test) % C)
    dev_shared, test_shared = rng.normal(size=(n_dev, C)), rng.normal(size=(n_test, C))
    plan_runs, probs = [], {}
    for run_id, name, overrides, q in runs:
        dev_p, test_p = noisy_probs(dev_y, q, rng, dev_shared), noisy_probs(test_y, q, rng, test_shared)
        write_run(root, run_id, name, dev=(dev_ids, dev_y, dev_p), test=(test_ids, test_y, test_p),
                  test_gold=test_gold)
        probs[run_id] = {"dev": dev_p, "test": test_p}
        plan_runs.append({"run_id": run_id, "name": name, "pack": 0, "overrides": overrides})
    plan = {"grid_name": "g", "runs": plan_runs, "ensemble": {"top_k": 3, "method": "mean"}}
    (root / "plan.json").write_text(json.dumps(plan))
    return {"dev_ids": dev_ids, "dev_y": dev_y, "test_ids": test_ids, "test_y": test_y, "probs": probs}


SEEDED = [  # config "lucky": one great seed, two poor ones; config "steady": three good seeds
    ("lucky-s1", "pairA hidden_layers=2 seed=1", {"model.hidden_layers": 2, "train.seed": 1}, 4.2),
    ("lucky-s2", "pairA hidden_layers=2 seed=2", {"model.hidden_layers": 2, "train.seed": 2}, 2.0),
    ("lucky-s3", "pairA hidden_layers=2 seed=3", {"model.hidden_layers": 2, "train.seed": 3}, 2.0),
    ("steady-s1", "pairA hidden_layers=3 seed=1", {"model.hidden_layers": 3, "train.seed": 1}, 3.3),
    ("steady-s2", "pairA hidden_layers=3 seed=2", {"model.hidden_layers": 3, "train.seed": 2}, 3.2),
    ("steady-s3", "pairA hidden_layers=3 seed=3", {"model.hidden_layers": 3, "train.seed": 3}, 3.3),
]


def test_seeds_form_configurations_ranked_by_mean(tmp_path):
    root = tmp_path / "g"
    data = make_grid_tree(root, SEEDED)
    f1 = {r: macro_f1(data["dev_y"], data["probs"][r]["dev"].argmax(1)) for r, *_ in SEEDED}
    assert max(f1, key=f1.get) == "lucky-s1"  # the best single run belongs to the worse configuration
    res = aggregate(root)
    configs = res["configurations"]
    assert [c["name"] for c in configs] == ["pairA hidden_layers=3", "pairA hidden_layers=2"]
    steady, lucky = configs
    assert steady["n_seeds"] == 3 and sorted(steady["seeds"]) == [1, 2, 3]
    assert sorted(steady["run_ids"]) == ["steady-s1", "steady-s2", "steady-s3"]
    vals = [f1[r] for r in ("steady-s1", "steady-s2", "steady-s3")]
    assert steady["dev_mean"] == pytest.approx(np.mean(vals))
    assert steady["dev_std"] == pytest.approx(np.std(vals, ddof=1))
    assert lucky["dev_mean"] < steady["dev_mean"]
    # Significance: best vs second-best configuration compares the means over seeds.
    test = [t for t in res["significance"] if t["a"].startswith("pairA hidden_layers=3") and t["split"] == "dev"]
    assert len(test) == 1 and test[0]["b"].startswith("pairA hidden_layers=2")
    assert test[0]["delta"] == pytest.approx(steady["dev_mean"] - lucky["dev_mean"])
    ens_vs_best = [t for t in res["significance"] if t["a"] == "ensemble (topk)" and t["split"] == "dev"][0]
    assert ens_vs_best["b"] == "pairA hidden_layers=3 (mean of 3 seeds)"
    # The leaderboard shows configurations first, then still every run.
    md = (root / "ensemble" / "leaderboard.md").read_text()
    conf, runs = md.split("## Runs")
    assert conf.index("| 1 | pairA hidden_layers=3 | 3 |") < conf.index("| 2 | pairA hidden_layers=2 | 3 |")
    assert f"{100 * steady['dev_mean']:.2f} ± {100 * steady['dev_std']:.2f}" in conf
    assert all(f"| {r} |" in runs for r, *_ in SEEDED)
    rows = read_csv(root / "ensemble" / "leaderboard.csv")
    assert rows[0]["run_id"] == "lucky-s1" and rows[0]["config_rank"] == "2"
    assert {r["config_rank"] for r in rows if r["run_id"].startswith("steady")} == {"1"}


def test_intervals_in_ensemble_json_and_leaderboard(tree):
    root, data = tree
    res = aggregate(root)
    for split in ("dev", "test"):
        lo, hi = res[f"{split}_macro_f1_ci95"]
        assert lo < res[f"{split}_macro_f1"] < hi and hi - lo > 0.02
    assert res["bootstrap"]["n_resamples"] >= 1000 and res["bootstrap"]["stratified_by_class"]
    # A run's interval is the bootstrap over its own dev file's order, seeded: recompute it.
    rows = {r["run_id"]: r for r in read_csv(root / "ensemble" / "leaderboard.csv")}
    top = ranked_ids(data)[0]
    dev_rows = read_csv(root / "runs" / top / "dev_probs.csv")
    y = np.array([LABELS.index(r["label"]) for r in dev_rows])
    pred = np.array([[float(r[c]) for c in LABELS] for r in dev_rows]).argmax(1)
    lo, hi = stats_module.bootstrap_ci(y, pred, C)
    assert float(rows[top]["dev_ci95_low"]) == pytest.approx(lo, abs=1e-6)
    assert float(rows[top]["dev_ci95_high"]) == pytest.approx(hi, abs=1e-6)
    assert rows["r4"]["dev_ci95_low"] == ""  # a failed run has no interval
    for m in res["members"]:  # each member's figures sit beside their intervals in ensemble.json too
        assert m["dev_macro_f1_ci95"] == pytest.approx([float(rows[m["run_id"]]["dev_ci95_low"]),
                                                        float(rows[m["run_id"]]["dev_ci95_high"])], abs=1e-6)
        assert m["test_macro_f1"] == pytest.approx(float(rows[m["run_id"]]["test_macro_f1"]), abs=1e-6)
        assert len(m["test_macro_f1_ci95"]) == 2
    md = (root / "ensemble" / "leaderboard.md").read_text()
    assert f"[{100 * lo:.2f}, {100 * hi:.2f}]" in md
    # ECE of the written ensemble probabilities, recomputed here.
    ens = read_csv(root / "ensemble" / "dev_probs.csv")
    p = np.array([[float(r[c]) for c in LABELS] for r in ens])
    g = np.array([LABELS.index(r["label"]) for r in ens])
    conf, correct = p.max(1), (p.argmax(1) == g)
    bins = np.minimum((np.ceil(conf * 15) - 1).clip(0), 14)
    want = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
               for b in range(15) if (bins == b).any())
    assert res["dev_ece"] == pytest.approx(want, abs=1e-4) and res["test_ece"] is not None
    assert (root / "ensemble" / "reliability.png").read_bytes()[:8] == PNG_MAGIC
    # Chance levels from the dev class counts; significance entries are well formed.
    assert res["chance_macro_f1"]["dev"] == pytest.approx(
        {"n": 360, **stats_module.chance_macro_f1(data["dev_y"], C)})
    assert {(t["split"], t["a"]) for t in res["significance"]} >= {("dev", "ensemble (topk)"),
                                                                   ("test", "ensemble (topk)")}
    for t in res["significance"]:
        assert set(t) == {"a", "b", "split", "delta", "p", "delta_ci95"} and 0 < t["p"] <= 1
    # Both selections side by side; the configured one is the ensemble.
    sel = res["selections"]
    assert res["selection"] == "topk" and sel["topk"]["members"] == [m["run_id"] for m in res["members"]]
    assert sel["topk"]["dev_macro_f1"] == pytest.approx(res["dev_macro_f1"])
    assert sel["greedy"]["dev_macro_f1"] >= macro_f1(data["dev_y"], data["probs"][top]["dev"].argmax(1))
    assert 0 < res["dev_macro_f1_crossfit"] <= 1
    assert res["dev_macro_f1_crossfit"] == sel["topk"]["dev_macro_f1_crossfit"]


def test_greedy_selection_is_the_ensemble_when_configured(tree):
    root, data = tree
    res = aggregate(root, selection="greedy")
    ids = ranked_ids(data)
    stack_ = np.stack([data["probs"][r]["dev"] for r in ids])
    bag, _ = greedy(stack_, data["dev_y"], "mean")
    assert [m["run_id"] for m in res["members"]] == [ids[i] for i in bag]
    assert len(bag) > len(set(bag))  # this tree's greedy bag repeats a run (weights it)
    assert res["selection"] == "greedy" and res["n_members"] == len(bag)
    mean = np.mean([data["probs"][ids[i]]["dev"] for i in bag], 0)
    assert res["dev_macro_f1"] == pytest.approx(macro_f1(data["dev_y"], mean.argmax(1)))
    assert res["dev_macro_f1"] >= max(dev_f1(data, r) for r in ids)
    tmean = np.mean([data["probs"][ids[i]]["test"] for i in bag], 0)
    preds = read_csv(root / "ensemble" / "predictions_test.csv")
    assert [p["label"] for p in preds] == [LABELS[c] for c in tmean.argmax(1)]
    md = (root / "ensemble" / "leaderboard.md").read_text()
    assert all(f"* | {r} |" in md for r in set(ids[i] for i in bag))  # every member starred once


def test_greedy_never_reads_test(tree):
    """Selection must be a function of dev alone: poisoning every test file changes nothing
    about which runs are chosen, only the test figures reported for them."""
    root, data = tree
    clean = aggregate(root, selection="greedy")
    worst = ranked_ids(data)[-1]
    for run_id in QUALITY:  # on test, the dev-worst run becomes perfect and the others always wrong
        y = data["test_y"]
        probs = np.eye(C)[y if run_id == worst else (y + 1) % C]
        write_probs(root / "runs" / run_id / "test_probs.csv", data["test_ids"], y, probs)
    poisoned = aggregate(root, selection="greedy")
    assert [m["run_id"] for m in poisoned["members"]] == [m["run_id"] for m in clean["members"]]
    for name in ("topk", "greedy"):
        for key in ("members", "dev_macro_f1", "dev_macro_f1_crossfit", "crossfit"):
            assert poisoned["selections"][name][key] == clean["selections"][name][key]
    # Had selection looked at test, it would have picked the dev-worst run alone.
    ids = ranked_ids(data)
    poisoned_test = np.stack([np.eye(C)[data["test_y"] if r == worst else (data["test_y"] + 1) % C] for r in ids])
    assert [ids[i] for i in greedy(poisoned_test, data["test_y"], "mean")[0]] == [worst]
    assert [m["run_id"] for m in poisoned["members"]] != [worst]
    assert poisoned["test_macro_f1"] != clean["test_macro_f1"]  # test was read: for reporting only


def test_unknown_selection_is_refused(tree):
    root, _ = tree
    with pytest.raises(AggregateError, match="unknown ensemble selection 'best'"):
        aggregate(root, selection="best")


def add_heads(root):
    for d in (root / "runs").iterdir():
        write_head(d)


KILL_SCRIPT = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import ser_hpc.ensemble.aggregate as agg
import ser_hpc.ensemble.build as build
import ser_hpc.ensemble.folder as folder
root, marker, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def pause(*args, **kwargs):
    marker.write_text("reached")  # the parent kills -9 from here on
    time.sleep(300)

setattr(build if hasattr(build, point) else folder, point, pause)
agg.aggregate(root, top_k=1)
"""


@pytest.mark.slow
def test_kill_mid_aggregation_keeps_the_previous_ensemble(tmp_path):
    """SIGKILL after the new members are copied (in write_report), then just before the
    switch (in publish): each time ensemble/ is still the previous, complete ensemble
    with every file its ensemble.json names (the old code deleted the unpicked member)."""
    import os
    import signal
    import time

    root = tmp_path / "g"
    data = make_tree(root)
    add_heads(root)
    first = aggregate(root, top_k=2)
    ens = root / "ensemble"
    before = {p.name: p.read_bytes() for p in ens.iterdir() if p.is_file()}
    assert [m["run_id"] for m in first["members"]] == ranked_ids(data)[:2]

    for n, point in enumerate(["write_report", "publish"], 1):
        marker = tmp_path / f"reached-{point}"
        proc = subprocess.Popen([str(PYTHON), "-c", KILL_SCRIPT, str(root), str(marker), point, str(REPO)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL

        # The link still points at the previous folder, byte for byte; everything it names exists.
        assert {p.name: p.read_bytes() for p in ens.iterdir() if p.is_file()} == before
        meta = json.loads((ens / "ensemble.json").read_text())
        assert len(meta["members"]) == 2
        for m in meta["members"]:
            assert (ens / m["head"]).read_bytes() == (root / "runs" / m["run_id"] / "best_head.safetensors").read_bytes()
            assert (ens / m["config"]).is_file()
        assert len(list(root.glob("ensemble.*"))) == 1 + n  # the killed jobs' half-built folders

    # The next aggregation switches and cleans up: one folder left, the link's target.
    res = aggregate(root, top_k=1)
    assert [m["run_id"] for m in res["members"]] == ranked_ids(data)[:1]
    assert ens.is_symlink() and [p.name for p in root.glob("ensemble.*")] == [os.readlink(ens)]
    assert sorted(p.name for p in (ens / "members").iterdir()) == ranked_ids(data)[:1]
    assert not list(root.glob(".ensemble*"))


def test_a_real_ensemble_folder_from_before_is_replaced_by_the_link(tree):
    root, _ = tree
    legacy = root / "ensemble"
    legacy.mkdir()
    (legacy / "stale.txt").write_text("from an older aggregation")
    aggregate(root)
    assert legacy.is_symlink() and not (legacy / "stale.txt").exists()
    assert len(list(root.glob("ensemble.*"))) == 1 and (legacy / "ensemble.json").is_file()


def test_selection_from_the_grid_file_and_plan(tmp_path, tree):
    from ser_hpc.config import ConfigError
    from ser_hpc.grid.plan import load_grid

    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.001\n")
    grid = ("name: g\nrun_config: base.yaml\nbackbone_pairs:\n  - {name: p, speech: a/b, text: c/d}\n"
            "axes: {model.hidden_layers: [1, 2]}\nensemble: {top_k: 2, selection: SEL}\n")
    (tmp_path / "g.yaml").write_text(grid.replace("SEL", "greedy"))
    assert load_grid(tmp_path / "g.yaml").ensemble == {"top_k": 2, "method": "mean", "selection": "greedy"}
    (tmp_path / "g.yaml").write_text(grid.replace("SEL", "best"))
    with pytest.raises(ConfigError, match="ensemble.selection must be topk or greedy"):
        load_grid(tmp_path / "g.yaml")
    # plan.json carries the grid's ensemble section; aggregation follows it.
    root, _ = tree
    plan = json.loads((root / "plan.json").read_text())
    plan["ensemble"]["selection"] = "greedy"
    (root / "plan.json").write_text(json.dumps(plan))
    res = aggregate(root)
    assert res["selection"] == "greedy"
    assert [m["run_id"] for m in res["members"]] == res["selections"]["greedy"]["members"]


def test_a_broken_head_is_left_out_and_a_good_ensemble_is_never_replaced_by_a_broken_one(tree):
    """A member's head truncated after training: the run leaves the ranking with the reason
    (leaderboard, ensemble.json), the new ensemble is built from loadable heads only; when no
    run is left, the previous ensemble stays published."""
    import os
    from ser_hpc.ensemble.folder import verify
    root, data = tree
    first = aggregate(root, top_k=2)
    best = first["members"][0]["run_id"]
    head = root / "runs" / best / "best_head.safetensors"
    head.write_bytes(head.read_bytes()[: head.stat().st_size // 2])
    res = aggregate(root, top_k=2)
    assert best not in [m["run_id"] for m in res["members"]] and len(res["members"]) == 2
    reason = {f["run_id"]: f["reason"] for f in res["failed"]}[best]
    assert "not usable as an ensemble member: best_head.safetensors is unreadable" in reason, reason
    assert "best_head.safetensors is unreadable" in (root / "ensemble" / "leaderboard.md").read_text()
    verify(root / "ensemble")  # every member file the published ensemble.json names loads
    # A head with the wrong number of classes is refused too.
    write_head(root / "runs" / res["members"][0]["run_id"], n_classes=C - 1)
    again = aggregate(root, top_k=2)
    assert "classifier has 5 outputs for 6 classes" in {f["run_id"]: f["reason"] for f in again["failed"]}[
        res["members"][0]["run_id"]]
    # Every head broken: nothing to build, and the last good ensemble stays where it was.
    published = os.readlink(root / "ensemble")
    for d in (root / "runs").iterdir():
        if (d / "best_head.safetensors").exists():
            (d / "best_head.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(AggregateError, match="the previous ensemble .* is kept"):
        aggregate(root, top_k=2)
    assert os.readlink(root / "ensemble") == published
    verify(root / "ensemble")
    assert json.loads((root / "ensemble" / "ensemble.json").read_text())["members"] == again["members"]
