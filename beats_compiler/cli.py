"""Command line: ``beats-compile MODEL [-o OUT] ...``.  The only module that
prints or picks exit codes (0 ok, 1 verification failed, 2 bad input or
usage, 3 internal error)."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

EXIT_OK, EXIT_VERIFY, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b").rstrip("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 512k, 16M, 1G)") from None


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .targets import PASSES, TARGETS

    p = _Parser(
        prog="beats-compile",
        description="Optimize an ONNX model for a target and prove on ONNX Runtime that it computes the same function.",
        epilog="Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 internal error.",
    )
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", help="output path (default: <stem>.beats.onnx beside the input)")
    p.add_argument("--target", default="cpu", choices=sorted(TARGETS), help="deployment target (default: cpu)")
    p.add_argument("--report", metavar="REPORT.json", help="write the JSON report here (for CI)")
    p.add_argument("--inputs", metavar="X.npz", help="verify with these inputs (name -> array) instead of generated ones")
    p.add_argument("--no-verify", action="store_true", help="skip verification on ONNX Runtime")
    p.add_argument("--disable-pass", action="append", default=[], metavar="NAME",
                   help=f"skip a pass (repeatable): {', '.join(PASSES)}")
    p.add_argument("--rtol", type=_positive_float, help="relative tolerance of verification (default 1e-3)")
    p.add_argument("--atol", type=_positive_float, help="absolute tolerance of verification (default 1e-4)")
    p.add_argument("--fold-size-limit", type=_size, metavar="BYTES",
                   help="most bytes one constant fold may add to the model (default 4M); larger folds are skipped")
    p.add_argument("--max-rounds", type=int, default=8, help="cap on pass-manager rounds (default 8)")
    p.add_argument("--check-each-pass", action="store_true", help="run the ONNX checker after every pass that changes the graph")
    p.add_argument("--external-data", action="store_true",
                   help="write weights to <output>.data (automatic over 2 GB or when the input used external data)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def _print_summary(console, report) -> None:
    from rich.table import Table

    t = Table(title=f"beats-compile  target={report.target}", show_lines=False)
    t.add_column("", style="bold")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_row("nodes", str(report.nodes_before), str(report.nodes_after))
    t.add_row("initializers", str(report.initializers_before), str(report.initializers_after))
    t.add_row("weights", _human(report.weight_bytes_before), _human(report.weight_bytes_after))
    t.add_row("file size", _human(report.file_size_before), _human(report.file_size_after))
    t.add_row("latency (median, ORT CPU)",
              _fmt(report.latency_ms_before, ".3f") + " ms" if report.latency_ms_before is not None else "-",
              _fmt(report.latency_ms_after, ".3f") + " ms" if report.latency_ms_after is not None else "-")
    console.print(t)

    changed = [(name, row) for name, row in report.pass_totals().items() if row["modified"]]
    if changed:
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
    if report.verified is None:
        console.print("[yellow]verification skipped (--no-verify)[/]")
    elif report.verified:
        console.print(f"[green]verified[/] on ONNX Runtime ({report.verify_input_source} inputs): "
                      f"max abs diff {report.max_abs_diff:.3g}, max rel diff {report.max_rel_diff:.3g} "
                      f"(rtol {report.rtol:g}, atol {report.atol:g})")
    else:
        console.print("[red bold]verification FAILED[/]")
        for o in report.outputs:
            if not o["ok"]:
                console.print(f"  output {o['name']}: max abs diff {o['max_abs_diff']:.3g} {o['detail']}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")


def run_compile(args: argparse.Namespace, console) -> int:
    from . import api
    from .errors import InputError
    from .io import atomic_write_bytes, check_output_path, default_output_path, load_model, save_model
    from .verify import load_inputs

    out = Path(args.output) if args.output else default_output_path(args.model)
    report_path = Path(args.report) if args.report else None
    loaded = load_model(args.model)
    external = args.external_data or loaded.uses_external_data
    check_output_path(loaded, out, external_data=external)
    if report_path is not None:
        check_output_path(loaded, report_path, external_data=False)
        if report_path.resolve() == out.resolve():
            raise InputError(f"{report_path}: the report and the model cannot share a path")
    inputs = load_inputs(args.inputs) if args.inputs else None
    if args.max_rounds < 1:
        raise InputError("--max-rounds must be at least 1")

    status = console.status("loading", spinner="dots") if not args.quiet else None
    if status is not None:
        status.start()
    try:
        result = api.compile(
            loaded,
            args.target,
            verify=not args.no_verify,
            inputs=inputs,
            rtol=args.rtol,
            atol=args.atol,
            disable=args.disable_pass,
            max_rounds=args.max_rounds,
            fold_size_limit=args.fold_size_limit,
            check_each_pass=args.check_each_pass,
            progress=(lambda msg: status.update(msg)) if status is not None else None,
        )
    finally:
        if status is not None:
            status.stop()
    report = result.report
    if report.verified is False:
        exit_code = EXIT_VERIFY
    else:
        saved = save_model(result.model, out, external_data=external)
        report.output = str(saved.path)
        report.file_size_after = saved.file_bytes
        exit_code = EXIT_OK
    if report_path is not None:
        atomic_write_bytes(report_path, (report.to_json() + "\n").encode())
    if not args.quiet:
        _print_summary(console, report)
        if exit_code == EXIT_OK:
            console.print(f"wrote {out}" + (f" (+ {out.name}.data)" if external else ""))
        else:
            console.print(f"[red]nothing written: the compiled model does not match the original[/]")
    return exit_code


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=False, highlight=False)
    err = Console(stderr=True, highlight=False)
    from .errors import BeatsError

    try:
        return run_compile(args, console)
    except BeatsError as exc:
        kind = "internal error" if exc.exit_code == EXIT_INTERNAL else "error"
        err.print(f"beats-compile: {kind}: {_one_line(str(exc))}", markup=False, soft_wrap=True)
        if args.debug:
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("beats-compile: interrupted", markup=False)
        return 130
    except MemoryError:
        err.print("beats-compile: error: out of memory", markup=False)
        return EXIT_INTERNAL
    except Exception as exc:  # a bug: one line unless --debug
        err.print(f"beats-compile: internal error: {type(exc).__name__}: {_one_line(str(exc))}"
                  + ("" if args.debug else " (rerun with --debug for the traceback)"), markup=False, soft_wrap=True)
        if args.debug:
            traceback.print_exc()
        return EXIT_INTERNAL


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
