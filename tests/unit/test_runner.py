"""The one command runner, against real programs: exit codes, output, timeouts, missing tools."""

import logging
import os
import sys
import time

import pytest

from hostagent.errors import CommandError, OperationError
from hostagent.runner import run, which


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


def test_timeout_kills_what_the_command_started_too(tmp_path):
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandError, match="timed out"):
        run(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], timeout=0.3)
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while _is_running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _is_running(grandchild)


def test_timeout_covers_a_command_that_closed_its_output():
    start = time.monotonic()
    with pytest.raises(CommandError, match="timed out"):
        run(["sh", "-c", "exec >&- 2>&-; sleep 10"], timeout=0.3)
    assert time.monotonic() - start < 2


def test_output_before_a_timeout_is_kept():
    with pytest.raises(CommandError) as exc:
        run(["sh", "-c", "echo started >&2; sleep 10"], timeout=0.3)
    assert exc.value.timed_out and exc.value.stderr == "started\n"


def test_input_is_passed_on_stdin():
    assert run(["cat"], input="hello").stdout == "hello"
    assert run(["cat"], input=b"\x00bytes").stdout == "\x00bytes"


def test_large_input_and_output_do_not_deadlock():
    data = "x" * (4 << 20)
    done = run(["sh", "-c", "cat; cat /dev/null >&2"], input=data)
    assert len(done.stdout) == len(data)


def test_input_the_command_does_not_read_is_no_error():
    assert run(["true"], input="y" * (1 << 20)).returncode == 0


def test_stdin_is_never_inherited():
    # With no input, stdin is /dev/null: a command that reads it gets EOF at once, even when
    # hostagent itself runs on a terminal.
    assert run(["sh", "-c", "cat; test -t 0 || echo not-a-tty"], timeout=5).stdout == "not-a-tty\n"


def test_undecodable_output_is_replaced():
    assert run(["printf", "\\377ok"]).stdout == "\ufffdok"


def test_sigpipe_is_default_in_the_child():
    # Python ignores SIGPIPE; a child must not inherit that (`yes | head` would never end).
    assert run(["sh", "-c", "yes | head -c 3"], timeout=5).stdout == "y\ny"


def test_a_command_that_cannot_be_executed_is_a_clear_error(tmp_path):
    script = tmp_path / "no-shebang"
    script.write_text("echo hi\n")
    script.chmod(0o755)
    with pytest.raises(OperationError, match="cannot run .*no-shebang"):
        run([str(script)])


def test_which_looks_in_sbin_dirs_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert which("sh") in ("/usr/bin/sh", "/bin/sh")
    tool = tmp_path / "mytool"
    tool.write_text("#!/bin/sh\necho mine\n")
    tool.chmod(0o755)
    assert which("mytool") == str(tool)
    assert run(["mytool"]).stdout == "mine\n"
    (tmp_path / "notexec").write_text("")
    assert which("notexec") is None and which(str(tmp_path)) is None


def test_each_command_and_its_duration_are_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="hostagent.runner"):
        run(["true"])
    assert "run: true" in caplog.messages[0]
    assert caplog.messages[1].startswith("ran true in ") and caplog.messages[1].endswith("(exit 0)")


def test_descriptors_we_inherited_are_not_passed_on():
    inherited = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    try:
        assert run(["sh", "-c", f"test -e /proc/self/fd/{inherited} && echo leaked || echo closed"]).stdout == "closed\n"
    finally:
        os.close(inherited)


def test_no_file_descriptor_is_left_open():
    before = set(os.listdir("/proc/self/fd"))
    run(["sh", "-c", "echo out; echo err >&2"], input="x")
    with pytest.raises(CommandError):
        run(["sleep", "5"], timeout=0.1)
    assert set(os.listdir("/proc/self/fd")) == before


def test_the_runner_imports_neither_sh_nor_subprocess_nor_logging():
    code = ("import sys, hostagent.runner as r; r.run(['true']); "
            "print(sorted({'sh', 'subprocess', 'shutil', 'logging'} & set(sys.modules)))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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


def test_without_pidfd_it_still_waits_and_times_out(monkeypatch):
    # Kernels before 5.3 (or a seccomp filter) have no pidfd_open: it polls with sleeps instead.
    def no_pidfd(pid):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    assert run(["sh", "-c", "exec >&- 2>&-; sleep 0.2; exit 4"], ok_codes=(4,)).returncode == 4
    start = time.monotonic()
    with pytest.raises(CommandError, match="timed out"):
        run(["sh", "-c", "exec >&- 2>&-; sleep 10"], timeout=0.3)
    assert time.monotonic() - start < 2


def test_a_command_dies_with_hostagent_when_its_process_group_is_killed(tmp_path):
    """kill -- -PGID (or a terminal's Ctrl-C, or a unit's KillMode=process-group) must not leave
    a mkfs or e2fsck running on, unlocked, after hostagent is gone."""
    import os
    import signal
    import subprocess
    import sys

    pidfile = tmp_path / "pid"
    script = ("import sys; from hostagent.runner import run; "
              f"run(['sh', '-c', 'echo $$ > {pidfile}; exec sleep 30'], timeout=60)")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)
    child = int(pidfile.read_text())
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 2
    while _is_running(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _is_running(child)
