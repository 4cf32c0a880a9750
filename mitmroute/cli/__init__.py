"""The `mitmroute` command: one entry point for the proxy and the tools around it.

    mitmroute run [--config C] [mitmdump args]    the proxy
    mitmroute ca [--out F]                        the CA bundle apps trust
    mitmroute env [--proxy URL] [--shell sh]      the environment an app needs: eval it
    mitmroute spend [--config C] ...              the spend log, as a table or with SQL
    mitmroute keys [--config C] ...               virtual keys, without a running proxy
    mitmroute doctor [--config C]                 check the set-up, each deployment included

Every command finds its config the same way (--config, $MITMROUTE_CONFIG, ./config.yaml,
config.example.yaml) and says on stderr which it used. Errors are one line and exit non-zero
(MITMROUTE_DEBUG=1 adds the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mitmroute.cli import ca, doctor, env, keys, run, spend
from mitmroute.cli.errors import CliError
from mitmroute.config import ConfigError

COMMANDS = (run, ca, env, spend, keys, doctor)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mitmroute",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(commands)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="mitmroute: %(message)s")
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.run(args)
    except CliError as e:
        return _fail(args.command, str(e), e.code)
    except ConfigError as e:
        return _fail(args.command, f"config: {e}", 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mitmroute spend | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if os.environ.get("MITMROUTE_DEBUG"):
            raise
        return _fail(args.command, f"{type(e).__name__}: {e} (MITMROUTE_DEBUG=1 shows where)", 1)


def _fail(command: str, message: str, code: int) -> int:
    one_line = " ".join(message.split())
    print(f"mitmroute {command}: {one_line}", file=sys.stderr)
    return code
