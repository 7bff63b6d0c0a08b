"""`llamagrid generate` and `llamagrid chat`: terminal clients of a router (or a worker) over llamagrid.client;
they import nothing beyond grpcio and the stubs."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from llamagrid.client import ADDRESS_ENV, API_KEY_ENV, DEFAULT_ADDRESS, Client, LlamagridError, TurnEnd


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--address", default=None,
                   help=f"host:port of the router (default ${ADDRESS_ENV}, else {DEFAULT_ADDRESS})")
    g.add_argument("--api-key", default=None, help=f"API key (default ${API_KEY_ENV})")
    g.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-root-cert)")
    g.add_argument("--tls-root-cert", default=None, help="PEM file of root certificates to trust (implies --tls)")
    g.add_argument("--timeout", type=float, default=None,
                   help="deadline in seconds, retries included (generate: default 300; chat: none)")
    g.add_argument("--model", default="", help="model name (default: the server's default model)")


def _add_sampling_args(p: argparse.ArgumentParser, *, default_max_new_tokens: int | None) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--ignore-eos", action="store_true", default=None)


def _params(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                                   "repetition_penalty", "ignore_eos")}


def _client(args: argparse.Namespace, timeout: float | None) -> Client:
    return Client(args.address, api_key=args.api_key, tls=args.tls, root_certificates=args.tls_root_cert,
                  timeout=args.timeout if args.timeout is not None else timeout, model=args.model)


def _fail(command: str, error: LlamagridError) -> int:
    print(f"\nllamagrid {command}: {error.code.name}: {error.details}", file=sys.stderr)
    return 1


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream the completion to stdout; with --json, print one JSON object when it is done."""
    try:
        with _client(args, 300.0) as client:
            if args.json:
                c = client.generate(args.prompt, **_params(args))
                print(json.dumps({"text": c.text, "num_tokens": len(c.token_ids), "token_ids": list(c.token_ids),
                                  "finish_reason": c.finish_reason,
                                  "usage": {"prompt_tokens": c.usage.prompt_tokens,
                                            "completion_tokens": c.usage.completion_tokens,
                                            "cached_prompt_tokens": c.usage.cached_prompt_tokens}}))
                return 0
            last = None
            for chunk in client.generate_stream(args.prompt, **_params(args)):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finish_reason:
                    last = chunk
            sys.stdout.write("\n")
            if last is not None and args.verbose:
                print(f"[finish={last.finish_reason} prompt_tokens={last.usage.prompt_tokens} "
                      f"completion_tokens={last.usage.completion_tokens}]", file=sys.stderr)
            return 0
    except LlamagridError as e:
        return _fail("generate", e)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _read_line(interactive: bool) -> str | None:
    """The next line of input (None at EOF); the prompt is shown only on a terminal."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def cmd_chat(args: argparse.Namespace) -> int:
    """Read a line, stream the reply, repeat. Ctrl-C during a reply cancels it (the session goes on); Ctrl-C at the
    prompt, or end of input, exits."""
    interactive = sys.stdin.isatty()
    try:
        client = _client(args, None)
    except LlamagridError as e:
        return _fail("chat", e)
    with client, client.chat(system=args.system, **_params(args)) as session:
        while True:
            try:
                line = _read_line(interactive)
            except KeyboardInterrupt:
                print()
                return 0
            if line is None:
                if interactive:
                    print()
                return 0
            if not line.strip():
                continue
            try:
                turn = session.send(line)
                end = _stream_reply(turn)
            except LlamagridError as e:
                _fail("chat", e)
                # at a terminal, a failed turn (e.g. rate limited) leaves the session open for the next line
                if not interactive or e.code.name in ("UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND"):
                    return 1
                continue
            except KeyboardInterrupt:  # a second Ctrl-C while the cancelled reply drains
                print()
                return 130
            if end.finish_reason == "CANCELLED":
                print("[cancelled]", flush=True)
            if args.verbose:
                print(f"[finish={end.finish_reason} prompt_tokens={end.usage.prompt_tokens} "
                      f"completion_tokens={end.usage.completion_tokens} "
                      f"cached_prompt_tokens={end.usage.cached_prompt_tokens}]", file=sys.stderr)


def _stream_reply(turn) -> TurnEnd:
    """Print the reply as it streams. A first Ctrl-C sends CancelTurn (the reply then ends CANCELLED and the session
    goes on); a second one raises KeyboardInterrupt. A signal handler, not KeyboardInterrupt, does the cancelling,
    so no event is lost to an exception raised half-way through reading it."""
    interrupts = 0

    def on_sigint(signum, frame):
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt
        turn.cancel()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None
    try:
        for event in turn:
            if isinstance(event, TurnEnd):
                sys.stdout.write("\n")
                sys.stdout.flush()
                return event
            sys.stdout.write(event.text)
            sys.stdout.flush()
        raise AssertionError("unreachable: a turn ends with TurnEnd")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def add_client_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="one-shot completion of a prompt through the router (streams to stdout)")
    g.add_argument("prompt")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text, num_tokens, token_ids, finish_reason, usage) instead")
    g.add_argument("-v", "--verbose", action="store_true", help="finish reason and usage on stderr")
    _add_sampling_args(g, default_max_new_tokens=None)
    _add_connection_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat through the router (Ctrl-C cancels a reply)")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("-v", "--verbose", action="store_true", help="finish reason and usage of each reply on stderr")
    _add_sampling_args(c, default_max_new_tokens=None)
    _add_connection_args(c)
    c.set_defaults(func=cmd_chat)
