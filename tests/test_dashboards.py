"""What a researcher sees in TensorBoard: described tags, the overview layout, hyperparameters,
curves on a slow device, termination fractions and an annotated video — checked through
TensorBoard's own HTTP API where it matters."""

import ast
import fnmatch
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_config
from common.driving import TERMINATIONS
from common.metrics import TerminationWindow
from common.tags import TAGS, describe, layout, markdown_table
from learner.cli import main
from tests.test_serial import SMOKE

ROOT = Path(__file__).resolve().parents[1]
METRICS_DOC = ROOT / "docs" / "metrics.md"


def test_the_metrics_page_table_is_the_tag_table():
    text = METRICS_DOC.read_text()
    table = text.split("<!-- tags:begin -->\n", 1)[1].split("\n<!-- tags:end -->", 1)[0]
    assert table == markdown_table(), "docs/metrics.md's table is stale: paste `python -m common.tags` into it"


def _logged_tag_patterns() -> set[str]:
    """Every string in the roles' code that can name a metric: literals and f-strings (each
    replacement field as `*`) that start with a known prefix; the tag table itself excluded."""
    from common.metrics import PREFIXES

    root = ROOT
    patterns = set()
    for path in [p for role in ("actors", "learner", "common", "replay_server") for p in (root / role).rglob("*.py")]:
        tree = ast.parse(path.read_text())
        table = {id(n) for node in ast.walk(tree) if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "TAGS"
                 for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in table:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                patterns.add(node.value)
            elif isinstance(node, ast.JoinedStr):
                patterns.add("".join(v.value if isinstance(v, ast.Constant) else "*" for v in node.values))
    return {p for p in patterns if p.startswith(PREFIXES) and not re.search(r"\s", p)}


def test_every_described_tag_is_logged_somewhere():
    """The other half of the metrics-page check: no row for a tag the code never logs. A catch-all such
    as f"eval/{name}" only vouches for a row that is itself a catch-all."""
    patterns = _logged_tag_patterns()
    specific = {p for p in patterns if not re.fullmatch(r"\w+/[*_]*", p)}

    def logged(tag: str) -> bool:
        return tag in patterns or any(fnmatch.fnmatchcase(tag.replace("*", "x"), p)
                                      or fnmatch.fnmatchcase(p.replace("*", "x"), tag) for p in specific)

    assert not [tag for tag in TAGS if not logged(tag)]
    assert not logged("train/never_logged") and not logged("debug/nothing_*")  # the check can fail


def test_every_tag_in_the_overview_is_described():
    for category in layout().values():
        for _, (_, tags) in category.items():
            for tag in tags:
                if ".*" in tag:  # a regex over several tags: it must match some described pattern
                    assert any(re.fullmatch(tag, t.replace("*", "x")) for t in TAGS), tag
                else:
                    assert describe(tag) is not None, tag


def test_termination_fractions_cover_the_last_episodes():
    window = TerminationWindow(size=4)
    reasons = ["collision", "timeout", "collision", "route_completed", "route_completed"]
    out = {}
    for reason in reasons:
        episode = {f"train/termination_{r}": float(r == reason)
                   for r in TERMINATIONS}
        out = window.apply({"train/episode_reward": 1.0, **episode})
    # the last four: timeout, collision, route_completed, route_completed
    assert out["train/termination_route_completed"] == 0.5
    assert out["train/termination_collision"] == 0.25 and out["train/termination_timeout"] == 0.25
    assert out["train/episode_reward"] == 1.0


class Recorder:
    def __init__(self):
        self.logged, self.histograms, self.steps = [], [], []

    def log(self, metrics, step):
        self.logged.append(metrics)
        self.steps.append(step)

    def histogram(self, tag, values, step):
        self.histograms.append(tag)


def recorded_learner(*overrides: str):
    """A CPU learner on batches of 4 random transitions, logging into a `Recorder`."""
    from learner.learner import Learner
    from learner.td3 import TD3
    from replay_server.ring import FrameRing
    from tests.conftest import random_batch_arrays

    cfg = load_config(overrides=["learner.device=cpu", "td3.batch_size=4", "td3.critic_warmup_updates=0", *overrides])
    torch.manual_seed(0)
    learner = Learner(TD3(cfg, torch.device("cpu")), FrameRing(16), cfg, Recorder(), np.random.default_rng(0))
    learner.limiter.sample = lambda ring, b, rng, n_step, gamma, images=True: random_batch_arrays(4)
    return learner


def test_learner_logs_by_time_on_a_slow_device():
    learner = recorded_learner("logging.log_interval=1000", "logging.log_seconds=0.001")
    for _ in range(4):
        time.sleep(0.002)
        learner.step(env_step=10)
    logged = learner.logger.logged
    # Far from 1000 updates, yet logged: on actor updates only, so each point has the actor's tags.
    assert [m["train/updates"] for m in logged] == [2.0, 4.0]
    assert all("train/actor_loss" in m for m in logged)
    assert {"debug/q", "debug/action_steer"} <= set(learner.logger.histograms)


def test_learner_curves_advance_while_actors_wait_for_a_slow_learner():
    """Distributed mode on a CPU: the actors run ahead and wait, so the env step stands still for
    hundreds of updates; the learner's points go at the env step whose budget each update spends."""
    learner = recorded_learner("td3.learning_starts=500", "learner.updates_per_step=0.5", "logging.log_interval=2")
    for _ in range(6):
        learner.step(env_step=1600)  # owed 550 updates; the env step does not move while they are worked off
    assert learner.logger.steps == [504, 508, 512]  # learning_starts + updates / updates_per_step
    assert learner.budget_step(env_step=505) == 505  # never ahead of the env steps


def test_evaluation_video_is_annotated_and_real_time():
    from actors.envs import make_env
    from actors.evaluator import run_episode, video_fps

    env = make_env(load_config(overrides=["env.max_episode_steps=12"]))
    frames: list = []
    strided: list = []
    try:
        result = run_episode(env, lambda obs: np.array([0.0, 0.3], np.float32), seed=5, frames=frames)
        raw = env.render()
        run_episode(env, lambda obs: np.array([0.0, 0.3], np.float32), seed=5, frames=strided, stride=3)
    finally:
        env.close()
    fps = video_fps(env)
    assert fps == 10  # one frame per 0.1 s env step
    assert len(frames) == result["length"] + fps  # every step, then the end held for a second
    assert len(strided) == result["length"] // 3 + fps  # steps 3, 6, 9, 12 (--video-stride 3)
    assert frames[0].shape == raw.shape
    assert frames[0][:20].mean() < raw[:20].mean()  # the overlay's dark band with text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """A short serial run, served by a real TensorBoard."""
    logdir = tmp_path_factory.mktemp("tb")
    assert main([*SMOKE, "--max-timesteps", "200", "--logdir", str(logdir)]) == 0
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
                             "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(f"{base}/data/plugin/scalars/tags"):  # empty until the first load finishes
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("TensorBoard did not serve the run within 60 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tensorboard_serves_the_overview_hparams_and_descriptions(served_run):
    base = served_run
    categories = [c["title"] for c in _get(f"{base}/data/plugin/custom_scalars/layout")["category"]]
    assert categories[0] == "1 learning" and len(categories) == len(layout())
    (run_tags,) = _get(f"{base}/data/plugin/scalars/tags").values()
    undescribed = [tag for tag, info in run_tags.items() if not info["description"]]
    assert not undescribed, undescribed
    experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
    names = {h["name"] for h in experiment["hparamInfos"]}
    assert {"td3.gamma", "td3.n_step", "cnn.trunk_dim", "env.scenario"} <= names
    assert not any(n.startswith("carla.") for n in names)  # an embedded run shows no CARLA settings
    assert "eval/success_rate" in {m["name"]["tag"] for m in experiment["metricInfos"]}
