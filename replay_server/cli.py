"""`python -m replay_server {serve,stats,inspect}`: run, measure and look inside the replay."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import redis
from PIL import Image, ImageDraw

from common.chunk import HEADER
from common.config import ConfigError, load_config
from common.driving import vector_dim
from replay_server.client import STATS_SUFFIX, connect
from replay_server.ingest import RedisReplay
from replay_server.ring import FrameRing
from replay_server.sampler import sample as sample_batch
from replay_server.server import RedisServer


def _stream_key_and_url(args: argparse.Namespace) -> tuple[str, str]:
    cfg = load_config(args.config, args.overrides)
    url = args.redis_url or cfg.replay.redis_url
    if not url:
        raise ConfigError("no Redis to talk to: pass --redis-url or set replay.redis_url")
    return cfg.replay.stream_key, url


def serve(args: argparse.Namespace) -> int:
    # Started in the background by a shell without job control (`make test &`), this process
    # inherits SIGINT ignored, and "Ctrl-C stops it" would not hold.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = load_config(args.config, args.overrides)
    server = RedisServer(Path(args.dir), port=args.port, password=args.password, aof=cfg.replay.aof,
                         fsync=cfg.replay.aof_fsync).start()
    shown = server.url.replace(f":{args.password}@", ":***@") if args.password else server.url
    print(f"replay service: {shown}", flush=True)
    print(f"data directory: {server.directory} (AOF {'on' if cfg.replay.aof else 'off'}); Ctrl-C stops it", flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"] and server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _policy_version(entry: list) -> int | None:
    if not entry:
        return None
    payload = entry[0][1].get(b"c", b"")
    if len(payload) < HEADER.size:
        return None
    return HEADER.unpack_from(payload)[7]


def stats(args: argparse.Namespace) -> int:
    key, url = _stream_key_and_url(args)
    r = connect(url)
    counts = {k.decode(): int(v) for k, v in r.hgetall(key + STATS_SUFFIX).items()}
    chunks_live = r.xlen(key)
    mean_steps = counts.get("transitions", 0) / max(counts.get("chunks", 0), 1)
    transitions_live = round(chunks_live * mean_steps)
    stream_bytes = r.memory_usage(key) or 0
    before = counts.get("transitions", 0)
    time.sleep(args.window)
    after = int(r.hget(key + STATS_SUFFIX, "transitions") or 0)
    report = {
        "stream": key,
        "chunks": chunks_live,
        "transitions": transitions_live,
        "transitions_ever_inserted": after,
        "bytes_in_redis": stream_bytes,
        "bytes_per_transition": stream_bytes / transitions_live if transitions_live else None,
        "insert_rate_per_s": (after - before) / args.window,
        "redis_used_memory": r.info("memory")["used_memory"],
        "oldest_policy_version": _policy_version(r.xrange(key, count=1)),
        "newest_policy_version": _policy_version(r.xrevrange(key, count=1)),
    }
    print(json.dumps(report, indent=1))
    return 0


def _strip(sample: dict[str, np.ndarray], i: int) -> Image.Image:
    frames = list(sample["image"][i]) + [sample["next_image"][i][-1]]
    scale = 2
    w = 84 * scale
    strip = Image.new("L", (w * len(frames), w + 24), color=0)
    for j, frame in enumerate(frames):
        strip.paste(Image.fromarray(frame).resize((w, w), Image.NEAREST), (j * w, 24))
    action = sample["action"][i]
    text = (f"obs t-3 .. t | next   steer {action[0]:+.2f} throttle/brake {action[1]:+.2f}   "
            f"reward {sample['reward'][i]:+.2f}   done {int(sample['done'][i])}")
    ImageDraw.Draw(strip).text((4, 6), text, fill=255)
    return strip


def inspect(args: argparse.Namespace) -> int:
    key, url = _stream_key_and_url(args)
    cfg = load_config(args.config, args.overrides)
    ring = FrameRing(cfg.replay.capacity, vector_dim=vector_dim(cfg.env))
    replay = RedisReplay(connect(url), key, ring, cfg.replay.max_chunk_bytes)
    replay.warm_start()
    if len(ring) == 0:
        print(f"error: stream '{key}' holds no transitions", file=sys.stderr)
        return 1
    sample = sample_batch(ring, args.n, np.random.default_rng(args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        _strip(sample, i).save(out / f"sample_{i:03d}.png")
    c = replay.counters
    print(f"{args.n} strips in {out}/ from {len(ring)} transitions "
          f"(skipped {c.skipped_foreign + c.skipped_undecodable + c.skipped_oversized} bad entries)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replay_server", description="The av-td3 replay service.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML config (replay.* keys are used)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    s = sub.add_parser("serve", help="run a local redis-server for the replay until Ctrl-C")
    common(s)
    s.add_argument("--dir", default="runs/replay-redis", help="data directory (AOF lives here)")
    s.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    s.add_argument("--password", default=None, help="require this password")
    s.set_defaults(func=serve)
    for name, func, helptext in (("stats", stats, "print replay statistics as JSON"),
                                 ("inspect", inspect, "write PNG strips of sampled frame stacks")):
        sp = sub.add_parser(name, help=helptext)
        common(sp)
        sp.add_argument("--redis-url", default="", help="redis://[:password@]host:port/db (default: replay.redis_url)")
        sp.set_defaults(func=func)
    sub.choices["stats"].add_argument("--window", type=float, default=1.0, help="seconds over which the insert rate is measured")
    sub.choices["inspect"].add_argument("--n", type=int, default=16, help="transitions to draw")
    sub.choices["inspect"].add_argument("--out", default="replay-inspect", help="output directory")
    sub.choices["inspect"].add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # ConfigError, bad URLs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except redis.exceptions.ConnectionError as exc:
        print(f"error: cannot reach Redis: {exc}", file=sys.stderr)
        return 2
