"""The ``ecdist`` command: demo, recover, compare, bench.

Options for the recovery settings are generated from ``Config``'s fields and their help
texts, so the CLI and the Python API cannot drift apart. Errors a user can cause print one
line (no traceback) and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import numpy as np

from .config import Config
from .errors import ConfigError, EcdistError, TeacherError

DEMO_ARCH = [20, 8, 1]
_NOT_FLAGS = {"activation", "student_widths"}  # given explicitly, with their own help


def angle(text: str) -> float:
    """Radians, written as a number or as ``pi/3``, ``pi``, ``0.25*pi``."""
    t = text.strip().lower().replace("π", "pi").replace(" ", "")
    m = re.fullmatch(r"(?:(\d*\.?\d+)\*?)?pi(?:/(\d*\.?\d+))?", t)
    try:
        if m:
            return float(m.group(1) or 1) * math.pi / float(m.group(2) or 1)
        return float(t)
    except (ValueError, ZeroDivisionError):
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not an angle (try 1.047 or pi/3)")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recovery settings (ecdist.Config)")
    g.add_argument("--student-widths", type=int, nargs="+", metavar="W", help="hidden widths of the students (ρ × the guess)")
    hints = get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name in _NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = next((a for a in get_args(hints[f.name]) if a is not type(None)), hints[f.name])  # X | None → X
        helptext = f"{f.metadata['help']} (default: {f.default:.4g})" if isinstance(f.default, float) else f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif get_origin(kind) is list:  # upper_widths
            g.add_argument(flag, type=int, nargs="+", default=None, metavar="W", help=helptext)
        elif f.name == "beta":
            g.add_argument(flag, type=angle, default=None, metavar="RAD", help=helptext + "; 'pi/3' is accepted")
        else:
            g.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=helptext)


def _config(args: argparse.Namespace, base: Config | None = None, **fixed: Any) -> Config:
    """The flags given, over ``base`` (a resumed run's config) or over Config's defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if f.name not in _NOT_FLAGS}
    values = {k: v for k, v in values.items() if v is not None}
    if getattr(args, "student_widths", None):
        values["student_widths"] = args.student_widths
    return base.replace(**(values | fixed)) if base is not None else Config(**(values | fixed))


