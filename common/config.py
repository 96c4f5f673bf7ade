"""The one configuration tree shared by every role.

Each section is a dataclass whose fields carry a docstring; sections compose into `Config`.
Values come from the defaults, then a YAML file (`--config`), then `--set a.b=c` overrides,
in that order; the device-dependent fields none of them set (None) then come from the profile of
`learner.device` (common/profiles.py), and an unset `env.lane_change` from `env.scenario`. These
defaults and profiles are the default run (`make run`); deploy/configs/ holds only what other runs
change. Every key and value is checked at start: an unknown key or an impossible value raises
`ConfigError` naming the key and what would have been valid, so a typo can never be silently
ignored (the old system's config drift).
`tests/test_config.py` fails when a field is never read by the code.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from common.backends import registered
from common.profiles import apply_profile


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it."""


@dataclass
class RewardConfig:
    """Weights and scales of the five reward components (shared by every backend)."""

    target_speed: float = 8.0
    """Speed in m/s at which the efficiency component is maximal."""
    w_efficiency: float = 2.0
    """Weight of the efficiency component (speed toward `target_speed`)."""
    w_lane_keeping: float = 2.0
    """Weight of the lane-keeping component (lateral offset and heading error)."""
    lane_keeping_reference: Literal["route", "lane"] = "route"
    """Whose centre lane keeping measures the offset from: the route's lane ('route'), so that in
    the other lane it pays nothing whatever the car does there, or the lane the car is in ('lane'),
    so that after a lane change it still pays for staying centred, away from the road's edge."""
    lane_keeping_speed_gate: bool = True
    """Lane keeping pays in proportion to speed up to `target_speed` (times min(v / target_speed,
    1)), so standing centred in the lane earns nothing. Off, it pays at any speed: standing still
    earns 2 a step against about 6.4 at the target speed, with no risk in the curves, and once
    braking stops the car (`env.embedded.brake_reverses` off) every seed learned to stand still
    (results/history.md)."""
    w_comfort: float = 1.0
    """Weight of the comfort component (longitudinal jerk)."""
    w_safety: float = 1.0
    """Weight of the safety component (collision, off-road, lane invasion)."""
    w_progress: float = 3.0
    """Weight of the progress component (metres gained along the route)."""
    collision_penalty: float = 10.0
    """Safety penalty on the step of a collision."""
    off_road_penalty: float = 10.0
    """Safety penalty on a step spent off the drivable road."""
    stuck_penalty: float = 0.0
    """Safety penalty on the step that ends an episode as 'stuck' (env.stuck_after_s): 0 leaves a
    standstill on a clear road worth the 0 it earns, which beats a collision, so a policy unsure of
    the road ahead can settle into braking there for good."""
    lane_invasion_penalty: float = 1.0
    """Safety penalty on the step a lane marking is crossed (counted once, in safety only)."""
    headway_penalty: float = 0.0
    """Safety penalty a step at zero gap to the vehicle ahead, falling linearly to 0 at a time gap
    of headway_s (common/driving.py headway_shortfall). 0 turns it off (the default)."""
    headway_s: float = 1.5
    """Time gap, s, to the vehicle ahead (gap over the ego's speed) below which headway_penalty applies."""
    aeb_penalty: float = 0.0
    """Safety penalty on a step emergency braking (env.aeb_gap_m) took the throttle on. Without it the
    brake costs the policy nothing, and it learned to floor the throttle and let the rule brake (half
    of its steps, results/README.md); charged, the policy's own action is what the transition pays
    for, as in intervention with a penalty (Saunders et al., 2018). 0: off."""
    jerk_scale: float = 10.0
    """Jerk in m/s^3 at which the comfort penalty reaches -1."""
    progress_scale: float = 1.0
    """Metres of route progress worth one unit of the progress component."""
    progress_speed_cap: bool = True
    """Progress counts at most target_speed * dt metres a step, so the step reward peaks at the
    target speed (6.4 at 8 m/s, 5.4 at 12, 3.65 at 19). Off (the seeds'), 3 per metre outpaces the
    efficiency term's fall above the target: 6.4 a step at 8 m/s, 6.6 at 12, 6.95 at 19, and a learned
    policy went full throttle to 19 m/s into the S-bend and the slow lead car (results/history.md)."""
    completion_bonus: float = 10.0
    """Progress-component bonus on the step the route is completed."""


TrainingStart = Literal["fixed", "anywhere", "anywhere_with_lead"]
LookaheadFeatures = Literal["metres", "per_point"]
WarmupActions = Literal["uniform", "baseline", "privileged"]


@dataclass
class EmbeddedConfig:
    """The embedded simulator (highway-env racetrack with traffic)."""

    policy_frequency: int = 10
    """Decisions per simulated second (one env step = 1/policy_frequency s)."""
    simulation_frequency: int = 10
    """Physics steps per simulated second; a multiple of policy_frequency."""
    traffic: list[int] = field(default_factory=lambda: [3, 8, 16])
    """Other vehicles for scenario 0/1/2: 0 passes it to highway-env as its upper bound (a lead car
    plus up to n-1 placed anywhere, out of reach); 1 and 2 place exactly n around the ego
    (actors/envs/traffic.py)."""
    render_scaling: float = 1.75
    """Pixels per metre of the top-down 84x84 camera (1.75 shows about 48 m)."""
    camera_vehicles: Literal["contrast", "highway"] = "contrast"
    """How the camera draws vehicles. contrast: filled footprints, other vehicles black and the
    ego light gray on the gray road; highway: highway-env's own drawing, thin outlines whose fill
    is within ~30 gray levels of the road (traffic barely shows; checkpoints from before this
    switch were trained on it)."""
    camera_heading_up: bool = True
    """Turn the camera with the ego so its heading points up, as a camera mounted on the car (CARLA's)
    sees the road. Off (north up, the default until 2026-12-05), the road ahead points wherever the
    car heads, so the CNN must learn the lead car's gap at every orientation around the track; on,
    held-out success at 30,000 steps rose from 0.00 / 1.00 / 1.00 to 0.95 / 0.95 / 1.00
    (results/README.md). Checkpoints from before the switch load with it off."""
    camera_ahead_m: float = 0.0
    """Metres ahead of the ego, along its heading, at the camera's centre: 0 centres the ego (24 m
    shown each way at 1.75 px/m); 12 shows 36 m ahead and 12 behind, as a camera on the car looks
    ahead, so a stopped car comes into view 4.5 s away at 8 m/s instead of 3 s."""
    brake_reverses: bool = False
    """highway-env's own kinematics: a held negative throttle_brake drives the ego backwards, down to
    -40 m/s. Off, braking stops the car and holds it, as CARLA's brake does with the reverse gear
    off. On reproduces the results (results/history.md) measured before 2026-12-03's fix, where policies that
    braked in the S-bend reversed off the road."""
    training_start: TrainingStart = "fixed"
    """Where training episodes start; evaluation episodes (and the baseline's) always start at
    highway-env's place, 20-50 m into the first straight with a slow lead car on the next segment, so
    their routes stay comparable. fixed: training starts there too, and the curves beyond the first
    ~100 m are seen only once the policy reaches them. anywhere: a random lane and place on the track
    (exploring starts), so every curve is in the replay from the first episodes on; the lead car
    stays where highway-env put it. anywhere_with_lead: the same, with the lead car moved onto the
    segment after the ego's, as at the fixed start."""
    training_start_fraction: float = 1.0
    """With training_start anywhere or anywhere_with_lead: the share of training episodes (drawn
    per episode from its seed) that start so; the others start at the fixed place, behind the
    slow lead car, as evaluation does. Below 1 mixes the whole track's curves into the replay
    with the lead-car following that evaluation asks for."""


