"""The command line: a thin layer over the API that turns errors into one-line messages.

Exit codes: 0 success, 1 failure (any `MwakitError`), 2 usage, 130 interrupted (Ctrl-C), 143
terminated (SIGTERM), 129 hung up (SIGHUP). Heavy modules
(torch, the planner) are imported inside commands so `mwakit --help` and `validate` stay fast.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from mwakit import __version__
from mwakit.errors import RECIPE_FIX, MwakitError, RecipeError
from mwakit.redact import redact, redact_exception
from mwakit.signals import Terminated, terminate_on_signals

F = TypeVar("F", bound=Callable[..., Any])


def _fail(err: MwakitError) -> None:
    if isinstance(err, RecipeError) and len(err.problems) > 1:
        # Several problems: a header, then one line per problem with its own fix.
        head = f"error: {err.source or 'recipe'}: {len(err.problems)} problems"
        click.echo(redact(head), err=True)
        for p in err.problems:
            click.echo(redact(f"  {p}" + (f" — fix: {p.fix}" if p.fix else "")), err=True)
        if not all(p.fix for p in err.problems):
            click.echo(f"fix: {RECIPE_FIX}", err=True)
    else:
        click.echo(redact(f"error: {err.message}"), err=True)


def _handle_errors(fn: F) -> F:
    """Map exceptions to one line and an exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # --debug is accepted before the command (`mwakit --debug run`) and after it.
        sub_debug = bool(kwargs.pop("sub_debug", False))
        debug = sub_debug or bool(click.get_current_context().find_root().params.get("debug"))
        try:
            with terminate_on_signals():
                return fn(*args, **kwargs)
        except MwakitError as err:
            if debug:
                redact_exception(err)  # the traceback shows messages: no token in them
                raise
            _fail(err)
            sys.exit(err.exit_code)
        except KeyboardInterrupt as err:
            if debug:
                raise
            # Every output is written into a temporary folder that unwinding has removed.
            how = f" by {err.name}" if isinstance(err, Terminated) else ""
            click.echo(f"interrupted{how}: stopped, no partial output left", err=True)
            sys.exit(err.exit_code if isinstance(err, Terminated) else 130)
        except Exception as err:
            if debug:
                redact_exception(err)
                raise
            click.echo(
                redact(
                    f"error: internal error: {type(err).__name__}: {err} "
                    "(re-run with --debug for the traceback, and please report it)"
                ),
                err=True,
            )
            sys.exit(1)

    # The option is added here, so every command that maps errors also takes --debug.
    return click.option(  # type: ignore[return-value]
        "--debug", "sub_debug", is_flag=True, help="Show tracebacks instead of one-line errors."
    )(wrapper)


