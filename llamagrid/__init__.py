"""llamagrid client library: `llamagrid.client.Client` / `AsyncClient` for the llamagrid.v1.Inference service."""

from llamagrid.client import (
    AsyncClient,
    ChatDelta,
    Client,
    Completion,
    GenerateChunk,
    LlamagridError,
    RetryPolicy,
    TurnEnd,
    Usage,
)

__all__ = ["AsyncClient", "ChatDelta", "Client", "Completion", "GenerateChunk", "LlamagridError", "RetryPolicy",
           "TurnEnd", "Usage"]
