"""Retrieval-augmented chat through a llamagrid router: a system prompt, context documents and a question,
answered at temperature 0.2 with the reply streamed as it is generated.

    LLAMAGRID_ADDRESS=127.0.0.1:50051 LLAMAGRID_API_KEY=lg_... python examples/rag_chat.py [QUESTION]

(With the generated tiny model the answer is gibberish; the plumbing is the point.)
"""

from __future__ import annotations

import argparse
import sys

from llamagrid.client import Client, LlamagridError, TurnEnd

SYSTEM_PROMPT = ("You are a support assistant for the llamagrid inference cluster. Answer only from the context "
                 "documents; if they do not contain the answer, say so. Be brief.")

DOCUMENTS = [
    ("router.md", "The router authenticates each call with a Bearer API key, applies the key's rate-limit tier "
                  "in Redis and forwards the request to the least-loaded healthy worker."),
    ("ratelimit.md", "A denied call fails with RESOURCE_EXHAUSTED and a retry-after-ms trailer telling the client "
                     "how long to wait before retrying."),
    ("workers.md", "Each worker runs one replica of the model with a paged KV cache; the router fails requests over "
                   "to another worker when one crashes."),
]

DEFAULT_QUESTION = "What should a client do when it receives RESOURCE_EXHAUSTED?"


def build_prompt(question: str, documents: list[tuple[str, str]]) -> str:
    context = "\n\n".join(f"[{i}] ({name}) {text}" for i, (name, text) in enumerate(documents, 1))
    return f"Context documents:\n{context}\n\nQuestion: {question}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    p.add_argument("--address", default=None, help="router host:port (default $LLAMAGRID_ADDRESS)")
    p.add_argument("--api-key", default=None, help="API key (default $LLAMAGRID_API_KEY)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    try:
        with Client(args.address, api_key=args.api_key, timeout=120) as client:
            session = client.chat(system=SYSTEM_PROMPT, temperature=0.2, max_new_tokens=args.max_new_tokens)
            with session:
                print(f"Q: {args.question}\nA: ", end="", flush=True)
                for event in session.send(build_prompt(args.question, DOCUMENTS)):
                    if isinstance(event, TurnEnd):
                        print(f"\n[finish={event.finish_reason} prompt_tokens={event.usage.prompt_tokens} "
                              f"completion_tokens={event.usage.completion_tokens}]")
                    else:
                        print(event.text, end="", flush=True)
    except LlamagridError as e:
        print(f"\nrag_chat: {e.code.name}: {e.details}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
