"""The projected wall time (streamrom.compression.time_estimate): its counts on known shapes, and the report's record
of projected beside measured."""
from __future__ import annotations

import json

import pytest

from streamrom.compression import time_estimate
from streamrom.compression.time_estimate import MachineSpeed, Shapes, project
from streamrom.compression.units import OBS_COPY_SECONDS, OBS_CUBES, UNIT_COMPRESSION

SPEED = MachineSpeed(multiply_adds_per_second=1e9, eigen_seconds=1.0, eigen_size=100)
SHAPES = Shapes(hidden=100, intermediate=300, heads=4, kv_heads=2, head_dim=25, vocab=1000, blocks=3,
                chosen_blocks=2, tokens=1000, seqlen=100, source_bytes=4_000_000)


def neurons(shapes: Shapes = SHAPES, ordered: bool = False):
    return UNIT_COMPRESSION["mlp.neurons"].work(shapes, SPEED, ordered)


def test_the_forward_count_is_the_blocks_multiply_adds():
    """Pass 2 alone, nothing factored: 2 forwards per block but the last's outputs, each
    tokens x (weights + 2 x seqlen x attention width) multiply-adds."""
    weights = 100 * 100 + 2 * 50 * 100 + 100 * 100 + 3 * 300 * 100
    forward = 1000 * (weights + 2 * 100 * 100)
    seconds = project(SHAPES, SPEED, [], [], first_pass=False, priced=[])
    assert seconds["forward"] == pytest.approx((2 * 3 - 1) * forward / 1e9)
    assert seconds["backward"] == 0 and seconds["statistics"] == 0
    assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"))


def test_factoring_costs_an_eigen_solve_per_linear_and_pass_one_a_backward():
    plain = project(SHAPES, SPEED, [], [], first_pass=False, priced=[])
    factored = project(SHAPES, SPEED, ["q"], [], first_pass=False, priced=[])
    # q: 100 x 100, its eigen-solve (1 s at 100) and products, per chosen block; its input's moment
    extra = 2 * (1.0 + (100 * 100 * 100 + 100 ** 3) / 1e9 + time_estimate.PER_LINEAR_SECONDS)
    assert factored["eigen"] - plain["eigen"] == pytest.approx(extra)
    assert factored["statistics"] == pytest.approx(2 * 1000 * 100 * 100 / 1e9)
    priced = project(SHAPES, SPEED, ["q"], [], first_pass=True, priced=["q"])
    assert priced["backward"] > 0 and priced["eigen"] == pytest.approx(2 * factored["eigen"])


def test_time_scales_with_the_tokens_where_the_passes_do():
    small = project(SHAPES, SPEED, ["q"], [neurons()], first_pass=True, priced=["q"])
    larger = Shapes(**{**SHAPES.__dict__, "tokens": 4000})
    large = project(larger, SPEED, ["q"], [neurons(larger)], first_pass=True, priced=["q"])
    for stage in ("forward", "statistics"):
        assert large[stage] == pytest.approx(4 * small[stage])
    assert large["eigen"] == pytest.approx(small["eigen"])  # the decompositions do not see the tokens


def test_pass_one_on_fewer_tokens_shrinks_pass_one_alone():
    """--pass1-tokens: pass 1's forward, backward and moments scale with its own tokens; pass 2's do not
    change, nor do the decompositions."""
    args = (SPEED, ["q"], [neurons()])
    full = project(SHAPES, *args, first_pass=True, priced=["q"])
    quarter = project(Shapes(**{**SHAPES.__dict__, "first_pass_tokens": 250}), *args, first_pass=True, priced=["q"])
    second = project(SHAPES, *args, first_pass=False, priced=["q"])
    for stage in ("forward", "backward", "statistics"):
        assert quarter[stage] - second[stage] == pytest.approx((full[stage] - second[stage]) / 4)
    assert quarter["eigen"] == full["eigen"] and quarter["read"] == full["read"]


def test_pass_one_order_leaves_pass_two_only_the_refit():
    """pass1: pass 2's eigen time loses the greedy removal (a third of its cube and more) and keeps the
    refit; pass 1 and every other stage are as obs's."""
    obs = project(SHAPES, SPEED, ["q"], [neurons()], first_pass=False, priced=["q"])
    ordered = project(SHAPES, SPEED, ["q"], [neurons(ordered=True)], first_pass=False, priced=["q"])
    n, hidden = SHAPES.intermediate, SHAPES.hidden
    refit = SHAPES.chosen_blocks * SPEED.products(n ** 3 / 3 + hidden * n * n)
    # (this narrow a removal copies its live inverse every round: about 32 copies of it)
    removal = SHAPES.chosen_blocks * (SPEED.products(OBS_CUBES * n ** 3 + hidden * n * n) + 32 * n * n * OBS_COPY_SECONDS)
    assert obs["eigen"] - ordered["eigen"] == pytest.approx(removal - refit)
    assert {k: v for k, v in ordered.items() if k not in ("eigen", "total")} == \
        {k: v for k, v in obs.items() if k not in ("eigen", "total")}
    # pass 1 prices by the removal either way
    assert project(SHAPES, SPEED, [], [neurons(ordered=True)], first_pass=True, priced=[])["eigen"] == \
        pytest.approx(project(SHAPES, SPEED, [], [neurons()], first_pass=True, priced=[])["eigen"] + refit - removal)


def test_refinement_is_three_forwards_and_a_forward_and_backward_per_step():
    """Each chosen block: the dense outputs and the error before and after (3 forwards over every
    token), then per step a forward and a backward (3 forwards' work) of the mini-batch."""
    weights = 100 * 100 + 2 * 50 * 100 + 100 * 100 + 3 * 300 * 100
    per_token = weights + 2 * 100 * 100
    plain = project(SHAPES, SPEED, ["q"], [], first_pass=False, priced=[])
    refined = project(SHAPES, SPEED, ["q"], [], first_pass=False, priced=[], refine_steps=8, refine_batch_tokens=200)
    assert "refine" not in plain
    assert refined["refine"] == pytest.approx(2 * (3 * 1000 + 8 * 3 * 200) * per_token / 1e9)
    assert refined["total"] - plain["total"] == pytest.approx(refined["refine"])


def test_probe_measures_something_positive():
    speed = time_estimate.probe(64, budget_seconds=0.2)
    assert speed.multiply_adds_per_second > 0 and speed.eigen_seconds > 0 and speed.eigen_size == 64


@pytest.mark.pipeline
def test_compress_reports_projected_beside_measured(tiny_models, tiny_tokens, tmp_path):
    import streamrom
    from streamrom import CalibrationConfig, CompressConfig

    streamrom.compress(tiny_models["llama"], tmp_path / "out", CompressConfig(
        method="mixed", allocate="spectrum", target_params=0.8,
        calibration=CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=32)))
    report = json.loads((tmp_path / "out" / "streamrom-report.json").read_text())
    projected = report["projected_seconds"]
    assert projected["seconds"]["total"] > 0 and projected["seconds"]["backward"] > 0  # pass 1 was projected
    assert projected["probe"]["multiply_adds_per_second"] > 0
    assert "refine" not in projected["seconds"]
