"""The CLI contract: usage errors are one line with exit 2; config errors name file and key."""

import json

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