@dataclass
class EnvConfig:
    """The driving task, identical for every backend."""

    backend: str = "embedded"
    """Simulator behind the env contract, a registered backend (common/backends.py): embedded
    (highway-env) or carla (a CARLA server), or one of your own with backend_module."""
    backend_module: str = ""
    """Module that registers env.backend when it is not built in; every process that makes envs
    (Ray workers too) imports it first."""
    scenario: Literal[0, 1, 2] = 0
    """The traffic ladder: 0 a slow lead car in the ego's lane (lane following); 1 traffic in the
    way (a stopped or crawling car in the ego's lane, mixed-speed traffic in both lanes ahead: an
    overtake or a well-timed wait); 2 dense (traffic in both lanes around the ego, cut-ins)."""
    max_episode_steps: int = 1000
    """Steps after which an episode is truncated (termination reason 'timeout')."""
    route_length_m: float = 300.0
    """Metres along the route after which the episode ends as 'route_completed'."""
    route_end_bootstraps: bool = False
    """Route completion truncates the episode (the TD target bootstraps, as at a timeout) instead of
    terminating it. Nothing the policy observes tells where the route ends, so a terminal there
    drops the value of states that look like any other stretch of road, and near the end standing
    still (worth 0) and driving on (worth the few steps left plus the bonus) end up close: a
    policy stopped 20 m short of the end on a clear road (results/history.md). The task is to keep driving; the
    route's length is where evaluation stops counting, as a time limit is (Pardo et al., 2018).
    Measured alone (3 seeds, 30,000 steps): success 0.00 / 0.70 / 0.95 against the default's
    0.00 / 1.00 / 1.00, so it stays off."""
    max_lateral_deviation_m: float = 2.5
    """Lateral distance from the route centre at which lane keeping pays nothing and, with
    lane_change off, the episode ends as 'lane_departure'."""
    lane_change: bool | None = None
    """The route is the road: the car may change lanes (each marking crossed is a lane invasion,
    penalised once) and the episode ends only when it leaves the road ('off_road'). Off: the route
    is one lane and max_lateral_deviation_m from its centre ends the episode. Unset: off on
    scenario 0 (lane following, the task every result before the ladder measured), on for 1 and 2
    (the traffic is in the way)."""
    lookahead_spacing_m: float = 2.0
    """Spacing of the 25 look-ahead route points in the vector features."""
    gap_features: bool = False
    """Two more vector features (55 in all): the gap to the vehicle ahead over 20 m (1 when none is
    in range) and the speed at which it closes over 30 m/s, from the obstacle distance that both
    backends measure (CARLA's obstacle sensor). Off, the camera alone shows the traffic."""
    traffic_features: int = 0
    """Privileged observation: this many nearest other vehicles (within 40 m along the route) in the
    vector, 5 features each relative to the ego (present, ahead, beside, relative and lateral speed),
    from the simulator's truth both backends give the privileged driver; an ablation of perception,
    not a sensor a car has. 0: off."""
    aeb_gap_m: float = 0.0
    """Automatic emergency braking, the rule production cars carry, keeping this gap, m, to the
    vehicle ahead: a step starts with a full brake, whatever the policy chose (its steering stands),
    when the obstacle distance both backends measure is shorter than what the ego needs to stop
    this far behind that vehicle if the ego accelerates through the step and only then brakes,
    while the other brakes as hard from now (RSS's safe longitudinal distance; its speed is the
    ego's less the closing speed, 0 when it has just come into range). info['aeb'] marks those
    steps and eval/aeb_steps counts them; the transition keeps the policy's action. 0: off."""
    aeb_decel_ms2: float = 5.0
    """Braking, m/s^2, that emergency braking (aeb_gap_m) counts on from both cars, and the ego's
    acceleration through the step before it: the embedded ego's full brake and full throttle."""
    lookahead_features: LookaheadFeatures = "per_point"
    """How the vector scales each look-ahead point's (x, y). per_point: point k by its own distance
    along the route, k * lookahead_spacing_m, so every point reads as about (cos, sin) of its
    bearing and all vary alike (through the S-bend the lateral parts vary with std 0.26-0.51).
    metres: all by 50 m (the seeds' and, before 2026-12-03, the default), so the near points,
    which steer the car, are the smallest features (std 0.011 for the 2 m point against 0.42 for
    the 50 m one); no seed then passed the S-bend, two of three do per point (results/history.md)."""
    stuck_after_s: float = 3.0
    """Seconds stopped (speed below stuck_speed_ms) with the road ahead clear (no obstacle within
    stuck_clearance_m) after which the episode ends as 'stuck', terminal, so its value is the 0 a
    standstill earns. Without it a timeout bootstraps a standstill from the critic's own guess: a
    policy stopped behind where the lead car had been rated braking at 40 and stayed stopped until
    the timeout (results/history.md). With env.reward.progress_speed_cap (the default since 2026-12-04): success
    0.00 / 1.00 / 1.00, no collision; without the cap every seed drove faster and rear-ended the
    lead car (0.00 / 0.05 / 0.00). 0 turns it off (the seeds' arrangement)."""
    stuck_speed_ms: float = 0.5
    """Speed, m/s, below which the car counts as stopped for stuck_after_s."""
    stuck_clearance_m: float = 15.0
    """A vehicle ahead nearer than this gap, m (DrivingState.obstacle_distance, measured up to
    20 m), makes a stop a wait, not 'stuck'. 15 m is the 20 m centre to centre of the embedded
    simulator's 5 m cars, where the results were measured."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward weights and scales."""
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    """Settings of the embedded simulator."""


