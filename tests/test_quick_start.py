"""The README's quick start: its `make run` command is one the CLI accepts, and a run with
`--stop-at-success` ends at an evaluation that reaches the rate, with a checkpoint of the weights
it judged, their evaluation video and `<logdir>/latest` naming the run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import ray

from actors.envs import check_backend
from common.config import load_config
from common.metrics import read_scalars
from learner import checkpoint
from learner.cli import build_parser, main, resolve_config
from common.weights import policy_to_bytes
from learner import distributed
from learner.distributed import DistributedRun
from learner.evaluate import main as evaluate_main
from learner.run_dirs import latest_run
from tests.conftest import ROOT
from tests.test_distributed import FAST

# A route of 5 m: even an untrained policy completes it, so the first evaluation reaches 1.0.
REACHABLE = ["--set", "env.route_length_m=5", "--set", "eval.references=false", "--stop-at-success", "1.0"]


def readme_quick_start() -> list[str]:
    """The arguments of the first line of README.md that starts with `make run` (ARGS="...")."""
    line = next((l.strip() for l in (ROOT / "README.md").read_text().splitlines() if re.match(r"\s*make run\b", l)), None)
    assert line is not None, "README.md has no line starting with `make run`"
    words = shlex.split(line, comments=True)
    assert words[:2] == ["make", "run"], line
    args = [w.split("=", 1)[1] for w in words[2:] if w.startswith("ARGS=")]
    assert len(words) == 2 + len(args), f"`{line}`: make run takes only ARGS=\"...\""
    return shlex.split(args[0]) if args else []


def test_the_readme_quick_start_is_a_command_the_cli_accepts():
    assert re.search(r"^run:.*\n\t\$\(PY\) -m learner \$\(ARGS\)$", (ROOT / "Makefile").read_text(), re.M)
    args = build_parser().parse_args(readme_quick_start())  # exits 2 on a flag it does not know
    cfg, resume = resolve_config(args)
    check_backend(cfg)
    assert resume is None
    # It ends by itself, well before the default budget of a million steps.
    assert cfg.learner.stop_at_success > 0 or cfg.learner.max_timesteps < load_config().learner.max_timesteps


def test_a_serial_run_stops_at_success_with_a_checkpoint_and_video(tmp_path, capsys):
    args = ["--mode", "serial", "--device", "cpu", "--num-eval-episodes", "1", "--eval-freq", "100",
            "--set", "td3.batch_size=16", "--set", "td3.learning_starts=50", "--set", "env.max_episode_steps=60",
            "--logdir", str(tmp_path), "--max-timesteps", "1000", *REACHABLE]
    assert main(args) == 0
    run_dir = latest_run(tmp_path)
    assert checkpoint.resolve(run_dir).name == "step_000000100"  # the first evaluation ended it
    assert (run_dir / "eval.gif").read_bytes()[:6] == b"GIF89a"
    out = capsys.readouterr().out
    assert f"evaluation video: {run_dir / 'eval.gif'}" in out and "eval success 1.00 at 100" in out
    # `<logdir>/latest` stands for the newest run wherever a run folder is taken.
    video = tmp_path / "out.gif"
    assert evaluate_main([str(tmp_path / "latest"), "--episodes", "1", "--video", str(video)]) == 0
    assert video.read_bytes()[:6] == b"GIF89a"


def test_a_distributed_run_ends_with_the_weights_the_evaluation_judged(tmp_path, monkeypatch):
    published: list[bytes] = []

    def recorded(actor):
        published.append(policy_to_bytes(actor))
        return published[-1]

    monkeypatch.setattr(distributed, "policy_to_bytes", recorded)
    cfg = load_config(overrides=[*FAST, "actors.num_actors=1", "learner.max_timesteps=5000", "eval.freq=300",
                                 "env.route_length_m=5", "eval.references=false", "learner.stop_at_success=1.0",
                                 "learner.weight_sync_interval=5"])
    run = DistributedRun(cfg, tmp_path / "run").init()
    try:
        final = run.run()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    core = run.core
    assert final["eval/success_rate"] == 1.0 and run.reached and core.env_step < 5000
    # The first periodic evaluation reached the rate while the learner trained on (and published
    # newer weights); the run ended on it, with the agent put back to the state it judged.
    evaluated = [step for _, step, _ in read_scalars(tmp_path / "run")["eval/success_rate"]]
    # Launched at the first report past 300 (reports come in chunks, so 300 or a little later).
    assert len(evaluated) == 1 and 300 <= evaluated[0] < 600 and core.last_eval_step == evaluated[0]
    judged = published.index(policy_to_bytes(core.agent.actor))
    assert judged < len(published) - 1, "no update ran while the evaluation did: nothing was put back"
    assert run.published_updates != core.agent.updates
    assert checkpoint.resolve(tmp_path / "run").name == f"step_{core.env_step:09d}"
    ckpt_cfg = checkpoint.saved_config(tmp_path / "run")
    assert policy_to_bytes(checkpoint.load_policy(tmp_path / "run", ckpt_cfg)) == published[judged]
    assert core.wrap_up().count("evaluation video:") == 1 and (tmp_path / "run" / "eval.gif").is_file()
