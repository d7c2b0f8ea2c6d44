"""Aggregation job: leaderboard, top-k ensemble, outputs, failures and the CLI.

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

from ser_hpc.data.labels import LABELS
from ser_hpc.ensemble.aggregate import AggregateError, aggregate
from ser_hpc.ensemble.collect import RunRecord
from ser_hpc.ensemble.combine import combine
from ser_hpc.ensemble.leaderboard import rank_runs

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


def write_run(root, run_id, name, *, dev=None, test=None, test_gold=True, status="done", reason=None):
    """One run folder as a training job leaves it. dev/test: (ids, labels, probs) or None."""
    d = root / "runs" / run_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(f"run:\n  name: {name}\n")
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
    first = {p.name: p.read_bytes() for p in ens.iterdir()}
    aggregate(root)
    second = {p.name: p.read_bytes() for p in ens.iterdir()}
    assert first.keys() == second.keys()
    assert not [n for n in first if n.startswith(".")]  # no temp files left behind
    a, b = json.loads(first.pop("ensemble.json")), json.loads(second.pop("ensemble.json"))
    a.pop("created"), b.pop("created")
    assert a == b
    assert first == second  # leaderboards, probs, predictions and PNGs byte-identical


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