@dataclass
class CarlaConfig:
    """CARLA servers, one per env (rollout actors first, then the evaluator), and the CARLA task."""

    launch: bool = True
    """Launch a server per env with `server_command`; false connects to running servers instead."""
    server_command: str = "/workspace/CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping CarlaUE4 -RenderOffScreen -nosound"
    """Command that starts a server (the path in the carlasim/carla image); the map goes after its
    last word that is not a flag, the RPC, streaming and secondary port flags are appended. The
    binary itself, with the project name CarlaUE4.sh passes it, not the script: the script starts it
    as a child, out of reach of the signal that kills a server when its actor dies."""
    host: str = "127.0.0.1"
    """Address the client connects to (launched servers listen on this machine)."""
    port: int = 2000
    """RPC port of env 0's server; env i uses port + 4*i (streaming +1, secondary +2)."""
    tm_port: int = 8000
    """Traffic Manager port of env 0; env i uses tm_port + i, so actors on one node never share one."""
    town: str = "Town01"
    """Map: a launched server boots it (`/Game/Carla/Maps/<town>` after the program of
    `server_command`); a server we connect to loads it unless it runs it already."""
    vehicle: str = "vehicle.tesla.model3"
    """Blueprint of the ego vehicle."""
    route_file: str = ""
    """File of 'x y' route points in CARLA world metres, one per line, '#' comments; the ego starts
    at the first point. Empty: a route generated per episode by walking map waypoints from a
    random spawn point."""
    traffic: list[int] = field(default_factory=lambda: [20, 50, 100])
    """NPC vehicles on autopilot for scenario 0/1/2 (cars only: blueprints with base_type 'car')."""
    settle_ticks: int = 2
    """Ticks after spawning, before an episode's first observation: sensors may send nothing on
    their first tick (a missing first frame is then no hung server) and the car lands."""
    hybrid_physics_from: int = 50
    """Scenarios with at least this many NPC vehicles run the Traffic Manager's hybrid physics:
    full physics only within `hybrid_physics_radius_m` of the ego (role_name 'hero'); 0 = never."""
    hybrid_physics_radius_m: float = 70.0
    """Radius around the ego inside which NPCs keep full physics in hybrid mode, m."""
    timeout_s: float = 10.0
    """Client time-out; a tick (or camera frame) slower than this is a hung server."""
    setup_timeout_s: float = 300.0
    """Client time-out while connecting and loading the map, which takes minutes on a cold
    server (the leaderboard allows 300 s for setup and 60 s per tick); ticks use `timeout_s`."""
    client_worker_threads: int = 2
    """Streaming threads of each CARLA client (`carla.Client(worker_threads=)`), which receive the
    world-tick and sensor streams and run the sensor callbacks; two let a tick through while a
    camera image is handled. libcarla's default, 0, starts one per hardware thread of the node:
    dozens in every env's client process on a big node, for four streams."""
    gpus: list[int] = field(default_factory=list)
    """GPUs launched servers render on, as Vulkan adapter indices on their node: env slot s gets
    `-graphicsadapter=gpus[s % len(gpus)]` (and r.GraphicsAdapter, as CARLA's docs set it), so
    consecutive slots (one host's servers under docker-compose.yml) spread over them. Empty: on a
    node with one GPU no flag; with several, every GPU but `learner_gpu`, mapped to Vulkan indices
    by PCI bus id (actors/envs/carla_gpus.py). Each server's log names the device it took."""
    learner_gpu: int = 0
    """The learner's GPU as nvidia-smi numbers it (compose's LEARNER_GPU) on nodes where servers
    pick their GPUs themselves (`gpus` empty): with 2+ GPUs they leave it to the learner; -1 lets
    them use it too."""
    quality_level: Literal["Epic", "Low"] = "Epic"
    """Rendering quality of launched servers; Low (`-quality-level=Low`) renders faster, with
    simpler materials and no shadows."""
    server_cpus: int = 0
    """CPUs each launched server is pinned to (its CPU affinity, which the server and all its threads
    inherit): slot s gets `server_cpus` consecutive CPUs of those the actor may use,
    from the (s * server_cpus)-th on, wrapping, so a node's servers spread over its cores; UE4 also
    sizes its task-graph worker pool from the CPUs it may use. Ray reserves them for the actor
    (`actors.num_cpus`). 0 leaves servers unpinned, one CPU reserved for each."""
    start_timeout_s: float = 120.0
    """Deadline for a server to answer after a launch or restart, or when connecting; then the env
    fails with an error naming the address."""
    restart_every_episodes: int = 0
    """Relaunch a launched server every N episodes, against CARLA's memory leaks; 0 never."""
    log_dir: str = "runs/carla_servers"
    """Directory, on the actor's node, for each launched server's output (carla_<env>.log): its
    own log, as `-stdout -FullStdOutLogOutput` (added to every launch) make UE4 print it."""
    max_start_failures: int = 3
    """Launches of one server that may exit the same way (exit code and diagnosed cause) before its
    start gives up with the diagnosis: a missing Vulkan driver or a taken port do not go away."""
    server_rpc_threads: int = 0
    """`-RPCThreads=N` for launched servers (CaRL's spelling), else sized from the host's cores;
    0 adds no flag. Stock CARLA 0.9.16 sizes its pool max(cores, 4) - 2 and ignores the flag:
    it takes effect only on builds that read it (README › CARLA)."""
    server_streaming_threads: int = 0
    """`-StreamingThreads=N` for launched servers, as `server_rpc_threads`; 0 adds no flag."""


@dataclass
class CnnConfig:
    """The NatureCNN feature extractor."""

    norm: Literal["layernorm", "none"] = "layernorm"
    """LayerNorm before each LeakyReLU (the seeds' fix), or none for the ablation."""

    trunk_dim: int = 50
    """Width of the bounded trunk (Linear -> LayerNorm -> Tanh, as in DrQ-v2) that each head puts
    between the 512 CNN features and its MLP; 0 feeds the raw features (the seeds' arrangement,
    which locks the actor at an action bound, results/README.md)."""


