"""The ``peftkit`` command line (typer): ``train``, ``inspect``, ``merge``, ``generate``, ``predict``.

Each command is a thin layer over a module of this package; user errors print one line and exit with code 2.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from .common import (
    EXIT_INTERRUPTED,
    TASKS,
    CliError,
    HelpGroup,
    guard,
    method_names,
    parse_options,
    quiet_library_noise,
)
from .data import DATA_HELP

app = typer.Typer(
    name="peftkit",
    help="Parameter-efficient fine-tuning from the command line: train an adapter, inspect, merge or try it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: wraps whole words at the terminal's width (up to 120 columns), shows a bool option as
    # --flag / --no-flag without a value, and leaves brackets such as "peftkit[plot]" alone (rich markup ate them)
    rich_markup_mode=None,
    cls=HelpGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
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
    quiet_library_noise()  # before any command imports transformers (and through it torchao)


def _split_targets(value: str | None) -> list[str] | str | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise CliError("--target-modules is empty")
    return parts[0] if parts == ["all-linear"] else parts


# ---------------------------------------------------------------------------------------------------- train
_TRAIN_HELP = """Train an adapter with transformers' Trainer: adapter-only checkpoints, resume, keep-best, multi-process
runs under torchrun / accelerate launch unchanged.

CONFIG is an optional YAML file with one key per flag (underscores: batch_size: 8); flags given on the command
line override it. The resolved configuration is printed and saved as OUTPUT/train_config.yaml, so
`peftkit train OUTPUT/train_config.yaml --overwrite` reruns the run.

