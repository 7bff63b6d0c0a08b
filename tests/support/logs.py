"""Reading a process's JSON-lines log."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def json_events(text: str, name: str | None = None) -> list[dict]:
    """The JSON objects of a log's text (all, or those of event `name`); lines cut short or not JSON are skipped."""
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                out.append(event)
    return out


def file_events(path: Path, name: str | None = None) -> list[dict]:
    return json_events(path.read_text(errors="replace"), name)
