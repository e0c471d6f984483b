"""``ptserve serve``: every setting is a flag (DESIGN decision 6), flags are validated like the environment, and an
open server refuses a non-loopback bind."""
from __future__ import annotations

import inspect

from typer.testing import CliRunner

from ptserve.server.cli import ENV_ONLY, app, serve
from ptserve.server.settings import Settings


def test_every_setting_is_a_serve_flag():
    params = inspect.signature(serve).parameters
    assert set(Settings.model_fields) - ENV_ONLY <= set(params)
    assert "admin_key" not in params  # a key on the command line would show in `ps`
    for name in set(Settings.model_fields) - ENV_ONLY:
        option = params[name].default
        assert option.param_decls == ("--" + name.replace("_", "-"),)
        assert f"PTSERVE_{name.upper()}" in option.help
    assert CliRunner().invoke(app, ["serve", "--help"]).exit_code == 0


def test_invalid_flag_value_exits_2_naming_the_setting():
    result = CliRunner().invoke(app, ["serve", "--max-batch-size", "lots"])
    assert result.exit_code == 2
    assert "max_batch_size" in result.output


def test_open_server_refuses_a_public_bind(monkeypatch):
    monkeypatch.delenv("PTSERVE_ADMIN_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "refusing to bind 0.0.0.0" in result.output


def test_a_missing_chat_template_file_exits_2_before_loading_anything(tmp_path, monkeypatch):
    result = CliRunner().invoke(app, ["serve", "--chat-template", str(tmp_path / "nope.jinja")])
    assert result.exit_code == 2
    assert "chat template file" in result.output and "nope.jinja" in result.output
    (tmp_path / "chat.jinja").write_text("{{ messages }}")
    assert Settings(chat_template=str(tmp_path / "chat.jinja")).chat_template == str(tmp_path / "chat.jinja")
    monkeypatch.setenv("PTSERVE_CHAT_TEMPLATE", "")
    assert Settings().chat_template is None  # an empty variable means unset
