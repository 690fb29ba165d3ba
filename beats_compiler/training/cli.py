"""``beats-compile artifacts`` and ``beats-compile train`` (dispatched here by
``beats_compiler.cli.main``).  Prints and picks exit codes like the main CLI:
0 ok, 1 verification failed, 2 bad input or usage, 3 internal error."""

from __future__ import annotations

import argparse
import traceback

from ..cli_common import EXIT_INTERNAL, Parser, human, positive_float
from ..errors import BeatsError, short_message
from .api import generate_artifacts, train
from .common import DEFAULTS, LOSSES, OPTIMIZERS, SCHEDULES

COMMANDS = ("artifacts", "train")
_EPILOG = ("Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 internal error. "
           "The default format runs on the installed onnxruntime; --format ort needs onnxruntime-training "
           "1.19.2 (.venv-train from scripts/ort-training-env.sh, or $BEATS_TRAIN_PYTHON).")


def _betas(text: str) -> tuple[float, float]:
    try:
        b1, b2 = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not two numbers B1,B2: {text!r}") from None
    return b1, b2


def build_parser(cmd: str) -> argparse.ArgumentParser:
    if cmd == "artifacts":
        p = Parser(prog="beats-compile artifacts", epilog=_EPILOG,
                    description="Generate training artifacts for a model made by `beats-compile insert`: D/V "
                                "trainable, every other initializer frozen. Default format: a train-step model "
                                "(forward, loss, backward from the gradient pass, optimizer update) and an eval model "
                                "that `train` runs on current onnxruntime. --format ort: ONNX Runtime training's "
                                "on-device artifacts for its C/C++/C#/Java training API (needs onnxruntime-training "
                                "1.19.2 in a separate environment).")
        p.add_argument("model", help="the inserted .onnx model (never modified)")
        p.add_argument("-o", "--output-dir", dest="out", required=True, metavar="DIR", help="artifacts folder to write")
        p.add_argument("--loss", default="ce", choices=list(LOSSES),
                       help="ce (cross-entropy, int64 class labels), mse, bce (with logits) or l1 (default ce)")
        p.add_argument("--output", metavar="NAME", help="the model output the loss applies to (default: the first)")
        p.add_argument("--label-name", metavar="NAME",
                       help="name of the label input the artifacts get (default labels for ce, target otherwise)")
        p.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS), help="adamw (default) or sgd")
        p.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"],
                       help=f"default learning rate of `train` (default {DEFAULTS['lr']:g})")
        p.add_argument("--weight-decay", type=positive_float, default=DEFAULTS["weight_decay"],
                       help="AdamW weight decay (default 0)")
        p.add_argument("--betas", type=_betas, default=DEFAULTS["betas"], metavar="B1,B2",
                       help="AdamW betas (default 0.9,0.999)")
        p.add_argument("--eps", type=positive_float, default=DEFAULTS["eps"], help="AdamW epsilon (default 1e-8)")
        p.add_argument("--momentum", type=positive_float, default=0.0, help="SGD momentum (default 0)")
        p.add_argument("--ignore-index", type=int, default=-100,
                       help="ce: label value that does not count, e.g. padding tokens (default -100)")
        p.add_argument("--format", default="beats", choices=["beats", "ort"],
                       help="beats (default: run by `train` on current onnxruntime) or ort (ORT training 1.19.2's "
                            "on-device format)")
    else:
        p = Parser(prog="beats-compile train", epilog=_EPILOG,
                    description="Train the D/V of an artifacts folder on .npz data (model input names and the label "
                                "name -> arrays, first axis = examples); write metrics.json, curve.png, a checkpoint "
                                "per epoch and the trained D/V as an adapter.")
        p.add_argument("dir", metavar="DIR", help="artifacts folder from `beats-compile artifacts`")
        p.add_argument("--data", required=True, metavar="TRAIN.npz", help="training data")
        p.add_argument("--eval", dest="eval_data", metavar="EVAL.npz", help="evaluation data (loss, accuracy, early stop)")
        p.add_argument("--epochs", type=int, default=3, help="epochs (default 3)")
        p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
        p.add_argument("--lr", type=positive_float, help="peak learning rate (default: the one given to `artifacts`)")
        p.add_argument("--schedule", default="constant", choices=list(SCHEDULES),
                       help="learning-rate decay after warmup (default constant)")
        p.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear warmup steps (default 0)")
        p.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
        p.add_argument("--patience", type=int, metavar="P",
                       help="stop after P epochs without improvement of the eval metric")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run folder")
        p.add_argument("--label", metavar="NAME", help="name of the label array in the .npz files "
                                                       "(default: the artifacts' label input name)")
        p.add_argument("--out-dir", metavar="RUN", help="run folder (default DIR/run)")
        p.add_argument("--fold", metavar="OUT.onnx", help="also write the deployable model with W0 + D (.) V folded in")
        p.add_argument("--fold-atol", type=positive_float, default=1e-4,
                       help="largest |folded - trained| logit difference accepted (default 1e-4)")
        p.add_argument("--save-adapter", metavar="A.npz", help="where to write the adapter (default RUN/adapter.npz)")
        p.add_argument("--no-curve", action="store_true", help="do not draw curve.png")
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                       help="execution provider for the default format (cuda needs onnxruntime-gpu)")
        p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: onnxruntime's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def _run_artifacts(args, console) -> int:
    from rich.table import Table

    status = None if args.quiet else console.status("generating artifacts", spinner="dots")
    if status is not None:
        status.start()

    def progress(ev: dict) -> None:
        if status is not None and ev.get("type") == "message":
            status.update(ev["text"])

    try:
        res = generate_artifacts(args.model, args.out, loss=args.loss, output=args.output, label_name=args.label_name,
                                 optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                                 betas=args.betas, eps=args.eps, momentum=args.momentum,
                                 ignore_index=args.ignore_index, format=args.format, progress=progress)
    finally:
        if status is not None:
            status.stop()
    if args.quiet:
        return 0
    m = res.manifest
    t = Table(title="beats-compile artifacts")
    for col, just in (("", "left"), ("tensors", "right"), ("parameters", "right"), ("bytes", "right")):
        t.add_column(col, justify=just)
    t.add_row("trainable (D/V)", str(m["trainable"]["count"]), f"{m['trainable']['params']:,}",
              human(m["trainable"]["bytes"]))
    t.add_row("frozen", str(m["frozen"]["count"]), f"{m['frozen']['params']:,}", human(m["frozen"]["bytes"]))
    console.print(t)
    opt = m["optimizer"]
    settings = (f"lr {opt['lr']:g}, weight decay {opt['weight_decay']:g}, betas {tuple(opt['betas'])}, eps {opt['eps']:g}"
                if opt["name"] == "adamw" else f"lr {opt['lr']:g}, momentum {opt.get('momentum') or 0:g}, "
                                              f"weight decay {opt['weight_decay']:g}")
    console.print(f"loss: {m['loss']} on output {m['loss_output']!r}; label input {m['label']['name']!r} "
                  f"({m['label']['dtype']}); optimizer: {opt['name']} ({settings})")
    for fix in res.preflight.get("fixes", []):
        console.print(f"pre-flight fix: {fix if isinstance(fix, str) else fix}")
    ft = Table(title=f"wrote {res.dir}")
    ft.add_column("file")
    ft.add_column("size", justify="right")
    for name, size in res.files.items():
        ft.add_row(name, human(size))
    console.print(ft)
    return 0


