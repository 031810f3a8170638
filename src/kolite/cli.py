"""`kolite serve | pull | bench`: flags are generated from the settings classes, so a flag and its
`KOLITE_*` environment variable can never drift apart (a flag given wins over the variable)."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from pydantic_settings import BaseSettings

from kolite import __version__
from kolite.config import ModelSettings, ServerSettings
from kolite.errors import KoliteError


def _flag_type(annotation: object) -> tuple[type | None, list[str] | None]:
    """(argparse type, choices) for a settings field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if annotation is bool:
        return None, None
    if annotation in (int, float, str, Path):
        return annotation, None  # type: ignore[return-value]
    return str, None


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings],
                       skip: Sequence[str] = ()) -> None:
    """One `--flag` per settings field, help from its description, env var named in the help."""
    group = parser.add_argument_group(settings_cls.__name__)
    for name, field in settings_cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        env = f"KOLITE_{name.upper()}"
        help_text = f"{field.description or ''} [env {env}]"
        ftype, choices = _flag_type(field.annotation)
        if typing.get_origin(field.annotation) is list:  # repeat the flag for several values
            group.add_argument(flag, dest=name, action="append", default=None, help=help_text)
        elif ftype is None:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=ftype, choices=choices, default=None, help=help_text)


def settings_from(ns: argparse.Namespace, settings_cls: type[BaseSettings]) -> BaseSettings:
    """Settings from env vars, overridden by the flags that were given."""
    given = {k: v for k, v in vars(ns).items() if k in settings_cls.model_fields and v is not None}
    return settings_cls(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kolite", description="Korean-first GPT-2 text generation server.")
    parser.add_argument("--version", action="version", version=f"kolite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server (loads the model in the background)")
    add_settings_flags(serve, ModelSettings)
    add_settings_flags(serve, ServerSettings)

    pull = sub.add_parser("pull", help="download and convert a model, then exit")
    pull.add_argument("model_name", nargs="?", metavar="MODEL", help="hub id or local folder")
    add_settings_flags(pull, ModelSettings, skip=("threads", "max_kv_tokens"))

    from kolite.bench import RANDOM_SHAPES

    bench = sub.add_parser("bench", help="measure this machine with the model: decode speed, time to first token, "
                           "batching, memory, bandwidth")
    add_settings_flags(bench, ModelSettings)
    opts = bench.add_argument_group("bench")
    opts.add_argument("--random-weights", choices=sorted(RANDOM_SHAPES), default=None, metavar="SHAPE",
                      help=f"bench a random-weight checkpoint of this exact shape ({', '.join(sorted(RANDOM_SHAPES))}),"
                      " written once into the kolite home: no download, works offline (instead of --model)")
    opts.add_argument("--new-tokens", type=int, default=None,
                      help="new tokens per request for decode and batching runs (default 128; 32 with --quick)")
    opts.add_argument("--quick", action="store_true", help="one repeat and shorter runs: a first look in less time")
    opts.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every result here")
    opts.add_argument("--plot", type=Path, default=None, metavar="PATH.png",
                      help="draw tokens/s against concurrency and against context length (needs matplotlib)")
    return parser


def cmd_serve(ns: argparse.Namespace) -> int:
    from kolite.api import server
    from kolite.api.app import create_app

    model_settings = settings_from(ns, ModelSettings)
    server_settings = settings_from(ns, ServerSettings)
    assert isinstance(model_settings, ModelSettings) and isinstance(server_settings, ServerSettings)
    # kolite's own messages at the chosen level; libraries (the quantizer logs to root) stay at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kolite").setLevel(server_settings.log_level.upper())
    if server_settings.binds_all_interfaces and not server_settings.api_keys():
        logging.getLogger("kolite").warning(
            "listening on all interfaces (%s) without an API key: anyone who can reach this machine can use the "
            "model; set --api-key (or KOLITE_API_KEY) on a shared network", server_settings.host)
    app = create_app(model_settings, server_settings)
    return server.run(app, host=server_settings.host, port=server_settings.port,
                      log_level=server_settings.log_level, shutdown_timeout=server_settings.shutdown_timeout,
                      header_timeout=server_settings.header_timeout, max_connections=server_settings.max_connections)


def cmd_pull(ns: argparse.Namespace) -> int:
    from kolite.convert.prepare import prepare_model

    if ns.model_name:
        ns.model = ns.model_name
    settings = settings_from(ns, ModelSettings)
    assert isinstance(settings, ModelSettings)
    prepared = prepare_model(settings, progress=lambda msg: print(f"kolite: {msg}", file=sys.stderr, flush=True))
    print(prepared.graph)
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from kolite.bench import run_command

    if ns.random_weights and ns.model is not None:
        print("kolite: error: give either --model or --random-weights, not both", file=sys.stderr)
        return 2
    settings = settings_from(ns, ModelSettings)
    assert isinstance(settings, ModelSettings)
    return run_command(settings, random_weights=ns.random_weights, new_tokens=ns.new_tokens, quick=ns.quick,
                       json_path=ns.json, plot_path=ns.plot)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return {"serve": cmd_serve, "pull": cmd_pull, "bench": cmd_bench}[ns.command](ns)
    except KoliteError as exc:
        print(f"kolite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
