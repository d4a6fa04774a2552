"""cloud-init's own code and unit files, for validating our user-data and units on the host
without installing the cloud-init package (its maintainer scripts would enable cloud-init's
services here). The Debian package is downloaded and unpacked under <repo>/.cache/cloud-init/,
and its Python dependencies go into a venv next to it."""

from __future__ import annotations

import glob
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.hosttools import need_tool
from tests.system.vm.image import cache_lock

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "cloud-init"
USER_DATA = REPO / "cloud-init" / "user-data.yaml"
# What cloudinit.cmd.main's `schema` command imports (Debian's Depends minus the ones it does not
# need for schema: netifaces, serial).
PYTHON_DEPS = ("pyyaml", "jsonschema", "jinja2", "configobj", "requests", "oauthlib", "jsonpatch")
# Values a deployment would fill in; any value works for validation.
EXAMPLE_VALUES = {"ECS_CLUSTER": "grand-central-test"}


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)


def cloud_init_tree() -> Path:
    """The unpacked cloud-init .deb (the version this host's apt offers, bookworm: 22.4)."""
    need_tool("apt-get", "apt")
    need_tool("dpkg-deb", "dpkg")
    with cache_lock(CACHE):
        done = sorted(glob.glob(str(CACHE / "tree-*" / "complete")))
        if done:
            return Path(done[-1]).parent
        debs = CACHE / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        got = _run(["apt-get", "download", "cloud-init"], cwd=debs)
        if got.returncode != 0:  # a machine whose package lists were never fetched
            _run(["apt-get", "update", "-qq"])
            got = _run(["apt-get", "download", "cloud-init"], cwd=debs)
        if got.returncode != 0:
            pytest.fail(f"apt-get download cloud-init failed: {got.stderr.strip()}")
        deb = sorted(debs.glob("cloud-init_*.deb"))[-1]
        version = _run(["dpkg-deb", "-f", deb, "Version"]).stdout.strip()
        tree = CACHE / f"tree-{re.sub(r'[^A-Za-z0-9.+-]', '_', version)}"
        extracted = _run(["dpkg-deb", "-x", deb, tree])
        if extracted.returncode != 0:
            pytest.fail(f"dpkg-deb -x {deb} failed: {extracted.stderr.strip()}")
        (tree / "complete").write_text(version + "\n")
        return tree


def cloud_init_python() -> Path:
    """A venv with the Python libraries cloud-init's schema command imports."""
    venv = CACHE / "venv"
    python = venv / "bin" / "python"
    with cache_lock(CACHE):
        if not (venv / "complete").exists():
            made = _run([sys.executable, "-m", "venv", "--clear", venv])
            if made.returncode != 0:
                pytest.fail(f"python -m venv failed: {made.stderr.strip()}")
            # The machine's own pip configuration chooses the index; PIP_* from the caller too.
            pip = _run([python, "-m", "pip", "install", "-q", *PYTHON_DEPS])
            if pip.returncode != 0:
                pytest.fail(f"pip install {' '.join(PYTHON_DEPS)} failed: {pip.stderr[-2000:]}")
            (venv / "complete").write_text("ok\n")
    return python


def cloud_init(*args: str) -> subprocess.CompletedProcess:
    """Run cloud-init's command line (`python -m cloudinit.cmd.main ARGS`) from the unpacked deb."""
    tree = cloud_init_tree()
    env = dict(os.environ, PYTHONPATH=str(tree / "usr/lib/python3/dist-packages"))
    return _run([cloud_init_python(), "-m", "cloudinit.cmd.main", *args], env=env, timeout=120)


def top_level_schema_keys() -> set[str]:
    """Every top-level key some cloud-init module accepts (the schema itself allows unknown
    top-level keys, so a misspelt `write_file:` would otherwise pass as valid)."""
    code = ("import json; from cloudinit.config.schema import get_schema; s = get_schema(); "
            "keys = set();\n"
            "for ref in s['allOf']:\n"
            "    d = s['$defs'][ref['$ref'].rsplit('/', 1)[1]]\n"
            "    keys.update(d.get('properties', {}))\n"
            "print(json.dumps(sorted(keys)))")
    tree = cloud_init_tree()
    env = dict(os.environ, PYTHONPATH=str(tree / "usr/lib/python3/dist-packages"))
    out = _run([cloud_init_python(), "-c", code], env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    return set(json.loads(out.stdout))


def placeholders(text: str) -> set[str]:
    """The ${NAME} placeholders a deployment fills in (string.Template's syntax = envsubst's)."""
    return {m.group("braced") for m in string.Template.pattern.finditer(text) if m.group("braced")}


def render_user_data(values: dict[str, str] | None = None) -> str:
    """The shipped user-data with its placeholders filled in, as Terraform/envsubst would."""
    return string.Template(USER_DATA.read_text()).substitute(values or EXAMPLE_VALUES)