@dataclass
class TD3Config:
    """The TD3 (or DDPG) update."""

    algo: Literal["td3", "ddpg"] = "td3"
    """td3: twin critics, target smoothing, delayed policy; ddpg: one critic, none of these."""
    gamma: float = 0.99
    """Discount factor."""
    n_step: int = 3
    """Rewards summed per TD target (n-step returns, as in Ape-X and DrQ-v2): the target bootstraps
    gamma^n * Q(s_{t+n}), or fewer steps where the episode ended. Uncorrected for off-policy data.
    With Polyak targets, Q approaches its fixed point with a time constant of about
    1 / (tau * (1 - gamma^n)) updates: 20,000 at tau 0.005, n 1; 3,400 at tau 0.01, n 3."""
    tau: float = 0.01
    """Polyak factor of the target networks (CNNs included). 0.01 (DrQ-v2's) with 3-step returns:
    the seeds' 0.005 with one step left Q at a fraction of its fixed point after 30,000 CPU steps."""
    policy_noise: float = 0.2
    """Std of the Gaussian noise on the target action (TD3 target smoothing)."""
    noise_clip: float = 0.5
    """Clip of the target-action noise."""
    policy_delay: int = 2
    """Critic updates per actor and target update."""
    batch_size: int | None = None
    """Transitions per update; unset: the device profile's (common/profiles.py: 64 on a CPU, 256 on CUDA)."""
    learning_starts: int | None = None
    """Env steps of uniform random actions before the first update; unset: the device profile's
    (1,000 on a CPU, 5,000 on CUDA)."""
    cnn_lr: float = 1e-4
    """Initial Adam learning rate of the CNN parameter groups."""
    mlp_lr: float = 3e-4
    """Adam learning rate of the MLP parameter groups."""
    cnn_weight_decay: float = 1e-4
    """Weight decay of the CNN parameter groups (the MLPs get none); see `weight_decay_style`."""
    weight_decay_style: Literal["decoupled", "l2"] = "decoupled"
    """decoupled: AdamW's decay on the CNN's conv and linear weights only; l2: Adam's L2
    `weight_decay` on every CNN parameter, LayerNorm gains and biases included (the seeds'), which
    shrinks the gains at ~lr per step while the task gradient is small."""
    pretanh_penalty: float = 1.0
    """Weight of mean(relu(|z| - pretanh_threshold)^2) added to the actor loss, z the actor's
    pre-tanh output: keeps tanh out of saturation, where it has no gradient left; 0 turns it off."""
    pretanh_threshold: float = 2.5
    """|z| beyond which the pre-tanh penalty applies (tanh(2.5) = 0.987)."""
    bc_weight: float = 0.0
    """Behaviour cloning of the driver's actions in the replay (`actors.warmup_actions`,
    `actors.guide_fraction`, or its labels on every step with `actors.teacher_labels`), as TD3+BC
    (Fujimoto & Gu, 2021) scales it: the actor loss adds bc_weight x mean|Q| x the batch mean of
    the squared distance from the policy's action to the driver's where it is known, so its
    overtakes are copied, not only found by dQ/da from the policy's own action; 0: off."""
    bc_q_filter: bool = False
    """Clone a driver's action only where critic 1 values it above the policy's own (Nair et al.,
    2018's Q filter), so cloning fades where the policy is better."""
    augment_shift: int = 4
    """DrQ random shift: pad each frame stack by this many pixels (replicate) and crop back to 84x84
    at a random offset, independently for image and next image of every sample; 0 turns it off.
    At 30,000 steps it raised held-out success from 0.55 / 0.00 / 0.00 to 1.00 / 0.35 / 0.00 on
    three training seeds (results/history.md)."""
    actor_encoder: Literal["own", "critic"] = "critic"
    """own: the actor CNN is trained by the actor loss; critic: the CNN is trained by the critic loss
    only and the actor reads its (detached) features, as in DrQ-v2 (the actor CNN then mirrors the
    critic CNN, so the published policy stays self-contained)."""
    critic_warmup_updates: int = 500
    """Critic updates before the first actor update, so the actor does not climb an untrained Q."""
    actor_grad_clip: float = 1.0
    """Max gradient norm of the actor CNN and of the actor MLP (each clipped separately)."""
    critic_grad_clip: float = 10.0
    """Max gradient norm of the critic CNN and of the critic MLPs (each clipped separately)."""


@dataclass
class LearnerConfig:
    """The learner process: device, budget, monitoring, checkpoints."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the learner trains; auto picks cuda when available."""
    max_timesteps: int = 1_000_000
    """Env-step budget of the run."""
    updates_per_step: float | None = None
    """Learner updates per env step once learning has started (0.5 = one update every 2 steps);
    unset: the device profile's (0.5 on a CPU, 1 on CUDA)."""
    threads: int | None = None
    """torch CPU threads of the learner process: on a CPU they run the update, on CUDA they only
    take cores from the actors beside it. 0: on a local Ray cluster the cores its actors and
    evaluator leave, else torch's default (every core); unset: the device profile's (0 on a CPU, 1
    on CUDA)."""
    stop_at_success: float = 0.0
    """End the run at the first evaluation whose success rate reaches this (1.0: every evaluation
    route completed), with a checkpoint of the weights it evaluated; 0 runs the whole budget. In
    distributed mode the learner trains on while the evaluator runs and, when the evaluation reaches
    the rate, goes back to the agent it judged (kept when the evaluation launched)."""
    max_update_debt: int = 200
    """Distributed mode: updates the learner may owe before it hands the actors no new work, so
    actors that outrun a slow learner (a CPU) cannot turn updates_per_step into a fiction (the
    work already handed out still comes in). 0 never holds actors back."""
    checkpoint_freq: int = 50_000
    """Env steps between checkpoints (one is also written at the end)."""
    feature_l2_threshold: float = 50.0
    """Mean per-sample CNN feature L2 norm above which the CNN learning rate is halved."""
    lr_cooldown_updates: int = 1000
    """Minimum updates between two adaptive halvings of the CNN learning rate."""
    min_cnn_lr: float = 1e-6
    """Floor of the adaptive CNN learning rate."""
    grad_warning_norm: float = 100.0
    """Pre-clip gradient norm that raises alerts/gradient_explosion_warning."""
    grad_critical_norm: float = 1000.0
    """Pre-clip gradient norm that raises alerts/gradient_explosion_critical."""
    nonfinite_restore_after: int = 3
    """Non-finite losses in a row after which the last good weights are restored."""
    amp: bool = True
    """bf16 autocast for forward passes on CUDA (ignored on CPU)."""
    weight_sync_interval: int = 100
    """Distributed mode: learner updates between two publications of the policy weights."""
    ray_address: str = ""
    """Ray cluster to join ('auto' or HOST:PORT); empty starts a local one."""
    ray_dashboard: bool = True
    """Start the Ray dashboard (bound to 127.0.0.1:8265) with a local Ray cluster."""
    replay_on_device: bool = False
    """Keep a copy of the replay's frames on the learner's device and gather each batch's frame
    stacks there: per update only frame slots and the small arrays cross to the device, not
    ~14 MB of stacks at batch 256 (device memory: the ring's frame capacity x 7 KB, about 8.8 GB
    for a ring of a million). For a GPU learner; off by default until a GPU measures it
    (`make bench-learner` compares both there)."""
    channels_last: bool = True
    """channels_last memory format for the CNNs on CUDA (`make bench-learner` compares it there).
    Never used on CPU: on a 2-core AMD EPYC it made a batch-64 update ~20% slower (160 vs 130 ms)."""
    compile: Literal["none", "default", "reduce-overhead"] = "none"
    """torch.compile the update's compute (the CNNs, losses and their backward passes; learner/
    compiled.py): default compiles, reduce-overhead adds CUDA graphs on a GPU. A compilation that
    fails falls back to eager with the reason logged. none until a GPU measures it (`make
    bench-learner` compares plain and compiled); compiling takes a minute or more at start."""


