"""The ``ptserve`` client commands against a real server over HTTP: every command, tables and ``--json``, and
an error line (``error: <status> <type>: <message>``) with a non-zero exit for every failure."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ptserve.adapters_store.format import encode_blob
from ptserve.adapters_store.validation import decode_blob
from ptserve.server.cli import app
from ptserve.server.training.outputs import write_outputs
from tests.client.conftest import ADMIN
from tests.factories import free_port, make_adapter

runner = CliRunner()


def cli(url: str, *args: str, key: str | None = ADMIN, input: str | None = None):
    env = {"PTSERVE_URL": url, "PTSERVE_API_KEY": key or "", "COLUMNS": "200"}
    return runner.invoke(app, list(args), env=env, input=input)


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def test_adapters_commands(server, minilm, tmp_path):
    fp = minilm.fingerprint
    blob_file = tmp_path / "a.safetensors"
    blob_file.write_bytes(encode_blob(make_adapter(fp, 6, seed=11)))
    info = json.loads(ok(cli(server, "adapters", "upload", "cli/one", str(blob_file), "--json")))
    assert info["id"] == "cli/one" and info["version"] == 1
    out_dir = write_outputs(make_adapter(fp, 4, seed=12, labels=("bad", "good")), tmp_path / "trained")
    table = ok(cli(server, "adapters", "upload", "cli/two", str(out_dir)))  # a `ptserve train --out` folder
    assert "cli/two" in table and "bad, good" in table

    listed = json.loads(ok(cli(server, "adapters", "list", "--tenant", "cli", "--json")))
    assert [a["id"] for a in listed] == ["cli/one", "cli/two"]
    assert "cli/one" in ok(cli(server, "adapters", "list", "--tenant", "cli"))
    shown = ok(cli(server, "adapters", "show", "cli/two"))
    assert "num_virtual_tokens" in shown and "bad, good" in shown
    assert json.loads(ok(cli(server, "adapters", "show", "cli/two", "--json")))["labels"] == ["bad", "good"]

    got = json.loads(
        ok(
            cli(
                server,
                "adapters",
                "download",
                "cli/one",
                "--out",
                str(tmp_path / "dl.safetensors"),
                "--peft",
                str(tmp_path / "peft"),
                "--json",
            )
        )
    )
    assert (tmp_path / "dl.safetensors").read_bytes() == blob_file.read_bytes() and got["bytes"] > 0
    assert (
        decode_blob((tmp_path / "dl.safetensors").read_bytes(), fp, "pooler_linear").config.num_virtual_tokens
        == 6
    )
    assert json.loads((tmp_path / "peft" / "labels.json").read_text()) == ["negative", "neutral", "positive"]
    again = json.loads(ok(cli(server, "adapters", "upload", "cli/three", str(tmp_path / "peft"), "--json")))
    assert again["labels"] == ["negative", "neutral", "positive"]

    assert "deleted cli/three" in ok(cli(server, "adapters", "delete", "cli/three"))
    res = cli(server, "adapters", "show", "cli/three")
    assert res.exit_code == 1 and "error: 404 adapter_not_found:" in res.stderr and "cli/three" in res.stderr


def test_classify_command(server, minilm, tmp_path):
    blob_file = tmp_path / "c.safetensors"
    blob_file.write_bytes(encode_blob(make_adapter(minilm.fingerprint, 5, seed=13)))
    ok(cli(server, "adapters", "upload", "cli/cls", str(blob_file)))
    res = json.loads(
        ok(cli(server, "classify", "cli/cls", "great food", "awful service", "--logits", "--json"))
    )
    assert len(res["predictions"]) == 2 and len(res["predictions"][0]["logits"]) == 3
    (tmp_path / "texts.txt").write_text("great food\n\nawful service\n")
    table = ok(cli(server, "classify", "cli/cls", "--file", str(tmp_path / "texts.txt")))
    assert "great food" in table and "awful service" in table and res["predictions"][0]["label"] in table
    piped = json.loads(ok(cli(server, "classify", "cli/cls", "--file", "-", "--json", input="great food\n")))
    assert piped["predictions"][0]["label"] == res["predictions"][0]["label"]
    long = cli(server, "classify", "cli/cls", "word " * 600)
    assert long.exit_code == 1 and "error: 422 input_too_long:" in long.stderr
    assert ok(cli(server, "classify", "cli/cls", "word " * 600, "--truncate", "--json"))


def test_keys_commands(server):
    created = json.loads(ok(cli(server, "keys", "create", "cli-tenant", "--name", "ci runner", "--json")))
    assert created["key"] and created["tenant"] == "cli-tenant" and created["name"] == "ci runner"
    plain = cli(server, "keys", "create", "cli-tenant")
    assert plain.exit_code == 0 and plain.stdout.strip() and "not shown again" in plain.stderr
    listed = json.loads(ok(cli(server, "keys", "list", "cli-tenant", "--json")))
    assert created["key_id"] in [k["key_id"] for k in listed] and created["key"] not in json.dumps(listed)
    assert created["key_id"] in ok(cli(server, "keys", "list", "cli-tenant"))
    # the new key works for its tenant ...
    assert json.loads(ok(cli(server, "adapters", "list", "--json", key=created["key"]))) == []
    # ... and not for admin work, with the server's own reason
    denied = cli(server, "keys", "list", "cli-tenant", key=created["key"])
    assert denied.exit_code == 1 and "error: 403" in denied.stderr
    assert "revoked key" in ok(cli(server, "keys", "revoke", "cli-tenant", created["key_id"]))
    gone = cli(server, "adapters", "list", key=created["key"])
    assert gone.exit_code == 1 and "error: 401 unauthorized:" in gone.stderr
    unknown = cli(server, "keys", "revoke", "cli-tenant", created["key_id"])
    assert unknown.exit_code == 1 and "error: 404" in unknown.stderr


def test_generate_command_streams_and_answers_json(gen_server):
    url, aid = gen_server
    full = json.loads(
        ok(cli(url, "generate", aid, "the lazy dog", "--max-new-tokens", "6", "--temperature", "0", "--json"))
    )
    assert full["adapter"] == aid and full["finish_reason"] in ("stop", "length")
    streamed = cli(url, "generate", aid, "the lazy dog", "--max-new-tokens", "6", "--temperature", "0")
    assert streamed.exit_code == 0 and streamed.stdout == full["text"] + "\n"
    assert f"finish_reason={full['finish_reason']}" in streamed.stderr
    plain = cli(
        url, "generate", aid, "the lazy dog", "--max-new-tokens", "6", "--temperature", "0", "--no-stream"
    )
    assert plain.stdout == full["text"] + "\n"
    missing = cli(url, "generate", "acme/nope", "hi")
    assert missing.exit_code == 1 and "error: 404 adapter_not_found:" in missing.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["adapters", "show", "cli/missing"], 1, "error: 404 adapter_not_found:"),
        (["adapters", "show", "no-slash"], 2, "must be 'tenant/name'"),
        (["adapters", "show", "Bad Tenant/x"], 1, "error: 400 invalid_adapter_id:"),
        (["adapters", "upload", "cli/x", "/nonexistent/file"], 2, "no such file or folder"),
        (["adapters", "download", "cli/x"], 2, "--out FILE"),
        (["classify", "cli/x"], 2, "no texts"),
    ],
)
def test_error_paths(server, args, code, message):
    res = cli(server, *args)
    assert res.exit_code == code and message in res.stderr, res.output


def test_upload_of_garbage_shows_the_servers_reason(server, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk")
    res = cli(server, "adapters", "upload", "cli/junk", str(tmp_path / "junk.safetensors"))
    assert res.exit_code == 1 and "error: 422 invalid_adapter:" in res.stderr and "pickle" in res.stderr


def test_missing_key_and_unreachable_server(server):
    res = cli(server, "adapters", "list", key=None)
    assert res.exit_code == 1 and "error: 401 unauthorized:" in res.stderr and "--api-key" in res.stderr
    down = cli(f"http://127.0.0.1:{free_port()}", "adapters", "list")
    assert down.exit_code == 1 and "cannot reach the server" in down.stderr


def test_connection_options_before_or_after_the_subcommand(server):
    """``--server``/``--api-key``/``--json`` are read once into the command's context: before the subcommand
    (the root's) or after it (how they have always been given, and they win), either over the environment."""
    refused = f"http://127.0.0.1:{free_port()}"
    env = {"PTSERVE_URL": refused, "PTSERVE_API_KEY": "wrong-key", "COLUMNS": "200"}

    def run(*args):
        return runner.invoke(app, list(args), env=env)

    after = json.loads(ok(run("adapters", "list", "--server", server, "--api-key", ADMIN, "--json")))
    before = json.loads(ok(run("--server", server, "--api-key", ADMIN, "--json", "adapters", "list")))
    short = json.loads(ok(run("-s", server, "adapters", "list", "--api-key", ADMIN, "--json")))
    assert after == before == short and isinstance(after, list)
    overridden = run("--server", refused, "--api-key", "wrong-key", "adapters", "list",
                     "--server", server, "--api-key", ADMIN, "--json")
    assert json.loads(ok(overridden)) == after
    env_only = run("adapters", "list")
    assert env_only.exit_code == 1 and "cannot reach the server" in env_only.stderr
    wrong_key = run("adapters", "list", "--server", server)  # the environment's key, the flag's server
    assert wrong_key.exit_code == 1 and "error: 401 unauthorized:" in wrong_key.stderr
    table = run("--server", server, "--api-key", ADMIN, "keys", "list", "cli-opts")
    assert table.exit_code == 0 and "has no keys" in table.stdout  # no --json anywhere: a human answer


def test_server_commands_take_the_same_connection_options():
    for args in (["train", "--help"], ["adapters", "import-thudm", "--help"]):
        res = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 0 and all(flag in res.stdout for flag in ("--server", "--api-key", "--json"))
