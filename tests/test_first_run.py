"""A first run reads clean: the job prints its own progress and summary, not its libraries' notices
about parts and settings the user has nothing to do with (issue 29, item 8)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest


@pytest.mark.slow  # a fresh process that imports torch and diffusers: left out of make test-fast
def test_loading_the_model_prints_nothing():
    # A fresh process: transformers prints its image-processor notice once per process, at the first
    # import of a diffusers pipeline, and diffusers its advice to install accelerate at every load.
    script = "from diffcut.method.features import FeatureExtractor; FeatureExtractor.from_pretrained('tiny-random')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_embedded_ray_start_leaves_out_only_rays_token_auth_default_notice():
    from ray._private.authentication import authentication_token_setup as setup

    from diffcut.job.ray_session import without_token_auth_default_notice

    records = _Records()
    setup.logger.addHandler(records)
    try:
        setup._warn_token_auth_enabled()  # Ray's own notice, as ray.init logs it when RAY_AUTH_MODE is unset
        with without_token_auth_default_notice():
            setup._warn_token_auth_enabled()
            setup._warn_token_auth_disabled()  # a warning that matters to the user stays
    finally:
        setup.logger.removeHandler(records)
    assert [message.split(".")[0] for message in records.messages] == [
        "Token authentication is enabled for this Ray cluster",
        "Token authentication is disabled for this Ray cluster",
    ]
