"""``ptserve train``: train a P-Tuning v2 prefix (and head) on the serving backbone, write it out, optionally
upload it (the connection options are the client's). Progress (a rich bar with loss and eval accuracy) goes to
stderr; ``--json`` prints the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ptserve.client.cli.context import Connection, connected, fail, print_json, stderr


def register(app: typer.Typer) -> None:
    app.command("train")(train)


@connected
def train(
    conn: Connection,
    data: Path = typer.Option(..., "--data", help="Training data: .jsonl, .json, .csv or .tsv."),
    out: Path = typer.Option(..., "--out", help="Write adapter.safetensors, peft/ and training.json here."),
    eval_data: Optional[Path] = typer.Option(
        None, "--eval-data", help="Evaluation data (early stopping, accuracy)."
    ),
    text_field: str = typer.Option("text", help="Field (column) holding the text (classify)."),
    label_field: str = typer.Option("label", help="Field (column) holding the label (classify)."),
    prompt_field: str = typer.Option("prompt", help="Field holding the prompt (generate)."),
    completion_field: str = typer.Option("completion", help="Field holding the completion (generate)."),
    query_field: str = typer.Option(
        "query", help="Field holding the query (embed pairs; data without it is read as labelled texts)."
    ),
    positive_field: str = typer.Option("positive", help="Field holding the query's positive text (embed)."),
    negative_field: str = typer.Option("negative", help="Field holding an optional hard negative (embed)."),
    task: str = typer.Option(
        "auto", help="classify, embed (encoders), generate (decoders), or auto: classify on encoders, generate on "
        "decoders."
    ),
    backbone: str = typer.Option("minilm", help="The serving backbone: 'minilm', a model folder or hub id."),
    virtual_tokens: int = typer.Option(16, help="Prefix length P (virtual tokens in every layer)."),
    head: str = typer.Option(
        "auto", help="Classification head: auto (mean_linear on backbones trained for mean pooling, such as MiniLM; "
        "else the backbone's PEFT head), pooler_linear, cls_mlp or mean_linear (served by ptserve, no PEFT export)."
    ),
    prefix_projection: bool = typer.Option(
        False,
        "--prefix-projection/--no-prefix-projection",
        help="Reparameterise the prefix with an MLP while training (materialised to plain K/V when saved).",
    ),
    projection_hidden: int = typer.Option(512, help="Hidden width of the projection MLP."),
    prefix_init: Optional[str] = typer.Option(
        None, help="Where the prefix starts (classify): tokens (every virtual token = one real training token's "
        "K/V in every layer) or random (PEFT's N(0, 1)) [see TrainConfig.prefix_init; random with "
        "--prefix-projection]."
    ),
    lr: Optional[float] = typer.Option(
        None, help="Learning rate of the prefix [1e-2; 1e-3 with --prefix-projection]."
    ),
    head_lr: Optional[float] = typer.Option(None, help="Learning rate of the head (default: --lr)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs at most [classify/generate 8, embed 15]."),
    batch_size: int = typer.Option(16, help="Examples per step."),
    seed: int = typer.Option(0, help="Seed for initialisation and shuffling."),
    patience: Optional[int] = typer.Option(
        None, help="Epochs without a better eval result (accuracy; generate: loss) before stopping (0 = never) "
        "[classify/generate 3, embed 4]."
    ),
    max_length: Optional[int] = typer.Option(
        None, help="Cut texts to this many tokens (default: what fits)."
    ),
    dropout: float = typer.Option(0.1, help="Dropout on the head's input while training."),
    prefix_dropout: float = typer.Option(0.0, help="Dropout on the prefix K/V while training (classify)."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay (classify)."),
    warmup_ratio: float = typer.Option(0.1, help="Linear warm-up over this share of the steps, then linear decay."),
    dev_fraction: float = typer.Option(
        0.15, help="Without --eval-data (classify): hold out this stratified share of --data as the dev split for "
        "early stopping and --search (0 = train on everything, no early stopping)."
    ),
    search: bool = typer.Option(
        False, "--search/--no-search",
        help="Classify: before the final fit, try learning rates, prefix lengths and heads on the dev split "
        "within --search-budget-s; training.json records the trials and the choice.",
    ),
    search_budget_s: float = typer.Option(300.0, help="Wall-time budget of --search's trials (the final fit comes on top)."),
    autocast: str = typer.Option(
        "auto", help="bf16 autocast while training: auto (where the device computes bf16 fast: GPUs, CPUs with "
        "AMX/AVX512-BF16), on, or off. The saved adapter is float32 either way."
    ),
    temperature: float = typer.Option(
        0.05, help="Temperature of the contrastive loss (embed; sentence-transformers' scale 20)."
    ),
    threads: int = typer.Option(0, help="torch threads on cpu (0 = torch's default)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    upload: Optional[str] = typer.Option(
        None, help="Upload the trained adapter as tenant/name (to --server, with --api-key)."
    ),
) -> None:
    """Train a P-Tuning v2 prefix on the frozen serving backbone: with a classification head on encoders
    (labelled texts), for embeddings on encoders (--task embed: query/positive pairs, optionally with a
    negative, or labelled texts, same label = positive; contrastive loss with in-batch negatives), or for
    causal-LM generation on decoders
    (prompt/completion pairs, loss on the completion). --json prints the summary as JSON on stdout."""
    import torch

    from ptserve.server.backbone import load_backbone
    from ptserve.server.training.classify import TrainConfig
    from ptserve.server.training.embed import EmbedConfig
    from ptserve.server.training.data import DataError
    from ptserve.client.wire.layout import BLOB_FILE
    from ptserve.server.training.outputs import write_outputs
    from ptserve.server.training.progress import RichProgress

    err = stderr()
    if upload and "/" not in upload:
        fail(f"--upload {upload!r} must be tenant/name", 2)
    try:
        task = _resolve_task(task, backbone)
        fields = {"classify": (text_field, label_field), "generate": (prompt_field, completion_field),
                  "embed": (text_field, label_field, query_field, positive_field, negative_field)}[task]
        train_set, eval_set = _load_data(task, data, eval_data, *fields)
        if task == "classify" and eval_set is None and dev_fraction > 0:
            from ptserve.server.training.data import stratified_split

            train_set, eval_set = stratified_split(train_set, dev_fraction, seed)
        if autocast not in ("auto", "on", "off"):
            raise DataError(f"--autocast {autocast!r}: use auto, on or off")
        if prefix_init is not None and prefix_init not in ("tokens", "random"):
            raise DataError(f"--prefix-init {prefix_init!r}: use tokens or random")
        if prefix_init == "tokens" and prefix_projection:
            raise DataError("--prefix-init tokens cannot start a reparameterised prefix (--prefix-projection)")
        if threads:
            torch.set_num_threads(threads)
        bb = load_backbone(backbone, device=device, dtype="float32")
    except DataError as exc:
        fail(str(exc), 2)
    except (OSError, ValueError) as exc:
        fail(f"cannot load backbone {backbone!r}: {exc}", 2)
    if task == "embed":
        cfg = EmbedConfig(
            virtual_tokens=virtual_tokens, prefix_projection=prefix_projection, projection_hidden=projection_hidden,
            lr=lr, epochs=15 if epochs is None else epochs, batch_size=batch_size, seed=seed,
            patience=4 if patience is None else patience, temperature=temperature,
            max_length=max_length,
        )
    else:
        cfg = TrainConfig(
            head=None if head == "auto" else head,
            weight_decay=weight_decay,
            prefix_dropout=prefix_dropout,
            **({} if prefix_init is None else {"prefix_init": prefix_init}),
            warmup_ratio=warmup_ratio,
            autocast=autocast,
            virtual_tokens=virtual_tokens,
            prefix_projection=prefix_projection,
            projection_hidden=projection_hidden,
            lr=lr,
            head_lr=head_lr,
            epochs=8 if epochs is None else epochs,
            batch_size=batch_size,
            seed=seed,
            patience=3 if patience is None else patience,
            dropout=dropout,
            max_length=max_length,
        )
    err.print(
        f"{task}: training {virtual_tokens} virtual tokens on {backbone} ({bb.fingerprint.model_type}, "
        f"{bb.fingerprint.num_layers} layers) with {len(train_set)} examples"
        + (f", evaluating on {len(eval_set)}" if eval_set else ""),
        highlight=False,
    )
    if search and (task != "classify" or not eval_set):
        fail("--search needs a classify task and a dev split (--eval-data, or --dev-fraction > 0)", 2)
    progress = RichProgress(err)
    search_record = None
    try:
        if search:
            from ptserve.server.training.search import SearchConfig, search_and_train

            found = search_and_train(bb, train_set, eval_set, cfg, SearchConfig(budget_s=search_budget_s),
                                     progress, progress)
            result, search_record = found.result, found.record
        else:
            result = _run(task, bb, train_set, eval_set, cfg, progress)
    except (DataError, ValueError) as exc:
        fail(str(exc), 2)
    finally:
        progress.stop()
    record = result.record()
    if search_record is not None:
        record["search"] = search_record
    write_outputs(result.adapter, out, record)
    summary = _summary(task, result, out)
    if upload:
        from ptserve.client.errors import PtserveClientError
        from ptserve.client.sdk import Client

        try:
            with Client(conn.server, conn.api_key) as c:
                summary["uploaded"] = c.upload(upload, out / BLOB_FILE).raw
        except PtserveClientError as exc:
            fail(f"upload failed ({exc}); the adapter is saved in {out}", 1)
    if conn.as_json:
        return print_json(summary)
    err.print(
        (f"best epoch {summary['best_epoch']} of {summary['epochs_run']}" if summary["best_epoch"] else
         f"kept the probe start (no epoch of {summary['epochs_run']} beat it on dev)")
        + f": {_shown(summary)}; "
        f"{summary['train_seconds']}s; wrote {out}/{{{BLOB_FILE}, peft/, training.json}}",
        highlight=False,
    )
    if summary.get("autocast_bf16"):
        err.print(f"bf16 autocast; {summary['attention']['reason']}", highlight=False)
    if upload:
        err.print(f"uploaded {upload} version {summary['uploaded']['version']}", highlight=False)


def _resolve_task(task: str, backbone: str) -> str:
    causal = _is_causal(backbone)
    if task == "auto":
        return "generate" if causal else "classify"
    if task not in ("classify", "generate", "embed") or (task == "generate") != causal:
        from ptserve.server.training.data import DataError

        raise DataError(
            f"--task {task} does not fit backbone {backbone!r}: "
            + ("a decoder trains 'generate' adapters" if causal else "an encoder trains 'classify' or 'embed' adapters")
        )
    return task


def _load_data(task: str, data: Path, eval_data: Path | None, *fields: str):
    from ptserve.server.training.data import has_field, load_examples, load_pairs, load_text_pairs

    def load(path: Path):
        if task == "classify":
            return load_examples(path, *fields)
        if task == "generate":
            return load_pairs(path, *fields)
        text_field, label_field, *pair_fields = fields  # embed: pairs when the query field is there
        return load_text_pairs(path, *pair_fields) if has_field(path, pair_fields[0]) else load_examples(
            path, text_field, label_field)

    train_set, eval_set = load(data), (load(eval_data) if eval_data else None)
    if eval_set is not None and type(eval_set[0]) is not type(train_set[0]):
        from ptserve.server.training.data import DataError

        raise DataError(f"{data} and {eval_data} must both be pairs or both labelled texts")
    return train_set, eval_set


def _run(task: str, bb, train_set, eval_set, cfg, progress):
    if task == "classify":
        from ptserve.server.training.classify import train_classifier

        return train_classifier(bb, train_set, eval_set, cfg, progress)
    if task == "embed":
        from ptserve.server.training.embed import train_embedder

        return train_embedder(bb, train_set, eval_set, cfg, progress)
    from ptserve.server.training.causal_lm import train_causal_lm

    return train_causal_lm(bb, train_set, eval_set, cfg, progress)


def _summary(task: str, result, out: Path) -> dict:
    summary = {
        "out": str(out),
        "task": task,
        "best_epoch": result.fit.best_epoch,
        "epochs_run": len(result.fit.history),
        "train_seconds": round(result.fit.seconds, 2),
        "trainable_parameters": result.trainable_parameters,
    }
    ev = result.eval
    if task == "classify":
        summary.update(labels=result.labels, head=result.adapter.config.head,
                       virtual_tokens=result.adapter.config.num_virtual_tokens,
                       eval_accuracy=ev.accuracy if ev else None, autocast_bf16=result.bf16,
                       attention=result.attention.record() if result.attention else None)
    elif task == "embed":
        base = result.baseline
        summary.update(eval_recall_at_1=ev.recall_at_1 if ev else None, eval_mrr=ev.mrr if ev else None,
                       bare_recall_at_1=base.recall_at_1 if base else None, bare_mrr=base.mrr if base else None)
    else:
        summary.update(eval_loss=ev.loss if ev else None, eval_exact_match=ev.exact_match if ev else None)
    return summary


def _shown(summary: dict) -> str:
    if summary.get("eval_mrr") is not None:
        return (f"eval recall@1 {summary['eval_recall_at_1']:.3f}, MRR {summary['eval_mrr']:.3f} "
                f"(bare backbone {summary['bare_recall_at_1']:.3f}, {summary['bare_mrr']:.3f})")
    if summary.get("eval_accuracy") is not None:
        return f"eval accuracy {summary['eval_accuracy']:.3f}"
    if summary.get("eval_loss") is not None:
        return f"eval loss {summary['eval_loss']:.4f}, exact match {summary['eval_exact_match']:.3f}"
    return "no evaluation data"


def _is_causal(backbone: str) -> bool:
    """Whether a backbone is a decoder LM, from its config alone (before loading the weights)."""
    from ptserve.server import hf_compat
    from ptserve.server.backbone import family_for, resolve_path

    return family_for(hf_compat.load_config(resolve_path(backbone), local_only=True)).causal
