"""The plan, typed: what the allocation fixes before the block loop and every later stage reads.

A block's part (BlockPlan) holds each linear's rank and each structured unit's width; the model's
(ModelPlan) one BlockPlan per block. Records — the progress file, a study's base plan, a --ranks file,
the allocator's slots and the checkpoint config — hold the flat form keyed by tensor prefix
("model.layers.<i>.<name>"); the registries tell a linear's rank from a unit's width here, in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..model.architectures import BLOCK_LINEARS, UNIT_NAMES, block_prefix


@dataclass(frozen=True)
class BlockPlan:
    """One block's part of the plan: each linear's rank (None: dense) and each structured unit's width
    (units kept; None: not narrowed) for the units the method sizes."""

    ranks: Mapping[str, int | None]
    widths: Mapping[str, int | None] = field(default_factory=dict)

    @classmethod
    def of(cls, values: Mapping[str, int | None]) -> "BlockPlan":
        """From one block's values by name (rank_plan's): the registries tell linears from units."""
        return cls({name: values.get(name) for name in BLOCK_LINEARS},
                   {name: values[name] for name in UNIT_NAMES if name in values})

    @classmethod
    def from_record(cls, record: Mapping[str, int | None], index: int) -> "BlockPlan":
        """Block `index`'s part of a flat record (keys "model.layers.<i>.<name>")."""
        prefix = block_prefix(index)
        return cls.of({name: record[prefix + name] for name in BLOCK_LINEARS + UNIT_NAMES if prefix + name in record})

    def keyed(self, index: int) -> dict[str, int | None]:
        """The flat form of this block as block `index`: linears first, then units, by tensor prefix."""
        prefix = block_prefix(index)
        return {f"{prefix}{name}": value for name, value in {**self.ranks, **self.widths}.items()}


@dataclass(frozen=True)
class ModelPlan:
    """The whole model's plan: `blocks[i]` is block i's part (blocks the run leaves alone plan nothing)."""

    blocks: tuple[BlockPlan, ...]

    @classmethod
    def from_record(cls, record: Mapping[str, int | None], num_layers: int) -> "ModelPlan":
        return cls(tuple(BlockPlan.from_record(record, index) for index in range(num_layers)))

    def record(self) -> dict[str, int | None]:
        """The flat form, block by block (the order the allocator's slots and the records keep)."""
        return {key: value for index, block in enumerate(self.blocks) for key, value in block.keyed(index).items()}

    def replaced(self, values: Mapping[str, int | None]) -> "ModelPlan":
        """This plan with some entries of its flat form replaced (a bayes trial's or the search's ranks)."""
        record = self.record()
        unknown = next((key for key in values if key not in record), None)
        if unknown is not None:
            raise KeyError(f"{unknown} is not in the plan")
        return ModelPlan.from_record({**record, **values}, len(self.blocks))

    def ranks(self) -> dict[str, int | None]:
        """Every block linear's rank, flat (the checkpoint config's "ranks")."""
        return {f"{block_prefix(index)}{name}": rank for index, block in enumerate(self.blocks)
                for name, rank in block.ranks.items()}

    def block_widths(self) -> list[Mapping[str, int | None]]:
        """Each block's unit widths by unit name (ModelSpec.narrowed's argument)."""
        return [block.widths for block in self.blocks]
