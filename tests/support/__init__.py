"""Helpers shared by the test packages: a scripted fake worker, routers in a thread or a process, waits."""
