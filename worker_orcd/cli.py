"""Command line: worker-orcd generate | serve | bench | pull | inspect.

The CLI is the only place that prints; everything below it logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from worker_orcd.engine.options import add_load_arguments, batch_kwargs
from worker_orcd.errors import WorkerError

if TYPE_CHECKING:
    from worker_orcd.engine.types import GenerationOutput

logger = logging.getLogger("worker_orcd")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "log_format", "text") != "json":
        logging.basicConfig(
            level=getattr(logging, args.log_level.upper()),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    try:
        return int(args.func(args) or 0)
    except WorkerError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worker-orcd", description=__doc__)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch the test model (or the test data) into the cache")
    p.add_argument(
        "--testdata",
        action="store_true",
        help="fetch llama.cpp's vocab-only GGUFs and tokenizer vectors instead of the model",
    )
    p.add_argument("--print-path", action="store_true", help="only print where it lives")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("inspect", help="describe a GGUF file")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", nargs="*", default=[])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    add_load_arguments(p)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="run the HTTP worker")
    from worker_orcd.server.options import add_serve_arguments

    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="measure prefill and decode speed")
    from worker_orcd.bench import add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def cmd_pull(args: argparse.Namespace) -> int:
    from worker_orcd import hub, testdata

    if args.testdata:
        print(testdata.testdata_dir() if args.print_path else testdata.pull_testdata())
    else:
        print(hub.model_path() if args.print_path else hub.pull())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from worker_orcd.gguf.inspect import format_report

    print(format_report(args.file))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import json
    import time

    from worker_orcd.engine.engine import Engine
    from worker_orcd.engine.types import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    params.validate()
    started = time.perf_counter()
    engine = Engine.load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_context=args.max_context,
        weights=args.weights,
        **batch_kwargs(args),
        tensor_parallel_size=args.tensor_parallel_size,
    )
    load_s = time.perf_counter() - started
    if args.chat:
        ids = engine.encode_prompt(
            messages=[{"role": "user", "content": args.prompt}], system=args.system
        )
    else:
        ids = engine.encode_prompt(args.prompt)

    def echo(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    try:
        out = engine.generate(ids, params, on_text=None if args.json else echo)
    finally:
        engine.close()
    if args.json:
        t = out.timings
        print(
            json.dumps(
                {
                    "prompt_ids": out.prompt_ids,
                    "token_ids": out.token_ids,
                    "text": out.text,
                    "stop_reason": out.stop_reason.value,
                    "stop_sequence": out.stop_sequence,
                    "seed": out.seed,
                    "load_s": round(load_s, 3),
                    "timings": {
                        "prompt_tokens": t.prompt_tokens,
                        "prefill_ms": round(t.prefill_ms, 3),
                        "prefill_tok_s": round(t.prefill_tok_s, 2),
                        "first_token_ms": round(t.first_token_ms, 3),
                        "decode_ms": round(t.decode_ms, 3),
                        "decode_tok_s": round(t.decode_tok_s, 2),
                        "tokens_out": t.tokens_out,
                    },
                },
                ensure_ascii=False,
            )
        )
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(_speed_line(load_s, out), file=sys.stderr)
    return 0


def _speed_line(load_s: float, out: GenerationOutput) -> str:
    """Load time, prefill and decode speed, stop reason: one line for the terminal."""
    t = out.timings
    return (
        f"[load {load_s:.1f} s | prompt {t.prompt_tokens} tokens, prefill {t.prefill_tok_s:.1f} "
        f"tok/s | {t.tokens_out} tokens out, decode {t.decode_tok_s:.1f} tok/s | "
        f"{out.stop_reason.value}]"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    if args.data_parallel_size > 1:
        from worker_orcd.server.front import serve_front

        return serve_front(args)
    from worker_orcd.server.main import serve

    return serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from worker_orcd.bench import run_bench

    return run_bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
