"""Command line: parse arguments, load config, call one flow, render its report, map errors to exit codes."""

from __future__ import annotations

import importlib
import os
import sys
from types import SimpleNamespace
from typing import Sequence

from hostagent import __version__
from hostagent.errors import EXIT_USAGE, HostagentError, InternalError, host_error
from hostagent.log import get_logger

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
    "grow": ("hostagent.flows.grow:run", "snapshot, grow the EBS volume (ModifyVolume) and its ext4 online; never shrinks"),
    "fetch-secrets": ("hostagent.flows.secrets:run", "download [secrets] source from S3 to dest, mode 0600"),
    "wait-couchdb": ("hostagent.flows.couchdb:run_wait", "wait until CouchDB answers /_up with status ok"),
    "check-couchdb": ("hostagent.flows.couchdb:run_check", "report CouchDB readiness and security posture"),
    "agent": ("hostagent.flows.agent:run", "the long-running agent (systemd Type=notify): reports to ECS, claims the volume while it is not mounted"),
    "ecs-task-volumes": ("hostagent.flows.ecs_task_volumes:run", "print the ECS task-definition volumes + mountPoints JSON"),
}

log = get_logger("hostagent")


# The flags each command takes besides the common ones (store_true; all default to False).
FLAGS = {
    "bootstrap": ("--dry-run",), "snapshot": ("--dry-run", "--wait", "--no-prune"),
    "prune": ("--dry-run",), "agent": ("--once",), "fetch-secrets": ("--if-configured",),
}


class UsageErrorExit(Exception):
    pass


def _argparse():
    """argparse, imported on demand (it costs ~10 ms with the shutil and gettext it pulls in),
    with a parser class that reports bad usage as one `hostagent: error:` line and exit 2."""
    import argparse

    class ArgumentParser(argparse.ArgumentParser):
        def error(self, message):  # noqa: D401 - argparse API
            raise UsageErrorExit(message)

    return argparse, ArgumentParser


def fast_parse(argv: Sequence[str]) -> SimpleNamespace | None:
    """The common command lines (`bootstrap --dry-run --json`, `verify-mount -v`…) parsed
    without argparse, giving exactly the namespace argparse would; None for anything else
    (--help, a value argparse must convert, a mistake), which argparse then handles."""
    found: dict = {}
    command = None
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--config" and words and not words[0].startswith("-"):
            found["config"] = words.pop(0)
        elif word.startswith("--config=") and len(word) > len("--config="):
            found["config"] = word[len("--config="):]
        elif word == "--json":
            found["json"] = True
        elif word == "--verbose" or (word.startswith("-v") and set(word[1:]) == {"v"}):
            # argparse counts -v before and after the command apart; the later count wins.
            side = "verbose_after" if command else "verbose_before"
            found[side] = found.get(side, 0) + (1 if word == "--verbose" else len(word) - 1)
        elif command is None and word in COMMANDS and not word.startswith("-"):
            command = word
        elif command is not None and word in FLAGS.get(command, ()):
            found[word[2:].replace("-", "_")] = True
        else:
            return None
    if command is None or command in ("restore", "grow", "wait-couchdb", "check-couchdb"):
        return None  # positional or typed arguments: argparse's to check
    verbose = found.pop("verbose_after", None) or found.pop("verbose_before", None)
    found.pop("verbose_before", None)
    if verbose:
        found["verbose"] = verbose
    flags = {flag[2:].replace("-", "_"): False for flag in FLAGS.get(command, ())}
    return SimpleNamespace(command=command, **{**flags, **found})


class Context:
    """What every flow gets: the parsed options and the config, loaded on first use."""

    def __init__(self, config_path: str, json: bool = False, verbose: int = 0):
        self.config_path = config_path
        self.json = json
        self.verbose = verbose
        self._config = None

    @property
    def config(self):
        if self._config is None:
            from hostagent.config import load_config

            self._config = load_config(self.config_path)
        return self._config


