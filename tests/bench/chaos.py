"""`make chaos`: learning that survives faults.

Embedded simulator: two distributed learning runs of one seed with the CPU settings the README's
quick start uses, one after the other, one undisturbed and one in which a rollout actor is
SIGKILLed every 2 minutes (alternating between the two) and the learner's redis-server is
SIGKILLed once (at 7 minutes by default) (it is relaunched from its AOF). Each run's checkpoint is then evaluated on 20
held-out episodes (seeds from 100000, never used in training); the transitions Redis acknowledged
(the distinct chunks of its stream, read back from the AOF) are compared with the transitions
that entered the learner's ring (`replay/inserted`); restarts and downtime come from the run's
own dashboard (`actors/restarts`, `actors/downtime_s`, `replay/redis_restarts`,
`replay/downtime_s`).

CARLA path: docker-compose.yml's topology as host processes (tests/rehearse.py) with one worker
holding 5 server slots (4 rollout actors and the evaluator), whose stand-in servers crash with
signal 11 a random 4 to 8 minutes after each launch: training goes on (env steps and updates keep
growing after the crashes), the crashes are counted on the dashboard (`actors/carla_restarts`,
`actors/simulator_failures`), and no server process is left once the services stop.

Writes results/chaos.json and results/chaos.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common.metrics import read_scalars
from tests.bench.report import RESULTS, machine
from tests.rehearse import Rehearsal, last

ROOT = Path(__file__).resolve().parents[2]
ACTOR_KILL_EVERY_S = 120.0
CARLA_CRASH_AFTER_S = "240-480"  # each stand-in server's life: 4 slots crash about every 1-2 minutes
HELD_OUT_EPISODES = 20
SUCCESS_TOLERANCE = 0.1
CARLA_COUNTERS = {"updates_per_s": "perf/updates_per_s", "carla_restarts": "actors/carla_restarts",
                  "simulator_failures": "actors/simulator_failures", "actor_restarts": "actors/restarts"}


def dashboard(run_dir: Path, counters: dict[str, str]) -> dict[str, float]:
    """Each counter's latest value in the run (0 before its first point), read from its event
    files once: {name: tag}, plus `env_steps`, the env step of its latest perf point (env steps
    are every tag's x-axis)."""
    scalars = read_scalars(run_dir)
    perf = scalars.get("perf/updates_per_s", [])
    return {"env_steps": int(perf[-1][1]) if perf else 0,
            **{name: float(last(scalars, tag) or 0.0) for name, tag in counters.items()}}


def run_processes(pid: int, marker: str) -> list[psutil.Process]:
    """The run's processes (the learner's descendants) whose command line starts with `marker`."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(marker):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def embedded_arm(logdir: Path, seed: int, steps: int, chaos: bool, redis_kill_s: float, say) -> dict:
    """One learning run; with `chaos`, the faults. Returns its figures."""
    cmd = [sys.executable, "-m", "learner", "--quiet", "--logdir", str(logdir), "--seed", str(seed),
           "--num-actors", "2", "--max-timesteps", str(steps), "--eval-freq", "5000",
           # Every acknowledged insert is on disk before the acknowledgement: a SIGKILLed Redis loses none.
           "--set", "replay.aof_fsync=always"]
    log_path = logdir / "learner.log"
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    faults: list[dict] = []
    next_kill, redis_killed = start + ACTOR_KILL_EVERY_S, False
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if chaos and now >= next_kill:
                actors = sorted(run_processes(proc.pid, "ray::RolloutWorker"), key=lambda p: p.pid)
                if actors:
                    victim = actors[len(faults) % len(actors)]
                    victim.send_signal(signal.SIGKILL)
                    faults.append({"what": "rollout actor SIGKILL", "at_s": round(now - start), "pid": victim.pid})
                    say(f"  {now - start:5.0f} s  SIGKILL rollout actor pid {victim.pid}")
                next_kill += ACTOR_KILL_EVERY_S
            if chaos and not redis_killed and now - start >= redis_kill_s:
                servers = run_processes(proc.pid, "redis-server") or [
                    p for p in psutil.Process(proc.pid).children() if p.name() == "redis-server"]
                if servers:
                    servers[0].send_signal(signal.SIGKILL)
                    faults.append({"what": "redis-server SIGKILL", "at_s": round(now - start), "pid": servers[0].pid})
                    say(f"  {now - start:5.0f} s  SIGKILL redis-server pid {servers[0].pid}")
                    redis_killed = True
            time.sleep(1.0)
    finally:
        if proc.poll() is None:
            proc.kill()
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the run exited {proc.returncode}; see {log_path}")
    (run_dir,) = [p for p in logdir.iterdir() if p.is_dir()]
    held_out = logdir / "held_out.json"
    subprocess.run([sys.executable, "-m", "learner.evaluate", str(run_dir), "--episodes", str(HELD_OUT_EPISODES),
                    "--json", str(held_out)], cwd=ROOT, check=True, capture_output=True, timeout=1800)
    metrics = json.loads(held_out.read_text())["metrics"]
    d = dashboard(run_dir, {"in_ring": "replay/inserted", "duplicates": "replay/duplicates",
                            "actor_restarts": "actors/restarts", "actor_downtime_s": "actors/downtime_s",
                            "redis_restarts": "replay/redis_restarts", "redis_downtime_s": "replay/downtime_s"})
    return {
        "chaos": chaos, "seed": seed, "env_steps": steps, "wall_clock_s": round(wall),
        "faults": faults,
        "held_out_success": metrics["eval/success_rate"], "held_out_collisions": metrics["eval/collision_rate"],
        "acknowledged_transitions": acknowledged_transitions(run_dir), "transitions_in_ring": int(d["in_ring"]),
        "duplicate_chunks_dropped": int(d["duplicates"]),
        "actor_restarts": int(d["actor_restarts"]), "actor_downtime_s": round(d["actor_downtime_s"], 1),
        "redis_restarts": int(d["redis_restarts"]), "redis_downtime_s": round(d["redis_downtime_s"], 1),
        "run_dir": str(run_dir),
    }


def acknowledged_transitions(run_dir: Path) -> int:
    """The distinct transitions of the run's Redis stream, read back from its AOF."""
    from tests.test_faults import persisted_transitions

    found, _ = persisted_transitions(run_dir)
    return sum(found.values())


def carla_arm(workdir: Path, minutes: float, say) -> dict:
    """The compose topology with crashing stand-in servers, for `minutes`."""
    r = Rehearsal(workdir, say)
    home = workdir / "carla_home"
    try:
        r.start_redis()
        learner = r.start_learner()
        r.until(lambda: r.healthcheck(learner, "head").returncode == 0, "the learner's Ray head is up", 120)
        r.start_worker(CARLA_SLOTS="5", WORKER_CPUS="10", FAKE_CARLA_CRASH_AFTER_S=CARLA_CRASH_AFTER_S,
                       FAKE_CARLA_HOME=str(home))
        r.until(lambda: r.latest("actors/alive") == 4, "4 rollout actors run on the worker's 5 slots", 300)
        start, marks = time.monotonic(), []
        while time.monotonic() - start < minutes * 60:
            time.sleep(30)
            d = dashboard(r.run_dir(), CARLA_COUNTERS)
            marks.append({"at_s": round(time.monotonic() - start), "env_steps": d["env_steps"],
                          "updates_per_s": round(d["updates_per_s"], 2), "carla_restarts": int(d["carla_restarts"]),
                          "simulator_failures": int(d["simulator_failures"])})
            say(f"  {marks[-1]}")
        learner.signal(signal.SIGINT)
        learner.wait(180)
        d = dashboard(r.run_dir(), CARLA_COUNTERS)
        figures = {
            "minutes": minutes, "crash_after_s": CARLA_CRASH_AFTER_S, "slots": 5, "marks": marks,
            "carla_restarts": int(d["carla_restarts"]), "simulator_failures": int(d["simulator_failures"]),
            "actor_restarts": int(d["actor_restarts"]),
        }
    finally:
        r.close()
    figures["orphaned_servers"] = stand_in_servers(home)
    return figures


def stand_in_servers(home: Path) -> list[int]:
    """Live stand-in server processes launched with FAKE_CARLA_HOME=`home`."""
    time.sleep(2)
    found = []
    for p in psutil.process_iter():
        try:
            if "fake_server.py" in " ".join(p.cmdline()) and p.environ().get("FAKE_CARLA_HOME") == str(home) \
                    and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def markdown(report: dict) -> str:
    e = report.get("embedded", {})
    lines = [f"# Chaos\n\n`make chaos` on {report['machine']}, {report['date']}.\n"]
    if e:
        quiet, chaos = e["undisturbed"], e["chaos"]
        lines += [
            "## Embedded simulator: learning under faults\n",
            f"Seed {quiet['seed']}, {quiet['env_steps']:,} env steps, 2 rollout actors, the default CPU settings; "
            f"with chaos a rollout actor is SIGKILLed every {ACTOR_KILL_EVERY_S:.0f} s and the learner's "
            "redis-server once (relaunched from its AOF, `replay.aof_fsync=always`). Held-out: "
            f"{HELD_OUT_EPISODES} episodes from seed 100000.\n",
            "| figure | undisturbed | chaos |", "|---|---|---|"]
        for key in ("held_out_success", "held_out_collisions", "wall_clock_s", "acknowledged_transitions",
                    "transitions_in_ring", "duplicate_chunks_dropped", "actor_restarts", "actor_downtime_s",
                    "redis_restarts", "redis_downtime_s"):
            lines.append(f"| {key.replace('_', ' ')} | {quiet[key]} | {chaos[key]} |")
        lines += ["", "Faults injected: " + "; ".join(f"{f['what']} at {f['at_s']} s" for f in chaos["faults"]) + ".",
                  "", f"Held-out success within {SUCCESS_TOLERANCE} of the undisturbed run: "
                  f"**{'yes' if e['success_within_tolerance'] else 'no'}**; acknowledged = in the ring in both runs: "
                  f"**{'yes' if e['nothing_lost'] else 'no'}**.\n"]
    c = report.get("carla")
    if c:
        lines += [
            "## CARLA path: stand-in servers that crash\n",
            f"The compose topology (tests/rehearse.py), one worker with {c['slots']} server slots (4 rollout actors, "
            f"the evaluator), each stand-in server crashing {c['crash_after_s']} s after its launch, for "
            f"{c['minutes']} minutes.\n",
            "| after (s) | env steps | updates/s | CARLA restarts | simulator failures |", "|---|---|---|---|---|"]
        lines += [f"| {m['at_s']} | {m['env_steps']:,} | {m['updates_per_s']} | {m['carla_restarts']} | "
                  f"{m['simulator_failures']} |" for m in c["marks"]]
        lines += ["", f"CARLA restarts {c['carla_restarts']}, simulator failures {c['simulator_failures']}, actor restarts "
                  f"{c['actor_restarts']}; stand-in servers left after the services stopped: "
                  f"{len(c['orphaned_servers'])}.\n"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make chaos", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=25000, help="env steps of each embedded run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--redis-kill-s", type=float, default=420.0, help="when the chaos run's redis-server is killed")
    p.add_argument("--carla-minutes", type=float, default=8.0)
    p.add_argument("--only", choices=["embedded", "carla"])
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="avtd3-chaos-"))
    report: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.only != "carla":
        arms = {}
        for name, chaos in (("undisturbed", False), ("chaos", True)):
            print(f"embedded, {name}: {args.steps} env steps", flush=True)
            (work / name).mkdir()
            arms[name] = embedded_arm(work / name, args.seed, args.steps, chaos, args.redis_kill_s, print)
            print(json.dumps({k: v for k, v in arms[name].items() if k != "faults"}), flush=True)
        report["embedded"] = {
            **arms,
            "success_within_tolerance": abs(arms["chaos"]["held_out_success"] - arms["undisturbed"]["held_out_success"])
            <= SUCCESS_TOLERANCE,
            "nothing_lost": all(a["acknowledged_transitions"] == a["transitions_in_ring"] for a in arms.values()),
        }
    if args.only != "embedded":
        print(f"CARLA path, {args.carla_minutes} min with crashing stand-in servers", flush=True)
        report["carla"] = carla_arm(work / "carla", args.carla_minutes, print)
    RESULTS.mkdir(exist_ok=True)
    name = f"chaos_{args.only}" if args.only else "chaos"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
