"""The trainer's progress on a terminal: a rich bar over all steps with the running loss and the last eval
metrics, and one line per epoch."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ptserve.server.training.loop import Callbacks, EpochStats
from ptserve.server.training.search import SearchProgress, Trial


class RichProgress(Callbacks, SearchProgress):
    """A progress bar over all steps, with the running loss and the last eval accuracy; a line per epoch."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[metric]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None

    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=epochs * steps_per_epoch, epoch=1, epochs=epochs, loss="-", metric=""
        )

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        self.progress.update(self.task, advance=1, epoch=epoch, loss=f"{loss:.4f}")

    def on_epoch(self, stats: EpochStats) -> None:
        line = f"epoch {stats.epoch}: train loss {stats.train_loss:.4f}"
        if stats.eval is not None:
            shown = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in stats.eval.metrics.items())
            line += f", eval loss {stats.eval.loss:.4f}" + (f", {shown}" if shown else "")
            self.progress.update(self.task, metric=shown)
        line += f" ({stats.seconds:.1f}s)" + (" [green]best[/]" if stats.best else "")
        self.progress.console.print(line, highlight=False)

    def on_trial_start(self, n: int, total: int, lr: float, virtual_tokens: int, head: str) -> None:
        self.console.print(f"search trial {n}/{total}: lr {lr:g}, {virtual_tokens} virtual tokens, head {head} ...",
                           highlight=False)

    def on_trial(self, n: int, trial: Trial, best: bool) -> None:
        self.console.print(
            f"  trial {n}: dev accuracy {trial.dev_accuracy:.3f}, dev loss {trial.dev_loss:.4f} "
            f"({trial.epochs_run} epochs, {trial.seconds:.0f}s)" + (" [green]best so far[/]" if best else ""),
            highlight=False,
        )

    def on_final(self, chosen: dict) -> None:
        self.console.print(
            f"search chose lr {chosen['lr']:g}, {chosen['virtual_tokens']} virtual tokens, head {chosen['head']}: "
            "final fit", highlight=False)

    def stop(self) -> None:
        self.progress.stop()
