"""MLX's distributed runtime for sharded stages: which rank am I, and a barrier that votes.

Under ``mlx.launch`` (ring, MPI, NCCL or JACCL backend) every rank runs the same DAG. A
stage marked ``sharded`` (capture) is computed by all ranks at once, each taking its share of
the work (``current_shard()``) and writing its own part files into the one partial artifact
folder; rank 0 writes the manifest once every rank is done. Outside ``mlx.launch`` there is
one rank and nothing here costs anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

# Set by mlx.launch (ring, jaccl, nccl: MLX_RANK) or by mpirun (MPI backend).
_LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


@dataclass(frozen=True)
class Shard:
    """This process's share of a sharded stage: items i with i % size == rank."""

    rank: int = 0
    size: int = 1

    def owns(self, index: int) -> bool:
        return index % self.size == self.rank


_SHARD: ContextVar[Shard | None] = ContextVar("mlx_interp_shard", default=None)


def current_shard() -> Shard:
    """The shard a sharded stage is computing now (rank 0 of 1 outside ``sharding``)."""
    return _SHARD.get() or Shard()


@contextmanager
def sharding(shard: Shard) -> Iterator[None]:
    """Run a sharded stage's compute as ``shard`` (the runner does this, stages only read it)."""
    token = _SHARD.set(shard)
    try:
        yield
    finally:
        _SHARD.reset(token)


def launched() -> bool:
    """True when this process was started by mlx.launch or mpirun."""
    return any(name in os.environ for name in _LAUNCH_ENV)


class Group:
    """A distributed group of ``size`` ranks; ``vote`` is the only collective we need."""

    def __init__(self, group=None):
        self._group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1

    def vote(self, value: int) -> int:
        """Sum of ``value`` over all ranks; every rank blocks until all have voted (a barrier)."""
        if self._group is None or self.size == 1:
            return int(value)
        import mlx.core as mx

        total = mx.distributed.all_sum(mx.array([int(value)], dtype=mx.int32), group=self._group)
        mx.eval(total)
        return int(total)

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.size)


_GROUP: Group | None = None


def world() -> Group:
    """The group of all ranks (size 1 unless launched by mlx.launch / mpirun); cached."""
    global _GROUP
    if _GROUP is None:
        if launched():
            import mlx.core as mx

            _GROUP = Group(mx.distributed.init())
        else:
            _GROUP = Group()
    return _GROUP
