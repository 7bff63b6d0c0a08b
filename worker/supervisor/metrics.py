"""Prometheus metrics of a replica supervisor (`python -m worker.supervisor --metrics-port N`).

A dedicated CollectorRegistry; label values are the cause enums of worker.supervisor.causes only.

=========================================  =======  ======  ==========================================================
name                                       type     labels  meaning
=========================================  =======  ======  ==========================================================
llamagrid_supervisor_group_starts_total    counter  -       rank groups started (the first start included)
llamagrid_supervisor_group_failures_total  counter  cause   groups that failed: oom, crash, killed, hung, exit
llamagrid_supervisor_restarts_total        counter  cause   restarts after a failure, by the failure's cause
llamagrid_supervisor_group_serving         gauge    -       1 while the current group serves
llamagrid_supervisor_crash_looped          gauge    -       1 once the supervisor gave up (crash loop; it then exits)
=========================================  =======  ======  ==========================================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from worker.supervisor.causes import CRASH, EXIT, HUNG, KILLED, OOM

CAUSES = (OOM, CRASH, KILLED, HUNG, EXIT)


class SupervisorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.starts = Counter("llamagrid_supervisor_group_starts", "Rank groups started.", registry=r)
        failures = Counter("llamagrid_supervisor_group_failures", "Rank groups that failed, by cause.", ["cause"],
                           registry=r)
        restarts = Counter("llamagrid_supervisor_restarts", "Restarts after a failure, by cause.", ["cause"],
                           registry=r)
        self._failures = {c: failures.labels(c) for c in CAUSES}
        self._restarts = {c: restarts.labels(c) for c in CAUSES}
        self.serving = Gauge("llamagrid_supervisor_group_serving", "1 while the current group serves.", registry=r)
        self.crash_looped = Gauge("llamagrid_supervisor_crash_looped", "1 once the supervisor gave up.", registry=r)

    def failed(self, cause: str) -> None:
        self.serving.set(0)
        if cause in self._failures:
            self._failures[cause].inc()

    def restarting(self, cause: str) -> None:
        if cause in self._restarts:
            self._restarts[cause].inc()
