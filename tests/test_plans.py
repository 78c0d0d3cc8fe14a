"""The typed plan (compression/plans.py): a linear's rank and a unit's width kept apart, the flat record
(progress file, study, --ranks) read and written back unchanged, the model's widths as the spec sees them;
and every unit it sizes with its pricing and narrowing (compression/units.py)."""
from __future__ import annotations

import pytest

from streamrom.compression.config import CompressConfig
from streamrom.compression.planning import model_plan
from streamrom.compression.plans import BlockPlan, ModelPlan
from streamrom.model.architectures import BLOCK_LINEARS, UNIT_NAMES
from streamrom.storage.checkpoint import CheckpointReader


def a_record(blocks: int = 3) -> dict[str, int | None]:
    """A mixed plan's record: block 1 narrows its MLP and factors q, block 2 factors o; the rest dense."""
    record = {}
    for index in range(blocks):
        record.update({f"model.layers.{index}.{name}": None for name in BLOCK_LINEARS + UNIT_NAMES})
    record["model.layers.1.mlp.neurons"] = 96
    record["model.layers.1.self_attn.q_proj"] = 16
    record["model.layers.2.self_attn.o_proj"] = 24
    return record


def test_a_record_reads_into_ranks_and_widths_and_writes_back_unchanged():
    record = a_record()
    plan = ModelPlan.from_record(record, 3)
    assert plan.blocks[1].widths["mlp.neurons"] == 96 and "mlp.neurons" not in plan.blocks[1].ranks
    assert plan.blocks[1].ranks["self_attn.q_proj"] == 16 and plan.blocks[2].ranks["self_attn.o_proj"] == 24
    assert set(plan.blocks[0].ranks) == set(BLOCK_LINEARS) and set(plan.blocks[0].widths) == set(UNIT_NAMES)
    assert list(plan.record().items()) == list(record.items())  # same entries in the same order
    assert plan.ranks() == {key: value for key, value in record.items() if not key.endswith(UNIT_NAMES)}
    assert plan.block_widths()[1] == {"self_attn.rotary_pairs": None, "self_attn.value_dims": None, "mlp.neurons": 96}


def test_a_record_without_units_plans_no_widths_and_a_missing_linear_stays_dense():
    record = {key: value for key, value in a_record(2).items() if not key.endswith(UNIT_NAMES)}
    del record["model.layers.0.mlp.up_proj"]
    plan = ModelPlan.from_record(record, 2)
    assert plan.blocks[1].widths == {} and plan.blocks[0].ranks["mlp.up_proj"] is None
    assert plan.blocks[1] == BlockPlan.from_record(record, 1)


def test_replacing_entries_changes_only_those_and_refuses_a_key_the_plan_lacks():
    plan = ModelPlan.from_record(a_record(), 3)
    changed = plan.replaced({"model.layers.0.mlp.neurons": 64, "model.layers.1.self_attn.q_proj": None})
    assert changed.blocks[0].widths["mlp.neurons"] == 64 and changed.blocks[1].ranks["self_attn.q_proj"] is None
    assert changed.blocks[2] == plan.blocks[2] and plan.blocks[0].widths["mlp.neurons"] is None  # frozen
    with pytest.raises(KeyError):
        plan.replaced({"model.layers.3.mlp.neurons": 64})


def test_the_spec_narrowed_by_a_plan_has_each_blocks_kept_units(tiny_models):
    spec = CheckpointReader(tiny_models["llama"]).spec
    plan = model_plan(spec, CompressConfig(method="structured", ratio=0.5), [1], 0, 4)
    kept = plan.blocks[1].widths["mlp.neurons"]
    assert kept and plan.blocks[0].widths["mlp.neurons"] is None
    narrowed = spec.narrowed(plan.block_widths())
    assert narrowed.linear_shape("mlp.down_proj", 1)[1] == kept < spec.intermediate_size
    assert narrowed.linear_shape("mlp.down_proj", 0)[1] == spec.intermediate_size


def test_a_ranks_file_naming_another_methods_unit_is_refused_by_name(tiny_models):
    from streamrom.errors import UsageError

    spec = CheckpointReader(tiny_models["llama"]).spec
    with pytest.raises(UsageError, match="that --method rom sizes"):
        model_plan(spec, CompressConfig(method="rom", ranks={"model.layers.0.mlp.neurons": 64}), [0], 0, 4)
    with pytest.raises(UsageError, match="not a block linear of this model$"):
        model_plan(spec, CompressConfig(method="rom", ranks={"model.layers.0.mlp.gate": 8}), [0], 0, 4)
    plan = model_plan(spec, CompressConfig(method="structured", ranks={"model.layers.0.mlp.neurons": 64}), [0], 0, 4)
    assert plan.blocks[0].widths["mlp.neurons"] == 64 and plan.blocks[0].ranks["mlp.down_proj"] is None


def test_every_registered_unit_has_its_pricing_narrowing_and_gguf_padding():
    from streamrom.compression.units import UNIT_COMPRESSION
    from streamrom.gguf.exporter import UNIT_PADDING
    from streamrom.model.architectures import UNITS

    assert list(UNIT_COMPRESSION) == list(UNIT_NAMES)
    assert set(UNIT_PADDING) == set(UNIT_NAMES)
    for unit in UNITS:
        rules = UNIT_COMPRESSION[unit.name]
        assert rules.unit is unit and set(rules.priced_in) <= set(unit.linears)
