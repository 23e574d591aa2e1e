"""The `quotaflow` command (CONTRACT.md, "CLI"): kafka, run, send, sim, demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

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
    from pipeline.send import send_one
    from topics.config import load_config

    config = load_config(args.config)
    return asyncio.run(
        send_one(
            config,
            prompt=args.prompt,
            model=args.model,
            tenant=args.tenant,
            stream=not args.no_stream,
            max_tokens=args.max_tokens,
            api_key_env=args.api_key_env,
            timeout_s=args.timeout,
        )
    )


def _status(args: argparse.Namespace) -> int:
    from pipeline._ray_env import prepare_ray_auth

    prepare_ray_auth()  # before Ray is imported
    from pipeline.status import print_status
    from topics.config import load_config

    config = load_config(args.config)
    return print_status(config, as_json=args.json, watch_s=None if args.once else args.interval)


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

    s = sub.add_parser("send", help="publish one request and stream its reply to stdout")
    s.add_argument("--config", required=True)
    s.add_argument("--model", default="auto")
    s.add_argument("--tenant", default="default")
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--no-stream", action="store_true", help="ask for one completion")
    s.add_argument("--api-key-env", help="env var holding the tenant key (authorization header)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    s.add_argument("prompt")
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
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
