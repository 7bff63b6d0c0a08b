"""Fault injection for recovery tests (off by default) and the exit code of an engine that ran out of memory.

Spec grammar (`--inject-fault SPEC`), one or more faults separated by `;`:

    FAULT  := KIND "@" "step=" N ("," "times=" T)? ("," "rank=" R)? ("," "start=" S)?
    KIND   := "oom" | "crash" | "hang"

A fault fires on the first check(step, rank) with step >= N on rank R (default 0), and on each later check
until it has fired T times (default 1). With start=S it is armed only in the S-th start of the group under a
supervisor (which sets LLAMAGRID_GROUP_START=1, 2, ... in the group's environment; a worker without one is start
1), so a restarted group runs clean: `oom` raises torch.OutOfMemoryError (the engine's shedding path
handles it as a real one), `crash` exits the process with code 1 at once (os._exit, no clean-up), `hang`
blocks the calling thread forever (so its heartbeat stops). Refused unless the environment sets
LLAMAGRID_ALLOW_FAULT_INJECTION=1.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass

OOM_EXIT_CODE = 86  # the engine gave up after repeated CUDA OOM; a supervisor restarts the group
CRASH_EXIT_CODE = 1
ALLOW_ENV = "LLAMAGRID_ALLOW_FAULT_INJECTION"
START_ENV = "LLAMAGRID_GROUP_START"  # set by worker.supervisor: which start of the group this process belongs to
KINDS = ("oom", "crash", "hang")

_FAULT = re.compile(r"(?P<kind>[a-z]+)@(?P<args>.*)")
_ARG = re.compile(r"(?P<key>[a-z]+)=(?P<value>\d+)")


@dataclass(slots=True)
class Fault:
    kind: str
    step: int
    times: int = 1
    rank: int = 0
    start: int | None = None
    num_fired: int = 0


class FaultPlan:
    """The faults of one process; check() is a cheap no-op when there are none."""

    def __init__(self, faults: list[Fault] | None = None, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        start = int(env.get(START_ENV, "1") or 1)
        self.faults = [f for f in faults or () if f.start is None or f.start == start]

    def __bool__(self) -> bool:
        return bool(self.faults)

    @classmethod
    def parse(cls, spec: str | None, environ: Mapping[str, str] | None = None) -> FaultPlan:
        """Parse a spec (grammar in the module docstring); ValueError names what is wrong."""
        if not spec:
            return cls()
        faults = []
        for part in (p.strip() for p in spec.split(";")):
            match = _FAULT.fullmatch(part)
            if match is None or match["kind"] not in KINDS:
                raise ValueError(f"fault {part!r}: expected KIND@step=N[,times=T][,rank=R][,start=S] with KIND in "
                                 f"{KINDS}")
            args: dict[str, int] = {}
            for item in match["args"].split(","):
                arg = _ARG.fullmatch(item.strip())
                if arg is None or arg["key"] not in ("step", "times", "rank", "start") or arg["key"] in args:
                    raise ValueError(f"fault {part!r}: bad argument {item!r} (step=N, times=T, rank=R, start=S)")
                args[arg["key"]] = int(arg["value"])
            if "step" not in args:
                raise ValueError(f"fault {part!r}: step=N is required")
            if args.get("times", 1) < 1:
                raise ValueError(f"fault {part!r}: times must be at least 1")
            faults.append(Fault(match["kind"], **args))
        return cls(faults, environ)

    def check(self, step: int, rank: int = 0) -> None:
        """Called once per model step just before the model runs: fire whatever fault is due."""
        if not self.faults:
            return
        for fault in self.faults:
            if fault.rank == rank and step >= fault.step and fault.num_fired < fault.times:
                fault.num_fired += 1
                _fire(fault, step, rank)


NO_FAULTS = FaultPlan()


def require_allowed(spec: str | None, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse fault injection unless explicitly enabled; also check the spec parses (startup, ValueError)."""
    if not spec:
        return
    if environ.get(ALLOW_ENV) != "1":
        raise ValueError(f"--inject-fault is for tests only and refused unless {ALLOW_ENV}=1 is set")
    FaultPlan.parse(spec)


def _fire(fault: Fault, step: int, rank: int) -> None:
    import structlog

    log = structlog.get_logger("worker.faults")
    log.warning("fault_injected", kind=fault.kind, step=step, rank=rank, num_fired=fault.num_fired)
    if fault.kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"injected CUDA out of memory at step {step} on rank {rank}")
    if fault.kind == "crash":
        _flush_and_exit(CRASH_EXIT_CODE)
    else:  # hang: block forever
        threading.Event().wait()


def exit_for_oom() -> None:
    """End the process with OOM_EXIT_CODE (no clean-up: the supervisor restarts the whole group)."""
    _flush_and_exit(OOM_EXIT_CODE)


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # exiting anyway
            stream.flush()
    os._exit(code)
