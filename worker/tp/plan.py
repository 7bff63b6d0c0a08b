"""The step plan: the flat int64 tensors of one model step, broadcast from rank 0 as a header then a payload."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist


class PlanKind(IntEnum):
    STOP = 0  # leave the loop and exit
    IDLE = 1  # nothing to run: a keep-alive so the other ranks leave the collective and heartbeat
    STEP = 2  # run the model on the payload


@dataclass(slots=True)
class StepPlan:
    """Everything every rank needs for one forward step (CPU tensors; rank 0 builds it from a batch)."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long
    query_lens: list[int]  # [S]
    context_lens: list[int]  # [S]
    block_tables: torch.Tensor  # [S, max_blocks] long, padded with 0
    sample_rows: torch.Tensor  # [R] long: flat rows whose logits rank 0 samples

    @property
    def num_sample_rows(self) -> int:
        return self.sample_rows.numel()


_HEADER = 5  # kind, T, S, max_blocks, R


class PlanChannel:
    """Broadcasts plans from group rank 0 over a CPU (gloo) group: two broadcasts per step, no pickling."""

    def __init__(self, group=None):
        self.group = group
        self.src = 0 if group is None else dist.get_global_rank(group, 0)

    def send(self, plan: StepPlan) -> None:
        t, s = plan.input_ids.numel(), len(plan.query_lens)
        header = torch.tensor([PlanKind.STEP, t, s, plan.block_tables.shape[1], plan.num_sample_rows],
                              dtype=torch.long)
        payload = torch.cat([
            plan.input_ids, plan.positions, plan.slot_mapping,
            torch.tensor(plan.query_lens + plan.context_lens, dtype=torch.long),
            plan.sample_rows, plan.block_tables.reshape(-1),
        ])
        dist.broadcast(header, self.src, group=self.group)
        dist.broadcast(payload, self.src, group=self.group)

    def send_control(self, kind: PlanKind) -> None:
        header = torch.zeros(_HEADER, dtype=torch.long)
        header[0] = kind
        dist.broadcast(header, self.src, group=self.group)

    def recv(self) -> tuple[PlanKind, StepPlan | None]:
        """Called by ranks > 0: block until rank 0 sends the next plan."""
        header = torch.empty(_HEADER, dtype=torch.long)
        dist.broadcast(header, self.src, group=self.group)
        kind, t, s, b, r = header.tolist()
        if kind != PlanKind.STEP:
            return PlanKind(kind), None
        payload = torch.empty(3 * t + 2 * s + r + s * b, dtype=torch.long)
        dist.broadcast(payload, self.src, group=self.group)
        ids, pos, slots, lens, rows, tables = payload.split([t, t, t, 2 * s, r, s * b])
        lens = lens.tolist()
        return PlanKind.STEP, StepPlan(ids, pos, slots, lens[:s], lens[s:], tables.view(s, b), rows)