def _run_train(args, console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    bar = None if args.quiet else Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                           TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                                           TimeElapsedColumn(), console=console, transient=False)
    tasks: dict[int, int] = {}
    info: dict = {}

    def progress(ev: dict) -> None:
        if bar is None:
            return
        kind = ev.get("type")
        if kind == "start":
            info.update(ev)
        elif kind == "step":
            e = ev["epoch"]
            if e not in tasks:
                tasks[e] = bar.add_task(f"epoch {e}/{info.get('epochs', '?')}", total=ev["steps"], loss="-", lr="-")
            bar.update(tasks[e], completed=ev["step"], loss=f"{ev['loss']:.4f}", lr=f"{ev['lr']:.3g}")
        elif kind == "epoch":
            parts = [f"epoch {ev['epoch']}: train loss {ev['train_loss']:.4f}"]
            if ev.get("eval_loss") is not None:
                parts.append(f"eval loss {ev['eval_loss']:.4f}")
            if ev.get("eval_accuracy") is not None:
                parts.append(f"eval accuracy {ev['eval_accuracy']:.4f}")
            parts.append(f"{ev['steps_per_s']:.1f} steps/s")
            bar.console.print(", ".join(parts) + (" *" if ev.get("best") else "")
                              + ("  (early stop)" if ev.get("stopped_early") else ""))
        elif kind == "message":
            bar.console.print(ev["text"])

    if bar is not None:
        bar.start()
    try:
        res = train(args.dir, args.data, eval_data=args.eval_data, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, schedule=args.schedule, warmup=args.warmup, seed=args.seed, patience=args.patience,
                    resume=args.resume, label=args.label, out_dir=args.out_dir, fold=args.fold,
                    save_adapter=args.save_adapter, fold_atol=args.fold_atol, curve=not args.no_curve,
                    device=args.device, threads=args.threads, progress=progress)
    finally:
        if bar is not None:
            bar.stop()
    if args.quiet:
        return 0
    m = res.metrics
    t = Table(title="beats-compile train")
    for col in ("epoch", "train loss", "eval loss", "eval accuracy", "lr", "seconds", "steps/s"):
        t.add_column(col, justify="right")
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for h in m["epochs"]:
        t.add_row(str(h["epoch"]) + (" *" if h.get("best") else ""), f(h["train_loss"], ".4f"), f(h["eval_loss"], ".4f"),
                  f(h["eval_accuracy"], ".4f"), f(h["lr"], ".3g"), f(h["seconds"], ".2f"), f(h["steps_per_s"], ".1f"))
    console.print(t)
    ie = m.get("initial_eval")
    if ie:
        console.print(f"before training: eval loss {ie['eval_loss']:.4f}"
                      + (f", eval accuracy {ie['eval_accuracy']:.4f}" if ie.get("eval_accuracy") is not None else ""))
    console.print(f"trainable parameters: {m['trainable_params']:,} (frozen {m['frozen_params']:,}); kept: {m['kept']}"
                  + ("; stopped early" if m["stopped_early"] else ""))
    from rich.markup import escape  # paths are text, not markup ("[" is legal in a file name)

    console.print(f"wrote {res.adapter} ({human(m['sizes']['adapter_bytes'])}; checkpoint "
                  f"{human(m['sizes']['checkpoint_bytes'])}), {res.metrics_path}" + (f", {res.curve}" if res.curve else ""),
                  markup=False, soft_wrap=True)
    if res.folded:
        console.print(f"[green]wrote {escape(str(res.folded))}[/]: folded model, {res.folded_node_count} nodes "
                      f"(inserted: {res.inserted_node_count}); max |folded - trained| {res.fold_max_abs_diff:.3g}",
                      soft_wrap=True)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    return 0


def main(argv: list[str]) -> int:
    from rich.console import Console

    cmd = argv[0]
    args = build_parser(cmd).parse_args(argv[1:])
    console = Console(stderr=False, highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        return _run_artifacts(args, console) if cmd == "artifacts" else _run_train(args, console)
    except BeatsError as exc:
        kind = "internal error" if exc.exit_code == EXIT_INTERNAL else "error"
        err.print(f"beats-compile: {kind}: {short_message(str(exc), None, raw=True)}", markup=False, soft_wrap=True)
        if args.debug:
            tb = getattr(exc, "worker_traceback", None)
            err.print(tb, markup=False) if tb else traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("beats-compile: interrupted", markup=False)
        return 130
    except Exception as exc:  # a bug: one line unless --debug
        err.print(f"beats-compile: internal error: {type(exc).__name__}: {short_message(str(exc), None, raw=True)}"
                  + ("" if args.debug else " (rerun with --debug for the traceback)"), markup=False, soft_wrap=True)
        if args.debug:
            traceback.print_exc()
        return EXIT_INTERNAL
