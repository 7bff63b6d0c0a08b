"""Kept for modules not yet moved to tests.support (the CLI tests): import from tests.support.router instead."""

from tests.support.router import RouterHandle, auth, create_keys, router_in_thread, serve_router
from tests.support.workers import start_workers

__all__ = ["RouterHandle", "auth", "create_keys", "router_in_thread", "serve_router", "start_workers"]
