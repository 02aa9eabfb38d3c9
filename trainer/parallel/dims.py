"""ParallelDims: the layout arithmetic and every process group.

world = dp * pp * n with rank order n fastest, then pp, then dp:

    rank = (dp_index * pp + pp_index) * n + n_index

so the n ranks of one intra-node group (SP = EP = n) are consecutive, as on
a machine with n GPUs per node. ``check_layout`` is pure arithmetic: it runs
before any process group exists and names the numbers when it fails. No other
module creates process groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import Config
from trainer.errors import ConfigError


def check_layout(cfg: Config, nproc: int, ranks: str = "--nproc") -> None:
    """Raise ConfigError naming the numbers if this layout cannot run on ``nproc`` ranks
    (``ranks`` says where that number came from)."""
    m, p = cfg.model, cfg.parallel
    problems = []
    if nproc != 1 and p.world != nproc:
        problems.append(
            f"parallel.dp * parallel.pp * parallel.n = {p.dp} * {p.pp} * {p.n} = {p.world} "
            f"but {ranks} is {nproc}"
        )
    if nproc > 1:
        if m.seq_len % p.n:
            problems.append(f"model.seq_len = {m.seq_len} is not divisible by parallel.n = {p.n}")
        if m.seq_len % p.n == 0 and (m.seq_len // p.n) % cfg.comm.chunks:
            problems.append(
                f"model.seq_len / parallel.n = {m.seq_len // p.n} local tokens per sequence are "
                f"not divisible by comm.chunks = {cfg.comm.chunks}"
            )
        if m.kv_heads % p.n:
            problems.append(
                f"model.kv_heads = {m.kv_heads} is not divisible by parallel.n = {p.n} "
                "(attention shards whole kv heads)"
            )
        if p.ffn == "tp" and m.ffn_hidden % p.n:
            problems.append(
                f"model.ffn_hidden = {m.ffn_hidden} is not divisible by parallel.n = {p.n} "
                "(parallel.ffn = tp splits every expert along h_ffn)"
            )
        if m.shared_experts and (m.shared_experts * m.shared_hidden) % p.n:
            problems.append(
                f"shared expert width {m.shared_experts * m.shared_hidden} is not divisible by "
                f"parallel.n = {p.n}"
            )
    if problems:
        raise ConfigError("invalid parallel layout: " + "; ".join(problems))


def _own_group(rank: int, partition: list[list[int]]):
    """Create one process group per member list (all ranks, same order); return ours."""
    import torch.distributed as dist

    mine = None
    for members in partition:
        group = dist.new_group(members)
        if rank in members:
            mine = group
    return mine


@dataclass
class ParallelDims:
    """Coordinates of this rank and the process groups of its layout."""

    n: int
    dp: int
    pp: int
    rank: int
    world: int
    n_group: object = None  # the n ranks of this node (SP = EP)
    dp_group: object = None  # the dp replicas of this (pp stage, n index)
    pp_group: object = None  # the pp stages of this (dp replica, n index)
    checkpoint_group: object = None  # every rank, gloo: checkpoint saves on their own thread

    @property
    def n_index(self) -> int:
        return self.rank % self.n

    @property
    def pp_index(self) -> int:
        return (self.rank // self.n) % self.pp

    @property
    def dp_index(self) -> int:
        return self.rank // (self.n * self.pp)

    def rank_of(self, dp_index: int, pp_index: int, n_index: int) -> int:
        return (dp_index * self.pp + pp_index) * self.n + n_index

    @classmethod
    def build(cls, cfg: Config, rank: int, world: int) -> ParallelDims:
        """Create the groups (every rank must call this, in the same order)."""

        check_layout(cfg, world)
        p = cfg.parallel
        dims = cls(p.n, p.dp, p.pp, rank, world)
        # new_group is collective: every rank creates every group and keeps its own.
        dims.n_group = _own_group(
            rank,
            [[dims.rank_of(d, s, i) for i in range(p.n)] for d in range(p.dp) for s in range(p.pp)],
        )
        dims.dp_group = _own_group(
            rank,
            [[dims.rank_of(d, s, i) for d in range(p.dp)] for s in range(p.pp) for i in range(p.n)],
        )
        dims.pp_group = _own_group(
            rank,
            [[dims.rank_of(d, s, i) for s in range(p.pp)] for d in range(p.dp) for i in range(p.n)],
        )
        # Checkpoint saves run DCP's collectives on a background thread: a group of their own
        # keeps them from interleaving with the training's, and gloo serves them on GPUs too.
        import torch.distributed as dist

        dims.checkpoint_group = dist.new_group(backend="gloo")
        return dims
