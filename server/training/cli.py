"""``ptserve train``: train a P-Tuning v2 prefix (and head) on the serving backbone, write it out, optionally
upload it. Progress (a rich bar with loss and eval accuracy) goes to stderr; ``--json`` prints the summary."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from server.training.loop import Callbacks, EpochStats


def register(app: typer.Typer) -> None:
    app.command("train")(train)


class RichProgress(Callbacks):
    """A progress bar over all steps, with the running loss and the last eval accuracy; a line per epoch."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("eval acc {task.fields[acc]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None

    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=epochs * steps_per_epoch, epoch=1, epochs=epochs,
                                           loss="-", acc="-")

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        self.progress.update(self.task, advance=1, epoch=epoch, loss=f"{loss:.4f}")

    def on_epoch(self, stats: EpochStats) -> None:
        line = f"epoch {stats.epoch}: train loss {stats.train_loss:.4f}"
        if stats.eval is not None:
            acc = stats.eval.metrics.get("eval_accuracy")
            line += f", eval loss {stats.eval.loss:.4f}" + (f", eval accuracy {acc:.3f}" if acc is not None else "")
            self.progress.update(self.task, acc=f"{acc:.3f}" if acc is not None else "-")
        line += f" ({stats.seconds:.1f}s)" + (" [green]best[/]" if stats.best else "")
        self.progress.console.print(line, highlight=False)

    def stop(self) -> None:
        self.progress.stop()


def train(
    data: Path = typer.Option(..., "--data", help="Training data: .jsonl, .json, .csv or .tsv."),
    out: Path = typer.Option(..., "--out", help="Write adapter.safetensors, peft/ and training.json here."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Evaluation data (early stopping, accuracy)."),
    text_field: str = typer.Option("text", help="Field (column) holding the text."),
    label_field: str = typer.Option("label", help="Field (column) holding the label."),
    backbone: str = typer.Option("minilm", help="The serving backbone: 'minilm', a model folder or hub id."),
    virtual_tokens: int = typer.Option(16, help="Prefix length P (virtual tokens in every layer)."),
    prefix_projection: bool = typer.Option(
        False, "--prefix-projection/--no-prefix-projection",
        help="Reparameterise the prefix with an MLP while training (materialised to plain K/V when saved)."),
    projection_hidden: int = typer.Option(512, help="Hidden width of the projection MLP."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of the prefix [1e-2; 1e-3 with --prefix-projection]."),
    head_lr: Optional[float] = typer.Option(None, help="Learning rate of the head (default: --lr)."),
    epochs: int = typer.Option(15, help="Epochs at most."),
    batch_size: int = typer.Option(16, help="Examples per step."),
    seed: int = typer.Option(0, help="Seed for initialisation and shuffling."),
    patience: int = typer.Option(4, help="Stop after this many epochs without a better eval accuracy (0 = never)."),
    max_length: Optional[int] = typer.Option(None, help="Cut texts to this many tokens (default: what fits)."),
    dropout: float = typer.Option(0.1, help="Dropout on the head's input while training."),
    threads: int = typer.Option(0, help="torch threads on cpu (0 = torch's default)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    upload: Optional[str] = typer.Option(None, help="Upload the trained adapter as tenant/name."),
    server: Optional[str] = typer.Option(None, "--server", "-s", envvar="PTSERVE_URL", help="Server for --upload."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PTSERVE_API_KEY", help="API key for --upload."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Train a P-Tuning v2 prefix (and classification head) on the frozen serving backbone."""
    import torch

    from server.backbone import load_backbone
    from server.training.classify import TrainConfig, train_classifier
    from server.training.data import DataError, load_examples
    from server.training.outputs import BLOB_FILE, write_outputs

    err = Console(stderr=True, soft_wrap=True)
    try:
        train_set = load_examples(data, text_field, label_field)
        eval_set = load_examples(eval_data, text_field, label_field) if eval_data else None
    except DataError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2)
    if upload and "/" not in upload:
        err.print(f"[bold red]error:[/] --upload {upload!r} must be tenant/name", highlight=False)
        raise typer.Exit(2)
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(
        virtual_tokens=virtual_tokens, prefix_projection=prefix_projection, projection_hidden=projection_hidden,
        lr=lr, head_lr=head_lr, epochs=epochs, batch_size=batch_size, seed=seed, patience=patience,
        dropout=dropout, max_length=max_length,
    )
    try:
        bb = load_backbone(backbone, device=device, dtype="float32")
    except (OSError, ValueError) as exc:
        err.print(f"[bold red]error:[/] cannot load backbone {backbone!r}: {exc}", highlight=False)
        raise typer.Exit(2)
    err.print(f"training {virtual_tokens} virtual tokens on {backbone} ({bb.fingerprint.model_type}, "
              f"{bb.fingerprint.num_layers} layers) with {len(train_set)} examples"
              + (f", evaluating on {len(eval_set)}" if eval_set else ""), highlight=False)
    progress = RichProgress(err)
    try:
        result = train_classifier(bb, train_set, eval_set, cfg, progress)
    except (DataError, ValueError) as exc:
        progress.stop()
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2)
    progress.stop()
    write_outputs(result.adapter, out, result.record())
    summary = {
        "out": str(out), "labels": result.labels, "best_epoch": result.fit.best_epoch,
        "epochs_run": len(result.fit.history), "train_seconds": round(result.fit.seconds, 2),
        "eval_accuracy": result.eval.accuracy if result.eval else None,
        "trainable_parameters": result.trainable_parameters,
    }
    if upload:
        from client.errors import PtserveClientError
        from client.sdk import Client

        try:
            with Client(server, api_key) as c:
                summary["uploaded"] = c.upload(upload, out / BLOB_FILE).raw
        except PtserveClientError as exc:
            err.print(f"[bold red]error:[/] upload failed ({exc}); the adapter is saved in {out}", highlight=False)
            raise typer.Exit(1)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    acc = f"{summary['eval_accuracy']:.3f}" if summary["eval_accuracy"] is not None else "n/a"
    err.print(f"best epoch {summary['best_epoch']} of {summary['epochs_run']}: eval accuracy {acc}; "
              f"{summary['train_seconds']}s; wrote {out}/{{{BLOB_FILE}, peft/, training.json}}", highlight=False)
    if upload:
        err.print(f"uploaded {upload} version {summary['uploaded']['version']}", highlight=False)
