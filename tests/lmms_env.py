"""Where the lmms-eval installed for the tests is (it cannot live in the test venv: its declared dependencies
conflict with the CPU torch, and `pip check` must pass there).

.ci/run installs lmms-eval 0.7.3 with ``--no-deps`` plus the packages its task and evaluator modules import into
one folder (``TOKENREDUCE_LMMS_EVAL``) and lmms-eval 0.7.1 alone into another (``TOKENREDUCE_LMMS_EVAL_LEGACY``);
tests run lmms-eval in subprocesses with those folders on ``PYTHONPATH``. Without them the ``lmms_eval`` tests
skip, unless ``TOKENREDUCE_REQUIRE_LMMS`` is set (CI sets it, so there they fail instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def paths() -> tuple[str, str]:
    new, old = os.environ.get("TOKENREDUCE_LMMS_EVAL"), os.environ.get("TOKENREDUCE_LMMS_EVAL_LEGACY")
    if not (new and old and os.path.isdir(new) and os.path.isdir(old)):
        if os.environ.get("TOKENREDUCE_REQUIRE_LMMS"):
            pytest.fail("TOKENREDUCE_LMMS_EVAL / TOKENREDUCE_LMMS_EVAL_LEGACY do not name lmms-eval folders")
        pytest.skip("lmms-eval not installed here (CI sets TOKENREDUCE_LMMS_EVAL, see .ci/run)")
    return new, old


def run(code: str, *args: str, legacy: bool = False, env: dict | None = None, timeout: int = 900):
    """Run `code` under lmms-eval 0.7.3 (or 0.7.1 with `legacy`) and return the JSON its last stdout line holds."""
    new, old = paths()
    path = os.pathsep.join([old, new] if legacy else [new])
    full = dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false", **(env or {}))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
