"""``ptserve classify`` and ``ptserve generate`` (which streams to the terminal)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ptserve.client.cli.context import Connection, connected, fail, print_json, stderr, stdout


@connected
def classify(
    conn: Connection,
    adapter: str = typer.Argument(..., help="Adapter id, tenant/name."),
    texts: Optional[List[str]] = typer.Argument(None, help="Texts to classify."),
    file: Optional[Path] = typer.Option(
        None, "--file", "-f", help="Read texts from a file, one a line ('-' = stdin)."
    ),
    logits: bool = typer.Option(False, "--logits", help="Return the logits too."),
    truncate: bool = typer.Option(False, help="Cut inputs that are too long instead of failing."),
) -> None:
    """Classify texts with a classification adapter."""
    inputs = list(texts or [])
    if file is not None:
        text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
        inputs += [line for line in text.splitlines() if line.strip()]
    if not inputs:
        fail("no texts: pass them as arguments or with --file", 2)
    with conn.client() as c:
        result = c.classify(adapter, inputs, return_logits=logits, truncate=truncate)
    if conn.as_json:
        return print_json(result.raw)
    table = Table(
        "text", "label", "score", *(["logits"] if logits else []), title=f"{result.adapter} v{result.version}"
    )
    for text, p in zip(inputs, result.predictions):
        extra = [", ".join(f"{x:.3f}" for x in p.logits)] if logits and p.logits else []
        table.add_row(text, p.label, f"{p.score:.3f}", *extra)
    stdout().print(table)


@connected
def generate(
    conn: Connection,
    adapter: str = typer.Argument(..., help="Adapter id, tenant/name."),
    prompt: str = typer.Argument(..., help="The prompt."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate at most."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy."),
    top_p: Optional[float] = typer.Option(None),
    top_k: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None, help="Same seed, same text."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print text as it is generated."),
) -> None:
    """Generate text with a generation adapter (streams to the terminal)."""
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
              "seed": seed, "stop": list(stop) if stop else None}
    with conn.client() as c:
        if not stream or conn.as_json:
            result = c.generate(adapter, prompt, **params)
            if conn.as_json:
                return print_json(result.raw)
            sys.stdout.write(result.text + "\n")
            done = f"finish_reason={result.finish_reason} usage={result.usage}"
            stderr().print(f"[dim]{done}[/]", highlight=False)
            return
        finish = None
        for event in c.generate_stream(adapter, prompt, **params):
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            finish = event.finish_reason or finish
        sys.stdout.write("\n")
        stderr().print(f"[dim]finish_reason={finish}[/]", highlight=False)