@dataclass
class ReplayConfig:
    """The replay memory."""

    capacity: int = 100_000
    """Transitions kept; the oldest are evicted first (FIFO)."""
    save_with_checkpoint: bool = True
    """Serial mode: save the local replay beside each checkpoint so a resume continues with it."""
    via_redis: bool = False
    """Serial mode: send chunks through the Redis replay service, as the distributed mode does,
    instead of straight into the learner's ring."""
    redis_url: str = ""
    """Redis holding the replay stream, e.g. redis://:password@host:6379/0; empty launches a
    local redis-server in the run directory. A password may also come from REDIS_PASSWORD."""
    stream_key: str = "avtd3:replay"
    """Redis stream the chunks are appended to."""
    chunk_steps: int = 32
    """Steps per chunk an actor sends (a chunk is also flushed at the end of an episode)."""
    aof: bool = True
    """Append-only-file persistence for the redis-server we launch."""
    aof_fsync: Literal["everysec", "always"] = "everysec"
    """appendfsync of that AOF: everysec may lose the last second of acknowledged inserts when
    Redis is killed; always loses none, at some insert throughput."""
    connect_timeout_s: float = 60.0
    """How long the learner retries (with back-off) a Redis that does not answer at start
    before it exits with an error naming the address."""
    client_buffer_chunks: int = 1024
    """Chunks an actor keeps while Redis is unreachable; older ones beyond this are dropped and counted."""
    max_chunk_bytes: int = 4 * 1024 * 1024
    """Stream entries larger than this are skipped (and counted) by the learner."""
    min_size_to_sample: int = 256
    """Transitions the learner's ring must hold before it samples (Reverb's min_size_to_sample)."""
    samples_per_insert: float = 0.0
    """Sampled transitions per inserted transition the learner may not exceed; 0 turns the limit off."""
    error_buffer: float = 10_000.0
    """Slack, in sampled transitions, around samples_per_insert before the learner waits."""
    sampler: Literal["uniform", "per", "lap"] = "uniform"
    """Which transitions a batch draws (replay_server/sampler.py). uniform: every live one equally.
    per: proportional prioritized replay (Schaul et al. 2016, Ape-X's), priority (|TD error| +
    per_eps)^per_alpha, importance weights on the critic loss. lap: LAP (Fujimoto et al. 2020),
    priority max(|TD error|, lap_min_priority)^per_alpha, a Huber critic loss, no weights."""
    per_alpha: float = 0.6
    """Exponent on the priorities of per and lap: 0 samples uniformly, 1 in proportion to |TD
    error| (Schaul et al.'s 0.6 for per; the LAP paper used 0.4)."""
    per_beta0: float = 0.4
    """per: importance-weight exponent beta at the first update (Schaul et al.'s 0.4), annealed
    linearly to 1, where the weights undo the sampling's bias entirely."""
    per_beta_steps: int = 1_000_000
    """per: learner updates over which beta anneals from per_beta0 to 1."""
    per_eps: float = 1e-6
    """per: added to |TD error| so that no live transition's priority is 0 (never drawn again)."""
    lap_min_priority: float = 1.0
    """lap: the floor of |TD error| in a priority and the Huber loss's threshold (LAP's 1)."""


