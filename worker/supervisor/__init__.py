"""The supervisor: the parent of one replica's rank group, restarting the whole group when any rank fails.

    python -m worker.supervisor [supervisor options] -- <python -m worker args>
    llamagrid worker --supervise [supervisor options] -- <python -m worker args>

Everything after `--` is passed to `python -m worker` unchanged (without `--`, every argument is a worker
argument and the supervisor runs with its defaults). The supervisor adds `--port`, `--port-file` and, once the
worker accepts it, `--run-dir` (a fresh directory per start, where every rank keeps `rank{r}.heartbeat` fresh).

- Start: `python -m worker ...` in its own session (process group), so rank 0 and the ranks it spawns are
  stopped together with os.killpg; rank 0 gets PR_SET_PDEATHSIG=SIGKILL, so it does not outlive a killed
  supervisor. The port is fixed for the supervisor's lifetime (`--port 0` picks a free one once), so a static
  router list finds the replica again; the supervisor's `--port-file` (or the worker args' one) is written
  when the first group serves.
- Watch: rank 0's exit status, every rank's PID from its heartbeat file, heartbeat age once serving, and the
  start-up grace. Causes: oom (exit 86), crash (other non-zero status, a fatal signal, a dead non-zero rank),
  killed (SIGKILL), hung (stale heartbeat, or not serving within the grace), exit (status 0 when not asked to
  stop). Any failure stops the whole group (a lone survivor would hang in a collective), reaps every process
  and starts a new group after a capped exponential backoff, reset once a group has served stably.
  Too many failures within a window (a crash loop) ends the supervisor with exit status 1.
- Stop (SIGTERM/SIGINT): SIGTERM to rank 0 (it drains), SIGKILL to the group after --stop-timeout, exit 0.
  A second signal skips the drain.

Log events (JSON lines on stderr): group_started, group_serving, group_failed, group_restarting, crash_loop,
supervisor_stopping, group_stopped.
"""

from worker.supervisor.supervisor import Supervisor, SupervisorConfig

__all__ = ["Supervisor", "SupervisorConfig"]
