"""The one command runner, against real programs: exit codes, output, timeouts, missing tools."""

import time

import pytest

from hostagent.errors import CommandError, OperationError
from hostagent.runner import run


def test_output_and_ok_codes():
    done = run(["sh", "-c", "echo out; echo err >&2; exit 2"], ok_codes=(0, 2))
    assert (done.returncode, done.stdout, done.stderr) == (2, "out\n", "err\n")


def test_failure_carries_argv_exit_code_and_stderr():
    with pytest.raises(CommandError) as exc:
        run(["sh", "-c", "echo first >&2; echo last words >&2; exit 3"])
    err = exc.value
    assert err.returncode == 3 and err.argv[0] == "sh" and "last words" in err.stderr
    assert str(err).endswith("exited 3: last words")


def test_timeout_kills_the_command_promptly():
    start = time.monotonic()
    with pytest.raises(CommandError, match="timed out") as exc:
        run(["sleep", "10"], timeout=0.3)
    assert exc.value.timed_out and time.monotonic() - start < 2


def test_killed_by_a_signal_is_said_so():
    with pytest.raises(CommandError, match="killed by signal 9"):
        run(["sh", "-c", "kill -9 $$"])


def test_input_is_passed_on_stdin():
    assert run(["cat"], input="hello").stdout == "hello"


def test_missing_program_is_a_clear_error():
    with pytest.raises(OperationError, match="required program 'no-such-tool-here' not found"):
        run(["no-such-tool-here"])


def test_arguments_are_never_interpreted_by_a_shell(tmp_path):
    target = tmp_path / "x; touch pwned"
    run(["touch", str(target)])
    assert target.exists() and not (tmp_path / "pwned").exists()


def test_lock_and_state_errors_are_one_line_operator_errors(tmp_path):
    from hostagent import state
    from hostagent.lock import host_lock

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OperationError, match="cannot open the lock file"):
        with host_lock(str(blocker / "sub" / "lock")):
            pass
    with pytest.raises(OperationError, match="cannot create the state directory"):
        state.write_record(str(blocker / "state"), "x.json", {})
