"""Flags are generated from the settings: each has its KOLITE_* variable, and a given flag wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from kolite.cli import build_parser, settings_from
from kolite.config import ModelSettings, ServerSettings


def test_env_then_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOLITE_PRECISION", "fp32")
    monkeypatch.setenv("KOLITE_PORT", "9001")
    monkeypatch.setenv("KOLITE_THREADS", "3")
    ns = build_parser().parse_args(["serve", "--threads", "2", "--model", "distilgpt2"])
    model = settings_from(ns, ModelSettings)
    server = settings_from(ns, ServerSettings)
    assert (model.precision, model.threads, model.model) == ("fp32", 2, "distilgpt2")
    assert server.port == 9001


def test_every_setting_has_a_flag() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for cls in (ModelSettings, ServerSettings):
        for name in cls.model_fields:
            assert "--" + name.replace("_", "-") in help_text
            assert f"KOLITE_{name.upper()}" in help_text


def test_bad_flag_values_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--precision", "int3"])
    assert "invalid choice" in capsys.readouterr().err


def test_boolean_and_path_flags(tmp_path: Path) -> None:
    ns = build_parser().parse_args(["serve", "--local-files-only", "--cache-dir", str(tmp_path), "--log-prompts"])
    model = settings_from(ns, ModelSettings)
    assert model.local_files_only is True and model.cache_dir == tmp_path
    assert settings_from(ns, ServerSettings).log_prompts is True