def set_option(fn: F) -> F:
    """``--set KEY=VALUE`` (repeatable): edit the recipe before it is validated.

    For every command that reads a recipe; load it with
    `mwakit.overrides.load_recipe_with(path, sets)`.
    """
    from mwakit.overrides import SET_HELP

    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mwakit")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Merge checkpoints of a fine-tuning run (PEFT/LoRA first) from a YAML recipe.

    \b
    mwakit validate recipe.yaml   check recipe + checkpoints, report every problem
    mwakit plan recipe.yaml       dry run: weights per checkpoint, per-tensor plan
    mwakit run recipe.yaml        merge into output.path (adapter + model card)
    mwakit init RUN_DIR|hf://REPO print a commented recipe for a run's checkpoints
    mwakit push DIR --repo-id ID  upload a merged folder to the Hub
    mwakit inspect PATH           describe a checkpoint or a run folder
    mwakit methods                list merge methods and their params
    mwakit convert mergekit.yaml  turn a mergekit config into an mwakit recipe
    mwakit fisher CKPT --base B --data D.jsonl   estimate a Fisher for `method: fisher`
    mwakit eval TARGET --data D.jsonl            score an adapter/model/recipe on held-out data
    mwakit tune recipe.yaml --data VAL.jsonl --out best.yaml   choose the merge on held-out data
    mwakit bake ADAPTER --base B -o OUT          merge an adapter into its base (full model)
    """


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--schema-only",
    is_flag=True,
    help="Check the recipe file alone (fast: no checkpoint folder is read).",
)
@set_option
@_handle_errors
def validate(recipe: Path, schema_only: bool, sets: tuple[str, ...]) -> None:
    """Check RECIPE as `plan` and `run` would: the recipe, every checkpoint's folder, config,
    headers and metrics, and whether the method can merge them; every problem at once, each
    with its location. No tensor byte is read; --schema-only reads the recipe file alone.
    """
    from mwakit.overrides import load_recipe_with
    from mwakit.validate import validate as check

    verdict = check(load_recipe_with(recipe, sets), schema_only=schema_only)
    for w in verdict.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"ok: {recipe}: {verdict.summary()}")


def _plan_text(plan: Any) -> str:
    from mwakit import wording

    doc = plan.to_json()
    space = wording.lora_space(doc["kind"], doc["lora_mode"], plan.recipe.delta_rank)
    lines = [
        f"method: {doc['method']} {json.dumps(doc['params'])}",
        *([f"lora space: {space}"] if space else []),
        f"base model: {doc['base_model'] or 'unknown'}",
        *(
            ["output: merged into the base model (a full model; no adapter is written)"]
            if plan.recipe.output.format == "merged"
            else []
        ),
        "",
    ]
    metric = doc["params"].get("metric")
    header = ["checkpoint", "step", metric or "metrics", "weight"]
    rows = []
    for c in doc["checkpoints"]:
        if metric:
            mval = c["metrics"].get(metric)
            mtxt = "" if mval is None else f"{mval:.6g}"
        else:
            mtxt = ", ".join(f"{k}={v:.4g}" for k, v in sorted(c["metrics"].items())[:3])
        step = "" if c["step"] is None else str(c["step"])
        rows.append([c["name"], step, mtxt, f"{c['weight']:.6f}"])
    if metric == "step":  # the step column already shows it
        header.pop(2)
        rows = [r[:2] + r[3:] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    s = doc["summary"]
    lines += [
        "",
        f"tensors: {s['lora_modules']} LoRA modules, {s['full_tensors']} full tensors merged, "
        f"{s['copied_tensors']} copied; read {wording.size(s['input_bytes'])}, "
        f"write {wording.size(s['output_bytes'])}",
    ]
    ranks = sorted({t["rank"] for t in doc["tensors"] if t["kind"] == "lora"})
    if ranks:
        lines.append(f"output ranks: {', '.join(map(str, ranks))}")
    ruled = [t for t in doc["tensors"] if t["rule"]]
    if ruled:
        lines.append(f"rules: {len(ruled)} tensor groups set by per-tensor rules")
    lines += _slices_text(doc.get("slices"))
    lines += _layers_text(doc.get("layers"))
    for w in doc["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _slices_text(slices: list[dict[str, Any]] | None) -> list[str]:
    """Runs of output layers and where they come from: `0–15 ← m0 layers 0–15`."""
    if not slices:
        return []
    runs: list[list[Any]] = []  # [first out, last out, checkpoint, first src, last src]
    for s in slices:
        r = runs[-1] if runs else None
        if r and r[2] == s["checkpoint"] and r[4] + 1 == s["source_layer"]:
            r[1], r[4] = s["layer"], s["source_layer"]
        else:
            src = s["source_layer"]
            runs.append([s["layer"], s["layer"], s["checkpoint"], src, src])
    out = [f"slices: {len(slices)} output layers"]
    for a, b, c, x, y in runs:
        out.append(
            f"  layer {a} ← {c} layer {x}" if a == b else f"  layers {a}–{b} ← {c} layers {x}–{y}"
        )
    return out


def _layers_text(layers: dict[str, Any] | None) -> list[str]:
    """The per-layer values table of `mwakit plan`."""
    if not layers:
        return []
    rows = layers["per_layer"]
    keys = list(rows[0]["params"]) if rows else []
    ruled = [(m, k) for m, ps in (rows[0]["rules"] if rows else {}).items() for k in ps]
    vary = len({tuple(r["weights"]) for r in rows}) > 1
    header = ["layer", "depth", *keys, *(f"{k} [{m}]" for m, k in ruled)]
    header += ["weights"] if vary else []
    table = [
        [str(r["layer"]), f"{r['t']:.3f}"]
        + [f"{r['params'][k]:.6g}" for k in keys]
        + [f"{r['rules'][m][k]:.6g}" for m, k in ruled]
        + ([", ".join(f"{w:.4g}" for w in r["weights"])] if vary else [])
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *table, strict=True)]
    out = [
        "",
        f"per-layer values: {layers['count']} layers (from {layers['source']}); tensors outside "
        "the layer stack take t = 0",
    ]
    for row in [header, *table]:
        out.append("  " + "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    return out


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole plan as JSON.")
@click.option(
    "--plot",
    "plot_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the weights against the metric into this file (the model card's plot); "
    "the extension picks the format: .png, .svg or .pdf.",
)
@set_option
@_handle_errors
def plan(recipe: Path, as_json: bool, plot_file: Path | None, sets: tuple[str, ...]) -> None:
    """Dry run: resolve weights and plan every tensor of RECIPE; writes nothing but --plot."""
    from mwakit import api
    from mwakit.overrides import load_recipe_with
    from mwakit.plot import check_plot_path, save_plot

    if plot_file is not None:
        check_plot_path(plot_file)  # before the work: a plot that cannot be written fails fast
    p = api.plan(load_recipe_with(recipe, sets))
    if plot_file is not None:
        save_plot(p, plot_file)
    click.echo(json.dumps(p.to_json(), indent=2) if as_json else _plan_text(p))
    if plot_file is not None and not as_json:
        click.echo(f"plot: {plot_file}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Override output.path.")
@click.option(
    "-f",
    "--force",
    is_flag=True,
    help="Replace an existing output folder (only an empty one or a previous mwakit output).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option(
    "--push/--no-push",
    default=None,
    help="Upload the finished folder to the Hub (default: push iff output.hub or --repo-id "
    "is set).",
)
@click.option("--repo-id", help="Hub repo to push to (overrides output.hub.repo_id).")
@click.option(
    "--executor",
    metavar="local|ray[=ADDRESS]",
    help="Where the tensor groups run (overrides the recipe's executor): this process, or "
    "Ray tasks, one per output shard (ADDRESS: the cluster, e.g. auto).",
)
@set_option
@_handle_errors
def run(
    recipe: Path,
    output: Path | None,
    force: bool,
    quiet: bool,
    push: bool | None,
    repo_id: str | None,
    executor: str | None,
    sets: tuple[str, ...],
) -> None:
    """Merge the checkpoints of RECIPE into its output folder (then push it, see --push)."""
    from mwakit import api
    from mwakit.overrides import load_recipe_with

    r = load_recipe_with(recipe, sets)
    hub = api.hub_target(repo_id, base=r.output.hub) if repo_id else None
    bar: Any = None

    def on_plan(p: Any) -> None:
        nonlocal bar
        for w in p.warnings:
            click.echo(f"warning: {w}", err=True)
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(p.tasks), unit="group", desc="merging", leave=False)

    def on_task(i: int, task: Any) -> None:
        if bar is not None:
            bar.update(1)

    try:
        res = api.run(
            r,
            output=output,
            overwrite=True if force else None,
            on_task=on_task,
            on_plan=on_plan,
            push=push,
            hub=hub,
            executor=executor,
        )
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        from mwakit import wording

        s, p = res.stats, res.plan
        space = wording.lora_space(p.kind, p.lora_mode, p.recipe.delta_rank)
        click.echo(
            f"merged {wording.plural(len(p.checkpoints), 'checkpoint')} with {p.method.name} "
            f"into {res.path} — "
            + (f"lora space {space}; " if space else "full models; ")
            + f"{wording.plural(s.tasks, 'tensor group')}, "
            f"{wording.size(s.bytes_written)} written in {s.seconds:.2f} s on {s.device}"
            + _truncation_note(s.rel_errors, s.solvers)
        )
    if res.commit_url:
        click.echo(f"pushed: {res.commit_url}")


def _truncation_note(rel_errors: dict[str, float], solvers: dict[str, str]) -> str:
    """``"; truncation error max 0.42 at <module> (…)"`` for a re-factorised merge, else ""."""
    if not rel_errors or all(v == 0.0 for v in rel_errors.values()):
        return ""
    from mwakit.card import solver_note

    name, worst = max(rel_errors.items(), key=lambda kv: kv[1])
    return f"; truncation error max {worst:.3g} at {name}{solver_note(solvers)}"


@main.command()
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Hub repo, org/name (created if missing).")
@click.option(
    "--private/--public",
    default=None,
    help="Visibility of a new repo (default: private); an existing repo keeps its own.",
)
@click.option("--revision", help="Branch to commit to (created if missing; default: main).")
@click.option("--create-pr", is_flag=True, default=None, help="Open a pull request instead.")
@click.option("-m", "--commit-message", help="Commit message.")
@_handle_errors
def push(
    output_dir: Path,
    repo_id: str,
    private: bool | None,
    revision: str | None,
    create_pr: bool | None,
    commit_message: str | None,
) -> None:
    """Upload OUTPUT_DIR (a folder `mwakit run` wrote) to the Hub in one commit.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed or written.
    """
    from mwakit import api

    target = api.hub_target(
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
    )
    click.echo(f"pushed: {api.push(output_dir, target)}")


@main.command()
@click.argument("target")
@click.option("--method", default="mwa", show_default=True, help="Merge method.")
@click.option("--metric", default="loss", show_default=True, help="Metric that weighs.")
@click.option("--penalty", default=0.7, show_default=True, type=float, help="MWA penalty p.")
@click.option(
    "--last",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Keep the last N checkpoints.",
)
@click.option("--output", "output_path", help="output.path in the recipe [out/<run>-<method>].")
@_handle_errors
def init(
    target: str,
    method: str,
    metric: str,
    penalty: float,
    last: int,
    output_path: str | None,
) -> None:
    """Print a commented recipe for the checkpoints of TARGET (a run folder or hf://org/repo).

    Each checkpoint's metrics are shown as comments; redirect to a file and run it:
    `mwakit init runs/x > recipe.yaml && mwakit run recipe.yaml`.
    """
    from mwakit.scaffold import scaffold

    click.echo(
        scaffold(
            target, method=method, metric=metric, penalty=penalty, last=last, output=output_path
        ),
        nl=False,
    )


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@_handle_errors
def inspect(path: Path, as_json: bool) -> None:
    """Describe a checkpoint folder or a run folder of checkpoint-<step>/ folders."""
    from mwakit.inspect import describe, describe_text

    doc = describe(path)
    click.echo(json.dumps(doc, indent=2) if as_json else describe_text(doc))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print methods and params as JSON.")
@_handle_errors
def methods(as_json: bool) -> None:
    """List the merge methods and their parameters.

    Float parameters may also be per-layer lists, interpolated over depth (see the README).
    """
    from mwakit.layer_params import per_layer_keys
    from mwakit.methods import get_method, method_names

    docs: list[dict[str, Any]] = []
    for name in method_names():
        m = get_method(name)
        schema = m.params.model_json_schema()
        lists = per_layer_keys(m.params)
        params = {
            k: {
                "type": v.get("type")
                or " | ".join(
                    str(x.get("type", x.get("enum", x.get("const")))) for x in v.get("anyOf", [])
                )
                or ("enum" if "enum" in v else "any"),
                "default": v.get("default"),
                **({"choices": v["enum"]} if "enum" in v else {}),
                "description": v.get("description", ""),
                "per_layer": k in lists,
            }
            for k, v in schema.get("properties", {}).items()
        }
        docs.append(
            {
                "name": name,
                "summary": m.summary,
                "formula": m.formula,
                "spaces": list(m.spaces),
                "reference": m.reference,
                "params": params,
            }
        )
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    for d in docs:
        click.echo(f"{d['name']}: {d['summary']}")
        click.echo(f"  formula: {d['formula']}")
        click.echo(f"  spaces: {', '.join(d['spaces'])}; reference: {d['reference']}")
        for k, v in d["params"].items():
            choices = f" ({'|'.join(map(str, v['choices']))})" if "choices" in v else ""
            layered = " (or a per-layer list)" if v["per_layer"] else ""
            click.echo(f"  {k}{choices} = {json.dumps(v['default'])}{layered}: {v['description']}")
        click.echo("")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the recipe to this file instead of stdout.",
)
@click.option("-f", "--force", is_flag=True, help="Replace an existing --output file.")
@_handle_errors
def convert(config: Path, output: Path | None, force: bool) -> None:
    """Turn the mergekit config CONFIG into an equivalent mwakit recipe.

    The recipe goes to stdout (or --output); every part of the config that has no mwakit
    equivalent is named on stderr, one line each. Exit 1 when nothing usable is left.
    """
    from mwakit.convert import convert_file
    from mwakit.errors import UsageError

    if output is not None and output.exists() and not force:
        raise UsageError(
            "the output file exists", where=str(output), fix="pass --force to replace it"
        )
    conv = convert_file(config)
    text = conv.to_yaml(str(config))
    for line in conv.untranslated:
        click.echo(f"cannot translate: {line}", err=True)
    for line in conv.notes:
        click.echo(f"note: {line}", err=True)
    if output is None:
        click.echo(text, nl=False)
    else:
        from mwakit.errors import OutputError

        tmp = output.with_name(f".{output.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(output)  # never a half-written recipe
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OutputError(
                f"cannot write the recipe: {err.strerror}",
                where=str(output),
                fix="write it into an existing, writable folder",
            ) from err
        click.echo(f"wrote {output}", err=True)


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--base",
    "base",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the base model the adapter was trained on.",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help='JSONL: {"text": ...}, {"prompt": ..., "completion": ...} or {"input_ids": [...]}.',
)
@click.option("--max-examples", default=64, show_default=True, help="Examples to average over.")
@click.option(
    "--sampled",
    is_flag=True,
    help="Sample labels from the model (true Fisher) instead of the data's (empirical).",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--out-name",
    default="fisher.safetensors",
    show_default=True,
    help="File written beside the checkpoint (the fisher method's fisher_file).",
)
@_handle_errors
def fisher(
    checkpoint: Path,
    base: Path,
    data: Path,
    max_examples: int,
    sampled: bool,
    seed: int,
    out_name: str,
) -> None:
    """Estimate the diagonal Fisher of CHECKPOINT's trainable tensors for `method: fisher`.

    The Fisher is the mean over examples of the squared gradient of log p(y|x), saved beside
    the checkpoint with the adapter's own keys.
    """
    from mwakit.fisher_estimate import estimate_fisher

    out = estimate_fisher(
        base,
        checkpoint,
        data,
        max_examples=max_examples,
        empirical=not sampled,
        seed=seed,
        out_name=out_name,
    )
    click.echo(f"wrote {out}")


@main.command(name="eval")
@click.argument("target")
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help='JSONL rows: {"prompt","completion"}, {"text"}, {"messages"} or '
    '{"prompt","choices","label"}.',
)
@click.option(
    "--base",
    help="Base model folder or hf:// ref [default: the adapters' base_model_name_or_path].",
)
@click.option(
    "--metric",
    "metric",
    default="loss",
    show_default=True,
    help="Comma-separated: loss, perplexity, exact_match, accuracy, module:function.",
)
@click.option("--tokenizer", help="Tokenizer folder [default: the base's, else the adapter's].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option(
    "--batch-tokens", default=2048, show_default=True, help="Padded tokens per forward pass."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_handle_errors
def eval_cmd(
    target: str,
    data: Path,
    base: str | None,
    metric: str,
    tokenizer: str | None,
    device: str,
    batch_tokens: int,
    as_json: bool,
) -> None:
    """Score TARGET on held-out DATA: an adapter folder (a checkpoint), a model folder, or a
    recipe (merged in memory, nothing written).

    Each metric is shown with its standard error over the rows (loss: mean token NLL).
    exact_match uses greedy decoding (no generation when the completion ends with the EOS
    token).
    """
    from mwakit.evaluate import evaluate

    res = evaluate(
        target,
        base=base,
        data=data,
        metrics=metric,
        tokenizer=tokenizer,
        device=device,
        batch_tokens=batch_tokens,
    )
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2, sort_keys=True))
        return
    click.echo(f"target: {res.target}")
    click.echo(f"base:   {res.base}")
    se = res.standard_errors()
    rows = [
        [k, f"{v:.6g}", f"± {se[k]:.3g}" if k in se else "", str(len(res.per_row.get(k, [])) or "")]
        for k, v in res.metrics.items()
    ]
    header = ["metric", "value", "se", "rows"]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
    for r in [header, *rows]:
        click.echo("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
    click.echo(f"{res.tokens} tokens scored in {res.seconds:.2f}s", err=True)


def _cache_size(text: str) -> int:
    """--cache-memory: a size with its unit, or 0."""
    from mwakit.errors import UsageError
    from mwakit.recipe import parse_size

    if text.strip() == "0":
        return 0
    try:
        return parse_size(text)
    except ValueError as err:
        raise UsageError(str(err), where="--cache-memory", fix="give e.g. 4GiB, or 0") from None


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, help="VAL: the JSONL rows every candidate is scored on.")
@click.option("--test", help="TEST: scored for the baselines and the chosen merge only.")
@click.option("--base", help="Base model folder or hf:// ref [the adapters' base_model].")
@click.option("--tokenizer", help="Tokenizer folder [the base's].")
@click.option("--metric", default="loss", show_default=True, help="The metric to choose by.")
@click.option(
    "--search",
    "search",
    default="penalty",
    show_default=True,
    help="Searches, comma-separated: penalty, last, greedy, weights, groups.",
)
@click.option(
    "--budget", default=30, show_default=True, type=int, help="Most candidates per search."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the chosen recipe here (and the plot beside it, as .png).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--workers", default=0, show_default=True, type=int, help="Local processes.")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="Score on Ray actors (no ADDRESS: start a local cluster; --workers: actors).",
)
@click.option(
    "--trial-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL trial log: resume from it, append to it.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--seed", default=0, show_default=True, type=int, help="CMA-ES's seed.")
@click.option(
    "--cache-memory",
    metavar="SIZE",
    help="Checkpoint tensors kept in memory across candidates, per worker (e.g. 4GiB; 0: "
    "none) [a quarter of the RAM, split among local --workers].",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@set_option
@_handle_errors
def tune(
    recipe: Path,
    data: str,
    test: str | None,
    base: str | None,
    tokenizer: str | None,
    metric: str,
    search: str,
    budget: int,
    out: Path | None,
    as_json: bool,
    workers: int,
    ray_address: str | None,
    trial_log: Path | None,
    device: str,
    seed: int,
    cache_memory: str | None,
    quiet: bool,
    sets: tuple[str, ...],
) -> None:
    """Search how to merge RECIPE's checkpoints, scoring each candidate on --data (VAL).

    Baselines (last, best single, uniform) are always scored; the choice is made on VAL
    alone (a simpler merge within 1 paired SE of the best wins) and TEST is scored for the
    baselines and the chosen merge only. --out gets a plain recipe that `mwakit run`
    reproduces.
    """
    from mwakit.overrides import load_recipe_with
    from mwakit.tune import tune as run_tune

    # Read (and --set) before any data or model is loaded: a bad recipe fails at once.
    loaded = load_recipe_with(recipe, sets) if sets else recipe
    cache_bytes = None if cache_memory is None else _cache_size(cache_memory)
    bar: Any = None

    def on_trial(trial: Any, done: int, total: int) -> None:
        nonlocal bar
        if quiet or not sys.stderr.isatty():
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="trial", desc="tuning", leave=False)
        bar.total = max(bar.total, done)
        bar.set_postfix_str(trial.name[:30], refresh=False)
        bar.update(1)

    try:
        res = run_tune(
            loaded,
            data=data,
            test=test,
            base=base,
            tokenizer=tokenizer,
            metric=metric,
            searches=search,
            budget=budget,
            out=out,
            trial_log=trial_log,
            workers=workers,
            ray=ray_address,
            device=device,
            seed=seed,
            on_trial=on_trial,
            cache_memory=cache_bytes,
        )
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
        return
    click.echo(res.table())
    if res.resumed:
        click.echo(f"resumed: {res.resumed} trials read from {trial_log}", err=True)
    if res.out is not None:
        click.echo(f"wrote {res.out}" + (f" and {res.plot}" if res.plot else ""))


@main.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option(
    "--base",
    "base",
    required=True,
    help="The base model: a folder saved with save_pretrained, or hf://org/repo[@revision].",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder."
)
@click.option(
    "-f",
    "--force",
    is_flag=True,
    help="Replace an existing output folder (only an empty one or a previous mwakit output).",
)
@click.option(
    "--shard-size", default="5GB", show_default=True, help="Largest output shard (500MB, 2GiB)."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="Written dtype of floating-point tensors [default: the base's].",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@_handle_errors
def bake(
    adapter: Path,
    base: str,
    output: Path,
    force: bool,
    shard_size: str,
    dtype: str | None,
    quiet: bool,
) -> None:
    """Merge the LoRA adapter folder ADAPTER into its base model, streamed, into --output.

    The output is a full model (sharded safetensors + index, config.json, tokenizer and
    generation files of the base, a model card) that loads without PEFT. The base is read one
    tensor at a time: memory stays small whatever its size.
    """
    from mwakit.bake import bake as run_bake

    bar: Any = None

    def on_tensor(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, unit="tensor", desc="baking", leave=False)
        if bar is not None:
            bar.update(1)

    try:
        res = run_bake(
            adapter,
            base,
            output,
            overwrite=force,
            shard_size=shard_size,
            dtype=dtype,
            on_tensor=on_tensor,
        )
    finally:
        if bar is not None:
            bar.close()
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    if not quiet:
        click.echo(
            f"baked {adapter} into {base}: {res.path} — {res.changed} of {res.tensors} tensors "
            f"changed, {res.bytes_written / 1e6:.1f} MB written in {res.seconds:.2f} s"
        )


if __name__ == "__main__":
    main()
