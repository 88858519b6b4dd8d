"""Cluster resources of the model actors: whether they take GPUs, how many CPUs each reserves, whether the GPUs
asked for can ever exist.

A model actor runs the whole block call (`pipeline.segmenting.block_call`): its threads read, decode, RLE-encode and
commit while the model runs, so it reserves the CPUs those threads use, and Ray does not pack more actors (or other
work) onto a node than its CPUs can feed. `actor_layout` derives the pool (how many actors, how many CPUs each)
from the nodes where ``--max-actors`` and ``--cpus-per-actor`` leave it unset.
"""

from __future__ import annotations

import json
import logging
from typing import NamedTuple

import ray

from pipeline.config import ResourceConfig

log = logging.getLogger(__name__)

# A GPU actor's CPUs when no GPU node can be seen yet (GPU workers autoscaling from zero): enough threads to
# decode and encode for one GPU at the goal rate with --device-preprocess (README "CPUs per GPU").
DEFAULT_GPU_ACTOR_CPUS = 8.0


# A CPU model actor's CPUs (= its torch threads) by default: replicas of a 1-thread model beat one model on
# several threads (small convolutions scale across threads worse than across processes; BENCHMARKS.md, "The CPU
# layout": 2 one-CPU actors gave 1.25× the images/s of one 2-CPU actor on 2 cores).
CPU_ACTOR_CPUS = 1.0


class ActorLayout(NamedTuple):
    """The model actor pool: it autoscales between ``min_actors`` and ``max_actors``, each reserving ``cpus``."""

    min_actors: int
    max_actors: int
    cpus: float


def actor_layout(resources: ResourceConfig, *, use_gpu: bool) -> ActorLayout:
    """The pool ``resources`` ask for, its unset parts derived from the cluster's nodes:

    - GPU actors: ``--max-actors`` (unset: ``--min-actors``), each `gpu_actor_cpus` unless ``--cpus-per-actor``;
    - CPU actors with ``--max-actors``: each `cpu_actor_cpus` (their share of half the cluster) unless
      ``--cpus-per-actor``;
    - CPU actors without it: as many as fit in half the cluster's CPUs, each `CPU_ACTOR_CPUS` (or
      ``--cpus-per-actor``), at least ``--min-actors``: the other half is left to the resume plan's tasks.
    """
    lower, given, cpus = resources.min_actors, resources.max_actors, resources.cpus_per_actor
    if use_gpu:
        return ActorLayout(lower, given or lower, cpus or gpu_actor_cpus(resources.num_gpus))
    if given is not None:
        return ActorLayout(lower, given, cpus or cpu_actor_cpus(given))
    cpus = cpus or CPU_ACTOR_CPUS
    node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    return ActorLayout(lower, max(lower, int(sum(node_cpus) // 2 // cpus)), cpus)


def gpu_actor_cpus(num_gpus: float) -> float:
    """A GPU actor's share of its node's CPUs, one CPU of each node kept free (the raylet, object store and
    other processes): ``(node CPUs - 1) × num_gpus / node GPUs`` on the smallest GPU node alive, at least 1;
    `DEFAULT_GPU_ACTOR_CPUS` when no node has GPUs yet."""
    shares = [
        (node["Resources"].get("CPU", 0.0) - 1) * num_gpus / node["Resources"]["GPU"]
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("GPU", 0) > 0
    ]
    if not shares:
        log.info("no GPU node yet: each model actor reserves %s CPUs (--cpus-per-actor)", DEFAULT_GPU_ACTOR_CPUS)
        return DEFAULT_GPU_ACTOR_CPUS
    return max(1.0, float(int(min(shares))))


def use_gpus(device: str) -> bool:
    """Whether the model actors request GPUs.

    ``cuda`` always does, without looking at the cluster's current resources: on an autoscaling cluster whose
    GPU workers start at zero, the request is what makes the autoscaler add them. ``auto`` uses GPUs when the
    cluster has some now (use ``cuda`` on clusters that scale GPU workers from zero); ``cpu`` never does.
    """
    if device == "cuda":
        return True
    return device == "auto" and ray.cluster_resources().get("GPU", 0) > 0


def cpu_actor_cpus(max_actors: int) -> float:
    """CPUs for one CPU-only model actor (torch runs as many threads as its actor reserves: Ray sets
    OMP_NUM_THREADS): half of the cluster's CPUs shared by the actors, leaving the rest to the resume plan's
    tasks that stream beside them, but at most half of the biggest live node's, so that an actor fits on one
    node (also after a node is lost). A node-spanning request would never be scheduled: the job would hang."""
    node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    return max(1.0, min(sum(node_cpus) // (2 * max_actors), max(node_cpus, default=0.0) // 2))


class ClusterError(RuntimeError):
    """The cluster can never run the job as asked (e.g. GPUs requested where no node can have one)."""


def check_gpu_supply() -> None:
    """With GPUs requested: fine when the cluster has some; a visible "waiting" line when an autoscaler may add
    them; `ClusterError` when nothing can (no GPU, and no autoscaler, or one whose node types have none)."""
    if ray.cluster_resources().get("GPU", 0) > 0:
        return
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    limits = state.get_max_resources_from_cluster_config()  # the node types of an autoscaler that reports them
    if limits is not None and not limits.get("GPU"):
        raise ClusterError(
            "--device cuda: no node type of this cluster's autoscaler has GPUs (ray status); add a GPU node type "
            "or use --device cpu"
        )
    if limits is None and not _autoscaler_can_launch(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)):
        raise ClusterError(
            "--device cuda: this cluster has no GPU and no autoscaler that could add one (ray status); run on a "
            "cluster with GPU workers (cluster.yaml, jobs/k8s/) or use --device cpu"
        )
    log.warning(
        "waiting for GPU workers: the cluster has none yet; the autoscaler is asked for them (`ray status` shows "
        "it starting them)"
    )


def _autoscaler_can_launch(status: bytes | None) -> bool:
    """Whether the (v1) autoscaler's status names node types it could launch: a cluster started without an
    autoscaling config (``ray start``, an embedded local Ray) runs it read-only, its node types being the
    running nodes themselves (``node_<id>``)."""
    if not status:
        return False
    report = json.loads(status).get("autoscaler_report") or {}
    types = {
        *(report.get("active_nodes") or {}),
        *(report.get("idle_nodes") or {}),
        *(report.get("pending_launches") or {}),
    }
    return any(not name.startswith("node_") for name in types)
