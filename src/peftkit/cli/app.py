"""The ``peftkit`` command line (typer): ``train``, ``inspect``, ``merge``, ``generate``, ``predict``.

Each command is a thin layer over a module of this package; user errors print one line and exit with code 2.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import EXIT_INTERRUPTED, TASKS, CliError, guard, method_names, parse_options

app = typer.Typer(
    name="peftkit",
    help="Parameter-efficient fine-tuning from the command line: train an adapter, inspect, merge or try it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _echo(message: str) -> None:
    typer.echo(message)


def _print_version(value: bool) -> None:
    if value:
        from ..config import PEFTKIT_VERSION

        typer.echo(f"peftkit {PEFTKIT_VERSION}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                help="Print the version and exit.")] = False) -> None:
    """Parameter-efficient fine-tuning from the command line: train an adapter, inspect, merge or try it."""


def _split_targets(value: str | None) -> list[str] | str | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise CliError("--target-modules is empty")
    return parts[0] if parts == ["all-linear"] else parts


# ---------------------------------------------------------------------------------------------------- train
@app.command()
def train(
    model: Annotated[str | None, typer.Option(help="Base model: a local directory or a Hugging Face Hub id.")] = None,
    data: Annotated[str | None, typer.Option(help="Training data: a .jsonl (one JSON object per line) or .csv.")] = None,
    task: Annotated[str | None, typer.Option(help=f"One of: {', '.join(TASKS)} (default causal-lm).")] = None,
    method: Annotated[str | None, typer.Option(
        help="Adapter method (default lora): any registered method, e.g. lora, dora, ia3, loha, lokr, "
             "prompt-tuning, p-tuning, prefix-tuning.")] = None,
    r: Annotated[int | None, typer.Option("--r", help="Rank (default: the method's).")] = None,
    alpha: Annotated[float | None, typer.Option(help="Scaling alpha (lora_alpha / alpha; default: the method's).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Adapter dropout (default: the method's).")] = None,
    target_modules: Annotated[str | None, typer.Option(
        help="Comma-separated module names, or all-linear (default: the model type's table).")] = None,
    num_virtual_tokens: Annotated[int | None, typer.Option(
        help="Prompt-learning methods: virtual tokens (default 20).")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="Any other config field as key=value (JSON values), repeatable: "
                               "-o use_rslora=true -o init_lora_weights=pissa.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training data (default 3).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps (overrides epochs).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of AdamW, decayed linearly to 0 (default 1e-3).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (default 0).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step (default 8).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Truncate texts to this many tokens (default 128).")] = None,
    eval_data: Annotated[str | None, typer.Option(help="Held-out data (same format): loss, and accuracy for "
                                                       "classifiers, before training and after each epoch.")] = None,
    output: Annotated[str | None, typer.Option(help="Directory for the adapter, tokenizer and training_log.json "
                                                    "(default peftkit-output).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    text_field: Annotated[str | None, typer.Option(help="Input field of a row (default per task: text; tokens for "
                                                        "token-cls; question for question-ans).")] = None,
    label_field: Annotated[str | None, typer.Option(help="Target field (default per task: label, tags, target, "
                                                         "answer, pair).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer directory or Hub id (default: the model's).")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue a run from the checkpoint Ctrl-C wrote "
                                                    "(<output>/checkpoint); other options override its settings.")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    interrupt_after: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Train an adapter on a data file with a plain PyTorch loop; Ctrl-C saves a checkpoint for --resume."""
    from .train import TrainArgs, args_for_resume, load_state
    from .train import train as run_training

    given = {
        "model": model, "data": data, "task": task, "method": method, "r": r, "alpha": alpha, "dropout": dropout,
        "num_virtual_tokens": num_virtual_tokens, "epochs": epochs, "max_steps": max_steps, "lr": lr,
        "weight_decay": weight_decay, "batch_size": batch_size, "max_length": max_length, "eval_data": eval_data,
        "output": output, "seed": seed, "text_field": text_field, "label_field": label_field,
        "tokenizer": tokenizer, "interrupt_after": interrupt_after,
    }
    with guard():
        given["target_modules"] = _split_targets(target_modules)
        if option:
            given["options"] = parse_options(option)
        given["progress"] = progress
        state = None
        if resume is not None:
            state = load_state(resume)
            args = args_for_resume(state, given)
        else:
            missing = [f"--{k}" for k in ("model", "data") if given[k] is None]
            if missing:
                raise CliError(f"missing option {' and '.join(missing)} (or --resume <checkpoint dir>)")
            args = TrainArgs(**{k: v for k, v in given.items() if v is not None})
        try:
            run_training(args, resume=state, echo=_echo)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None


