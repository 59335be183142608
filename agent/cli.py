"""``python -m agent run --config agent.toml`` (also ``electorate-agent``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from agent.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="electorate-agent", description="Electorate agent")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="take part in the configured elections")
    run.add_argument("--config", required=True, help="path to the agent TOML file")
    run.add_argument("--log-level", default="INFO")
    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", required=True)
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"electorate-agent: bad config: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"{args.config}: ok, {len(config.elections)} election(s)")
        return 0

    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {config.id} %(levelname)s %(name)s: %(message)s",
    )
    from agent.service import Agent

    async def serve() -> None:
        agent = Agent(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.start()
        await stop.wait()
        logging.getLogger("agent").info("stopping: resigning every election")
        await agent.stop()

    asyncio.run(serve())
    return 0
