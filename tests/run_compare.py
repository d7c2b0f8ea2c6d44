"""Does one run folder end exactly like another? (distributed, resumed, packed vs alone)"""
import json

import pytest


def read_final(run_dir):
    return json.loads((run_dir / "final.json").read_text())


def read_metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, atol=1e-5):
    """Same evaluations, same best checkpoint, same final metrics (float noise aside)."""
    fa, fb = read_final(a), read_final(b)
    for key in ("status", "dev_macro_f1", "best_step", "test_macro_f1", "confusion_matrix", "steps"):
        assert fa[key] == fb[key], (key, fa[key], fb[key])
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        assert x["dev_macro_f1"] == y["dev_macro_f1"]
        assert x["dev_loss"] == pytest.approx(y["dev_loss"], abs=atol)
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=atol)
