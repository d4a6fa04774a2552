"""Command line: parse arguments, load config, call one flow, render its report, map errors to exit codes."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

from hostagent import __version__
from hostagent.errors import EXIT_USAGE, HostagentError, InternalError, host_error

# command -> (module:function, help). Flow modules are imported only for the command that runs,
# so `hostagent --help` and `verify-mount` never pay for boto3 or requests.
COMMANDS = {
    "bootstrap": ("hostagent.flows.bootstrap:run", "find, attach, format-if-blank, fstab, mount and lay out the volume"),
    "verify-mount": ("hostagent.flows.verify:run", "check that the volume is mounted and laid out as configured"),
    "devices": ("hostagent.flows.devices:run", "list block devices with serial, EBS volume id, fs, UUID, mount point"),
    "snapshot": ("hostagent.flows.snapshot:run_snapshot", "take a consistent EBS snapshot of the volume, then prune"),
    "snapshots": ("hostagent.flows.snapshot:run_list", "list this volume's hostagent snapshots, newest first"),
    "prune": ("hostagent.flows.snapshot:run_prune", "apply snapshot retention"),
    "restore": ("hostagent.flows.restore:run", "create a new persistence volume from a snapshot (old one kept)"),
    "fetch-secrets": ("hostagent.flows.secrets:run", "download [secrets] source from S3 to dest, mode 0600"),
    "wait-couchdb": ("hostagent.flows.couchdb:run_wait", "wait until CouchDB answers /_up with status ok"),
    "check-couchdb": ("hostagent.flows.couchdb:run_check", "report CouchDB readiness and security posture"),
    "agent": ("hostagent.flows.agent:run", "the long-running agent (systemd Type=notify)"),
    "ecs-task-volumes": ("hostagent.flows.ecs_task_volumes:run", "print the ECS task-definition volumes + mountPoints JSON"),
}

log = logging.getLogger("hostagent")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one `hostagent: error:` line and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageErrorExit(message)


class UsageErrorExit(Exception):
    pass


@dataclass
class Context:
    """What every flow gets: the parsed options and the config, loaded on first use."""

    config_path: str
    json: bool = False
    verbose: int = 0
    _config: object = field(default=None, repr=False)

    @property
    def config(self):
        if self._config is None:
            from hostagent.config import load_config

            self._config = load_config(self.config_path)
        return self._config


def build_parser() -> ArgumentParser:
    common = ArgumentParser(add_help=False)
    # SUPPRESS lets the options stand before or after the command without one overriding the other.
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $HOSTAGENT_CONFIG or /etc/hostagent/hostagent.toml)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON object on stdout")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log what is done (repeat for more)")

    parser = ArgumentParser(prog="hostagent", parents=[common],
                            description="Make this host ready to run CouchDB under ECS on a "
                                        "persistent EBS volume.")
    parser.add_argument("--version", action="version", version=f"hostagent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    cmds = {}
    for name, (_, help_text) in COMMANDS.items():
        cmds[name] = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
    for name in ("bootstrap", "snapshot", "prune", "restore"):
        cmds[name].add_argument("--dry-run", action="store_true",
                                help="print the plan and change nothing")
    cmds["snapshot"].add_argument("--wait", action="store_true",
                                  help="wait until the snapshot completes, showing progress")
    cmds["snapshot"].add_argument("--no-prune", action="store_true",
                                  help="do not apply retention afterwards")
    cmds["restore"].add_argument("snapshot_id", metavar="SNAPSHOT_ID", help="snap-…")
    cmds["wait-couchdb"].add_argument("--timeout", type=float, metavar="S", default=None,
                                      help="seconds to wait (default: couchdb.timeout)")
    cmds["check-couchdb"].add_argument("--timeout", type=float, metavar="S", default=None,
                                       help="seconds to wait for readiness (default: 0, look once)")
    cmds["agent"].add_argument("--once", action="store_true",
                               help="run the checks and report once, then exit")
    return parser


def setup_logging(verbose: int, *, for_agent: bool = False) -> None:
    level = logging.DEBUG if verbose >= 2 else logging.INFO if (verbose or for_agent) else logging.WARNING
    # Under systemd (JOURNAL_STREAM set) journald adds the time and unit name itself.
    fmt = "%(message)s" if os.environ.get("JOURNAL_STREAM") else "hostagent: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_error(exc: HostagentError, *, as_json: bool) -> None:
    print(f"hostagent: error: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    if as_json:
        print(json.dumps({"ok": False, "error": str(exc), "exit_code": exc.exit_code}))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageErrorExit as exc:
        print(f"hostagent: error: {exc}", file=sys.stderr)
        print("hint: see `hostagent --help`", file=sys.stderr)
        if want_json:
            print(json.dumps({"ok": False, "error": str(exc), "exit_code": EXIT_USAGE}))
        return EXIT_USAGE
    if not args.command:
        build_parser().print_help(sys.stderr)
        return EXIT_USAGE

    from hostagent.config import config_path

    as_json = getattr(args, "json", False)
    ctx = Context(config_path=config_path(getattr(args, "config", None)), json=as_json,
                  verbose=getattr(args, "verbose", 0) or 0)
    setup_logging(ctx.verbose, for_agent=args.command == "agent")
    target, _ = COMMANDS[args.command]
    module_name, func_name = target.split(":")
    try:
        flow = getattr(importlib.import_module(module_name), func_name)
        report = flow(ctx, args)
        rendered = json.dumps(report.to_json(), indent=2, default=str) if as_json else report.text
    except HostagentError as exc:
        print_error(exc, as_json=as_json)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hostagent: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one line, never a traceback unless -vv
        if ctx.verbose >= 2:
            log.exception("traceback of the error below:")
        # An OSError that got this far (EROFS, ENOSPC, EPERM…) is the host failing, not a bug.
        error = host_error(exc) if isinstance(exc, OSError) else InternalError.from_exception(exc)
        print_error(error, as_json=as_json)
        return error.exit_code
    if rendered:
        print(rendered)
    return report.code
