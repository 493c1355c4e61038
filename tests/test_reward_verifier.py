"""The `Verifier` interface (reward/base.py): its `stats()` as each verifier fills it, and as the trainer reads it."""
from __future__ import annotations

import pytest

from kimina_jax.pipeline import MainProcessRewarder
from kimina_jax.reward import LeanClient, Rewarder, StandinVerifier, Verifier


def test_verifiers_report_their_stats_by_metric_name():
    assert StandinVerifier().stats() == {}  # the default: nothing to report
    # Nothing listens on port 9: no verdict comes back, but what was asked twice went out once.
    with LeanClient("http://127.0.0.1:9", retries=0, message_lines="body") as lean:
        assert isinstance(lean, Verifier) and lean.stats() == {"reward/cache_hit_rate": 0.0}
        verdicts = lean.check_sync(["theorem a : True := trivial"] * 2 + ["theorem b : True := trivial"])
        assert [v.status for v in verdicts] == ["unverified"] * 3
        assert lean.stats() == {"reward/cache_hit_rate": pytest.approx(1 / 3)}


def test_only_the_verifying_process_reports_verifier_stats():
    assert MainProcessRewarder(None).stats() == {}  # processes other than 0 hold no verifier

    class Counting(StandinVerifier):
        def stats(self) -> dict[str, float]:
            return {"reward/checked": 3.0}

    assert MainProcessRewarder(Rewarder(Counting())).stats() == {"reward/checked": 3.0}
