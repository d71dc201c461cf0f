"""Recover a teacher's hidden width on a Ray cluster — a driver script for `ray job submit`.

    ray job submit --working-dir . -- python examples/recover_on_cluster.py --out /shared/ecdist-run

Under `ray job submit` the script runs on the cluster with RAY_ADDRESS set, so
``ecdist.recover`` (backend "auto") puts its student packs on the cluster's nodes; run
directly, it starts a local Ray. ``--out`` should be on storage every node can write
(NFS, a mounted bucket): the packs checkpoint there, and a killed actor resumes from it.
"""
from __future__ import annotations

import argparse
import json

import ecdist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder (checkpoints and results)")
    p.add_argument("--arch", default="20-8-1", help="synthetic tanh teacher, d_in-width-d_out")
    p.add_argument("--rho", type=int, default=4, help="students are rho times wider than the teacher")
    p.add_argument("--n-students", type=int, default=20)
    p.add_argument("--queries", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus-per-pack", type=int, default=1)
    p.add_argument("--gpus-per-pack", type=float, default=0.0)
    p.add_argument("--resume", action="store_true", help="continue a run killed earlier")
    args = p.parse_args()

    d_in, width, d_out = (int(x) for x in args.arch.split("-"))
    teacher = ecdist.teachers.random_mlp([d_in, width, d_out], "tanh", seed=args.seed)
    X = ecdist.queries.gaussian(args.queries, d_in, seed=args.seed + 1)
    config = ecdist.Config(
        activation="tanh", student_widths=[args.rho * width], n_students=args.n_students, seed=args.seed,
        cpus_per_pack=args.cpus_per_pack, gpus_per_pack=args.gpus_per_pack,
    )
    result = ecdist.recover(teacher, X, config, out=args.out, resume=args.resume)
    result.comparison = ecdist.compare(result.network, teacher, "tanh")
    result.save(args.out)
    print(result.summary())
    print("plan:", json.dumps({k: result.plan[k] for k in ("backend", "pack_sizes", "pack_nodes")}))
    print(f"recovered {result.layer_sizes} (teacher {result.comparison.teacher_sizes}); results in {args.out}")


if __name__ == "__main__":
    main()