@dataclass
class ActorsConfig:
    """Acting in the environment: exploration."""

    warmup_actions: WarmupActions = "uniform"
    """What acts for the first `td3.learning_starts` env steps, before any update. uniform: uniform
    random actions. baseline: the traffic-blind classical baseline (PID + pure pursuit,
    `actors/baseline.py`) plus Gaussian noise of std `expl_noise_start` (times the env's noise
    scale), so the replay holds drives through the curves before the first update; measured on the
    cap + stuck default (3 seeds, 30k steps): mean success 0.57 against uniform's 0.67
    (results/history.md). privileged: the privileged driver (IDM and gap-accepting lane changes on
    the simulator's truth) plus that noise, so the replay holds overtakes of the traffic in the way."""
    guide_fraction: float = 0.0
    """Share of the training episodes after learning starts that the `warmup_actions` driver
    (baseline or privileged) drives, plus the exploration noise, drawn per episode; the rest the
    policy drives. Keeps the driver's drives (overtakes, the route's far end) in the replay through
    the run, not only before the first update (the train/ episode metrics count its episodes too;
    eval/ is the policy's alone); 0: the policy drives every episode."""
    teacher_labels: bool = False
    """Label every training step with the privileged driver's action for the observation the
    actor is in, whoever acts (DAgger, Ross et al., 2011), for `td3.bc_weight` to clone: the
    driver's choices on the policy's own states, not only on the driver's drives; needs the env's
    surroundings (both backends give them)."""
    expl_noise_start: float = 0.1
    """Std of the Gaussian exploration noise when learning starts. 0.1 (= the end value, as SB3's
    TD3 peer): the old 0.3, decaying over 100,000 steps, still put a ~0.24 std on steering at
    30,000 steps, which drove the car out of the curves (results/history.md)."""
    expl_noise_end: float = 0.1
    """Std of the exploration noise after the decay."""
    expl_noise_decay_steps: int = 100_000
    """Env steps after learning_starts over which the noise decays linearly."""
    expl_noise_exponent: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """Colour of the exploration noise of [steer, throttle_brake]: the exponent beta of its 1/f^beta
    power spectrum, drawn per episode (`colorednoise`) and scaled to the std above. 0: white,
    independent at every step (TD3's); the car's own inertia averages it out within a few steps,
    so it seldom holds a steering or braking offset through a curve. 1: pink, whose low
    frequencies do hold one for seconds (Eberhard et al., ICLR 2023: the best default of white,
    pink and OU noise for off-policy continuous control). 2: red (Brownian, close to
    Ornstein-Uhlenbeck). Pink steering ([1, 0]) took every seed through the S-bend on the north-up
    camera, where white left seed 1 off the road; with the heading-up camera white does that too
    and collides less (results/README.md: success 0.95 / 0.95 / 1.00 white, 0.95 / 1.00 / 0.55 pink steering)."""
    action_scaling: bool = False
    """The seeds' temporary safety limit on actions; off by default, warns every episode when on."""
    action_scaling_limit: float = 0.6
    """Absolute action limit applied when action_scaling is on."""
    num_actors: int = 2
    """Rollout actors in distributed mode."""
    envs_per_actor: int | None = None
    """Envs each rollout actor steps together, with one batched policy forward per step over all
    of them (each env keeps its own episodes, seeds, noise scale and chunks; a CARLA env its own
    server). Serial mode always runs one env. Unset: the device profile's (1 with a CPU learner,
    which sets the pace; 8 with a CUDA one)."""
    noise_scale_min: float = 0.5
    """Distributed mode: exploration-noise multiplier of the first env of the first actor (Ape-X
    style spread over every env of the run)."""
    noise_scale_max: float = 2.0
    """Exploration-noise multiplier of the last env of the last actor; the others are spaced
    geometrically between."""
    weight_sync_steps: int = 100
    """Env steps between an actor's (non-blocking) checks for newer policy weights."""
    steps_per_report: int = 200
    """Env steps an actor runs between two reports to the learner (episode stats, speed)."""
    num_cpus: float = 0.5
    """CPUs each rollout actor and the evaluator reserve in Ray for themselves and their env clients
    (fractions let 2 actors fit 2 cores). With `carla.launch`, each also reserves a CPU for every
    server it launches (`carla.server_cpus` when set), which busy-waits for the next tick in
    synchronous mode: a rollout actor reserves num_cpus + envs_per_actor, the evaluator num_cpus + 1."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where rollout actors and the evaluator run the policy (serial mode: the learner's device).
    cuda suits a CARLA worker, whose GPU is there anyway and whose actors step several envs; give
    each actor a share of it with `num_gpus`, or Ray hides the GPU from it."""
    inference_dtype: Literal["float32", "bfloat16"] = "float32"
    """The dtype of the rollout actors' policy (weights and forward pass). bfloat16 makes the
    batched CPU forward ~1.5x faster where the CPU has AVX512-BF16 instructions (much slower where
    it lacks them) and suits GPUs; its actions differ from float32's by ~1e-3, far below the
    exploration noise. The evaluator, `python -m learner.evaluate` and serial mode act in float32."""
    num_gpus: float = 0.0
    """GPU share Ray reserves for each rollout actor and the evaluator (0.25: four share one GPU)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each rollout actor needs, e.g. {carla: 1} to land on CARLA nodes."""
    elastic_resource: str = ""
    """Elastic actors: a resource of `resources` whose cluster-wide total sets the actor count
    instead of `num_actors`: as many actors as the live nodes have room for, less one share for the
    evaluator. Workers that join get actors within `elastic_check_s`; actors of a node that leaves
    are retired, not counted as deaths. Empty: always `num_actors`."""
    elastic_check_s: float = 5.0
    """Seconds between two looks at the cluster's resources when `elastic_resource` is set."""
    restart_backoff_s: float = 1.0
    """First delay before restarting a dead actor; doubles per consecutive death of that actor, up to 60 s."""
    max_consecutive_deaths: int = 10
    """Deaths in a row (without a report between) after which an actor's failure is taken as
    permanent and the run stops with its last error; 0 never gives up."""


@dataclass
class EvalConfig:
    """Periodic deterministic evaluation."""

    freq: int = 10_000
    """Env steps between evaluations (0 disables them)."""
    num_episodes: int = 5
    """Deterministic episodes per evaluation."""
    seed_offset: int = 10_000
    """Added to the run seed for the evaluation env, so eval episodes differ from training ones."""
    video: bool = True
    """Record the first episode of each evaluation as an animated eval/video; a run ends by
    writing its last one to eval.gif in its folder."""
    references: bool = True
    """On the first evaluation, also run the classical baseline and a uniformly random policy on
    the same seeds, logged with every evaluation as eval/baseline_* and eval/random_* lines."""


@dataclass
class LoggingConfig:
    """TensorBoard and console output."""

    logdir: str = "runs"
    """Directory under which each run gets its own folder."""
    debug: bool = False
    """Log learner diagnostics every 10 updates instead of every `log_interval` and print debug lines."""
    log_interval: int = 100
    """Updates between learner diagnostics in TensorBoard (or `log_seconds`, whichever comes first)."""
    log_seconds: float = 20.0
    """Seconds after which the learner logs its diagnostics even before `log_interval` updates,
    so a slow device (a CPU) still draws curves rather than dots."""
    episode_window: int = 20
    """Finished training episodes over which train/termination_* fractions are taken."""
    quiet: bool = False
    """Plain log lines instead of the live status line."""


@dataclass
class Config:
    """The whole run."""

    seed: int = 42
    """Seed of every random generator of the run."""
    mode: Literal["serial", "distributed"] = "distributed"
    """distributed: Ray rollout actors, an evaluator and the Redis replay feed this learner;
    serial: one process (env, replay and learner)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The driving task."""
    carla: CarlaConfig = field(default_factory=CarlaConfig)
    """The CARLA servers and task (env.backend=carla)."""
    cnn: CnnConfig = field(default_factory=CnnConfig)
    """The CNN feature extractor."""
    td3: TD3Config = field(default_factory=TD3Config)
    """The TD3 update."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The learner process."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """The replay memory."""
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    """Acting and exploration."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""


# ---------------------------------------------------------------------------------------------
# Building a Config from YAML and overrides, with checked types.


