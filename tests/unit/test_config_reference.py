"""hostagent/config.py is the one source of the config keys: docs/configuration.md is generated
from it, every key has a meaning, and packaging/hostagent.toml.example lists every key with
exactly its default and nothing else."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

from hostagent import config_reference
from hostagent.config import KEY_DOCS, SECTION_CLASSES, Config

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "configuration.md"
EXAMPLE = REPO / "packaging" / "hostagent.toml.example"


def test_docs_configuration_md_is_the_generators_output():
    assert REFERENCE.read_text(encoding="utf-8") == config_reference.render(), (
        "docs/configuration.md is stale: run "
        f"`{config_reference.GENERATOR}` and commit the result")


def test_generator_runs_as_a_module_and_prints_the_reference():
    done = subprocess.run([sys.executable, "-m", "hostagent.config_reference"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == config_reference.render()


def test_every_key_has_a_meaning():
    assert config_reference.missing_meanings() == [], (
        "add these keys' meanings to KEY_DOCS in hostagent/config.py")


def test_every_meaning_is_of_a_key():
    stale = sorted(set(KEY_DOCS) - set(config_reference.config_keys()))
    assert stale == [], f"KEY_DOCS in hostagent/config.py describes keys config.py lacks: {stale}"


def test_every_section_has_a_line_of_its_own():
    assert set(config_reference.SECTION_DOCS) == set(SECTION_CLASSES)


def test_the_reference_shows_each_key_with_its_toml_default():
    text = config_reference.render()
    for name, cls in SECTION_CLASSES.items():
        assert f"## [{name}]" in text
        for key in cls._fields:
            default = config_reference.toml_value(getattr(cls(), key)).replace("|", "\\|")
            assert f"| `{key}` |" in text and f"`{default}`" in text, (name, key)


def test_toml_value_round_trips_through_tomllib():
    for value in ("", "a \"quoted\" \\ path", 0, 300, True, False, ("data", "etc/local.d"),
                  {}, {"Name": "grand-central-persistence", "with space": "x"}):
        parsed = tomllib.loads(f"v = {config_reference.toml_value(value)}")["v"]
        expected = list(value) if isinstance(value, tuple) else value
        assert parsed == expected, value


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def test_example_lists_every_key_with_exactly_its_default():
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    defaults = Config()
    assert list(example) == list(SECTION_CLASSES), (
        "packaging/hostagent.toml.example must have every section of config.py, in its order")
    problems = []
    for name, cls in SECTION_CLASSES.items():
        section, default = example.get(name, {}), getattr(defaults, name)
        for key in cls._fields:
            if key not in section:
                problems.append(f"{name}.{key} is missing (default {_plain(getattr(default, key))!r})")
            elif section[key] != _plain(getattr(default, key)) \
                    or type(section[key]) is not type(_plain(getattr(default, key))):
                problems.append(f"{name}.{key} = {section[key]!r}, but the default is "
                                f"{_plain(getattr(default, key))!r}")
        problems += [f"{name}.{key} is not a key of config.py" for key in section
                     if key not in cls._fields]
    assert problems == [], ("packaging/hostagent.toml.example says it lists every key with its "
                            "default; it does not:\n  " + "\n  ".join(problems))


def test_readme_config_sample_is_a_valid_config():
    import re

    from hostagent.config import parse_config

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    samples = re.findall(r"^```toml\n(.*?)^```", readme, flags=re.M | re.S)
    assert samples, "README.md shows a short config sample"
    for sample in samples:
        parse_config(tomllib.loads(sample), source="README.md")