def _command_options(name: str, cmd) -> None:
    if name in ("bootstrap", "snapshot", "prune", "restore", "grow"):
        cmd.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    if name == "snapshot":
        cmd.add_argument("--wait", action="store_true",
                         help="wait until the snapshot completes, showing progress")
        cmd.add_argument("--no-prune", action="store_true",
                         help="do not apply retention afterwards")
    elif name == "restore":
        cmd.add_argument("snapshot_id", metavar="SNAPSHOT_ID", help="snap-…")
        cmd.add_argument("--apply", action="store_true",
                         help="also swap it in: unmount, detach our old volume, attach and mount "
                              "the restored one, verify (refuses while files are open on it)")
    elif name == "grow":
        cmd.add_argument("--size", type=int, metavar="GIB", required=True,
                         help="the new size of the volume in GiB (more than it is now)")
        cmd.add_argument("--no-snapshot", action="store_true",
                         help="do not snapshot the volume first")
    elif name == "wait-couchdb":
        cmd.add_argument("--timeout", type=float, metavar="S", default=None,
                         help="seconds to wait (default: couchdb.timeout)")
    elif name == "check-couchdb":
        cmd.add_argument("--timeout", type=float, metavar="S", default=None,
                         help="seconds to wait for readiness (default: 0, look once)")
    elif name == "fetch-secrets":
        cmd.add_argument("--if-configured", action="store_true",
                         help="with no [secrets] source, do nothing and exit 0 (for the boot "
                              "unit) instead of failing with exit 2")
    elif name == "agent":
        cmd.add_argument("--once", action="store_true",
                         help="run the checks and report once, then exit; only reports: it "
                              "never runs bootstrap to claim the volume (the service does)")


def build_parser(only: str | None = None):
    """The full parser, or (only=NAME) one with just that command: building all thirteen
    subparsers costs ~5 ms, a fifth of what a reboot-path bootstrap may spend."""
    argparse, ArgumentParser = _argparse()
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
    for name, (_, help_text) in COMMANDS.items():
        if only is None or name == only:
            _command_options(name, sub.add_parser(name, parents=[common], help=help_text,
                                                  description=help_text))
    return parser


def command_in(argv: Sequence[str]) -> str | None:
    """The command named in argv (the first word that is one, skipping --config's value), or
    None when the full parser must decide (no command, --help/--version before it)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--config":
            skip = True
        elif word in ("-h", "--help", "--version"):
            return None
        elif word in COMMANDS:
            return word
        elif not word.startswith("-"):
            return None
    return None


def setup_logging(verbose: int, *, for_agent: bool = False) -> None:
    """stdlib logging to stderr (journald under systemd) at the level -v asks for. At the
    default level `logging` is imported only when a warning is actually logged."""
    from hostagent import log as lazy

    level = lazy.DEBUG if verbose >= 2 else lazy.INFO if (verbose or for_agent) else lazy.WARNING

    def configure() -> None:
        import logging

        # Under systemd (JOURNAL_STREAM set) journald adds the time and unit name itself.
        fmt = "%(message)s" if os.environ.get("JOURNAL_STREAM") else "hostagent: %(message)s"
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
        for noisy in ("botocore", "boto3", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

    if level < lazy.WARNING:
        lazy.set_level(level)
        configure()
    else:
        lazy.set_level(level, configure)


def print_error(exc: HostagentError, *, as_json: bool) -> None:
    print(f"hostagent: error: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    if as_json:
        import json

        answer = {"ok": False, "error": str(exc), "exit_code": exc.exit_code}
        if getattr(exc, "reason", None):
            answer["reason"] = exc.reason
        # What a flow had done before it failed (grow: its steps), for machines too.
        answer.update({k: v for k, v in (getattr(exc, "json_extra", None) or {}).items()
                       if k not in answer})
        print(json.dumps(answer, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    try:
        args = fast_parse(argv) or build_parser(only=command_in(argv)).parse_args(argv)
    except UsageErrorExit as exc:
        print(f"hostagent: error: {exc}", file=sys.stderr)
        print("hint: see `hostagent --help`", file=sys.stderr)
        if want_json:
            import json

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
        if as_json:
            import json

            rendered = json.dumps(report.to_json(), indent=2, default=str)
        else:
            rendered = report.text
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