def _run_folder(args: argparse.Namespace) -> tuple[Path, Config | None]:
    """The run folder of `recover` (--out, or --resume RUN_DIR) and, when resuming a run there, its config."""
    from .storage import RunFolder

    resume_dir = args.resume if isinstance(args.resume, Path) else None
    if resume_dir is not None and args.out is not None and resume_dir.resolve() != args.out.resolve():
        raise ConfigError(f"--resume {resume_dir} and --out {args.out} name different folders; give one of them")
    out = resume_dir or args.out
    if out is None:
        raise ConfigError("out: give --out DIR (the run folder), or --resume RUN_DIR to continue a run")
    run = RunFolder.existing(out, tidy=args.snapshot is None) if args.resume else None  # a snapshot only reads
    if run is None and resume_dir is not None and not (args.teacher and (args.queries or args.gaussian or args.uniform)):
        raise ConfigError(
            f"--resume {resume_dir}: there is no run in that folder to resume; give the folder of a run, or start "
            "one with --teacher, --activation, --student-widths and queries"
        )
    return out, run.config() if run is not None else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecdist",
        description="Recover the weights and layer sizes of a neural network from its input-output "
        "behaviour (Expand-and-Cluster). Start with `ecdist demo`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="recover a synthetic tanh teacher 20-8-1 end to end (about 2 minutes on 2 cores)",
        description="Recover a random tanh teacher 20-8-1 from 4,000 Gaussian queries with 20 students "
        "of width 32; print a table against the teacher and write results and a plot to --out.",
    )
    demo.add_argument("--out", type=Path, default=Path("ecdist-demo"), help="result folder (replaced if it holds a previous run)")
    demo.add_argument("--teacher-seed", type=int, default=0, help="seed of the synthetic teacher")
    demo.add_argument("--queries", type=int, default=4000, help="number of Gaussian queries")
    _add_config_flags(demo)

    rec = sub.add_parser(
        "recover",
        help="recover a teacher given as a saved state dict or a module:function black box",
        description="Query a teacher, train students, cluster their neurons and write the recovered "
        "network to --out. Example: ecdist recover --teacher teacher.pt --arch 20-8-1 --activation tanh "
        "--student-widths 32 --gaussian 4000 --out run1. Continue a killed run with "
        "`ecdist recover --resume run1`: its config, queries and teacher answers come from the folder.",
    )
    rec.add_argument("--teacher", help="a .pt/.pth/.safetensors state dict (with --arch) or 'module:function' "
                     "(required unless resuming)")
    rec.add_argument("--arch", help="architecture of a state-dict teacher, e.g. 20-8-1")
    rec.add_argument("--activation", help="hidden activation: g, tanh, identity, sigmoid, softplus, gelu, silu, relu, "
                     "leaky_relu (required unless resuming)")
    q = rec.add_mutually_exclusive_group()
    q.add_argument("--queries", type=Path, help="queries as .npy or .parquet (n rows, d_in columns)")
    q.add_argument("--gaussian", type=int, metavar="N", help="draw N standard Gaussian queries")
    q.add_argument("--uniform", type=int, metavar="N", help="draw N queries uniform in [-1, 1]^d_in")
    rec.add_argument("--d-in", type=int, help="input dimension for generated queries (default: from --arch)")
    rec.add_argument("--query-seed", type=int, default=1, help="seed of generated queries")
    rec.add_argument("--out", type=Path, help="run folder: queries, checkpoints and results")
    rec.add_argument(
        "--resume", nargs="?", const=True, type=Path, metavar="RUN_DIR",
        help="continue the run in RUN_DIR (or in --out), skipping what it finished; teacher, queries and settings "
        "come from the folder unless given again (then they must be the run's)",
    )
    rec.add_argument(
        "--snapshot", type=Path, metavar="DIR",
        help="with --resume: recover from the students as the run's checkpoints hold them now, training them no "
        "further and writing nothing into RUN_DIR (a run still training there goes on), in a run folder of its own, "
        "DIR: a deep run's later stages checkpoint there, and the same command again resumes them. It runs in this "
        "process unless --address names a Ray cluster",
    )
    rec.add_argument(
        "--address",
        help="Ray cluster to train on: 'auto' (the one `ray start` runs on this machine) or host:port "
        "(default: RAY_ADDRESS, else a local Ray for this run)",
    )
    _add_config_flags(rec)

    cmp_ = sub.add_parser(
        "compare",
        help="compare a recovered network (a result folder) with its teacher",
        description="Print per-layer sizes, the worst and median 1-|cos| per layer and the functional error.",
    )
    cmp_.add_argument("result", type=Path, help="a result folder written by `ecdist recover` or `ecdist demo`")
    cmp_.add_argument("--teacher", required=True, help="a state dict (with --arch) or 'module:function'")
    cmp_.add_argument("--arch", help="architecture of a state-dict teacher, e.g. 20-8-1")
    cmp_.add_argument("--queries", type=Path, help="test inputs (.npy/.parquet); default 2,000 fresh Gaussian inputs")
    cmp_.add_argument("--seed", type=int, default=12345, help="seed of the default test inputs")
    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub: Any) -> None:
    from .bench import BENCHMARKS

    bench = sub.add_parser(
        "bench",
        help="scaling and quality benchmarks: one JSON each and a report with plots (--scale small: ~10 min on 2 cores)",
        description="Measure students/s (stacked vs loop, 1 vs 2 Ray actors, a 3-node Ray cluster), clustering time "
        "and memory vs M (scipy vs FAISS), end-to-end recovery time vs teacher width and depth, and quality vs ρ and "
        "N; write one JSON per benchmark and report.md with plots and a scaling model to --out.",
    )
    bench.add_argument("--scale", default="small", choices=["small", "medium", "large", "tiny"], metavar="{small,medium,large}",
                       help="sizes: small ~10 min on 2 cores, medium ~1 h, large hours (default: small)")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default: bench-results/)")
    bench.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
                       help=f"run only these benchmarks ({', '.join(BENCHMARKS)}); the report covers every JSON in --out")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="students train here (auto: the CPU) and FAISS searches here; cuda writes students_gpu.json")


def _teacher(spec: str, arch: str | None, activation: str):
    from . import teachers

    if ":" in spec and not Path(spec).exists():
        return teachers.from_spec(spec)
    if not arch:
        raise TeacherError(f"--arch is needed to read the state dict {spec} (e.g. --arch 20-8-1)")
    return teachers.load(spec, arch, activation)


