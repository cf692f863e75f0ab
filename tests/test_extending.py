"""The test a newcomer would write: a new coefficient rule and a new regime, each defined once
here, reach a short instrumented run, its records, ``decomp validate``'s table and a figure
through the public API, with no other edit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
from matplotlib.colors import to_hex
from test_train import TINY

from decomp.results.plots import FIGURES
from decomp.results.rundata import load_runs
from decomp.results.validate import format_table, validate
from decomp.occ import coefficient_from_statistics
from decomp.regimes import REGIMES, CrossEntropy, register_regime
from decomp.rules import RULES, CoefficientRule, register_rule
from decomp.runlog import read_jsonl
from decomp.training.config import config_help
from decomp.training.loop import train

POOLED = RULES["pooled"]


def half_pooled(ctx) -> tuple[float, ...]:
    """Half the pooled proxy, per MTP depth: a rule on log-probs alone."""
    return tuple(0.5 * v for v in POOLED.compute(ctx))


RULE = CoefficientRule(
    "half_pooled", frozenset({"logprobs"}), half_pooled, "half the least-squares slope", "none",
    style=("#123456", "X"), statistics=POOLED.statistics,
    from_statistics=lambda stats, scale: 0.5 * coefficient_from_statistics(stats, scale, "pooled"))


@dataclass(frozen=True)
class HalfCE(CrossEntropy):
    """Cross-entropy at half the configured coefficient."""

    name: ClassVar[str] = "ce-half"

    def coefficient(self, mtp_logp, logp, old_logp, mask) -> float:
        return 0.5 * self.scale


@pytest.fixture
def extended():
    # registered through the public functions; removed again afterwards for the other tests
    register_rule(RULE)
    register_regime(HalfCE)
    yield
    RULES.pop(RULE.name, None)
    REGIMES.pop(HalfCE.name, None)


def test_a_new_rule_and_regime_are_measured_applied_validated_and_plotted(extended, tmp_path, cache):
    assert "half_pooled" in config_help() and "ce-half" in REGIMES
    cfg = dataclasses.replace(TINY, steps=4, decomp_every=2, sweep_every=0, curvature_every=0)
    occ = tmp_path / "runs" / "occ"
    train(dataclasses.replace(cfg, regime="occ", occ_estimator="half_pooled"), occ, cache_dir=cache,
          progress=False, log=lambda s: None)
    half = tmp_path / "runs" / "ce-half"
    train(dataclasses.replace(cfg, regime="ce-half", mtp_scale=0.3), half, cache_dir=cache, progress=False,
          log=lambda s: None)

    # the records: the rule measured beside every built-in estimator, with its realized gain
    records = read_jsonl(occ / "decomposition.jsonl")
    assert records and all({"coef_half_pooled", "gain_half_pooled", "efficiency_half_pooled"} <= set(r)
                           for r in records)
    for r in records:  # computed, not copied: half of the pooled estimate of the same update
        assert r["coef_half_pooled"] == pytest.approx(0.5 * r["coef_pooled"], rel=1e-12, abs=1e-15)
    # occ applied the rule: its active direction's coefficient is the rule's estimate
    active = [r for r in records if r["direction"] == "active"]
    assert all(r["coef"] == pytest.approx(r["coef_half_pooled"], rel=1e-6, abs=1e-12) for r in active)
    assert any(r["coef_half_pooled"] != 0.0 for r in records)  # the test has power: not all zero
    # the new regime trained at its own coefficient
    assert all(m["mtp_coef"] == pytest.approx(0.15) for m in read_jsonl(half / "metrics.jsonl")[1:])

    # decomp validate's table and a figure
    runs = load_runs([tmp_path / "runs"])
    result = validate(runs)
    assert "half_pooled" in result["estimators"] and "half_pooled" in format_table(result)
    fig = FIGURES["proxy_vs_exact"](runs)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("half_pooled") for t in titles)
    fig = FIGURES["coefficients"](runs)  # its estimates over training, in the rule's own style
    lines = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "half_pooled"]
    assert lines and all(to_hex(line.get_color()) == "#123456" for line in lines)


def test_registering_refuses_duplicates_and_non_rules(extended):
    with pytest.raises(ValueError, match="exists already"):
        register_rule(RULE)
    with pytest.raises(ValueError, match="exists already"):
        register_regime(HalfCE)
    with pytest.raises(TypeError, match="CoefficientRule"):
        register_rule(half_pooled)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown needs"):
        CoefficientRule("x", frozenset({"telepathy"}), half_pooled, "", "")
