"""Every TensorBoard tag the system logs, with the one-line description TensorBoard shows on
hover, and the overview layout (custom scalars) built from them.

One table, three readers: `MetricLogger` writes each description into the event file with the
tag's first value, `python -m common.tags` prints the metrics table of docs/metrics.md, and a test fails
when a logged tag is missing here or that page lists a tag that is not here. A `*` in a tag
stands for an index or a name (an actor, a reward component, a termination reason).
"""

from __future__ import annotations

import fnmatch
import sys

from common.driving import ACTION_NAMES, COLLISION_KINDS, EVAL_ONLY_TERMINATIONS, REWARD_COMPONENTS, TERMINATIONS

# The seeds' thresholds (005_*.txt): warning / critical feature L2, |mean| and std of features.
FEATURE_L2_WARNING, FEATURE_L2_CRITICAL, FEATURE_MEAN_LIMIT, FEATURE_STD_LIMIT = 50.0, 100.0, 10.0, 50.0

TAGS: dict[str, str] = {
    # -- training episodes (one point per finished episode) --------------------------------------
    "train/episode_reward": "Return of a finished training episode (exploration noise on).",
    "train/episode_length": "Steps of a finished training episode.",
    "train/collisions_per_episode": "Collisions in a finished training episode.",
    "train/lane_invasions_per_episode": "Lane markings crossed in a finished training episode.",
    "train/aeb_steps": "Fraction of a finished training episode's steps on which emergency braking (env.aeb_gap_m) overrode the throttle.",
    "train/mean_speed": "Mean speed of a finished training episode, m/s.",
    "train/route_progress_m": "Metres driven along the route in a finished training episode.",
    "train/route_progress_pct": "Route progress of a finished training episode, % of env.route_length_m.",
    "train/termination_*": "Fraction of the last logging.episode_window training episodes that ended this way.",
    "train/policy_action_mean_*": "Mean of the policy's action (before exploration noise) over a training episode.",
    "train/policy_action_std_*": "Std of the policy's action (before noise) over a training episode; near 0 at ±1 is a lock.",
    "rewards/*": "Sum of one weighted reward component over a finished training episode.",
    # -- the TD3 update (every logging.log_interval updates or logging.log_seconds) ---------------
    "train/updates": "Learner updates so far (critic steps).",
    "train/critic_loss": ("Sum of both critics' MSE to the TD target (weighted by the importance weights with "
                          "replay.sampler=per; LAP's Huber with lap)."),
    "train/actor_loss": "-Q1(s, pi(s)) plus the pre-tanh penalty (and the behaviour cloning term, `td3.bc_weight`), on "
                        "actor-update steps only.",
    "train/pretanh_penalty": "The actor's pre-tanh penalty term (mean relu(|z| - threshold)^2).",
    "train/bc_loss": "With `td3.bc_weight` > 0: batch mean of the squared distance from the policy's action to the "
                     "driver's on the cloned transitions (0 for the others).",
    "train/bc_share": "With `td3.bc_weight` > 0: share of the batch cloned: the driver's transitions or its labels (with "
                      "`td3.bc_q_filter`, those whose action critic 1 values above the policy's).",
    "debug/q*_mean": "Mean Q of critic 1 or 2 on the sampled batch.",
    "debug/q_target_mean": "Mean TD target r + gamma^k (1 - done) min Q' on the sampled batch.",
    "debug/td_error_q*": "Mean |Q - target| of critic 1 or 2.",
    "debug/q": "Histogram of critic 1's Q on the sampled batch.",
    "debug/cnn_features_l2_norm": "Mean per-sample L2 norm of the actor CNN's features (seeds: warn 50, critical 100).",
    "debug/cnn_feature_*": "Mean, std, min or max of the actor CNN's features over the batch.",
    "debug/critic_cnn_features_l2_norm": "Mean per-sample L2 norm of the critic CNN's features.",
    "debug/critic_cnn_feature_*": "Mean, std, min or max of the critic CNN's features over the batch.",
    "debug/reference_feature_*": "One of the seeds' CNN-health thresholds (L2 50 / 100, mean ±10, std 50): a reference line.",
    "debug/actor_pretanh_abs_mean": "Mean |z| of the actor's output before tanh; beyond ~2.6 tanh passes no gradient.",
    "debug/actor_pretanh_abs_max": "Max |z| of the actor's output before tanh over the batch.",
    "debug/action_saturated_*": "Fraction of the batch's policy actions with |a| > 0.99 in this dimension.",
    "debug/action_mean_*": "Mean of the policy's actions on the batch in this dimension.",
    "debug/action_std_*": "Std of the policy's actions on the batch (the seeds' action variance).",
    "debug/action_*": "Histogram of the policy's actions on the batch in this dimension.",
    "debug/dq_da_norm": "Mean per-sample |dQ1/da| at the policy's action: what moves the actor.",
    "gradients/*_norm": "Gradient norm of this part before clipping (clipped to td3.*_grad_clip).",
    "agent/cnn_lr": "Learning rate of the CNN parameter groups (halved when features explode).",
    "agent/mlp_lr": "Learning rate of the MLP parameter groups.",
    # -- alerts (0 or 1 unless said) ------------------------------------------------------------
    "alerts/gradient_explosion_warning": "1 when a pre-clip gradient norm exceeds learner.grad_warning_norm.",
    "alerts/gradient_explosion_critical": "1 when a pre-clip gradient norm exceeds learner.grad_critical_norm.",
    "alerts/feature_explosion": "1 when a CNN's mean feature L2 exceeds learner.feature_l2_threshold.",
    "alerts/nonfinite_loss": "Updates skipped for a NaN/inf loss or gradient since the previous point (0: none).",
    "alerts/weights_restored": ("Restores of the last good weights after repeated non-finite updates, since the "
                                "previous point."),
    "alerts/action_saturation": "1 when more than half of a batch sits at a bound in some action dimension.",
    "alerts/learner_resumes": "Times this run was resumed from a checkpoint.",
    # -- evaluation (every eval.freq env steps and at the end) ----------------------------------
    "eval/mean_reward": "Mean return of the deterministic evaluation episodes.",
    "eval/success_rate": "Fraction of evaluation episodes that completed the route.",
    "eval/collision_rate": "Fraction of evaluation episodes that ended in a collision.",
    "eval/avg_lane_invasions": "Mean lane markings crossed per evaluation episode.",
    "eval/avg_episode_length": "Mean steps per evaluation episode.",
    "eval/aeb_steps": "Fraction of the evaluation steps on which emergency braking (env.aeb_gap_m) overrode the policy's throttle.",
    "eval/mean_speed": "Mean speed over the evaluation episodes, m/s.",
    "eval/route_progress_m": "Mean metres driven along the route per evaluation episode.",
    "eval/route_progress_pct": "Mean route progress per evaluation episode, % of env.route_length_m.",
    "eval/termination_*": "Fraction of evaluation episodes that ended this way (collisions and completed routes: the two rates).",
    "eval/collision_*": ("Fraction of evaluation episodes that ended in a collision of this kind: rear_end (the vehicle "
                         "ahead in the ego's lane), from_behind, side (a lane change or a cut-in), other (no vehicle "
                         "near); they add up to eval/collision_rate."),
    "eval/baseline_*": "The privileged classical baseline (IDM and gap-accepting lane changes on PID + pure pursuit) on the same evaluation seeds: a reference line.",
    "eval/random_*": "A uniformly random policy on the same evaluation seeds: a reference line.",
    "eval/video": "The first evaluation episode, with step, speed, action and reward drawn on it.",
    # -- throughput (every few seconds) ---------------------------------------------------------
    "perf/env_steps_per_s": "Env steps per second of the whole run since the last perf point.",
    "perf/env_steps_per_s_actor*": "Env steps per second of one rollout actor over the same window as the total.",
    "perf/updates_per_s": "Learner updates per second since the last perf point.",
    "perf/updates_per_env_step": ("Learner updates per env step since the last perf point (learner.updates_per_step); "
                                 "not logged for a window in which the actors were held back for the whole of it."),
    "perf/learner_step_ms": ("Wall time of one learner step (sampling, the update and its logging) since the last "
                             "perf point, ms: 1000 / this is the rate the learner would reach if its loop cost nothing."),
    "perf/learner_busy_fraction": ("Share of the time since the last perf point that the learner spent in its steps; "
                                   "when it sets the pace, the rest is what its loop (reports, replay polling, weight "
                                   "publication, evaluation) costs."),
    "perf/updates_owed": ("Distributed mode: updates the learner owes for the env steps reported so far; above "
                          "learner.max_update_debt by at most the reports already handed out."),
    "perf/weight_broadcast_ms": "Time to serialize and publish one weight version, ms.",
    "perf/learner_rss_mb": "Resident memory of the learner process, MB.",
    "perf/learner_heap_released_mb": ("Free malloc heap the learner handed back to the OS at this perf point "
                                      "(glibc malloc_trim), MB; 0 without glibc."),
    "perf/gpu_memory_allocated_mb": "GPU memory held by tensors, MB (CUDA only).",
    "perf/gpu_memory_reserved_mb": "GPU memory reserved by the caching allocator, MB (CUDA only).",
    # -- replay ---------------------------------------------------------------------------------
    "replay/size": "Transitions in the learner's replay ring now.",
    "replay/inserted": "Transitions that entered the learner's replay ring since the run started.",
    "replay/sent": "Transitions this process sent to the Redis replay service (serial mode through Redis).",
    "replay/dropped": "Transitions the senders dropped because Redis stayed unreachable past their buffer.",
    "replay/send_failures": "Failed sends to Redis (each retried until the buffer is full).",
    "replay/duplicates": "Chunks read from Redis twice (a resend after a lost acknowledgement), ignored.",
    "replay/skipped": "Stream entries the learner could not use (foreign, undecodable or oversized).",
    "replay/poll_failures": "Failed reads of the Redis stream (retried).",
    "replay/redis_restarts": "Times the learner restarted the redis-server it launched.",
    "replay/downtime_s": "Seconds the learner could not read the Redis stream, summed: from a failed poll to the next good one.",
    "replay/priority": ("Prioritized replay (replay.sampler=per or lap): histogram of priority^alpha over up to 4096 "
                        "live transitions spread evenly over the ring."),
    "replay/priority_max": "Prioritized replay: the running maximum priority^alpha, which every new transition gets.",
    "replay/priority_mean": "Prioritized replay: mean priority^alpha over the live transitions.",
    "replay/importance_weight": "replay.sampler=per: histogram of the last batch's importance weights (the largest is 1).",
    "replay/importance_weight_mean": "replay.sampler=per: mean importance weight of the last batch (1: no correction).",
    "replay/importance_weight_min": "replay.sampler=per: smallest importance weight of the last batch.",
    "replay/per_beta": "replay.sampler=per: the importance-weight exponent beta, from replay.per_beta0 to 1.",
    # -- actors ---------------------------------------------------------------------------------
    "actors/alive": "Rollout actors running now.",
    "actors/target": "Rollout actors the run wants (actors.num_actors, or what the cluster has room for with actors.elastic_resource).",
    "actors/retired": "Rollout actors retired because the cluster shrank (elastic actors); not deaths.",
    "actors/restarts": "Rollout actors restarted after a crash or a kill.",
    "actors/downtime_s": ("Seconds rollout actors were out of service after deaths, summed: from a death "
                          "noticed to the restarted actor's first report."),
    "actors/held_for_learner": ("Loop passes in which idle actors got no work: the learner owed over "
                                "learner.max_update_debt updates."),
    "actors/policy_lag": "Weight versions the most outdated actor is behind the learner.",
    "actors/weight_fetches": "Weight versions fetched by all actors.",
    "actors/nonfinite_dropped": "Env steps with a NaN/inf observation or reward, dropped before the replay.",
    "actors/simulator_failures": "Episodes lost to a simulator hang or crash.",
    "actors/inference_fraction": ("Share of the rollout actors' loop time spent in the batched policy forward, "
                                  "since each started; where it rivals the env's share, more envs per actor, "
                                  "bfloat16 or actors.device=cuda pay off."),
    "actors/carla_restarts": "CARLA servers relaunched by the actors' supervisors.",
    "actors/carla_tick_ms": "Mean CARLA world tick time of the actors, ms.",
    "actors/npc_spawn_failures": "NPC vehicles CARLA could not spawn (occupied or too few spawn points), all episodes.",
}


