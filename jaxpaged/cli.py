"""The `jaxpaged` command: convert, generate, serve, bench.

Each subcommand's module provides `add_arguments(parser)` and `run(args) -> int`; user
errors print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model dir or dummy preset (default: SmolLM2)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text, streamed to the terminal")
    _add_engine_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=None)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from jaxpaged.generate_cli import run

    return run(args)


def _add_convert(sub) -> None:
    from converters import convert

    p = sub.add_parser("convert", help="convert an HF checkpoint to jaxpaged params")
    convert.add_arguments(p)
    p.set_defaults(func=convert.run)


def _add_serve(sub) -> None:
    try:
        from server import cli as server_cli
    except ImportError:  # the server package is optional at import time
        return
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    server_cli.add_arguments(p)
    p.set_defaults(func=server_cli.run)


def _add_bench(sub) -> None:
    from jaxpaged import bench

    p = sub.add_parser("bench", help="offline throughput / latency benchmark")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpaged", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_generate(sub)
    _add_serve(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxpaged {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