# ---------------------------------------------------------------------------------------------------- inspect
@app.command("inspect")
def inspect_(
    adapter: Annotated[str, typer.Argument(help="Adapter directory (adapter_config.json + weights).")],
    plot: Annotated[str | None, typer.Option(help="Also draw the update strength per layer and per module type "
                                                  "into this image (needs matplotlib: peftkit[plot]).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Method, task, base model, targets, ranks, size, and per-layer update strength (‖ΔW‖_F, effective rank),
    from the saved files alone."""
    from .inspect_cmd import format_report, inspect_adapter
    from .inspect_cmd import plot as draw

    with guard():
        info = inspect_adapter(adapter)
        if plot:
            draw(info, plot)
        typer.echo(json.dumps(info, indent=2) if as_json else format_report(info))
        if plot and not as_json:
            typer.echo(f"plot written to {plot}")


# ---------------------------------------------------------------------------------------------------- merge
@app.command()
def merge(
    adapter: Annotated[str, typer.Argument(help="Adapter directory.")],
    output: Annotated[str, typer.Option(help="Directory for the merged model (transformers from_pretrained).")],
    dtype: Annotated[str | None, typer.Option(help="Save weights as float32, float16 or bfloat16 "
                                                   "(default: the base model's).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model to merge into (default: the adapter config's "
                                                   "base_model_name_or_path).")] = None,
) -> None:
    """Write the base model with the adapter merged into its weights (+ the tokenizer)."""
    from .infer import merge as run_merge

    with guard():
        run_merge(adapter, output, dtype, model, echo=_echo)


# ---------------------------------------------------------------------------------------------------- generate
@app.command()
def generate(
    adapter: Annotated[str, typer.Argument(help="Adapter directory (causal-lm or seq2seq-lm).")],
    prompt: Annotated[list[str], typer.Option(help="Prompt text (repeatable).")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 32,
    model: Annotated[str | None, typer.Option(help="Base model override.")] = None,
) -> None:
    """Greedy generation with the adapted model."""
    from .infer import generate as run_generate

    with guard():
        run_generate(adapter, prompt, max_new_tokens, model, echo=_echo)


# ---------------------------------------------------------------------------------------------------- predict
@app.command()
def predict(
    adapter: Annotated[str, typer.Argument(help="Adapter directory (seq-cls or token-cls).")],
    text: Annotated[list[str] | None, typer.Option(help="Text to classify (repeatable).")] = None,
    data: Annotated[str | None, typer.Option(help="Or a .jsonl/.csv file of rows to classify.")] = None,
    text_field: Annotated[str, typer.Option(help="Field of --data rows holding the text.")] = "text",
    model: Annotated[str | None, typer.Option(help="Base model override.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the predictions as JSON.")] = False,
) -> None:
    """Classify texts: prints label, probability and text (one line each)."""
    from .data import is_text, read_rows
    from .infer import predict as run_predict

    with guard():
        texts = list(text or [])
        if data is not None:
            texts += [row.values[text_field] for row in read_rows(data, {text_field: is_text})]
        if not texts:
            raise CliError("nothing to classify: pass --text or --data")
        results = run_predict(adapter, texts, model, echo=(lambda _m: None) if as_json else _echo)
        if as_json:
            typer.echo(json.dumps(results, indent=2))


# ---------------------------------------------------------------------------------------------------- methods
@app.command()
def methods() -> None:
    """List the adapter methods --method accepts (from the registry)."""
    typer.echo("\n".join(method_names()))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``peftkit`` command."""
    app(args=argv, prog_name="peftkit")


__all__ = ["app", "main"]