def describe(tag: str) -> str | None:
    """The description of `tag`: its exact row, else the most specific `*` row that matches."""
    if tag in TAGS:
        return TAGS[tag]
    matches = [p for p in TAGS if "*" in p and fnmatch.fnmatchcase(tag, p)]
    return TAGS[max(matches, key=len)] if matches else None


def _expand(pattern: str, names: tuple[str, ...]) -> list[str]:
    return [pattern.replace("*", n) for n in names]


def layout() -> dict[str, dict[str, list]]:
    """The overview (TensorBoard's Custom Scalars tab): one category per question a researcher asks."""
    terms = tuple(TERMINATIONS)
    feature_refs = ["debug/cnn_features_l2_norm", "debug/critic_cnn_features_l2_norm"]
    return {
        "1 learning": {
            "eval return (with baseline and random)": ["Multiline", ["eval/mean_reward", "eval/baseline_mean_reward",
                                                                      "eval/random_mean_reward"]],
            "eval success (with baseline)": ["Multiline", ["eval/success_rate", "eval/baseline_success_rate"]],
            "eval collisions (with baseline)": ["Multiline", ["eval/collision_rate", "eval/baseline_collision_rate"]],
            "eval route progress %": ["Multiline", ["eval/route_progress_pct", "eval/baseline_route_progress_pct"]],
            "training return": ["Multiline", ["train/episode_reward"]],
            "training episode length": ["Multiline", ["train/episode_length"]],
        },
        "2 why episodes end": {
            "training episodes": ["Multiline", _expand("train/termination_*", terms)],
            "evaluation episodes": ["Multiline", ["eval/success_rate", "eval/collision_rate",
                                                   *_expand("eval/termination_*", EVAL_ONLY_TERMINATIONS)]],
            "evaluation collisions by kind": ["Multiline", _expand("eval/collision_*", COLLISION_KINDS)],
            "lane invasions per episode": ["Multiline", ["train/lane_invasions_per_episode", "eval/avg_lane_invasions"]],
            "emergency braking, share of steps": ["Multiline", ["train/aeb_steps", "eval/aeb_steps"]],
            "speed m/s": ["Multiline", ["train/mean_speed", "eval/mean_speed"]],
            "route progress %": ["Multiline", ["train/route_progress_pct", "eval/route_progress_pct"]],
            "reward components": ["Multiline", _expand("rewards/*", REWARD_COMPONENTS)],
        },
        "3 TD3": {
            "critic loss": ["Multiline", ["train/critic_loss"]],
            "actor loss": ["Multiline", ["train/actor_loss"]],
            "Q1 / Q2 / target": ["Multiline", ["debug/q1_mean", "debug/q2_mean", "debug/q_target_mean"]],
            "TD errors": ["Multiline", ["debug/td_error_q1", "debug/td_error_q2"]],
            "gradient norms (before clipping)": ["Multiline", [r"gradients/.*_norm"]],
            "learning rates": ["Multiline", ["agent/cnn_lr", "agent/mlp_lr"]],
        },
        "4 CNN health (seeds: L2 warn 50, critical 100; |mean| < 10; std < 50)": {
            "feature L2 (per sample)": ["Multiline", [*feature_refs, "debug/reference_feature_l2_warning",
                                                       "debug/reference_feature_l2_critical"]],
            "feature mean": ["Multiline", ["debug/cnn_feature_mean", "debug/critic_cnn_feature_mean",
                                           "debug/reference_feature_mean_high", "debug/reference_feature_mean_low"]],
            "feature std": ["Multiline", ["debug/cnn_feature_std", "debug/critic_cnn_feature_std",
                                          "debug/reference_feature_std_limit"]],
        },
        "5 actions": {
            "saturated fraction (|a| > 0.99)": ["Multiline", _expand("debug/action_saturated_*", ACTION_NAMES)],
            "batch action mean": ["Multiline", _expand("debug/action_mean_*", ACTION_NAMES)],
            "batch action std": ["Multiline", _expand("debug/action_std_*", ACTION_NAMES)],
            "pre-tanh |z|": ["Multiline", ["debug/actor_pretanh_abs_mean", "debug/actor_pretanh_abs_max"]],
            "policy action per episode (mean)": ["Multiline", _expand("train/policy_action_mean_*", ACTION_NAMES)],
            "|dQ/da|": ["Multiline", ["debug/dq_da_norm"]],
        },
        "6 throughput": {
            "env steps/s (total and per actor)": ["Multiline", [r"perf/env_steps_per_s.*"]],
            "updates/s": ["Multiline", ["perf/updates_per_s"]],
            "learner step ms / busy fraction": ["Multiline", ["perf/learner_step_ms", "perf/learner_busy_fraction"]],
            "updates per env step": ["Multiline", ["perf/updates_per_env_step"]],
            "updates owed": ["Multiline", ["perf/updates_owed"]],
            "policy lag (versions)": ["Multiline", ["actors/policy_lag"]],
            "actors alive / target": ["Multiline", ["actors/alive", "actors/target"]],
            "actor time in the policy forward": ["Multiline", ["actors/inference_fraction"]],
            "learner memory MB": ["Multiline", [r"perf/.*_mb"]],
        },
        "7 replay": {
            "size": ["Multiline", ["replay/size"]],
            "inserted / sent": ["Multiline", ["replay/inserted", "replay/sent"]],
            "losses (dropped, failures, skipped)": ["Multiline", ["replay/dropped", "replay/send_failures",
                                                                  "replay/skipped", "replay/poll_failures"]],
            "priorities (prioritized replay)": ["Multiline", ["replay/priority_max", "replay/priority_mean"]],
            "importance weights (per)": ["Multiline", ["replay/importance_weight_mean", "replay/importance_weight_min",
                                                       "replay/per_beta"]],
        },
        "8 faults": {
            "restarts": ["Multiline", ["actors/restarts", "replay/redis_restarts", "actors/carla_restarts",
                                       "actors/simulator_failures"]],
            "downtime s (summed)": ["Multiline", ["actors/downtime_s", "replay/downtime_s"]],
        },
        "9 alerts": {
            "alerts": ["Multiline", [r"alerts/.*"]],
        },
    }


def reference_lines() -> dict[str, float]:
    """Constant series drawn beside the CNN feature statistics (the seeds' thresholds)."""
    return {"debug/reference_feature_l2_warning": FEATURE_L2_WARNING,
            "debug/reference_feature_l2_critical": FEATURE_L2_CRITICAL,
            "debug/reference_feature_mean_high": FEATURE_MEAN_LIMIT,
            "debug/reference_feature_mean_low": -FEATURE_MEAN_LIMIT,
            "debug/reference_feature_std_limit": FEATURE_STD_LIMIT}


def markdown_table() -> str:
    """The metrics table of docs/metrics.md, one row per tag."""
    rows = ["| tag | what it shows |", "|---|---|"]
    rows += [f"| `{tag}` | {text.replace('|', chr(92) + '|')} |" for tag, text in TAGS.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
