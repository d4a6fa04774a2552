"""The CLI contract: usage errors are one line with exit 2; config errors name file and key."""

import json
import sys

from hostagent.cli import main


def test_unknown_command_is_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hostagent: error: ")
    assert "Traceback" not in err


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_missing_config_file_is_exit_2_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    assert main(["--config", str(missing), "verify-mount"]) == 2
    err = capsys.readouterr().err
    assert f"config file not found ({missing})" in err.splitlines()[0]


def test_json_error_object_on_stdout(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[volume]\ndevice = '/dev/loop9'\nbogus = 1\n")
    assert main(["verify-mount", "--json", "--config", str(bad)]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and "volume.bogus" in out["error"]


def test_options_after_the_command_work(tmp_path, capsys):
    assert main(["verify-mount", "--config", str(tmp_path / "x.toml")]) == 2
    assert "x.toml" in capsys.readouterr().err


def test_version(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "hostagent" in capsys.readouterr().out


import errno
import logging

import pytest

from hostagent import cli


@pytest.fixture
def flow(monkeypatch, tmp_path):
    """Point `verify-mount` at a stand-in flow that raises what the test gives it."""
    def install(exc):
        def run(ctx, args):
            raise exc

        module = type(sys)("stand_in_flow")
        module.run = run
        monkeypatch.setitem(sys.modules, "stand_in_flow", module)
        monkeypatch.setitem(cli.COMMANDS, "verify-mount", ("stand_in_flow:run", "stand-in"))
    # -vv configures the root logger; leave it as found for the tests after this one.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield install
    root.handlers[:], root.level = handlers, level


def test_an_unexpected_exception_is_one_line_and_exit_70(flow, capsys):
    flow(KeyError("etc"))
    assert main(["verify-mount"]) == 70
    err = capsys.readouterr().err.splitlines()
    assert err == ["hostagent: error: unexpected KeyError: 'etc'",
                   "hint: this is a bug in hostagent; rerun with -vv for the traceback"]


def test_with_vv_the_traceback_is_logged_too(flow, capsys, caplog):
    flow(ZeroDivisionError("division by zero"))
    assert main(["verify-mount", "-vv"]) == 70
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [ZeroDivisionError]
    err = capsys.readouterr().err.splitlines()
    assert err[-2] == "hostagent: error: unexpected ZeroDivisionError: division by zero"
    caplog.clear()
    assert main(["verify-mount", "-v"]) == 70
    assert not [r for r in caplog.records if r.exc_info]


STAND_IN = """
import sys
from hostagent import cli
def run(ctx, args):
    raise ZeroDivisionError("division by zero")
sys.modules["stand_in_flow"] = sys.modules[__name__]
cli.COMMANDS["verify-mount"] = ("stand_in_flow:run", "stand-in")
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verbose, traceback", [([], False), (["-vv"], True)])
def test_the_traceback_reaches_stderr_only_with_vv(verbose, traceback):
    import subprocess

    proc = subprocess.run([sys.executable, "-c", STAND_IN, "verify-mount", *verbose],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 70 and proc.stdout == ""
    assert ("Traceback (most recent call last)" in proc.stderr) is traceback
    assert proc.stderr.splitlines()[-2:] == [
        "hostagent: error: unexpected ZeroDivisionError: division by zero",
        "hint: this is a bug in hostagent; rerun with -vv for the traceback"]


def test_an_unexpected_exception_with_json(flow, capsys):
    flow(RuntimeError("boom\nsecond line from http://admin:s3cret@localhost:5984/_up"))
    assert main(["verify-mount", "--json"]) == 70
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out == {"ok": False, "exit_code": 70,
                   "error": "unexpected RuntimeError: boom second line from "
                            "http://***@localhost:5984/_up"}
    assert "s3cret" not in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("exc, line", [
    (OSError(errno.EROFS, "Read-only file system", "/opt/couchdb/data"),
     "hostagent: error: Read-only file system (/opt/couchdb/data)"),
    (OSError(errno.ENOSPC, "No space left on device", "/etc/fstab.hostagent-tmp"),
     "hostagent: error: No space left on device (/etc/fstab.hostagent-tmp)"),
    (PermissionError(errno.EPERM, "Operation not permitted", "/opt/couchdb"),
     "hostagent: error: Operation not permitted (/opt/couchdb)"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"),
     "hostagent: error: Invalid cross-device link (/a -> /b)"),
    (OSError(errno.EIO, "Input/output error"), "hostagent: error: Input/output error"),
    (OSError(errno.ENOENT, "No such file or directory", "/opt/x\ny"),
     "hostagent: error: No such file or directory (/opt/x\\ny)"),
])
def test_an_escaped_os_error_is_a_host_failure_exit_1(flow, capsys, exc, line):
    flow(exc)
    assert main(["verify-mount", "--json"]) == 1
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == line and len(err) <= 2
    if exc.errno in (errno.EROFS, errno.ENOSPC, errno.EPERM):
        assert err[1].startswith("hint: ")
    out = json.loads(captured.out)
    assert out["ok"] is False and out["exit_code"] == 1 and out["error"] == line.split(": ", 2)[2]


# --- the argparse-free fast path gives exactly argparse's answer ----------------------------

FAST_CASES = [
    ["bootstrap"], ["bootstrap", "--dry-run"], ["bootstrap", "--dry-run", "--json"],
    ["--json", "bootstrap"], ["--config", "/etc/x.toml", "bootstrap", "-v"],
    ["bootstrap", "--config=/etc/x.toml", "-vv"], ["-v", "bootstrap", "--verbose", "-v"],
    ["verify-mount"], ["verify-mount", "--json"], ["devices", "--json", "--config", "/c"],
    ["snapshot", "--wait", "--no-prune"], ["snapshot", "--dry-run"], ["prune", "--dry-run"],
    ["agent", "--once", "-v"], ["snapshots"], ["fetch-secrets"], ["ecs-task-volumes"],
    ["--config", "/a", "--config", "/b", "bootstrap"], ["-vv", "bootstrap", "-v"],
    ["-vv", "bootstrap"], ["bootstrap", "-v", "-v"], ["fetch-secrets", "--if-configured"],
    ["--json", "fetch-secrets", "--if-configured", "-v"],
]
ARGPARSE_ONLY = [
    [], ["--help"], ["bootstrap", "--help"], ["--version"], ["bootstrap", "--bogus"],
    ["verify-mount", "--dry-run"], ["--dry-run", "bootstrap"], ["bootstrap", "extra"],
    ["restore", "snap-0123456789abcdef0"], ["wait-couchdb", "--timeout", "5"],
    ["check-couchdb"], ["bootstrap", "--config"], ["bootstrap", "bootstrap"], ["-x", "devices"],
    ["bootstrap", "--config", "--dry-run"], ["bootstrap", "--if-configured"],
    ["--if-configured", "fetch-secrets"],
]


@pytest.mark.parametrize("argv", FAST_CASES, ids=" ".join)
def test_fast_parse_matches_argparse(argv):
    from hostagent.cli import build_parser, fast_parse

    fast = fast_parse(argv)
    assert fast is not None
    assert vars(fast) == vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", ARGPARSE_ONLY, ids=lambda a: " ".join(a) or "(none)")
def test_everything_else_goes_to_argparse(argv):
    from hostagent.cli import fast_parse

    assert fast_parse(argv) is None


# --- fetch-secrets --if-configured: what hostagent-secrets.service runs at every boot ---------

def test_fetch_secrets_without_a_source_is_exit_2_and_with_if_configured_a_no_op(tmp_path, capsys):
    config = tmp_path / "hostagent.toml"
    dest = tmp_path / "secrets" / "secrets.env"
    config.write_text(f"[volume]\ndevice = '/dev/loop9'\n[secrets]\ndest = '{dest}'\n"
                      f"[host]\nlock_file = '{tmp_path / 'lock'}'\n")
    # The contract for a person is unchanged: nothing to fetch is a config error.
    assert main(["--config", str(config), "fetch-secrets"]) == 2
    assert "secrets.source is not set" in capsys.readouterr().err
    # The boot unit's flag: nothing configured is nothing to do, and nothing is touched.
    assert main(["--config", str(config), "fetch-secrets", "--if-configured"]) == 0
    assert "not configured" in capsys.readouterr().out
    assert main(["--config", str(config), "fetch-secrets", "--if-configured", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"ok": True, "secrets": [{"source": "", "dest": str(dest),
                                            "status": "not configured"}]}
    assert not dest.parent.exists() and not (tmp_path / "lock").exists()


def test_fetch_secrets_if_configured_still_fails_on_a_bad_config(tmp_path, capsys):
    """A broken config is exit 2 with the flag too: the unit fails visibly, never skips."""
    config = tmp_path / "hostagent.toml"
    config.write_text("[volume]\ndevice = '/dev/loop9'\n[secrets]\nsource = 'http://x/y'\n")
    assert main(["--config", str(config), "fetch-secrets", "--if-configured"]) == 2
    assert "secrets.source" in capsys.readouterr().err
