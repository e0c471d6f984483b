"""The server's commands of the ``ptserve`` CLI, added to the client's app (``ptserve.client.cli``) on import:
``serve`` (flags mirror ``PTSERVE_*`` settings), ``train`` and ``adapters import-thudm``. Importing this
module loads no torch: each command imports what it runs."""
from __future__ import annotations

import inspect
import ipaddress
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from ptserve.client.cli import adapters_app, app
from ptserve.client.cli.context import Connection, connected, fail, parse_labels, print_json, stdout
from ptserve.server.settings import Settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(insecure: bool = False, **flags: Optional[str]) -> None:
    """Run the HTTP server. Every PTSERVE_* setting but the admin key is also a flag (--max-batch-size 32 =
    PTSERVE_MAX_BATCH_SIZE=32); flags win over the environment."""
    from ptserve.server.api.app import create_app
    from ptserve.server.logs import configure_logging
    from ptserve.server.serving import serve_app

    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"invalid setting: {exc}", err=True)
        raise typer.Exit(2) from None
    if not settings.admin_key and not _is_loopback(settings.host) and not insecure:
        typer.echo(
            f"refusing to bind {settings.host} without PTSERVE_ADMIN_KEY: anyone could manage adapters. "
            "Set an admin key, bind 127.0.0.1, or pass --insecure.", err=True,
        )
        raise typer.Exit(2)
    configure_logging(settings.log_level, settings.log_format)
    workers = _api_workers(settings)
    if workers:  # an engine core process and API workers (docs/design.md "Engine core and API workers")
        from ptserve.server.engine_core.supervisor import Supervisor

        raise typer.Exit(Supervisor(settings, workers).run())
    fastapi_app = create_app(settings)
    # One worker per process (a replica); run more replicas on the same store to scale (docs/design.md).
    serve_app(fastapi_app, fastapi_app.state.ptserve, settings.host, settings.port, settings.log_level,
              settings.drain_timeout_s)


def _api_workers(settings: Settings) -> int:
    """How many API worker processes (0: serve in this process), for encoders and decoder LMs alike."""
    from ptserve.server.engine_core.supervisor import default_api_workers
    from ptserve.server.hardware import cpu_budget

    asked = settings.api_workers
    return default_api_workers(cpu_budget()) if asked == "auto" else asked


ENV_ONLY = {"admin_key"}  # secrets stay out of the command line, where `ps` would show them


def _settings_flags() -> inspect.Signature:
    """``serve``'s signature: one ``--flag`` per Settings field (DESIGN decision 6: the same names everywhere).
    Values arrive as text and are validated by the Settings class itself, exactly like environment variables."""
    params = [inspect.Parameter("insecure", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--insecure", help="Allow a non-loopback bind without PTSERVE_ADMIN_KEY."))]
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        option = typer.Option(None, flag, help=f"{field.description} [PTSERVE_{name.upper()}]", show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=option))
    return inspect.Signature(params, return_annotation=None)


serve.__signature__ = _settings_flags()
app.command()(serve)


@adapters_app.command("import-thudm")
@connected
def adapters_import_thudm(
    conn: Connection,
    checkpoint: Path = typer.Argument(
        ..., help="THUDM P-tuning-v2 checkpoint: a .safetensors/.bin file or folder."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Write adapter.safetensors and peft/ here."),
    backbone: str = typer.Option(
        "minilm", help="The backbone it was trained on: 'minilm', a folder or hub id."
    ),
    labels: Optional[str] = typer.Option(None, help="Label names 'a,b,c' (default: config.json id2label)."),
    allow_pickle: bool = typer.Option(
        False, help="Read a .bin/.pt pickle with torch.load(weights_only=True)."
    ),
    upload: Optional[str] = typer.Option(None, help="Also upload it as this adapter id (tenant/name)."),
) -> None:
    """Convert a THUDM P-tuning-v2 checkpoint (plain or projected prefix encoder, classifier)."""
    from ptserve.adapters_store.errors import APIError
    from ptserve.adapters_store.thudm import read_checkpoint, thudm_to_adapter
    from ptserve.client.wire.layout import BLOB_FILE
    from ptserve.server.training.outputs import write_outputs

    try:
        fp, head_kind, pooler = _backbone_geometry(backbone)
        state, config_labels = read_checkpoint(checkpoint, allow_pickle)
        labels_ = parse_labels(labels) or config_labels
        adapter = thudm_to_adapter(state, fp, head_kind, labels_, backbone, pooler)
    except APIError as exc:
        fail(f"{exc.type}: {exc.message}", 2)
    except (OSError, ValueError) as exc:
        fail(str(exc), 2)
    write_outputs(adapter, out)
    result = {
        "out": str(out),
        "task": adapter.config.task,
        "num_virtual_tokens": adapter.config.num_virtual_tokens,
        "labels": list(adapter.config.labels),
    }
    if upload:
        with conn.client() as c:
            result["uploaded"] = c.upload(upload, out / BLOB_FILE).raw
    if conn.as_json:
        return print_json(result)
    stdout().print(
        f"imported {checkpoint} -> {out} ({result['task']}, {result['num_virtual_tokens']} virtual tokens)",
        highlight=False,
    )
    if upload:
        stdout().print(f"uploaded {upload} version {result['uploaded']['version']}", highlight=False)


def _backbone_geometry(name: str):
    """(fingerprint, head kind, pooler weights for cls_mlp heads) of a backbone (BERT: its config alone)."""
    from ptserve.adapters_store.fingerprint import fingerprint_from_config
    from ptserve.server import hf_compat
    from ptserve.server.backbone import family_for, resolve_path

    path = resolve_path(name)
    config = hf_compat.load_config(path, local_only=True)
    family = family_for(config)
    pooler = None
    if (
        family.head_kind == "cls_mlp"
    ):  # RoBERTa: THUDM's head sits on the pooler, which ptserve's head carries
        from ptserve.server.backbone import load_backbone

        model = load_backbone(name, device="cpu", dtype="float32").model
        pooler = {
            "pooler.dense.weight": model.pooler.dense.weight.detach().clone(),
            "pooler.dense.bias": model.pooler.dense.bias.detach().clone(),
        }
    return fingerprint_from_config(config), family.head_kind, pooler


from ptserve.server.training.cli import register as _register_training  # noqa: E402

_register_training(app)


if __name__ == "__main__":
    app()