def _section_fields(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _unknown_key(path: str, key: str, valid: list[str]) -> ConfigError:
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{where}'.{hint} Valid keys here: {', '.join(valid)}")


def _coerce(path: str, hint: Any, value: Any) -> Any:
    """Checks `value` against the annotation `hint`; returns it in the field's type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(f"{path}={value!r} is not valid; choose one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, args[0], value)
    if origin is dict:
        key_t, value_t = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r} is not valid; expected a mapping like {{name: 1}}")
        return {_coerce(f"{path} key", key_t, k): _coerce(f"{path}.{k}", value_t, v) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r} is not valid; expected a list of {item.__name__}")
        return [_coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} is not valid; expected true or false")
        return value
    if hint in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e6 as a string
            value = float(value)
        except ValueError:
            pass
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}={value!r} is not valid; expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} is not valid; expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} is not valid; expected a string")
        return value
    raise ConfigError(f"{path}: unsupported field type {hint!r}")


def _merge(obj: Any, data: dict[str, Any], path: str = "") -> None:
    """Writes a nested dict into the dataclass tree `obj`, checking every key and value."""
    fields = _section_fields(obj)
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            raise _unknown_key(path, key, list(fields))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                sub = list(_section_fields(current))
                raise ConfigError(f"'{where}' is a section; set one of its keys: {', '.join(sub)}")
            _merge(current, value, where)
        else:
            setattr(obj, key, _coerce(where, fields[key], value))


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Splits `a.b=c` into ('a.b', c) with c parsed as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """`base` (the defaults unless given, e.g. a resumed run's config), then the YAML file at
    `path`, then `overrides` (`a.b=c`), all checked."""
    cfg = base if base is not None else Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections")
        _merge(cfg, data)
    for text in overrides or []:
        key, value = parse_override(text)
        nested: dict[str, Any] = {}
        _set_path(nested, key, value)
        _merge(cfg, nested)
    resolve_unset(cfg)
    validate(cfg)
    return cfg


def resolve_unset(cfg: Config) -> None:
    """Fills the fields that neither the defaults, the YAML file nor `--set` gave (None) from what
    they depend on: the device-dependent ones from the device profile, `env.lane_change` from
    `env.scenario` (off on 0, on for 1 and 2)."""
    apply_profile(cfg)
    if cfg.env.lane_change is None:
        cfg.env.lane_change = cfg.env.scenario != 0


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Rejects values that type-check but cannot work together."""
    t, r, e = cfg.td3, cfg.replay, cfg.env
    _require(0.0 < t.gamma <= 1.0, f"td3.gamma={t.gamma} must be in (0, 1]")
    _require(t.n_step >= 1, f"td3.n_step={t.n_step} must be at least 1")
    _require(0.0 < t.tau <= 1.0, f"td3.tau={t.tau} must be in (0, 1]")
    _require(t.policy_delay >= 1, f"td3.policy_delay={t.policy_delay} must be >= 1")
    _require(t.batch_size >= 1, f"td3.batch_size={t.batch_size} must be >= 1")
    _require(t.policy_noise >= 0 and t.noise_clip >= 0, "td3.policy_noise and td3.noise_clip must be >= 0")
    _require(t.cnn_lr > 0 and t.mlp_lr > 0, "td3.cnn_lr and td3.mlp_lr must be > 0")
    _require(t.cnn_weight_decay >= 0, f"td3.cnn_weight_decay={t.cnn_weight_decay} must be >= 0")
    _require(t.actor_grad_clip > 0 and t.critic_grad_clip > 0, "td3.*_grad_clip must be > 0")
    _require(t.pretanh_penalty >= 0 and t.pretanh_threshold > 0, "td3.pretanh_penalty must be >= 0, td3.pretanh_threshold > 0")
    _require(t.bc_weight >= 0, f"td3.bc_weight={t.bc_weight} must be >= 0")
    ga = cfg.actors.guide_fraction
    _require(0.0 <= ga <= 1.0, f"actors.guide_fraction={ga} must be in [0, 1]")
    _require(ga == 0 or cfg.actors.warmup_actions != "uniform",
             f"actors.guide_fraction={ga} needs a driver: actors.warmup_actions baseline or privileged, not uniform")
    _require(t.bc_weight == 0 or cfg.actors.warmup_actions != "uniform" or cfg.actors.teacher_labels,
             f"td3.bc_weight={t.bc_weight} clones a driver's actions: actors.warmup_actions must be baseline or "
             "privileged, or actors.teacher_labels on")
    _require(not cfg.actors.teacher_labels or t.bc_weight > 0,
             "actors.teacher_labels labels the replay for behaviour cloning: set td3.bc_weight > 0")
    _require(0 <= t.augment_shift <= 16, f"td3.augment_shift={t.augment_shift} must be in [0, 16] pixels")
    _require(t.critic_warmup_updates >= 0, f"td3.critic_warmup_updates={t.critic_warmup_updates} must be >= 0")
    _require(cfg.cnn.trunk_dim >= 0, f"cnn.trunk_dim={cfg.cnn.trunk_dim} must be >= 0 (0: no trunk)")
    _require(t.learning_starts >= 0, f"td3.learning_starts={t.learning_starts} must be >= 0")
    _require(r.capacity >= t.batch_size, f"replay.capacity={r.capacity} must be >= td3.batch_size={t.batch_size}")
    _require(r.chunk_steps >= 1 and r.client_buffer_chunks >= 1, "replay.chunk_steps and replay.client_buffer_chunks must be >= 1")
    _require(r.max_chunk_bytes >= 1024, "replay.max_chunk_bytes must be >= 1024")
    _require(r.connect_timeout_s > 0, "replay.connect_timeout_s must be > 0")
    _require(cfg.actors.max_consecutive_deaths >= 0, "actors.max_consecutive_deaths must be >= 0")
    ea = cfg.actors.elastic_resource
    _require(not ea or cfg.actors.resources.get(ea, 0) > 0,
             f"actors.elastic_resource={ea!r} must be one of actors.resources with a positive amount, "
             f"got actors.resources={cfg.actors.resources}")
    _require(cfg.actors.elastic_check_s > 0, "actors.elastic_check_s must be > 0")
    _require(len(cfg.actors.expl_noise_exponent) == 2 and min(cfg.actors.expl_noise_exponent) >= 0,
             f"actors.expl_noise_exponent={cfg.actors.expl_noise_exponent} must list 2 exponents >= 0 (steer, throttle_brake)")
    _require(cfg.actors.envs_per_actor >= 1, f"actors.envs_per_actor={cfg.actors.envs_per_actor} must be >= 1")
    _require(r.min_size_to_sample >= 1, "replay.min_size_to_sample must be >= 1")
    _require(r.samples_per_insert >= 0 and r.error_buffer >= 0, "replay.samples_per_insert and replay.error_buffer must be >= 0")
    _require(0.0 <= r.per_alpha <= 1.0 and 0.0 <= r.per_beta0 <= 1.0,
             f"replay.per_alpha={r.per_alpha} and replay.per_beta0={r.per_beta0} must be in [0, 1]")
    _require(r.per_beta_steps >= 1, f"replay.per_beta_steps={r.per_beta_steps} must be >= 1")
    _require(r.per_eps > 0 and r.lap_min_priority > 0, "replay.per_eps and replay.lap_min_priority must be > 0")
    _require(cfg.learner.max_timesteps > 0, "learner.max_timesteps must be > 0")
    _require(cfg.learner.updates_per_step > 0, "learner.updates_per_step must be > 0")
    _require(cfg.learner.max_update_debt >= 0, "learner.max_update_debt must be >= 0")
    _require(cfg.learner.threads >= 0, f"learner.threads={cfg.learner.threads} must be >= 0 (0: the cores the actors leave)")
    _require(0.0 <= cfg.learner.stop_at_success <= 1.0,
             f"learner.stop_at_success={cfg.learner.stop_at_success} must be a success rate in [0, 1] (0: never stop early)")
    _require(not cfg.learner.stop_at_success or cfg.eval.freq > 0,
             "learner.stop_at_success needs periodic evaluations: eval.freq > 0")
    _require(cfg.actors.num_gpus >= 0, f"actors.num_gpus={cfg.actors.num_gpus} must be >= 0")
    _require(cfg.actors.device != "cuda" or cfg.actors.num_gpus > 0,
             "actors.device=cuda needs actors.num_gpus > 0: Ray makes a GPU visible only to actors that reserve a share")
    _require(cfg.learner.checkpoint_freq > 0, "learner.checkpoint_freq must be > 0")
    _require(cfg.learner.min_cnn_lr > 0, "learner.min_cnn_lr must be > 0")
    _require(cfg.eval.freq >= 0 and cfg.eval.num_episodes >= 1, "eval.freq must be >= 0 and eval.num_episodes >= 1")
    _require(cfg.logging.log_interval >= 1, "logging.log_interval must be >= 1")
    _require(cfg.logging.log_seconds > 0, f"logging.log_seconds={cfg.logging.log_seconds} must be positive")
    _require(cfg.logging.episode_window >= 1, f"logging.episode_window={cfg.logging.episode_window} must be >= 1")
    _require(e.max_episode_steps >= 1, "env.max_episode_steps must be >= 1")
    _require(e.route_length_m > 0, "env.route_length_m must be > 0")
    _require(e.max_lateral_deviation_m > 0, "env.max_lateral_deviation_m must be > 0")
    _require(e.lookahead_spacing_m > 0, "env.lookahead_spacing_m must be > 0")
    _require(e.traffic_features >= 0, f"env.traffic_features={e.traffic_features} must be >= 0 (0: off)")
    c = cfg.carla
    _require(len(c.traffic) == 3 and min(c.traffic) >= 0,
             f"carla.traffic={c.traffic} must list 3 non-negative counts (scenarios 0, 1, 2)")
    _require(c.settle_ticks >= 1, f"carla.settle_ticks={c.settle_ticks} must be >= 1 (a camera may skip its first tick)")
    _require(c.hybrid_physics_from >= 0 and c.hybrid_physics_radius_m > 0,
             "carla.hybrid_physics_from must be >= 0 and carla.hybrid_physics_radius_m > 0")
    _require(c.timeout_s > 0 and c.start_timeout_s > 0 and c.setup_timeout_s > 0,
             "carla.timeout_s, carla.start_timeout_s and carla.setup_timeout_s must be > 0")
    _require(c.restart_every_episodes >= 0, "carla.restart_every_episodes must be >= 0")
    _require(0 < c.port < 65536 and 0 < c.tm_port < 65536, "carla.port and carla.tm_port must be TCP ports")
    _require(c.client_worker_threads >= 0,
             f"carla.client_worker_threads={c.client_worker_threads} must be >= 0 (0: one per hardware thread)")
    _require(c.server_cpus >= 0, f"carla.server_cpus={c.server_cpus} must be >= 0 (0: servers unpinned)")
    _require(min(c.gpus, default=0) >= 0 and len(set(c.gpus)) == len(c.gpus),
             f"carla.gpus={c.gpus} must list distinct GPU indices >= 0 (empty: the default adapter)")
    _require(c.learner_gpu >= -1, f"carla.learner_gpu={c.learner_gpu} must be a GPU index, or -1 (servers may share it)")
    _require(c.max_start_failures >= 1, f"carla.max_start_failures={c.max_start_failures} must be >= 1")
    _require(c.server_rpc_threads >= 0 and c.server_streaming_threads >= 0,
             "carla.server_rpc_threads and carla.server_streaming_threads must be >= 0 (0: no flag)")
    emb = e.embedded
    _require(len(emb.traffic) == 3 and min(emb.traffic) >= 0,
             f"env.embedded.traffic={emb.traffic} must list 3 non-negative counts (scenarios 0, 1, 2)")
    _require(0.0 <= emb.training_start_fraction <= 1.0,
             f"env.embedded.training_start_fraction={emb.training_start_fraction} must be in [0, 1]")
    _require(emb.policy_frequency >= 1 and emb.simulation_frequency % emb.policy_frequency == 0,
             "env.embedded.simulation_frequency must be a positive multiple of env.embedded.policy_frequency")
    _require(emb.render_scaling > 0, "env.embedded.render_scaling must be > 0")
    a = cfg.actors
    _require(a.expl_noise_start >= 0 and a.expl_noise_end >= 0, "actors.expl_noise_* must be >= 0")
    _require(a.expl_noise_decay_steps >= 1, "actors.expl_noise_decay_steps must be >= 1")
    _require(0 < a.action_scaling_limit <= 1, "actors.action_scaling_limit must be in (0, 1]")
    _require(e.aeb_gap_m >= 0, f"env.aeb_gap_m={e.aeb_gap_m} must be >= 0 (0: no emergency braking)")
    _require(e.aeb_decel_ms2 > 0, f"env.aeb_decel_ms2={e.aeb_decel_ms2} must be > 0")
    _require(e.reward.target_speed > 0, "env.reward.target_speed must be > 0")
    _require(e.reward.jerk_scale > 0 and e.reward.progress_scale > 0,
             "env.reward.jerk_scale and env.reward.progress_scale must be > 0")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


_DISPLAY_ORDER = ("seed", "mode", "td3", "cnn", "learner", "replay", "actors", "eval", "env", "carla", "logging")


def for_display(cfg: Config) -> dict[str, Any]:
    """The sections that apply to this run, hyperparameters first: without the config sections
    of the other registered backends (no `carla` on the embedded backend, no `env.embedded` on
    CARLA). For the config text and the HPARAMS tab."""
    data = to_dict(cfg)
    for spec in registered().values():
        if spec.name != cfg.env.backend and spec.config_section:
            *parents, leaf = spec.config_section.split(".")
            node = data
            for key in parents:
                node = node[key]
            node.pop(leaf, None)
    return {k: data[k] for k in _DISPLAY_ORDER if k in data}


def flat_hparams(cfg: Config) -> dict[str, bool | int | float | str]:
    """`for_display` flattened to dotted keys with TensorBoard-hparams values (lists become text)."""
    out: dict[str, bool | int | float | str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
        else:
            out[prefix] = node if isinstance(node, (bool, int, float, str)) else str(node)

    walk(for_display(cfg), "")
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuilds a Config from `to_dict` output (a checkpoint's), with the same checks."""
    cfg = Config()
    _merge(cfg, data)
    resolve_unset(cfg)  # a checkpoint from before a field that resolves so existed
    validate(cfg)
    return cfg


def iter_fields(obj: Any = None, prefix: str = "") -> typing.Iterator[str]:
    """Dotted paths of every leaf field, e.g. 'td3.gamma'."""
    obj = Config() if obj is None else obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, path + ".")
        else:
            yield path