def cmd_demo(args: argparse.Namespace) -> int:
    import ecdist

    from .plots import plot_recovery

    config = _config(args, activation="tanh", student_widths=args.student_widths or [32])
    if (args.out / "run.json").exists():
        shutil.rmtree(args.out)  # the demo always starts fresh in its own folder
    teacher = ecdist.teachers.random_mlp(DEMO_ARCH, "tanh", seed=args.teacher_seed)
    X = ecdist.queries.gaussian(args.queries, DEMO_ARCH[0], seed=args.teacher_seed + 1)
    print(f"teacher: tanh {'-'.join(map(str, DEMO_ARCH))}; {len(X)} Gaussian queries; "
          f"{config.n_students} students of width {config.student_widths}")
    result = ecdist.recover(teacher, X, config, out=args.out, progress=True)
    X_test = ecdist.queries.gaussian(2000, DEMO_ARCH[0], seed=args.teacher_seed + 2)
    result.comparison = ecdist.compare(result.network, teacher, "tanh", X=X_test)
    result.save(args.out)
    plot = plot_recovery(result, args.out / "recovery.png")
    _print_result(result)
    verdict = "EXACT" if result.comparison.exact else "NOT exact"
    print(f"\n{verdict}: width {result.layer_sizes} vs teacher {result.comparison.teacher_sizes}, "
          f"worst 1-|cos| {max(result.comparison.max_weight_distance):.1e}, in {result.timings['total']:.0f} s")
    print(f"results: {args.out}/  plot: {plot}")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    import ecdist

    from .plots import plot_recovery
    from .teachers import parse_arch

    out, stored = _run_folder(args)
    if stored is None:  # a new run: everything must be given
        if not args.teacher:
            raise ConfigError("teacher: give --teacher (a state dict with --arch, or module:function)")
        if not args.activation:
            raise ConfigError("activation: give --activation (e.g. tanh)")
        if not args.student_widths:
            raise ConfigError("student_widths: give --student-widths (about 4 × the width you expect)")
        if not (args.queries or args.gaussian or args.uniform):
            raise ConfigError("queries: give --queries FILE, --gaussian N or --uniform N")
    activation = args.activation or stored.activation
    teacher = _teacher(args.teacher, args.arch, activation) if args.teacher else None
    X = None
    if args.queries:
        X = ecdist.queries.load(args.queries)
    elif args.gaussian or args.uniform:
        d_in = args.d_in or (parse_arch(args.arch)[0] if args.arch else None)
        if d_in is None:
            raise ConfigError("d_in: give --d-in (or --arch) so that queries can be generated")
        gen = ecdist.queries.gaussian if args.gaussian else ecdist.queries.uniform
        X = gen(args.gaussian or args.uniform, d_in, seed=args.query_seed)
    config = _config(args, activation=activation, base=stored)
    if args.snapshot is not None:
        snap, run_dir = args.snapshot.resolve(), out.resolve()
        if stored is None or snap == run_dir or run_dir in snap.parents:
            raise ConfigError("--snapshot DIR looks at a run in progress: give --resume RUN_DIR of an existing run, "
                              "and a DIR outside RUN_DIR")
    train = args.snapshot is None
    result = ecdist.recover(teacher, X, config, out=out, resume=bool(args.resume), progress=True, address=args.address,
                            train=train, snapshot=args.snapshot)
    dest = out if train else args.snapshot
    if isinstance(teacher, ecdist.teachers.MLP):
        result.comparison = ecdist.compare(result.network, teacher, activation)
        result.save(dest)
    plot_recovery(result, dest / "recovery.png")
    _print_result(result)
    if not train:
        steps = result.students.column("steps").to_pylist()
        print(f"from the checkpoints of {out}/ as they stand: students at step {min(steps)}–{max(steps)}")
    print(f"results: {dest}/")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import ecdist

    result = ecdist.load(args.result)
    teacher = _teacher(args.teacher, args.arch, result.config.activation)
    X = ecdist.queries.load(args.queries) if args.queries else None
    rep = ecdist.compare(result.network, teacher, result.config.activation, X=X, seed=args.seed)
    print(rep.summary())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import time

    from . import bench

    t0 = time.perf_counter()
    argv = ["ecdist", "bench", "--scale", args.scale, "--out", str(args.out), "--only", *args.only, "--device", args.device]
    report = bench.run(args.scale, args.out, args.only, args.device, argv=argv, echo=print)
    print(f"report: {report} ({time.perf_counter() - t0:.0f} s)")
    return 0


_RULE_NOTES = {  # a layer whose candidates came from a fallback says so under the table
    "reference": "the stable rule did not fit exactly; candidates from the authors' cut, pruned",
    "student": "no clustering rule fit exactly; one exact student's neurons, pruned",
}


def _print_result(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(result.summary())
    rep = result.comparison
    table = Table(title="recovered vs teacher" if rep is not None else "recovered layers")
    for col in ("layer", "recovered", "teacher", "overhead", "worst 1-|cos|", "median 1-|cos|", "clusters' students"):
        table.add_column(col, justify="right")
    for i, layer in enumerate(result.layers):
        ns = np.asarray(layer.clusters.column("n_students"))
        spread = f"{ns.min()}–{ns.max()}" if ns.size else "-"
        if rep is not None and rep.teacher_sizes is not None and i < len(rep.teacher_sizes):
            dw = np.asarray(rep.weight_distance[i])
            table.add_row(str(i + 1), str(layer.width), str(rep.teacher_sizes[i]), f"{rep.overhead[i]:+.0%}",
                          f"{dw.max():.1e}", f"{np.median(dw):.1e}", spread)
        else:
            table.add_row(str(i + 1), str(layer.width), "?", "", "", "", spread)
    console.print(table)
    for layer in result.layers:
        if layer.rule in _RULE_NOTES and layer.rule != result.config.cluster_rule:
            console.print(f"layer {layer.index}: {_RULE_NOTES[layer.rule]}")
    if rep is not None:
        console.print(f"functional relative MSE on {rep.n_test} fresh inputs: {rep.functional_mse:.2e}")


COMMANDS = {"demo": cmd_demo, "recover": cmd_recover, "compare": cmd_compare, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except EcdistError as exc:
        one_line = " ".join(str(exc).split())  # a message quoting a file or a library may hold newlines
        print(f"ecdist: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ecdist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
