"""Command line: ``beats-compile MODEL [-o OUT] ...``.  The only module that
prints or picks exit codes (0 ok, 1 verification failed, 2 bad input or
usage, 3 internal error)."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from .cli_common import EXIT_INTERNAL, EXIT_OK, EXIT_VERIFY, Parser, human, positive_float
from .errors import short_message


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b").rstrip("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 512k, 16M, 1G)") from None


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", help=f"output path (default: {default_out} beside the input)")
    p.add_argument("--report", metavar="REPORT.json", help="write the JSON report here (for CI)")
    p.add_argument("--inputs", metavar="X.npz", help="verify with these inputs (name -> array) instead of generated ones")
    p.add_argument("--no-verify", action="store_true", help="skip verification on ONNX Runtime")
    p.add_argument("--bisect", action="store_true",
                   help="name the pass and node that change the outputs most, even when verification passes "
                        "(done anyway when it fails)")
    p.add_argument("--rtol", type=positive_float, help="relative tolerance of verification")
    p.add_argument("--atol", type=positive_float, help="absolute tolerance of verification")
    p.add_argument("--verify-memory", type=_size, metavar="BYTES",
                   help="verify one model at a time, its weights fed from their files, in parts of at most BYTES "
                        "of weights (default: automatic; models over 1 GiB run so in 512M parts)")
    p.add_argument("--verify-scope", choices=("auto", "full", "partial"), default="auto",
                   help="full: every output; partial: the outputs that need the first 2 x --verify-memory bytes of "
                        "weights, on a truncated copy, plus the weights compared tensor by tensor; "
                        "auto (default): partial past 4 GiB of weights")
    p.add_argument("--external-data", action="store_true",
                   help="write weights to <output>.data (automatic over 2 GB or when the input used external data)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    p.add_argument("--max-nodes", type=_count, default=None, metavar="N",
                   help="refuse models with more than N nodes in all graphs (default 1000000)")
    p.add_argument("--max-depth", type=_count, default=None, metavar="N",
                   help="refuse models whose subgraphs nest more than N deep (default 16)")


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return v


def _limits(args: argparse.Namespace):
    from .validate import DEFAULT_MAX_DEPTH, DEFAULT_MAX_NODES, Limits

    return Limits(max_nodes=args.max_nodes or DEFAULT_MAX_NODES, max_depth=args.max_depth or DEFAULT_MAX_DEPTH)


def build_parser() -> argparse.ArgumentParser:
    from .targets import TARGETS, target_passes

    p = Parser(
        prog="beats-compile",
        description="Optimize an ONNX model for a target and prove on ONNX Runtime that it computes the same function. "
                    "Subcommands: `beats-compile insert|fold|unfold MODEL ...` (see `beats-compile insert --help`), "
                    "`beats-compile artifacts|train ...` (training D/V on ONNX Runtime), "
                    "`beats-compile adapter-base|export-adapter ...` (one base, many ONNX Runtime adapters).",
        epilog="Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 internal error.",
    )
    _common(p, "<stem>.beats.onnx")
    p.add_argument("--target", default="cpu", choices=sorted(TARGETS), help="deployment target (default: cpu)")
    p.add_argument("--no-latency", action="store_true",
                   help="verify, but skip the latency measurement (up to 2 s of alternating ORT runs)")
    p.add_argument("--disable-pass", action="append", default=[], metavar="NAME",
                   help=f"skip a pass (repeatable): {', '.join(target_passes())}")
    p.add_argument("--fold-size-limit", type=_size, metavar="BYTES",
                   help="most bytes one constant fold may add to the model (default 4M); larger folds are skipped")
    p.add_argument("--fold-memory-limit", type=_size, metavar="BYTES",
                   help="most bytes constant folding may allocate in all (default 1G); further folds are skipped")
    p.add_argument("--max-rounds", type=int, default=8, help="cap on pass-manager rounds (default 8)")
    p.add_argument("--check-each-pass", action="store_true", help="run the ONNX checker after every pass that changes the graph")
    t = p.add_argument_group("gpu and npu targets")
    t.add_argument("--strict", action="store_true",
                   help="fail (exit 1) when any node falls back off the target's provider")
    t.add_argument("--fp32-ops", default="", metavar="OP,OP",
                   help="gpu: ops to keep in fp32 besides the built-in block list")
    t.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...", type=_input_shape,
                   help="npu: static shape of an input (repeatable); default: from --calib or --inputs samples")
    t.add_argument("--calib", metavar="DATA.npz|random",
                   help="npu: calibration samples (per input, stacked on a first axis; a quarter is held out "
                        "for the accuracy check), or 'random' (accuracy on real data then unknown)")
    t.add_argument("--activation-type", default="uint8", choices=("uint8", "uint16", "float16"),
                   help="npu: activation type (default uint8); float16 quantizes nothing: the HTP runs the model in fp16")
    t.add_argument("--soc-model", type=int, metavar="N",
                   help="npu: QNN's SoC model number the HTP sessions compile for (default 60, the x86-64 HTP "
                        "backend's; it sets the HTP memory a graph may use, and the fp16 mode needs one)")
    t.add_argument("--weight-type", default="uint8", choices=("uint8", "int8"), help="npu: weight type (default uint8)")
    t.add_argument("--per-channel", action="store_true", help="npu: per-channel weights (Conv; MatMul/Gemm as int8 symmetric per output channel)")
    t.add_argument("--min-cosine", type=positive_float, metavar="C",
                   help="npu: least cosine similarity to fp32 on held-out inputs (default 0.99)")
    t.add_argument("--precompile", action="store_true",
                   help="npu: also write <stem>.ctx.onnx, an EPContext model holding the compiled QNN HTP context")
    return p


def _input_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition("=")
    try:
        values = [int(d) for d in dims.split(",")]
    except ValueError:
        values = []
    if not sep or not name or not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"not NAME=D0,D1,... with positive dims: {text!r}")
    return name, values


SUBCOMMANDS = ("insert", "fold", "unfold")
TRAINING_SUBCOMMANDS = ("artifacts", "train")
ADAPTER_SUBCOMMANDS = ("adapter-base", "export-adapter")


def build_reparam_parser(cmd: str) -> argparse.ArgumentParser:
    epilog = "Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 internal error."
    if cmd == "insert":
        p = Parser(prog="beats-compile insert", epilog=epilog,
                    description="Reparameterize selected weights as W0 + D (.) V (V = 0: the function is unchanged). "
                                "Also writes <OUT stem>.trainable.json beside the output.")
        _common(p, "<stem>.inserted.onnx")
        p.add_argument("--ops", default=None, metavar="OP,OP",
                       help="consumer op types whose weights are selected (default MatMul,Gemm,Conv,ConvTranspose,LSTM,GRU,RNN: W and R of the recurrent ops)")
        p.add_argument("--embeddings", action="store_true", help="also select Gather tables (embeddings)")
        p.add_argument("--include", action="append", default=[], metavar="GLOB", help="only weights whose name matches (repeatable)")
        p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip weights whose name matches (repeatable)")
        p.add_argument("--min-size", type=int, default=None, metavar="N", help="only weights of at least N elements (default 1024)")
        p.add_argument("--factorization", default=None, help="full | vector | rank:R (default full)")
        p.add_argument("--layout", default=None, choices=("weight", "branch"), help="weight (default) or branch (rank:R only)")
        p.add_argument("--config", metavar="POLICY.json", help="selection rules as JSON (replaces the selection flags)")
        p.add_argument("--seed", type=int, default=None, help="seed of the random D (and A) initialization (default 0)")
        p.add_argument("--d-scale", type=float, default=None, help="D = 1 + d_scale * N(0,1) (default 0.02)")
    elif cmd == "fold":
        p = Parser(prog="beats-compile fold", epilog=epilog,
                    description="Fold W0 + D (.) V into each reparameterized weight: the original nodes, no inference cost.")
        _common(p, "<stem>.folded.onnx")
        p.add_argument("--values", metavar="X.npz", help="trained D/V tensors by name (instead of the model's own)")
        p.add_argument("--adapter", metavar="A.npz", help="an adapter (D/V plus records): also applies to the base model")
        p.add_argument("--save-adapter", metavar="A.npz", help="also save the D/V being folded as an adapter file")
    else:
        p = Parser(prog="beats-compile unfold", epilog=epilog,
                    description="Re-insert an adapter's D/V into a folded model to continue training.")
        _common(p, "<stem>.unfolded.onnx")
        p.add_argument("--adapter", metavar="A.npz", required=True, help="the adapter the model was folded with")
    return p


def build_adapter_parser(cmd: str) -> argparse.ArgumentParser:
    from .targets import TARGETS

    epilog = "Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 internal error."
    if cmd == "adapter-base":
        p = Parser(prog="beats-compile adapter-base", epilog=epilog,
                   description="Make the adapter base of an inserted model: every D/V (A/B) becomes a graph input "
                               "with a default that adds nothing (V = 0, or A/B of rank 0), so the base alone is the "
                               "original model and ONNX Runtime adapters (export-adapter) switch fine-tunes per run. "
                               "Optimized by the target's pipeline and verified against the original.")
        p.add_argument("model", metavar="INSERTED.onnx", help="a model made by `beats-compile insert` (never modified)")
        p.add_argument("-o", "--output", help="output path (default: <stem>.base.onnx beside the input)")
        p.add_argument("--target", default="cpu", choices=sorted(TARGETS),
                       help="deployment target (default: cpu; gpu and npu cannot take adapters and say why)")
        p.add_argument("--inputs", metavar="X.npz", help="verify with these inputs instead of generated ones")
        p.add_argument("--rtol", type=positive_float, help="relative tolerance of verification (default: the target's)")
        p.add_argument("--atol", type=positive_float, help="absolute tolerance of verification (default: the target's)")
        p.add_argument("--external-data", action="store_true",
                       help="write weights to <output>.data (automatic over 2 GB or when the input used external data)")
        p.add_argument("--max-nodes", type=_count, default=None, metavar="N",
                       help="refuse models with more than N nodes in all graphs (default 1000000)")
        p.add_argument("--max-depth", type=_count, default=None, metavar="N",
                       help="refuse models whose subgraphs nest more than N deep (default 16)")
    else:
        p = Parser(prog="beats-compile export-adapter", epilog=epilog,
                   description="Write trained D/V (an adapter .npz from `beats-compile train`) as an ONNX Runtime "
                               ".onnx_adapter for an adapter base, after checking that it fits the base and that the "
                               "base with the adapter active equals the folded model (max abs diff <= 1e-4).")
        p.add_argument("model", metavar="ADAPTER.npz", help="the adapter (D/V plus records; never modified)")
        p.add_argument("--base", required=True, metavar="BASE.onnx",
                       help="the adapter base (`beats-compile adapter-base`)")
        p.add_argument("-o", "--output", help="output path (default: <adapter stem>.onnx_adapter beside the adapter)")
        p.add_argument("--inputs", metavar="X.npz", help="verify with these inputs instead of generated ones")
    p.add_argument("--report", metavar="REPORT.json", help="write the JSON report here (for CI)")
    p.add_argument("--no-verify", action="store_true", help="skip verification on ONNX Runtime")
    p.add_argument("--no-latency", action="store_true", help="verify, but skip the latency measurement (up to 2 s)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def _print_summary(console, report) -> None:
    from rich.table import Table

    title = f"beats-compile  target={report.target}" if report.command == "compile" else f"beats-compile {report.command}"
    t = Table(title=title, show_lines=False)
    t.add_column("", style="bold")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_row("nodes", str(report.nodes_before), str(report.nodes_after))
    t.add_row("initializers", str(report.initializers_before), str(report.initializers_after))
    t.add_row("weights", human(report.weight_bytes_before), human(report.weight_bytes_after))
    t.add_row("file size", human(report.file_size_before), human(report.file_size_after))
    t.add_row("latency (median, ORT CPU)",
              _fmt(report.latency_ms_before, ".3f") + " ms" if report.latency_ms_before is not None else "-",
              _fmt(report.latency_ms_after, ".3f") + " ms" if report.latency_ms_after is not None else "-")
    console.print(t)

    _print_reparam(console, report.reparam)
    changed = [(name, row) for name, row in report.pass_totals().items() if row["modified"]]
    if report.command not in ("compile", "adapter-base"):
        pass
    elif changed:
        pt = Table(title="passes that changed the graph")
        pt.add_column("pass")
        pt.add_column("rounds", justify="right")
        pt.add_column("seconds", justify="right")
        pt.add_column("what changed")
        for name, row in changed:
            stats = ", ".join(f"{k}={v}" for k, v in sorted(row["stats"].items()) if v)
            pt.add_row(name, str(row["modified"]), f"{row['seconds']:.3f}", stats)
        console.print(pt)
    else:
        console.print("no pass changed the graph")
    ops_b, ops_a = report.op_histogram_before, report.op_histogram_after
    delta = {op: ops_a.get(op, 0) - ops_b.get(op, 0) for op in sorted(set(ops_b) | set(ops_a))}
    delta = {k: v for k, v in delta.items() if v}
    if delta:
        console.print("ops: " + ", ".join(f"{k} {v:+d}" for k, v in delta.items()))
    _print_legality(console, report)
    if report.verify_inputs_generated:
        from rich.markup import escape

        from .inputs import summary_line

        console.print(escape(summary_line(report.verify_inputs_generated)), soft_wrap=True)
    if report.verified is None:
        console.print("[yellow]verification skipped (--no-verify)[/]")
    elif report.verified and report.target == "npu" and report.command == "compile":
        console.print(f"[green]verified[/] on the QNN HTP backend ({report.verify_input_source})")
        for o in report.outputs:
            console.print(f"  output {o['name']}: {o['detail']}")
    elif report.verified:
        console.print(f"[green]verified[/] on ONNX Runtime ({report.verify_input_source} inputs): "
                      f"max abs diff {report.max_abs_diff:.3g}, max rel diff {report.max_rel_diff:.3g} "
                      f"(rtol {report.rtol:g}, atol {report.atol:g})")
        if report.verify_method and report.verify_method != "side by side":
            console.print(f"  the two models were run {report.verify_method}")
    elif report.legality and report.legality.get("strict") and not report.legality.get("ok"):
        console.print("[red bold]--strict: nodes fall back off the target's provider (see above)[/]")
    else:
        npu_acc = report.target == "npu" and report.command == "compile"  # a cosine bar, not a tolerance
        console.print("[red bold]verification FAILED[/]"
                      + (f" on the QNN HTP backend ({report.verify_input_source})" if npu_acc else ""))
        for o in report.outputs:
            if not o["ok"]:
                diff = "" if npu_acc else f"max abs diff {o['max_abs_diff']:.3g} "
                console.print(f"  output {o['name']}: {diff}{o['detail']}")
        if report.culprit:
            console.print(f"  {report.culprit['message']}", markup=False, soft_wrap=True)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")


def _print_legality(console, report) -> None:
    leg = getattr(report, "legality", None)
    if not leg:
        return
    where = "QNN HTP session" if leg["source"] == "qnn-session" else "static check"
    console.print(f"legality ({where}): {leg['nodes_on_target']}/{leg['nodes_total']} nodes on the target "
                  f"({100 * leg['fraction_on_target']:.1f}%), compute nodes {leg['compute_nodes_on_target']}/"
                  f"{leg['compute_nodes_total']}")
    for issue in leg["fallback"]:
        console.print(f"  [yellow]not taken[/] {issue['node']} ({issue['op']}): {'; '.join(issue['reasons'])}")
    for issue in leg["expected_fallback"]:
        console.print(f"  on CPU by design: {issue['node']} ({issue['op']})")
    for note in leg["notes"]:
        console.print(f"  note: {note}")


def _print_reparam(console, info: dict | None) -> None:
    from rich.table import Table

    if not info:
        return
    if info.get("inserted"):
        t = Table(title="reparameterized weights (W0 + D (.) V)")
        for col in ("weight", "shape", "factorization", "layout", "consumers", "trainable"):
            t.add_column(col, justify="right" if col == "trainable" else "left")
        for w in info["inserted"]:
            fact = f"rank:{w['rank']}" if w["factorization"] == "rank" else w["factorization"]
            t.add_row(w["weight"], "x".join(map(str, w["shape"])), fact, w["layout"], ",".join(sorted(set(w["consumers"]))),
                      f"{w['trainable_params']:,}")
        console.print(t)
        total, model = info["trainable_params_total"], info["model_params"]
        console.print(f"trainable parameters: {total:,} of {model:,} ({100.0 * total / max(model, 1):.2f}%)")
    for w, why in info.get("skipped", {}).items():
        console.print(f"[yellow]skipped[/] {w}: {why}")
    if info.get("folded"):
        console.print(f"folded {len(info['folded'])} weight(s); largest |D (.) V| "
                      f"{max(f['max_abs_delta'] for f in info['folded']):.3g}")
    if info.get("unfolded"):
        console.print(f"re-inserted D/V for {len(info['unfolded'])} weight(s)")
    if info.get("adapter_parameters"):
        ranks = f", rank {'/'.join(map(str, info['ranks']))}" if info.get("ranks") else ""
        console.print(f"adapter parameters: {info['adapter_parameters']} graph inputs for {info['adapter_weights']} "
                      f"weight(s) ({', '.join(info['factorizations'])}{ranks}, {', '.join(info['layouts'])} layout); "
                      f"one adapter: {human(info['adapter_bytes'])}; "
                      f"defaults in the base: {human(info['default_bytes'])}")


def _prepare(args: argparse.Namespace, default_suffix: str):
    from .errors import InputError
    from .io import check_output_path, default_output_path, load_model
    from .verify import load_inputs

    if args.output:
        out = Path(args.output)
    else:
        out = default_output_path(args.model)
        out = out.with_name(out.name.replace(".beats.onnx", default_suffix))
    report_path = Path(args.report) if args.report else None
    loaded = load_model(args.model, lazy=True, limits=_limits(args))
    external = args.external_data or loaded.uses_external_data
    check_output_path(loaded, out, external_data=external)
    if report_path is not None:
        check_output_path(loaded, report_path, external_data=False)
        if report_path.resolve() == out.resolve():
            raise InputError(f"{report_path}: the report and the model cannot share a path")
    inputs = load_inputs(args.inputs) if args.inputs else None
    return loaded, out, report_path, external, inputs


class _Status:
    def __init__(self, console, quiet: bool):
        self.status = None if quiet else console.status("loading", spinner="dots")

    def __enter__(self):
        if self.status is not None:
            self.status.start()
        return (lambda msg: self.status.update(msg)) if self.status is not None else None

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.stop()


def _finish(args, console, result, out: Path, report_path: Path | None, external: bool, extra=None) -> int:
    """Save (only if verified or unverified-by-request), report, summarize."""
    from .io import atomic_write_bytes, save_model

    report = result.report
    if report.verified is False:
        exit_code = EXIT_VERIFY
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"beats-compile: {report.failure_line()}", markup=False,
                                                    soft_wrap=True)
    else:
        saved = save_model(result.model, out, external_data=external, base_dir=result.base_dir)
        report.output = str(saved.path)
        report.file_size_after = saved.file_bytes
        if extra is not None:
            extra(out)
        exit_code = EXIT_OK
    if report_path is not None:
        atomic_write_bytes(report_path, (report.to_json() + "\n").encode())
    if not args.quiet:
        _print_summary(console, report)
        if report.culprit and exit_code == EXIT_OK:
            console.print(f"bisect: {report.culprit['message']}", markup=False, soft_wrap=True)
        if exit_code == EXIT_OK:
            console.print(f"wrote {out}" + (f" (+ {out.name}.data)" if external else ""), markup=False, soft_wrap=True)
        else:
            leg = getattr(report, "legality", None)
            console.print("[red]nothing written: " + ("--strict legality failed[/]" if leg and leg.get("strict") and not leg.get("ok")
                                                       else "the result does not match the original[/]"))
    return exit_code


def run_compile(args: argparse.Namespace, console) -> int:
    from . import pipeline
    from .errors import InputError
    from .options import CompileOptions, PassOptions, TargetOptions, VerifyOptions

    loaded, out, report_path, external, inputs = _prepare(args, ".beats.onnx")
    if args.max_rounds < 1:
        raise InputError("--max-rounds must be at least 1")
    shapes = dict(args.input_shape)
    if len(shapes) != len(args.input_shape):
        raise InputError("--input-shape: an input is given twice")
    ctx_path = None
    if args.precompile:
        from .io import check_output_path

        ctx_path = out.with_name((out.name[:-5] if out.name.endswith(".onnx") else out.name) + ".ctx.onnx")
        check_output_path(loaded, ctx_path, external_data=False)
    options = CompileOptions(
        target=args.target,
        passes=PassOptions(disable=tuple(args.disable_pass or ()), max_rounds=args.max_rounds,
                           check_each_pass=args.check_each_pass, fold_size_limit=args.fold_size_limit,
                           fold_memory_limit=args.fold_memory_limit),
        verify=VerifyOptions(enabled=not args.no_verify, inputs=inputs, rtol=args.rtol, atol=args.atol,
                             measure_latency=not args.no_latency, memory=args.verify_memory,
                             scope=args.verify_scope),
        target_options=TargetOptions(input_shapes=shapes or None, calib=args.calib,
                                     fp32_ops=tuple(o.strip() for o in args.fp32_ops.split(",") if o.strip()),
                                     precompile=args.precompile, activation_type=args.activation_type,
                                     weight_type=args.weight_type, per_channel=args.per_channel,
                                     min_cosine=args.min_cosine, soc_model=args.soc_model),
        strict=args.strict,
        bisect=args.bisect,
    )
    with _Status(console, args.quiet) as progress:
        result = pipeline.compile(loaded, options, progress)

    def write_ctx(_out: Path) -> None:
        from .io import atomic_write_bytes

        if ctx_path is not None and result.precompiled is not None:
            atomic_write_bytes(ctx_path, result.precompiled)
            result.report.target_details.setdefault("precompiled", {})["path"] = str(ctx_path)
            if not args.quiet:
                console.print(f"wrote {ctx_path} (EPContext, QNN HTP)", markup=False, soft_wrap=True)

    return _finish(args, console, result, out, report_path, external, write_ctx)


def _policy(args: argparse.Namespace):
    import json as _json

    from passes import reparam as rp

    from .errors import InputError

    try:
        if args.config:
            flags = [f for f in ("ops", "factorization", "layout", "min_size") if getattr(args, f) is not None]
            if flags or args.include or args.exclude or args.embeddings:
                raise InputError("--config replaces the selection flags; give one or the other")
            try:
                data = _json.loads(Path(args.config).read_text())
            except FileNotFoundError:
                raise InputError(f"{args.config}: config file not found") from None
            except (OSError, ValueError) as exc:
                raise InputError(f"{args.config}: not a JSON policy ({exc})") from None
            if args.seed is not None:
                data["seed"] = args.seed
            if args.d_scale is not None:
                data["d_scale"] = args.d_scale
            return rp.Policy.from_dict(data)
        ops = tuple(o.strip() for o in args.ops.split(",") if o.strip()) if args.ops else rp.DEFAULT_OPS
        if args.embeddings and "Gather" not in ops:
            ops = ops + ("Gather",)
        rule = rp.Rule(
            ops=ops,
            include=tuple(args.include),
            exclude=tuple(args.exclude),
            min_size=1024 if args.min_size is None else args.min_size,
            factorization=args.factorization or "full",
            layout=args.layout or "weight",
        )
        return rp.Policy((rule,), 0 if args.seed is None else args.seed, 0.02 if args.d_scale is None else args.d_scale)
    except rp.ReparamError as exc:
        raise InputError(str(exc)) from None


def run_reparam(cmd: str, args: argparse.Namespace, console) -> int:
    import json as _json

    from . import reparam
    from .io import atomic_write_bytes, check_output_path

    common = dict(verify=not args.no_verify, rtol=args.rtol, atol=args.atol, verify_memory=args.verify_memory,
                  verify_scope=args.verify_scope)
    flags = dict(bisect=args.bisect)
    if cmd == "insert":
        policy = _policy(args)
        loaded, out, report_path, external, inputs = _prepare(args, ".inserted.onnx")
        manifest = reparam.manifest_path(out)
        check_output_path(loaded, manifest, external_data=False)
        with _Status(console, args.quiet) as progress:
            kw = {k: v for k, v in common.items() if v is not None}
            result = reparam.insert(loaded, policy, inputs=inputs, progress=progress, **kw, **flags)

        def write_manifest(_out: Path) -> None:
            text = _json.dumps(reparam.trainable_manifest(result.model), indent=2) + "\n"
            atomic_write_bytes(manifest, text.encode())
            if not args.quiet:
                console.print(f"wrote {manifest}", markup=False, soft_wrap=True)

        return _finish(args, console, result, out, report_path, external, write_manifest)
    if cmd == "fold":
        loaded, out, report_path, external, inputs = _prepare(args, ".folded.onnx")
        values = reparam.load_values(args.values) if args.values else None
        adapter = reparam.Adapter.load(args.adapter) if args.adapter else None
        if args.save_adapter:
            check_output_path(loaded, Path(args.save_adapter), external_data=False)
            own = reparam.Adapter.from_model(loaded.model, loaded.base_dir)
            for given in (values, adapter.values if adapter is not None else None):  # fold's precedence
                if given:
                    own.values.update({k: v for k, v in given.items() if k in own.values})
        with _Status(console, args.quiet) as progress:
            result = reparam.fold(loaded, values, adapter=adapter, inputs=inputs, progress=progress, **common, **flags)
        extra = (lambda _out: own.save(args.save_adapter)) if args.save_adapter else None
        return _finish(args, console, result, out, report_path, external, extra)
    loaded, out, report_path, external, inputs = _prepare(args, ".unfolded.onnx")
    adapter = reparam.Adapter.load(args.adapter)
    with _Status(console, args.quiet) as progress:
        result = reparam.unfold(loaded, adapter, inputs=inputs, progress=progress, **common, **flags)
    return _finish(args, console, result, out, report_path, external)


def run_adapter(cmd: str, args: argparse.Namespace, console) -> int:
    """``adapter-base`` and ``export-adapter`` (``beats_compiler.adapters``)."""
    from . import adapters
    from .errors import InputError
    from .io import atomic_write_bytes
    from .verify import load_inputs

    if cmd == "adapter-base":
        why = adapters.refusal(args.target)
        if why:
            raise InputError(why)
        loaded, out, report_path, external, inputs = _prepare(args, ".base.onnx")
        with _Status(console, args.quiet) as progress:
            result = adapters.make_base(loaded, target=args.target, verify=not args.no_verify, inputs=inputs,
                                        rtol=args.rtol, atol=args.atol, measure_latency=not args.no_latency,
                                        progress=progress)
        return _finish(args, console, result, out, report_path, external)
    adapter = Path(args.model)
    stem = adapter.name[:-4] if adapter.name.endswith(".npz") else adapter.name
    out = Path(args.output) if args.output else adapter.with_name(stem + adapters.ADAPTER_SUFFIX)
    report_path = Path(args.report) if args.report else None
    if report_path is not None:
        taken = {p.resolve() for p in (adapter, Path(args.base), out)}
        if report_path.resolve() in taken:
            raise InputError(f"{report_path}: the report cannot share a path with the adapter, the base or the output")
    inputs = load_inputs(args.inputs) if args.inputs else None
    with _Status(console, args.quiet) as progress:
        rep = adapters.export_adapter(adapter, args.base, out, verify=not args.no_verify, inputs=inputs,
                                      measure_latency=not args.no_latency, progress=progress)
    if report_path is not None:
        atomic_write_bytes(report_path, (rep.to_json() + "\n").encode())
    if not rep.ok:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"beats-compile: {rep.failure_line()}", markup=False,
                                                    soft_wrap=True)
    if not args.quiet:
        _print_export(console, rep)
    return EXIT_OK if rep.ok else EXIT_VERIFY


def _print_export(console, rep) -> None:
    ranks = f", rank {'/'.join(map(str, rep.ranks))}" if rep.ranks else ""
    console.print(f"beats-compile export-adapter: {rep.parameters} parameters for {rep.weights} weight(s){ranks}, "
                  f"{human(rep.bytes)}", markup=False, soft_wrap=True)
    if rep.verified is None:
        console.print("[yellow]verification skipped (--no-verify)[/]")
    elif rep.verified:
        console.print(f"[green]verified[/] on ONNX Runtime ({rep.verify_input_source} inputs): the base with "
                      f"the adapter active vs the folded model, max abs diff {rep.max_abs_diff:.3g} "
                      f"(atol {rep.atol:g})")
    else:
        console.print("[red bold]verification FAILED[/]: the base with the adapter active does not match the "
                      "folded model")
        for o in rep.outputs:
            if not o["ok"]:
                console.print(f"  output {o['name']}: max abs diff {o['max_abs_diff']:.3g} {o['detail']}", markup=False)
    if rep.latency_ms_folded is not None:
        console.print(f"latency (median, ORT CPU): folded {rep.latency_ms_folded:.3f} ms, base + adapter "
                      f"{rep.latency_ms_adapter:.3f} ms")
    for w in rep.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    if rep.output:
        console.print(f"wrote {rep.output} ({human(rep.file_bytes)})", markup=False, soft_wrap=True)
    else:
        console.print("[red]nothing written: the adapter does not match the folded model[/]")


class _LazyConsole:
    """A ``rich`` console made on first use: ``-q`` runs that print nothing never
    import rich (about 60 ms of a small model's compile)."""

    def __init__(self, **kw):
        self._kw, self._console = kw, None

    def __getattr__(self, name):
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kw)
        return getattr(self._console, name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINING_SUBCOMMANDS:  # ORT training: beats_compiler/training/cli.py
        from .training.cli import main as training_main

        return training_main(argv)
    cmd = argv[0] if argv and argv[0] in SUBCOMMANDS + ADAPTER_SUBCOMMANDS else None
    if cmd in ADAPTER_SUBCOMMANDS:
        parser = build_adapter_parser(cmd)
    else:
        parser = build_reparam_parser(cmd) if cmd else build_parser()
    args = parser.parse_args(argv[1:] if cmd else argv)
    console = _LazyConsole(stderr=False, highlight=False)
    err = _LazyConsole(stderr=True, highlight=False)
    from .errors import BeatsError

    try:
        if cmd in ADAPTER_SUBCOMMANDS:
            return run_adapter(cmd, args, console)
        return run_reparam(cmd, args, console) if cmd else run_compile(args, console)
    except BeatsError as exc:
        kind = "internal error" if exc.exit_code == EXIT_INTERNAL else "error"
        err.print(f"beats-compile: {kind}: {short_message(str(exc), None, raw=True)}", markup=False, soft_wrap=True)
        if args.debug:
            traceback.print_exc()
        _report_error(args, cmd, exc.exit_code, short_message(str(exc), None, raw=True))
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("beats-compile: interrupted", markup=False)
        return 130
    except MemoryError:
        err.print("beats-compile: error: out of memory", markup=False)
        return EXIT_INTERNAL
    except Exception as exc:  # a bug: one line unless --debug
        err.print(f"beats-compile: internal error: {type(exc).__name__}: {short_message(str(exc), None, raw=True)}"
                  + ("" if args.debug else " (rerun with --debug for the traceback)"), markup=False, soft_wrap=True)
        if args.debug:
            traceback.print_exc()
        _report_error(args, cmd, EXIT_INTERNAL, f"{type(exc).__name__}: {short_message(str(exc), None, raw=True)}")
        return EXIT_INTERNAL


def _report_error(args, cmd: str | None, code: int, message: str) -> None:
    """CI reads the report even when the command failed: write the error there
    (never over the model file)."""
    import json as _json

    if not getattr(args, "report", None):
        return
    path = Path(args.report)
    try:
        from .io import default_output_path

        taken = {Path(args.model).resolve(), default_output_path(args.model).resolve()}
        if args.output:
            taken.add(Path(args.output).resolve())
        if getattr(args, "base", None):  # export-adapter
            taken.add(Path(args.base).resolve())
        if path.resolve() in taken or (path.exists() and not path.is_file()) or not path.parent.is_dir():
            return
        from .io import atomic_write_bytes

        body = {"command": cmd or "compile", "input": args.model, "verified": None, "exit_code": code, "error": message}
        atomic_write_bytes(path, (_json.dumps(body, indent=2) + "\n").encode())
    except Exception:  # the error itself was already reported on stderr
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
