"""The `quotaflow` command (CONTRACT.md, "CLI"): kafka, run, send, sim, status, usage, serve,
demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from aiokafka.errors import KafkaConnectionError

from topics.errors import QuotaflowError

__all__ = ["main"]


def _kafka(args: argparse.Namespace) -> int:
    from pipeline.kafka_local import LocalKafka

    kafka = LocalKafka(Path(args.home) if args.home else None)
    if args.action == "fetch":
        jars = kafka.fetch()
        print(f"kafka jars ready ({len(jars)} jars)")
    elif args.action == "up":
        print(kafka.up(port=args.port))
    elif args.action == "down":
        print("stopped" if kafka.down() else "not running")
    else:
        st = kafka.status()
        if st.running:
            print(f"running pid={st.pid} bootstrap={st.bootstrap} log={st.log_path}")
        else:
            print(f"not running (data {st.data_dir}, log {st.log_path})")
            return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    if os.environ.get("RAY_ADDRESS"):
        from pipeline._ray_env import prepare_ray_auth

        prepare_ray_auth()  # joining a cluster: before Ray is imported
    from pipeline.runtime import run_gateway
    from topics.config import load_config

    config = load_config(args.config)
    return asyncio.run(run_gateway(config))


def _sim(args: argparse.Namespace) -> int:
    from pipeline.simulator import run_simulator
    from topics.config import load_config
    from topics.logs import configure_logging

    config = load_config(args.config)
    if config.simulator is None:
        raise QuotaflowError(f"{args.config}: no 'simulator' section to run")
    configure_logging(config.logging)
    run_simulator(config.simulator, port=args.port)
    return 0


def _send(args: argparse.Namespace) -> int:
    from pipeline._send_args import SINGLE_TIMEOUT_S, check_send_args
    from pipeline.send import send_one
    from topics.config import load_config

    check_send_args(args)
    config = load_config(args.config)
    if args.file is not None:
        from pipeline.batch import send_batch

        return asyncio.run(
            send_batch(
                config,
                path_in=Path(args.file),
                path_out=Path(args.out),
                model=args.model,
                tenant=args.tenant,
                window=args.window,
                max_tokens=args.max_tokens,
                api_key_env=args.api_key_env,
                grace_s=args.grace,
                timeout_s=args.timeout,
                progress_interval_s=args.progress_interval,
                id_prefix=args.id_prefix,
            )
        )
    return asyncio.run(
        send_one(
            config,
            prompt=args.prompt,
            model=args.model,
            tenant=args.tenant,
            stream=not args.no_stream,
            max_tokens=args.max_tokens,
            api_key_env=args.api_key_env,
            timeout_s=args.timeout if args.timeout is not None else SINGLE_TIMEOUT_S,
        )
    )


def _status(args: argparse.Namespace) -> int:
    from pipeline._ray_env import prepare_ray_auth

    prepare_ray_auth()  # before Ray is imported
    from pipeline.status import print_status
    from topics.config import load_config

    config = load_config(args.config)
    return print_status(config, as_json=args.json, watch_s=None if args.once else args.interval)


def _usage(args: argparse.Namespace) -> int:
    from pipeline.usage import run_usage
    from topics.config import load_config

    config = load_config(args.config)
    return run_usage(
        config,
        since=args.since,
        until=args.until,
        tenants=args.tenant or (),
        by=[k.strip() for k in args.by.split(",") if k.strip()],
        csv_path=args.csv,
    )


def _serve(args: argparse.Namespace) -> int:
    from pipeline._frontdoor_settings import settings_from
    from pipeline.frontdoor import serve
    from topics.config import load_config

    config = load_config(args.config)
    settings = settings_from(
        config.frontdoor,
        host=args.host,
        port=args.port,
        reply_topic=args.reply_topic,
        request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        drain_timeout_s=args.drain_timeout,
    )
    return asyncio.run(serve(config, settings))


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(requests=args.requests, home=Path(args.home) if args.home else None)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quotaflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kafka", help="a local single-node Apache Kafka (KRaft)")
    k.add_argument("action", choices=["up", "down", "status", "fetch"])
    k.add_argument("--port", type=int, default=9092, help="listener port; 0 picks a free one")
    k.add_argument("--home", help="state directory (default $QUOTAFLOW_HOME or ./.quotaflow)")
    k.set_defaults(func=_kafka)

    r = sub.add_parser("run", help="run the gateway until SIGINT/SIGTERM, then drain")
    r.add_argument("--config", required=True)
    r.set_defaults(func=_run)

    from pipeline._batch_options import BatchOptions
    from pipeline._send_args import SEND_EPILOG, SINGLE_TIMEOUT_S

    batch = BatchOptions()
    s = sub.add_parser(
        "send",
        help="publish one request and stream its reply, or a JSONL file of them (--file)",
        epilog=SEND_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", required=True)
    s.add_argument("--model", default="auto", help="with --file: for lines that name none")
    s.add_argument("--tenant", default="default", help="with --file: for lines that name none")
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--no-stream", action="store_true", help="ask for one completion")
    s.add_argument("--api-key-env", help="env var holding the tenant key (authorization header)")
    s.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds to wait for the answer (default {SINGLE_TIMEOUT_S:g}); with --file, "
        f"without any reply to one request before giving up (default {batch.timeout_s:g})",
    )
    s.add_argument("--file", help="JSONL input, one request per line (see below)")
    s.add_argument("--out", help="JSONL results, one line per request; resumes if it exists")
    s.add_argument(
        "--window", type=int, help=f"requests in flight at once (default {batch.window})"
    )
    s.add_argument(
        "--grace",
        type=float,
        help=f"seconds to wait for those in flight after Ctrl-C (default {batch.grace_s:g})",
    )
    s.add_argument(
        "--progress-interval",
        type=float,
        help="seconds between progress lines when stderr is not a terminal "
        f"(default {batch.progress_interval_s:g})",
    )
    s.add_argument("--id-prefix", help="put before the ids derived for lines without one")
    s.add_argument("prompt", nargs="?", help="one prompt (or --file)")
    s.set_defaults(func=_send)

    m = sub.add_parser("sim", help="run the OpenAI-compatible provider simulator")
    m.add_argument("--config", required=True)
    m.add_argument("--port", type=int, default=None, help="override simulator.port")
    m.set_defaults(func=_sim)

    st = sub.add_parser("status", help="buckets, queues, callers and caches of the running gateway")
    st.add_argument("--config", required=True)
    st.add_argument("--once", action="store_true", help="print one snapshot and exit")
    st.add_argument("--json", action="store_true", help="machine-readable snapshot(s)")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    st.set_defaults(func=_status)

    u = sub.add_parser("usage", help="spend, tokens and cache savings per tenant and model")
    u.add_argument("--config", required=True)
    u.add_argument("--since", help="start: a duration back (24h, 7d) or ISO date/time (UTC)")
    u.add_argument("--until", help="end (exclusive), same forms; default now")
    u.add_argument("--tenant", action="append", help="only this tenant (repeatable)")
    u.add_argument("--by", default="tenant,model", help="group by: tenant, model, deployment")
    u.add_argument("--csv", help="also write the groups as CSV to this file ('-': stdout only)")
    u.set_defaults(func=_usage)

    from pipeline._frontdoor_settings import FrontDoorSettings

    door = FrontDoorSettings()  # the defaults; the config's `frontdoor` section overrides them
    v = sub.add_parser("serve", help="OpenAI-compatible HTTP front door (/v1/chat/completions)")
    v.add_argument("--config", required=True)
    v.add_argument("--host", help=f"listen address (default {door.host})")
    v.add_argument(
        "--port", type=int, help=f"listen port; 0 picks a free one (default {door.port})"
    )
    v.add_argument(
        "--reply-topic", help=f"topic its replies come back on (default {door.reply_topic})"
    )
    v.add_argument(
        "--request-timeout",
        type=float,
        help=f"seconds to wait for an answer before 504 (default {door.request_timeout_s:g})",
    )
    v.add_argument(
        "--max-body-bytes", type=int, help=f"larger bodies get 413 (default {door.max_body_bytes})"
    )
    v.add_argument(
        "--drain-timeout",
        type=float,
        help=f"seconds requests in flight get on SIGTERM (default {door.drain_timeout_s:g})",
    )
    v.set_defaults(func=_serve)

    d = sub.add_parser("demo", help="broker, simulator, gateway and sample traffic on one machine")
    d.add_argument("--requests", type=int, default=24, help="sample requests to send")
    d.add_argument("--home", help="state directory for the demo's broker")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except QuotaflowError as exc:
        print(f"quotaflow: error: {exc}", file=sys.stderr)
        return 2
    except KafkaConnectionError as exc:
        print(
            f"quotaflow: error: cannot reach Kafka ({exc}); is the broker up? "
            "(`quotaflow kafka status`, or the config's kafka.bootstrap_servers)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
