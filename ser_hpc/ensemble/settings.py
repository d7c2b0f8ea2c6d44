"""An ensemble's settings, as a grid file's ``ensemble:`` or jobs/aggregate.py gives them:
how many members (top_k), how their outputs combine (method) and how they are chosen
(selection). The launcher checks them before submitting; the aggregation resolves the same
way, with its command line over plan.json."""
from __future__ import annotations

from typing import Any

METHODS = ("mean", "vote")        # average the class probabilities, or a majority vote
SELECTIONS = ("topk", "greedy")   # the top k by dev (the paper), or greedy forward selection with replacement
DEFAULTS = {"top_k": 3, "method": "mean", "selection": "topk"}


def resolve(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` over the defaults, checked; a ValueError names the bad key and value."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"ensemble takes top_k, method and selection, not {', '.join(unknown)}")
    out = {**DEFAULTS, **given}
    k, method, selection = out["top_k"], out["method"], out["selection"]
    if type(k) is not int or k < 1:
        raise ValueError(f"ensemble.top_k must be an integer >= 1, got {k!r}")
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}: ensemble.method must be mean or vote")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown ensemble selection {selection!r}: ensemble.selection must be topk or greedy")
    return out
