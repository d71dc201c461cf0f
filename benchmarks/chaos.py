"""Chaos: K small recoveries on a local Ray while pack actors are killed at random moments.

Each run recovers the same tanh 6-3-1 teacher (1,000 Gaussian queries) with 4 students of width
12 in 2 packs of 2, each pack a Ray actor with ``actor_restarts=3`` and a run folder for its
checkpoints. A seeded plan picks, for every run, one or two kills: a pack, a training step at
which to strike and a way — ``ray.kill(actor, no_restart=False)`` or SIGKILL of the actor's
worker process. A thread beside the driver finds the pack actors by name in namespace "ecdist",
polls their progress and strikes when a pack reaches its step. Ray restarts the actor, which
resumes from its last checkpoint. After each run:

- completed: ``recover`` returned a result;
- identical: the same layer sizes, the same network bit for bit and the same students (loss,
  status, restarts) as a clean run with the same seed on the same Ray (no kills);
- data lost: files listed in the run folder's manifest that are missing or fail their checksum,
  plus results that ``ecdist.load`` cannot read back.

It must end K / K / 0. Kills that were planned but never struck (the pack finished first) are
counted apart; every kill that struck and was survived is listed per run.

Run:  python benchmarks/chaos.py [--runs K] [--seed S]
Out:  benchmarks/results/chaos.json
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch

import ecdist
from ecdist import distributed
from ecdist.storage import Files

TEACHER = [6, 3, 1]
N_QUERIES = 1000
STEPS = 150  # LM iterations per pack (no early stop: student_tol 0, no stall window), so there is time to strike


def config() -> ecdist.Config:
    return ecdist.Config(activation="tanh", student_widths=[12], n_students=4, seed=3, student_tol=0.0,
                         stall_window=10**6, lm_max_iter=STEPS, threads=1, pack_size=2, actor_restarts=3, backend="ray")


class Killer(threading.Thread):
    """Carries out a kill plan on the running pack actors, found by name in namespace "ecdist"."""

    def __init__(self, plan: list[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.pending, self.struck = list(plan), []
        self.done = threading.Event()

    def run(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        while self.pending and not self.done.is_set():
            actors = {}
            for name in ray.util.list_named_actors():  # this namespace's: ecdist-<run>-pack-<i>
                try:
                    actors[name] = ray.get_actor(name, namespace=distributed.NAMESPACE)
                except ValueError:  # released meanwhile
                    continue
            asked = {a.progress.remote(): name for name, a in actors.items()}
            ready = ray.wait(list(asked), num_returns=len(asked), timeout=0.5)[0] if asked else []
            for ref in ready:  # an actor being restarted answers later: the others are not held up
                name = asked[ref]
                try:
                    info = ray.get(ref, timeout=0)
                except (RayError, GetTimeoutError):
                    continue
                actor = actors[name]
                kill = next((k for k in self.pending if k["pack"] == info["pack"] and info.get("step", 0) >= k["step"]
                             and info.get("phase") not in ("waiting", "done")), None)
                if kill is None:
                    continue
                if kill["how"] == "ray.kill":
                    ray.kill(actor, no_restart=False)
                else:
                    try:
                        os.kill(info["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                self.pending.remove(kill)
                self.struck.append(kill | {"at_step": int(info["step"]), "actor": name})
            self.done.wait(0.02)


def damaged_files(folder: Path) -> tuple[int, int]:
    """(files listed in the manifest, those missing or failing their checksum)."""
    files = Files(folder)
    listed = files.entries() or {}
    bad = 0
    for rel in listed:
        try:
            files.read(rel)
        except ecdist.RunFolderError:
            bad += 1
    return len(listed), bad


def same(a: ecdist.Recovery, b: ecdist.Recovery) -> bool:
    if a.layer_sizes != b.layer_sizes:
        return False
    sa, sb = a.network.state_dict(), b.network.state_dict()
    if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
        return False
    return all(a.students.column(c).equals(b.students.column(c)) for c in ("student", "rel_loss", "status", "restarts"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="K, the number of recoveries with kills")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill plan")
    args = ap.parse_args()
    import ray

    teacher = ecdist.teachers.random_mlp(TEACHER, "tanh", seed=0)
    X = ecdist.queries.gaussian(N_QUERIES, TEACHER[0], seed=1)
    rng = np.random.default_rng(args.seed)
    rows = []
    t_all = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, namespace=distributed.NAMESPACE, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="ecdist-chaos-") as tmp:
            t0 = time.perf_counter()
            clean = ecdist.recover(teacher, X, config(), out=Path(tmp) / "clean")
            clean_s = time.perf_counter() - t0
            print(f"clean run: widths {clean.layer_sizes} in {clean_s:.1f} s", flush=True)
            for k in range(args.runs):
                plan = [{"pack": int(rng.integers(2)), "step": int(rng.integers(1, int(0.8 * STEPS))),
                         "how": str(rng.choice(["ray.kill", "SIGKILL"]))} for _ in range(int(rng.integers(1, 3)))]
                folder = Path(tmp) / f"run{k}"
                row: dict[str, Any] = {"run": k, "planned": plan}
                killer = Killer(plan)
                t0 = time.perf_counter()
                killer.start()
                try:
                    result = ecdist.recover(teacher, X, config(), out=folder)
                except ecdist.EcdistError as exc:
                    result, row["error"] = None, f"{type(exc).__name__}: {exc}"
                finally:
                    killer.done.set()
                    killer.join()
                row["seconds"] = time.perf_counter() - t0
                struck = killer.struck
                row["struck"] = struck
                row["completed"] = result is not None
                row["identical"] = result is not None and same(result, clean)
                row["packs_resumed_from"] = result.plan["packs_resumed_from"] if result is not None else None
                row["files_listed"], row["files_damaged"] = damaged_files(folder)
                try:
                    row["loadable"] = same(ecdist.load(folder), clean)
                except ecdist.RunFolderError as exc:
                    row["loadable"], row["load_error"] = False, str(exc)
                rows.append(row)
                kills = ", ".join(f"{s['how']} pack {s['pack']} at step {s['at_step']}" for s in struck) or "-"
                print(f"run {k}: {len(struck)}/{len(plan)} kills struck ({kills}); "
                      f"completed {row['completed']}, identical {row['identical']}, damaged files "
                      f"{row['files_damaged']}/{row['files_listed']}, resumed from {row['packs_resumed_from']}, "
                      f"{row['seconds']:.1f} s", flush=True)
    finally:
        ray.shutdown()
    summary = {
        "runs": len(rows),
        "completed": sum(r["completed"] for r in rows),
        "identical": sum(r["identical"] for r in rows),
        "data_lost": sum(r["files_damaged"] + (not r["loadable"]) for r in rows),
        "kills_planned": sum(len(r["planned"]) for r in rows),
        "kills_struck": sum(len(r["struck"]) for r in rows),
        "kills_by_ray_kill": sum(s["how"] == "ray.kill" for r in rows for s in r["struck"]),
        "kills_by_sigkill": sum(s["how"] == "SIGKILL" for r in rows for s in r["struck"]),
        "packs_resumed_from_a_checkpoint": sum(v > 0 for r in rows for v in (r["packs_resumed_from"] or [])),
    }
    out = {
        "benchmark": "chaos",
        "machine": _common.machine_info(),
        "settings": {"teacher": TEACHER, "queries": N_QUERIES, "config": config().to_dict(), "seed": args.seed},
        "clean": {"layer_sizes": clean.layer_sizes, "seconds": clean_s},
        "summary": summary,
        "runs": rows,
        "seconds": time.perf_counter() - t_all,
    }
    path = _common.RESULTS / "chaos.json"
    _common.write_json(path, out)
    s = summary
    print(f"completed / identical / data lost: {s['completed']}/{s['runs']} / {s['identical']}/{s['runs']} / "
          f"{s['data_lost']}  ({s['kills_struck']} of {s['kills_planned']} planned kills struck)")
    print(f"wrote {path}")
    ok = s["completed"] == s["identical"] == s["runs"] and s["data_lost"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
