"""Aggregation of a grid with a data.fold axis (ensemble/folds.py): configurations ranked by
their mean dev macro-F1 over folds, one ensemble per fold from the top configurations, the
fold-averaged figures in ensemble.json, and the fold combination used by jobs/predict.py.

Results trees are built by hand as training jobs write them; every expected figure is
computed here with sklearn from the generated probabilities.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, recall_score

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ser_hpc.ensemble.aggregate import aggregate  # noqa: E402
from ser_hpc.ensemble.collect import AggregateError  # noqa: E402
from ser_hpc.inference.ensemble import (EnsembleError, combine_fold_results, ensemble_labels,  # noqa: E402
                                        fold_ensemble_dirs)
from ser_hpc.inference.predictor import PredictionResult  # noqa: E402
from tests.test_aggregate import write_head  # noqa: E402

LABELS = ["anger", "contempt", "fear", "joy", "sadness"]
C = len(LABELS)
FOLDS = (1, 2, 3)
SEEDS = (1, 2)
# configuration -> quality per fold: "a" wins folds 1 and 2 narrowly, "b" wins fold 3 by far.
QUALITY = {"a": {1: 2.2, 2: 2.2, 3: 1.0}, "b": {1: 2.0, 2: 2.0, 3: 3.5}}


def write_probs(path, ids, y, probs):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", *LABELS])
        for i, g, p in zip(ids, y, probs):
            w.writerow([i, LABELS[g], *(repr(float(x)) for x in p)])


def probs_for(y, quality, rng, shared):
    logits = quality * np.eye(C)[y] + shared + rng.normal(size=(len(y), C))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def mf1(y, pred):
    return f1_score(y, pred, labels=sorted(set(y.tolist())), average="macro", zero_division=0)


def make_fold_tree(root: Path, top_k: int = 1, seed: int = 0):
    """2 configurations x 2 seeds x 3 folds; each fold its own dev and test items."""
    rng = np.random.default_rng(seed)
    plan_runs, data = [], {"folds": {}}
    for fold in FOLDS:
        dev_ids = [f"f{fold}-dev-{i:03d}.wav" for i in range(150)]
        test_ids = [f"f{fold}-test-{i:03d}.wav" for i in range(100)]
        dev_y = rng.permutation(np.arange(len(dev_ids)) % C)
        test_y = rng.permutation(np.arange(len(test_ids)) % C)
        dsh, tsh = rng.normal(size=(len(dev_y), C)), rng.normal(size=(len(test_y), C))
        fd = data["folds"][fold] = {"dev_ids": dev_ids, "dev_y": dev_y, "test_ids": test_ids, "test_y": test_y,
                                    "runs": {}}
        for cfg, q in QUALITY.items():
            for s in SEEDS:
                run_id = f"{cfg}-f{fold}-s{s}"
                dev_p, test_p = probs_for(dev_y, q[fold], rng, dsh), probs_for(test_y, q[fold], rng, tsh)
                d = root / "runs" / run_id
                d.mkdir(parents=True)
                (d / "config.yaml").write_text(f"run:\n  name: {run_id}\ndata:\n  fold: {fold}\n")
                write_head(d, n_classes=C)
                perm = rng.permutation(len(dev_ids))  # rows shuffled: alignment is by id
                write_probs(d / "dev_probs.csv", [dev_ids[i] for i in perm], dev_y[perm], dev_p[perm])
                write_probs(d / "test_probs.csv", test_ids, test_y, test_p)
                final = {"run_id": run_id, "status": "done", "dev_macro_f1": mf1(dev_y, dev_p.argmax(1)),
                         "test_macro_f1": mf1(test_y, test_p.argmax(1)), "best_step": 10}
                (d / "final.json").write_text(json.dumps(final))
                fd["runs"][run_id] = {"cfg": cfg, "dev": dev_p, "test": test_p, **final}
                plan_runs.append({"run_id": run_id, "name": f"pair hidden={cfg} fold={fold} seed={s}", "pack": 0,
                                  "overrides": {"model.hidden": cfg, "data.fold": fold, "train.seed": s}})
    plan = {"grid_name": "folds", "runs": plan_runs, "ensemble": {"top_k": top_k, "method": "mean"}}
    (root / "plan.json").write_text(json.dumps(plan))
    return data


def expected_ranking(data):
    """configuration -> (per-fold dev means over seeds, mean over folds)."""
    out = {}
    for cfg in QUALITY:
        per = [np.mean([r["dev_macro_f1"] for r in data["folds"][f]["runs"].values() if r["cfg"] == cfg])
               for f in FOLDS]
        out[cfg] = (per, float(np.mean(per)))
    return out


def hand_fold_ensemble(data, fold, cfgs):
    fd = data["folds"][fold]
    runs = [r for r in fd["runs"].values() if r["cfg"] in cfgs]
    figs = {}
    for split in ("dev", "test"):
        y = fd[f"{split}_y"]
        pred = np.mean([r[split] for r in runs], axis=0).argmax(1)
        present = sorted(set(y.tolist()))
        figs[split] = {"macro_f1": f1_score(y, pred, labels=present, average="macro", zero_division=0),
                       "ua": recall_score(y, pred, labels=present, average="macro", zero_division=0),
                       "wa": accuracy_score(y, pred)}
    return figs, sorted(r["run_id"] for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [1, 2])
def test_fold_grid_ranking_and_fold_averaged_ensemble(tmp_path, top_k):
    data = make_fold_tree(tmp_path, top_k=top_k)
    result = aggregate(tmp_path)
    ens = tmp_path / "ensemble"
    on_disk = json.loads((ens / "ensemble.json").read_text())
    assert on_disk["folds"] == json.loads(json.dumps(result["folds"]))
    assert on_disk["labels"] == LABELS

    # configurations ranked by the mean over folds of the per-fold (mean over seeds) dev macro-F1
    exp = expected_ranking(data)
    order = sorted(exp, key=lambda c: -exp[c][1])
    confs = on_disk["configurations"]
    assert [c["overrides"]["model.hidden"] for c in confs] == order
    for c in confs:
        per, mean = exp[c["overrides"]["model.hidden"]]
        assert [f["dev_macro_f1"] for f in c["folds"]] == pytest.approx(per)
        assert c["dev_mean"] == pytest.approx(mean)
        assert c["dev_std"] == pytest.approx(np.std(per, ddof=1))
        assert [f["n_seeds"] for f in c["folds"]] == [2, 2, 2]
        assert "fold=" not in c["name"] and "seed=" not in c["name"]
    # the fixture makes the mean-over-folds winner differ from the winner of most folds
    per_a, per_b = exp["a"][0], exp["b"][0]
    assert order[0] == "b" and per_a[0] > per_b[0] and per_a[1] > per_b[1]

    chosen = set(order[:top_k])
    assert on_disk["fold_ensembles"] == [f"fold_{f}" for f in FOLDS]
    tests = {k: [] for k in ("macro_f1", "ua", "wa")}
    for rec, fold in zip(on_disk["folds"], FOLDS):
        figs, members = hand_fold_ensemble(data, fold, chosen)
        assert rec["fold"] == fold
        assert sorted(rec["members"]) == members
        assert rec["dev_macro_f1"] == pytest.approx(figs["dev"]["macro_f1"])
        assert rec["test_macro_f1"] == pytest.approx(figs["test"]["macro_f1"])
        assert rec["test_ua"] == pytest.approx(figs["test"]["ua"])
        assert rec["test_wa"] == pytest.approx(figs["test"]["wa"])
        for k in tests:
            tests[k].append(figs["test"][k])
        # each fold folder is a self-contained ensemble, as without folds
        sub = json.loads((ens / f"fold_{fold}" / "ensemble.json").read_text())
        assert sorted(m["run_id"] for m in sub["members"]) == members
        assert sub["labels"] == LABELS and sub["fold"] == fold
        assert sub["test_macro_f1"] == pytest.approx(figs["test"]["macro_f1"])
        for m in members:
            assert (ens / f"fold_{fold}" / "members" / m / "best_head.safetensors").read_bytes() == \
                (tmp_path / "runs" / m / "best_head.safetensors").read_bytes()
        assert (ens / f"fold_{fold}" / "dev_probs.csv").is_file()
        assert (ens / f"fold_{fold}" / "report.md").is_file()
        assert ensemble_labels(ens / f"fold_{fold}") == tuple(LABELS)
    for k, values in tests.items():
        assert on_disk["mean"][k] == pytest.approx(np.mean(values))
        assert on_disk["std"][k] == pytest.approx(np.std(values, ddof=1))
    # The launcher's closing headline states the means ± std over folds.
    from ser_hpc.ensemble.report_stats import summary
    mf1 = tests["macro_f1"]
    assert summary(on_disk).startswith("ensembles of 3 folds (mean): dev macro-F1 ")
    assert f"test macro_f1 {np.mean(mf1):.4f} ± {np.std(mf1, ddof=1):.4f} ua " in summary(on_disk)
    report = (ens / "report.md").read_text()
    assert "## Configurations over folds" in report and "## Ensemble per fold" in report
    assert "mean ± std" in report
    board = (ens / "leaderboard.md").read_text()
    assert "fold 3 dev / test" in board
    assert not (ens / "members").exists()  # members live in the fold folders
    assert ens.is_symlink()

    # predict's view of the folder: every fold, or one, with shared labels
    dirs = fold_ensemble_dirs(ens)
    assert [d.name for d in dirs] == ["fold_1", "fold_2", "fold_3"]
    assert [d.name for d in fold_ensemble_dirs(ens, 2)] == ["fold_2"]
    with pytest.raises(EnsembleError, match="no ensemble for fold 7"):
        fold_ensemble_dirs(ens, 7)


@pytest.mark.slow
def test_fold_labels_must_agree(tmp_path):
    make_fold_tree(tmp_path)
    aggregate(tmp_path)
    ens = tmp_path / "ensemble"
    path = ens / "fold_2" / "ensemble.json"
    meta = json.loads(path.read_text())
    meta["labels"] = list(reversed(LABELS))
    path.chmod(0o644)
    path.write_text(json.dumps(meta))
    with pytest.raises(EnsembleError, match="differ"):
        fold_ensemble_dirs(ens)


def test_non_fold_grid_keeps_the_old_layout(tmp_path):
    data = make_fold_tree(tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    # keep fold 1 only: a grid without a fold axis (one fold) aggregates as before
    plan["runs"] = [r for r in plan["runs"] if r["overrides"]["data.fold"] == 1]
    for r in plan["runs"]:
        del r["overrides"]["data.fold"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    result = aggregate(tmp_path, top_k=2)
    ens = tmp_path / "ensemble"
    assert "folds" not in result and "fold_ensembles" not in result
    assert not any(ens.glob("fold_*"))
    assert (ens / "members").is_dir() and result["labels"] == LABELS
    runs = data["folds"][1]["runs"]
    top = sorted(runs, key=lambda r: -runs[r]["dev_macro_f1"])[:2]
    assert sorted(m["run_id"] for m in result["members"]) == sorted(top)
    assert fold_ensemble_dirs(ens) == [ens.resolve()]
    with pytest.raises(EnsembleError, match="--fold"):
        fold_ensemble_dirs(ens, 1)


def test_missing_fold_of_a_run_is_an_error(tmp_path):
    make_fold_tree(tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    run_id = plan["runs"][0]["run_id"]
    del plan["runs"][0]["overrides"]["data.fold"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "runs" / run_id / "config.yaml").write_text("run:\n  name: x\n")
    with pytest.raises(AggregateError, match="no data.fold"):
        aggregate(tmp_path)


def _result(probs, errors=None, labels=tuple(LABELS)):
    n = probs.shape[0]
    pred = np.where(np.isnan(probs).any(axis=1), -1, np.nan_to_num(probs).argmax(axis=1))
    return PredictionResult(rows=[None] * n, probs=probs, pred=pred, member_probs=probs[None],
                            windows=np.ones(n, dtype=int), errors=errors or {}, notes=[], elapsed_s=1.0,
                            audio_s=3.0, labels=labels)


def test_combine_fold_results_is_the_mean_of_fold_probabilities():
    rng = np.random.default_rng(1)
    folds = [rng.dirichlet(np.ones(C), size=6) for _ in range(3)]
    folds[2][4] = np.nan  # one fold could not score row 4
    combined = combine_fold_results([_result(p, {4: "bad audio"} if k == 2 else None)
                                     for k, p in enumerate(folds)])
    ok = [0, 1, 2, 3, 5]
    expected = np.mean([p[ok] for p in folds], axis=0)
    np.testing.assert_allclose(combined.probs[ok], expected)
    np.testing.assert_array_equal(combined.pred[ok], expected.argmax(axis=1))
    assert combined.pred[4] == -1 and combined.errors == {4: "bad audio"}
    assert combined.member_probs.shape == (3, 6, C)
    assert combined.elapsed_s == 3.0
    single = _result(folds[0])
    assert combine_fold_results([single]) is single
    with pytest.raises(EnsembleError):
        combine_fold_results([_result(folds[0]), _result(folds[1], labels=tuple(reversed(LABELS)))])