Defaults per task: --lr 5e-3 and 10 epochs for seq-cls, token-cls and question-ans; --lr 1e-3 and 3 epochs for
causal-lm, seq2seq-lm and feature-extraction; --alpha 2 x rank for LoRA-style methods. Ctrl-C saves
OUTPUT/checkpoint-STEP and exits with code 130; continue with --resume."""


def _bool_flag(name: str, help_text: str) -> Any:
    return typer.Option(f"--{name}/--no-{name}", help=help_text, show_default=False)


@app.command(help=_TRAIN_HELP)
def train(
    config: Annotated[str | None, typer.Argument(help="YAML config file (keys = flag names with underscores).",
                                                 show_default=False)] = None,
    model: Annotated[str | None, typer.Option(help="Base model: a local directory or a Hugging Face Hub id.")] = None,
    data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
    task: Annotated[str | None, typer.Option(help=f"One of: {', '.join(TASKS)} (default causal-lm).")] = None,
    method: Annotated[str | None, typer.Option(
        help="Adapter method (default lora): any registered method, e.g. lora, dora, ia3, loha, lokr, "
             "prompt-tuning, p-tuning, prefix-tuning.")] = None,
    r: Annotated[int | None, typer.Option("--r", help="Rank (default: the method's).")] = None,
    alpha: Annotated[float | None, typer.Option(
        help="Scaling alpha (default 2 x rank for LoRA-style methods, else the method's).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Adapter dropout (default: the method's).")] = None,
    target_modules: Annotated[str | None, typer.Option(
        help="Comma-separated module names, or all-linear (default: the model type's table).")] = None,
    num_virtual_tokens: Annotated[int | None, typer.Option(
        help="Prompt-learning methods: virtual tokens (default 20).")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="Any other config field as key=value (JSON or Python values; booleans also as True, yes, 1), repeatable: "
                               "-o use_rslora=true -o init_lora_weights=pissa.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training data (default per task).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps (overrides epochs).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default per task: 5e-3 classification, "
                                                  "1e-3 generation).")] = None,
    lr_scheduler: Annotated[str | None, typer.Option(help="Learning-rate schedule: linear (default), cosine, "
                                                          "constant, constant_with_warmup, ...")] = None,
    warmup_ratio: Annotated[float | None, typer.Option(help="Linear warmup over this fraction of the steps.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup over this many steps.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay (default 0).")] = None,
    optim: Annotated[str | None, typer.Option(help="Trainer optimizer: adamw_torch (default), sgd, "
                                                   "paged_adamw_8bit, ...")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Gradient clipping norm (default 1.0).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step and process (default 8).")] = None,
    gradient_accumulation_steps: Annotated[int | None, typer.Option(
        help="Batches summed into one optimizer step (default 1).")] = None,
    eval_batch_size: Annotated[int | None, typer.Option(help="Evaluation batch size (default: --batch-size).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Truncate texts to this many tokens (default 128).")] = None,
    bf16: Annotated[bool | None, _bool_flag("bf16", "bfloat16 mixed precision.")] = None,
    fp16: Annotated[bool | None, _bool_flag("fp16", "float16 mixed precision (GPU).")] = None,
    gradient_checkpointing: Annotated[bool | None, _bool_flag(
        "gradient-checkpointing", "Recompute activations in backward: less memory, slower.")] = None,
    eval_data: Annotated[str | None, typer.Option(help="Held-out data (same format): loss, and accuracy + "
                                                       "macro-F1 for classifiers, at start and every epoch.")] = None,
    eval_steps: Annotated[int | None, typer.Option(help="Evaluate every N steps instead of every epoch.")] = None,
    save_steps: Annotated[int | None, typer.Option(help="Write OUTPUT/checkpoint-STEP every N steps (with "
                                                        "--eval-data: at every evaluation by default).")] = None,
    save_total_limit: Annotated[int | None, typer.Option(help="Checkpoints kept (default 2; the best is kept "
                                                              "too).")] = None,
    keep_best: Annotated[bool | None, _bool_flag(
        "keep-best", "With --eval-data, save the adapter of the lowest eval loss, not the last (default on).")] = None,
    early_stopping_patience: Annotated[int | None, typer.Option(
        help="Stop after N evaluations without a lower eval loss.")] = None,
    logging_steps: Annotated[int | None, typer.Option(help="Log the loss every N steps (default: every 1% of "
                                                           "the run, at least every step).")] = None,
    report_to: Annotated[str | None, typer.Option(help="Trackers: none (default), tensorboard, wandb, "
                                                       "all, or a comma-separated list.")] = None,
    output: Annotated[str | None, typer.Option(help="Directory for the adapter, tokenizer, train_config.yaml, "
                                                    "training_log.json, loss_curve.png (default peftkit-output).")] = None,
    overwrite: Annotated[bool | None, _bool_flag(
        "overwrite", "Replace the adapter in a non-empty --output (its old checkpoints are removed).")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue from a checkpoint directory, or 'last' (the newest "
                                                    "in --output); other flags override the run's config.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    text_field: Annotated[str | None, typer.Option(help="Input field of a row (default per task: text; tokens for "
                                                        "token-cls; question for question-ans).")] = None,
    label_field: Annotated[str | None, typer.Option(help="Target field (default per task: label, tags, target, "
                                                         "answer, pair).")] = None,
    format: Annotated[str | None, typer.Option(
        help="causal-lm row format: auto (default: from the first row's fields), text, alpaca, messages "
             "(also sharegpt), prompt-completion.")] = None,
    train_on_prompt: Annotated[bool | None, _bool_flag(
        "train-on-prompt", "causal-lm: learn the whole text; by default the prompt (alpaca prompt, user and "
                           "system turns) is masked out of the loss.")] = None,
    chat_template: Annotated[str | None, typer.Option(
        help="Jinja chat template (a file or the template text) for messages rows, instead of the "
             "tokenizer's.")] = None,
    packing: Annotated[bool | None, _bool_flag(
        "packing", "causal-lm: fill blocks of --max-length tokens with whole examples (kept apart by "
                   "position ids).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer directory or Hub id (default: the model's).")] = None,
    load_in_4bit: Annotated[bool | None, _bool_flag(
        "load-in-4bit", "QLoRA: load the base in 4 bits (nf4, bitsandbytes; peftkit[bnb]).")] = None,
    load_in_8bit: Annotated[bool | None, _bool_flag(
        "load-in-8bit", "Load the base in 8 bits (bitsandbytes; peftkit[bnb]).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Base weights' dtype: float32, bfloat16, float16 or auto "
                                                   "(default auto: the checkpoint's; also the 4-bit compute "
                                                   "dtype).")] = None,
    device_map: Annotated[str | None, typer.Option(help="transformers device_map: auto, cpu, cuda:0, or a JSON "
                                                        "object.")] = None,
    progress: Annotated[bool | None, _bool_flag(
        "progress", "Progress bar (default); --no-progress prints the loss as lines.")] = None,
    interrupt_after: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    given = dict(locals())  # every flag (None = not given), before anything else is bound here
    given.pop("config")
    from .train import resolve
    from .train import train as run_training

    with guard():
        given["target_modules"] = _split_targets(target_modules)
        given["option"] = parse_options(option) if option else None
        given["report_to"] = [t.strip() for t in report_to.split(",") if t.strip()] if report_to else None
        args = resolve(config, given)
        try:
            run_training(args, echo=_echo)
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
    output: Annotated[str, typer.Option(help="Directory for the merged model (must be new or empty unless "
                                             "--overwrite).")],
    dtype: Annotated[str | None, typer.Option(help="Save weights as float32, float16 or bfloat16 "
                                                   "(default: the base model's).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model to merge into (default: the adapter config's "
                                                   "base_model_name_or_path).")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors file, e.g. 5GB, 500MB; bigger models "
                                                     "are split into shards with an index.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --output directory.")] = False,
) -> None:
    """Write the base model with the adapter merged into its weights: a plain transformers model (config.json,
    generation_config.json, safetensors shards, tokenizer) that AutoModelFor*.from_pretrained and vLLM load
    without peftkit."""
    from .infer import merge as run_merge

    with guard():
        run_merge(adapter, output, dtype, model, max_shard_size=max_shard_size, overwrite=overwrite, echo=_echo)


# ---------------------------------------------------------------------------------------------------- generate
_MaxNewTokens = Annotated[int, typer.Option(help="Tokens to generate per prompt or reply (at least 1).")]
_DoSample = Annotated[bool, typer.Option("--do-sample", help="Sample instead of greedy decoding.")]
_Temperature = Annotated[float | None, typer.Option(help="Sampling temperature (> 0; needs --do-sample).")]
_TopP = Annotated[float | None, typer.Option(help="Nucleus sampling: keep the smallest set of tokens with this "
                                                  "much probability (0 < p <= 1; needs --do-sample).")]
_TopK = Annotated[int | None, typer.Option(help="Sample among the k most likely tokens (0: all; needs "
                                                "--do-sample).")]
_RepetitionPenalty = Annotated[float | None, typer.Option(help="Penalise tokens already generated (> 1 "
                                                               "penalises; 1: none).")]
_Seed = Annotated[int | None, typer.Option(help="Random seed: the same seed repeats a sampled run.")]
_Stream = Annotated[bool | None, typer.Option("--stream/--no-stream", show_default=False,
                                              help="Print text as it is generated (default: on a terminal).")]


def _sampling(max_new_tokens: int, do_sample: bool, temperature: float | None, top_p: float | None,
              top_k: int | None, repetition_penalty: float | None, seed: int | None) -> Any:
    from .infer import Sampling

    return Sampling(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed)


def _stream_default(stream: bool | None) -> bool:
    import sys

    return sys.stdout.isatty() if stream is None else stream


@app.command()
def generate(
    adapter: Annotated[str, typer.Argument(help="Adapter directory (causal-lm or seq2seq-lm).")],
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt text (repeatable).")] = None,
    prompts_file: Annotated[str | None, typer.Option(help="Prompts from a file: one per line, or .jsonl with a "
                                                          "JSON string or {\"prompt\": ...} per line.")] = None,
    max_new_tokens: _MaxNewTokens = 32,
    do_sample: _DoSample = False,
    temperature: _Temperature = None,
    top_p: _TopP = None,
    top_k: _TopK = None,
    repetition_penalty: _RepetitionPenalty = None,
    seed: _Seed = None,
    stream: _Stream = None,
    model: Annotated[str | None, typer.Option(help="Base model override.")] = None,
) -> None:
    """Generate with the adapted model (greedy unless --do-sample); causal-lm output is printed after its prompt.
    For a conversation with the chat template, use `peftkit chat`."""
    from .infer import generate as run_generate
    from .infer import read_prompts

    with guard():
        sampling = _sampling(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        prompts = list(prompt or []) + (read_prompts(prompts_file) if prompts_file is not None else [])
        if not prompts:
            raise CliError("no prompt: pass --prompt TEXT or --prompts-file FILE")
        try:
            run_generate(adapter, prompts, sampling, model, stream=_stream_default(stream), echo=_echo)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None


# ---------------------------------------------------------------------------------------------------- chat
@app.command()
def chat(
    adapter: Annotated[str, typer.Argument(help="Adapter directory (causal-lm).")],
    system: Annotated[str | None, typer.Option(help="System message that starts the conversation.")] = None,
    chat_template: Annotated[str | None, typer.Option(help="Jinja chat template file (default: the "
                                                           "tokenizer's).")] = None,
    max_new_tokens: _MaxNewTokens = 256,
    do_sample: _DoSample = False,
    temperature: _Temperature = None,
    top_p: _TopP = None,
    top_k: _TopK = None,
    repetition_penalty: _RepetitionPenalty = None,
    seed: _Seed = None,
    stream: _Stream = None,
    model: Annotated[str | None, typer.Option(help="Base model override.")] = None,
) -> None:
    """Talk with the adapted model: each line you type is a user message, the reply is generated from the whole
    conversation formatted by the tokenizer's chat template. /exit or Ctrl-D quits, /reset forgets the history.
    Reads stdin, so `peftkit chat ADAPTER < questions.txt` answers a file of messages."""
    import sys

    from .chat import chat as run_chat

    with guard():
        sampling = _sampling(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        try:
            run_chat(adapter, sampling, model, system=system, chat_template=chat_template,
                     stream=_stream_default(stream), interactive=sys.stdin.isatty(), echo=_echo)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None


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


# ---------------------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_(
    adapter: Annotated[str, typer.Argument(help="Adapter directory.")],
    data: Annotated[str, typer.Option(help="Rows in the training format of the adapter's task (see `peftkit "
                                           "train --help`).")],
    text_field: Annotated[str | None, typer.Option(help="Input field of a row (default: the task's).")] = None,
    label_field: Annotated[str | None, typer.Option(help="Target field of a row (default: the task's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass.")] = 8,
    max_length: Annotated[int, typer.Option(help="Truncate texts to this many tokens.")] = 512,
    model: Annotated[str | None, typer.Option(help="Base model override.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Score the adapter on a data file: accuracy, macro-F1, per-class precision/recall and the confusion matrix
    for seq-cls and token-cls; loss and perplexity for causal-lm and seq2seq-lm; loss for other tasks."""
    from .evaluate import evaluate, format_report

    with guard():
        report = evaluate(adapter, data, model, text_field, label_field, batch_size, max_length)
        typer.echo(json.dumps(report, indent=2) if as_json else format_report(report, data))


# ---------------------------------------------------------------------------------------------------- push
@app.command()
def push(
    adapter: Annotated[str, typer.Argument(help="Adapter directory (training checkpoints in it are skipped).")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repo: NAME or USER_OR_ORG/NAME (created if needed).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    token: Annotated[str | None, typer.Option(help="Hub token (default: HF_TOKEN or `hf auth login`).")] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Hub id of the base model to record in the uploaded "
                                                        "adapter_config.json (when it was trained on a local "
                                                        "copy).")] = None,
) -> None:
    """Upload an adapter directory to the Hugging Face Hub as one commit."""
    from .push import push as run_push

    with guard():
        run_push(adapter, repo_id, private=private, token=token, commit_message=commit_message,
                 base_model=base_model, echo=_echo, warn=lambda m: typer.echo(m, err=True))


# ---------------------------------------------------------------------------------------------------- methods
@app.command()
def methods() -> None:
    """List the adapter methods --method accepts (from the registry)."""
    typer.echo("\n".join(method_names()))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``peftkit`` command."""
    app(args=argv, prog_name="peftkit")


__all__ = ["app", "main"]
