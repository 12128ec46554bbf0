"""Joining the Ray cluster of the process that started this one.

A Serve replica runs its engine in a process of its own (``engine/engine_process.py``); where the
engine reaches Ray actors (a draft actor, tensor-parallel ranks), that process connects to the
replica's cluster as a driver of its own, and the actors it starts share its fate: they end
when it ends. Ranks still go to the replica's placement group, which this module hands over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

_inherited_placement_group: PlacementGroup | None = None  # set by RayContext.join in the process that joined


@dataclass(frozen=True)
class RayContext:
    """What another process needs to reach this one's Ray cluster and resources."""

    address: str
    namespace: str
    runtime_env: dict
    placement_group: PlacementGroup | None

    @classmethod
    def of_this_process(cls) -> RayContext | None:
        """This process's Ray connection; None where it has none."""
        import ray
        from ray.util.placement_group import get_current_placement_group

        if not ray.is_initialized():
            return None
        context = ray.get_runtime_context()
        return cls(context.gcs_address, context.namespace, dict(context.runtime_env), get_current_placement_group())

    def join(self) -> None:
        """Connect this process to the cluster; its actors may use the placement group."""
        import ray

        global _inherited_placement_group
        ray.init(address=self.address, namespace=self.namespace, runtime_env=self.runtime_env or None)
        _inherited_placement_group = self.placement_group


def current_placement_group() -> PlacementGroup | None:
    """The placement group this process's Ray work belongs to: its own (a Serve replica's), or
    the one of the process whose cluster it joined; None if neither."""
    from ray.util.placement_group import get_current_placement_group

    return get_current_placement_group() or _inherited_placement_group
