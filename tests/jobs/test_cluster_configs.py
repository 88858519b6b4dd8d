"""Offline checks of the deployment configs: `cluster.yaml` (Ray cluster launcher on AWS) and the KubeRay
manifests `jobs/k8s/raycluster.yaml` and `jobs/k8s/rayjob.yaml`.

What is validated by real code rather than by looking at keys:
- cluster.yaml goes through the config resolution of `ray up` (Ray's `_bootstrap_config`: prepare_config,
  EC2 resource autodetection, validate_config against Ray's ray-schema.json, bootstrap_aws creating the
  IAM profile, key pair, subnets and security group), with AWS replaced by moto's in-process mock: no
  credentials, no network. The declared node resources are compared with what Ray detects from the EC2
  instance-type catalogue.
- The RayCluster spec, and the RayJob's copy of it, go through Ray's own KubeRay translation (the code the
  autoscaler sidecar runs on the custom resource), which ends in validate_config.
- The RayJob entrypoint is parsed by `jobs.segment`'s own argument parser and config.
Not validated: the KubeRay CRD schema (that needs an API server); a field allowlist taken from the ray.io/v1
Go types catches misspelt fields instead.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from jobs.segment import parse_job

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYCLUSTER_YAML = ROOT / "jobs" / "k8s" / "raycluster.yaml"
RAYJOB_YAML = ROOT / "jobs" / "k8s" / "rayjob.yaml"
CONFIG_FILES = (CLUSTER_YAML, RAYCLUSTER_YAML, RAYJOB_YAML)


def _load(path: Path) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    assert isinstance(docs[0], dict), f"{path.name}: top level is not a mapping"
    return docs[0]


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return _load(CLUSTER_YAML)


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return _load(RAYCLUSTER_YAML)


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _load(RAYJOB_YAML)


def _worker_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]}


def _gpu_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in _worker_types(cluster).items() if t["resources"].get("GPU", 0) > 0}


def _ray_start_argv(commands: list[str]) -> list[str]:
    """The argv of the single `ray start ...` among shell ``commands`` (split at ``;`` and ``&&``)."""
    found = []
    for command in commands:
        for part in re.split(r";|&&", command):
            argv = shlex.split(part)
            if argv[:2] == ["ray", "start"]:
                found.append(argv)
    assert len(found) == 1, f"expected one `ray start` in {commands}, found {len(found)}"
    return found[0]


def _flag(argv: list[str], name: str) -> str | None:
    """Value of ``--name=value`` or ``--name value`` in ``argv`` (None when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


# --- cluster.yaml: Ray's own schema and `ray up` resolution -------------------------------------------


def test_cluster_yaml_passes_ray_schema(cluster: dict[str, Any]) -> None:
    validate_config(copy.deepcopy(cluster))  # the file as written (also what `ray up` hands the head)
    prepared = prepare_config(copy.deepcopy(cluster))  # merged with Ray's AWS defaults, offline
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.fixture(scope="module")
def aws_resolved(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """cluster.yaml resolved as `ray up` does, against moto's mock of EC2/IAM; also Ray's autodetected resources."""
    import boto3
    import moto
    from ray.autoscaler._private.aws import node_provider
    from ray.autoscaler._private.commands import _bootstrap_config

    region = cluster["provider"]["region"]
    instance_types = sorted({t["node_config"]["InstanceType"] for t in cluster["available_node_types"].values()})
    home = tmp_path_factory.mktemp("home")  # bootstrap_aws writes the new SSH key to ~/.ssh
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")  # moto's documented dummy values
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", region)
        mp.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")  # bootstrap_aws attaches AmazonEC2FullAccess
        with moto.mock_aws():
            # Ray lists the whole catalogue (seconds in moto); the entries of the types used are enough.
            # An unknown instance type fails here.
            catalogue = boto3.client("ec2", region_name=region).describe_instance_types(InstanceTypes=instance_types)
            mp.setattr(node_provider, "list_ec2_instances", lambda *args, **kwargs: catalogue["InstanceTypes"])
            # bootstrap_aws sleeps 15 s twice "for IAM propagation"; nothing propagates in a mock.
            mp.setattr("time.sleep", lambda seconds: None)
            bare = prepare_config(copy.deepcopy(cluster))
            for node_type in bare["available_node_types"].values():
                node_type["resources"] = {}
            detected = node_provider.AWSNodeProvider.fillout_available_node_types_resources(bare)
            resolved = _bootstrap_config(copy.deepcopy(cluster), no_config_cache=True)
    return {"resolved": resolved, "detected": detected["available_node_types"]}


def test_cluster_yaml_resolves_like_ray_up(aws_resolved: dict[str, Any], cluster: dict[str, Any]) -> None:
    resolved = aws_resolved["resolved"]  # not schema-valid any more: bootstrap adds an internal "head_node" key
    assert resolved["auth"]["ssh_private_key"].endswith(".pem")
    assert "IamInstanceProfile" in resolved["head_node"], "bootstrap gives the head its autoscaler IAM profile"
    for name, node_type in resolved["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["SubnetIds"], name
        assert node_config["SecurityGroupIds"], name
        assert node_config["InstanceType"] == cluster["available_node_types"][name]["node_config"]["InstanceType"]


def test_declared_resources_match_instance_types(aws_resolved: dict[str, Any], cluster: dict[str, Any]) -> None:
    """Declared CPU/GPU counts (they override Ray's autodetection) must fit the EC2 hardware."""
    detected = aws_resolved["detected"]
    for name, node_type in cluster["available_node_types"].items():
        declared = node_type["resources"]
        hardware = detected[name]["resources"]
        instance = node_type["node_config"]["InstanceType"]
        assert "CPU" in hardware, f"{instance} not in the EC2 catalogue"
        assert 0 <= declared.get("CPU", hardware["CPU"]) <= hardware["CPU"], (name, instance, hardware)
        assert declared.get("GPU", 0) == hardware.get("GPU", 0), (name, instance, hardware)


# --- cluster.yaml: the deployment choices ---------------------------------------------------------------


def test_gpu_worker_types_scale_from_zero(cluster: dict[str, Any]) -> None:
    gpu_types = _gpu_types(cluster)
    assert gpu_types, "no worker type offers a GPU resource"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, name
        assert 1 <= node_type["max_workers"] <= cluster["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in _worker_types(cluster).values()) == 0, "idle cluster = head only"


def test_head_takes_no_gpu_work_and_is_on_demand(cluster: dict[str, Any]) -> None:
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert "InstanceMarketOptions" not in head["node_config"], "a reclaimed spot head would kill the job"


def test_gpu_workers_are_spot(cluster: dict[str, Any]) -> None:
    for name, node_type in _gpu_types(cluster).items():
        assert node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", name


def test_workers_get_s3_access_from_an_instance_profile(cluster: dict[str, Any]) -> None:
    for name, node_type in _worker_types(cluster).items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name}: workers get no IAM profile by default"


def test_idle_timeout_and_scaling_settings(cluster: dict[str, Any]) -> None:
    assert 0 < cluster["idle_timeout_minutes"] <= 30
    assert cluster["upscaling_speed"] > 0
    assert cluster["provider"]["type"] == "aws"
    assert cluster["provider"]["cache_stopped_nodes"] is False


def test_dashboard_bound_to_loopback(cluster: dict[str, Any]) -> None:
    head = _ray_start_argv(cluster["head_start_ray_commands"])
    assert "--head" in head
    assert _flag(head, "--dashboard-host") in ("127.0.0.1", "localhost")
    assert _flag(head, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"
    worker = _ray_start_argv(cluster["worker_start_ray_commands"])
    assert _flag(worker, "--address") == "$RAY_HEAD_IP:6379"
    assert "0.0.0.0" not in " ".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])


def test_project_installed_on_every_node(cluster: dict[str, Any]) -> None:
    targets = [remote for remote, local in cluster["file_mounts"].items() if local in (".", "./")]
    assert len(targets) == 1, "the working tree is mounted once"
    installs = [c for c in cluster["setup_commands"] if "pip install" in c and targets[0] in c]
    assert installs, f"no setup command installs {targets[0]}"


# --- KubeRay manifests ---------------------------------------------------------------------------------

# Field names of the ray.io/v1 API (KubeRay's raycluster_types.go / rayjob_types.go) used to catch typos:
# the operator would silently ignore an unknown field.
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
}
AUTOSCALER_OPTIONS_FIELDS = {
    "resources",
    "image",
    "imagePullPolicy",
    "env",
    "envFrom",
    "volumeMounts",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "version",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
}


def _cluster_specs(raycluster: dict[str, Any], rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"raycluster.yaml": raycluster["spec"], "rayjob.yaml": rayjob["spec"]["rayClusterSpec"]}


def _pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_kuberay_api_version_and_kind(raycluster: dict[str, Any], rayjob: dict[str, Any]) -> None:
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")


def test_kuberay_fields_are_known(raycluster: dict[str, Any], rayjob: dict[str, Any]) -> None:
    assert set(rayjob["spec"]) <= RAYJOB_SPEC_FIELDS
    for where, spec in _cluster_specs(raycluster, rayjob).items():
        assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, where
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS, where
        assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS_FIELDS, where
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP_FIELDS, (where, group["groupName"])


@pytest.mark.parametrize("where", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_cluster_through_ray_translation(
    where: str, raycluster: dict[str, Any], rayjob: dict[str, Any], cluster: dict[str, Any]
) -> None:
    spec = _cluster_specs(raycluster, rayjob)[where]
    assert spec["enableInTreeAutoscaling"] is True
    ray_cr = {"metadata": {"name": "panoptic-flow", "namespace": "default"}, "spec": copy.deepcopy(spec)}
    derived = _derive_autoscaling_config_from_ray_cr(ray_cr)  # what the autoscaler sidecar computes
    assert derived["idle_timeout_minutes"] == cluster["idle_timeout_minutes"], "same idle timeout as cluster.yaml"
    node_types = derived["available_node_types"]
    assert node_types.pop("headgroup")["resources"].get("GPU", 0) == 0, "the head takes no GPU work"
    gpu_groups = {name: t for name, t in node_types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_groups, "no worker group offers a GPU"
    for name, node_type in gpu_groups.items():
        assert node_type["min_workers"] == 0, name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["resources"]["GPU"] >= 1, name


@pytest.mark.parametrize("where", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_gpu_limits(where: str, raycluster: dict[str, Any], rayjob: dict[str, Any]) -> None:
    spec = _cluster_specs(raycluster, rayjob)[where]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    head_resources = head["template"]["spec"]["containers"][0].get("resources", {})
    assert not any("gpu" in key for part in head_resources.values() for key in part)
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, "no worker group asks Kubernetes for a GPU"
    for group in gpu_groups:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert (
            resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"])
            == resources["limits"]["nvidia.com/gpu"]
        )
        assert group["minReplicas"] == 0 <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1


def test_head_service_not_exposed(raycluster: dict[str, Any], rayjob: dict[str, Any]) -> None:
    for where, spec in _cluster_specs(raycluster, rayjob).items():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not head.get("enableIngress", False), where


def test_rayjob_cluster_equals_raycluster(raycluster: dict[str, Any], rayjob: dict[str, Any]) -> None:
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]
    assert "clusterSelector" not in rayjob["spec"]


def test_rayjob_runs_segment_job(rayjob: dict[str, Any], raycluster: dict[str, Any]) -> None:
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.segment"]
    config, _ = parse_job(argv[3:])  # exits (SystemExit) on a misspelt flag or a bad value
    assert all(uri.startswith("s3://") for uri in config.input.uris)
    assert config.output.startswith("s3://")
    assert config.resources.device == "cuda", "GPU workers start at zero: only an explicit GPU request scales them up"
    gpu_capacity = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in raycluster["spec"]["workerGroupSpecs"]
    )
    assert config.resources.max_actors * config.resources.num_gpus <= gpu_capacity, "actor pool cannot fit"


def test_rayjob_runtime_env_matches_pyproject(rayjob: dict[str, Any]) -> None:
    tomllib = pytest.importorskip("tomllib")
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "pip", "env_vars", "py_modules"}
    assert re.fullmatch(r"(s3|gs|https)://\S+\.zip", runtime_env["working_dir"]), "a remote zip of the project"
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # Ray itself comes from the image; installing it again into the runtime env would shadow it.
    expected = [d for d in dependencies if not re.match(r"ray\b", d)]
    assert runtime_env["pip"] == expected


def test_same_image_everywhere(cluster: dict[str, Any], raycluster: dict[str, Any], rayjob: dict[str, Any]) -> None:
    docker = cluster["docker"]
    images = {docker["image"], docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])}
    for spec in _cluster_specs(raycluster, rayjob).values():
        assert spec["rayVersion"] == ray.__version__
        for template in _pod_templates(spec):
            images.update(c["image"] for c in template["spec"]["containers"])
    assert len(images) == 1, f"different images: {sorted(images)}"
    (image,) = images
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-(gpu|cu\d+)", image), (
        f"{image}: not an official Ray GPU image of the installed Ray {ray.__version__}"
    )


def test_pods_use_irsa_service_account(raycluster: dict[str, Any], rayjob: dict[str, Any]) -> None:
    accounts = set()
    for spec in _cluster_specs(raycluster, rayjob).values():
        for template in _pod_templates(spec):
            accounts.add(template["spec"].get("serviceAccountName"))
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    assert "secretKeyRef" not in env.get("valueFrom", {}), env["name"]
    assert len(accounts) == 1 and None not in accounts, f"service accounts: {accounts}"


CREDENTIAL_PATTERNS = [
    re.compile(r"aws_secret_access_key|aws_access_key_id|aws_session_token|aws_secret", re.IGNORECASE),
    re.compile(r"\bA[KS]IA[0-9A-Z]{16}\b"),  # the shape of AWS access key ids
    re.compile(r"secretKeyRef"),  # Kubernetes secrets as env vars: S3 access is meant to come from IRSA
    re.compile(r"password\s*:", re.IGNORECASE),
]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_no_credentials_in_configs(path: Path) -> None:
    text = path.read_text()
    for pattern in CREDENTIAL_PATTERNS:
        match = pattern.search(text)
        assert match is None, f"{path.name}: {match.group(0)!r} looks like a credential"
