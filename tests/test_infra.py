"""Cluster definitions in infra/: valid for the tools that read them, and sized for the pipeline.

- infra/aws/cluster.yaml goes through Ray's own launcher config code (``prepare_config`` and
  ``validate_config`` from ``ray.autoscaler._private.util``, what ``ray up`` runs before it
  touches AWS), and through Ray's AWS provider resource autodetection against a moto EC2 on
  127.0.0.1 (the instance-type catalog, no AWS account).
- infra/kuberay/ manifests validate against the vendored KubeRay CRD schemas
  (infra/kuberay/crds/) the way the API server does with strict field validation: unknown
  fields rejected, ``nullable`` honoured, ``x-kubernetes-list-type`` map/set uniqueness checked;
  CEL rules (``x-kubernetes-validations``) cannot be evaluated here, so the test asserts the
  manifests reach none except transition rules (``oldSelf``), which cannot fail on create.
- What the pods / node types offer covers what the pipeline's actors request: the defaults of
  ``diffcut.job.pipeline.label_dataset`` overridden by the flags of the RayJob's command, which is
  parsed by the real ``diffcut label`` argument parser.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
CRDS = KUBERAY / "crds"
AWS_CONFIG = INFRA / "aws" / "cluster.yaml"
RENDER = KUBERAY / "render.py"
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)(?P<gpu>-gpu)?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RESOURCE_PARAMS = ("extractor_gpus", "extractor_cpus", "ncut_cpus")


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# --------------------------------------------------------------------------- the pipeline's asks


@pytest.fixture(scope="module")
def pipeline_defaults() -> dict:
    """Per-actor resources the pipeline asks for when no flag overrides them."""
    from diffcut.job import settings

    params = {spec.dest: spec.default for spec in settings.flags()}
    missing = [name for name in RESOURCE_PARAMS if name not in params]
    assert not missing, f"the run's settings have no flag(s) {missing}"
    defaults = {name: params[name] for name in RESOURCE_PARAMS}
    # 1 GPU per extractor actor; None means "1 on CUDA devices, none on CPU" (resolved below).
    assert defaults["extractor_gpus"] in (1.0, None)
    return defaults


def parse_label_command(entrypoint: str):
    """The RayJob's command, parsed by the real ``diffcut label`` parser (same flags as jobs/label.py)."""
    from diffcut.cli import build_parser

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "jobs/label.py"], argv[:2]
    assert (ROOT / "jobs" / "label.py").is_file()
    return build_parser(["label"]).parse_args(["label", *argv[2:]])


def requested_resources(args, defaults: dict, device: str = "cuda") -> dict:
    """Per-actor resources of a run on ``device``: the flag's value where given, else the library default."""
    out = {}
    for name in RESOURCE_PARAMS:
        value = getattr(args, name, None) if args is not None else None
        value = defaults[name] if value is None else value
        if name == "extractor_gpus" and value is None:
            value = 1.0 if device.startswith("cuda") else 0.0
        out[name] = float(value)
    return out


# --------------------------------------------------------------------------- KubeRay CRD validation


def crd_schema(kind: str, api_version: str) -> dict:
    """openAPIV3Schema of the served, non-deprecated CRD version named by ``api_version``."""
    crd = load_yaml(CRDS / {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind])
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert entry["served"] and not entry.get("deprecated", False), f"{api_version} is not a current version"
    return entry["schema"]["openAPIV3Schema"]


def strict_schema(schema: dict) -> dict:
    """A JSON Schema that rejects what the Kubernetes API server rejects under strict field validation.

    Structural CRD schemas prune (default) or reject (``kubectl --validate=strict``, the default)
    fields they do not declare; JSON Schema allows them unless ``additionalProperties`` is false.
    ``nullable: true`` is OpenAPI for "null is also fine". ``x-kubernetes-int-or-string`` needs
    nothing: KubeRay's schemas spell it out as ``anyOf: [integer, string]``.
    """
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in ("additionalProperties", "items", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(sub) for sub in out[key]]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def kubernetes_extension_problems(instance, schema: dict, path: str = "$") -> tuple[list[str], list[str]]:
    """Walk ``instance`` along ``schema``: list-type violations, and CEL rules that would apply.

    Returns (errors, unevaluated): ``x-kubernetes-list-type: map`` items must be unique by their
    ``x-kubernetes-list-map-keys`` (key defaults filled in), ``set`` items unique; every CEL rule on
    a reached node that is not a transition rule (those mention ``oldSelf`` and only run on update)
    is returned so that the caller can insist there are none.
    """
    errors: list[str] = []
    unevaluated = [
        f"{path}: {rule['rule']}"
        for rule in schema.get("x-kubernetes-validations", [])
        if "oldSelf" not in rule["rule"]
    ]
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key, value in instance.items():
            sub = properties.get(key, additional if isinstance(additional, dict) else None)
            if sub is not None:
                e, u = kubernetes_extension_problems(value, sub, f"{path}.{key}")
                errors += e
                unevaluated += u
    elif isinstance(instance, list):
        items = schema.get("items", {})
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            key_defaults = {k: items.get("properties", {}).get(k, {}).get("default") for k in keys}
            seen = [tuple(item.get(k, key_defaults[k]) for k in keys) for item in instance]
            if len(seen) != len(set(seen)):
                errors.append(f"{path}: duplicate entries for map keys {keys}: {seen}")
        elif list_type == "set":
            seen = [json.dumps(item, sort_keys=True) for item in instance]
            if len(seen) != len(set(seen)):
                errors.append(f"{path}: duplicate entries in a set")
        for i, item in enumerate(instance):
            e, u = kubernetes_extension_problems(item, items, f"{path}[{i}]")
            errors += e
            unevaluated += u
    return errors, unevaluated


def crd_problems(manifest: dict) -> list[str]:
    """Everything the API server would refuse in ``manifest`` (empty when it is valid)."""
    schema = crd_schema(manifest["kind"], manifest["apiVersion"])
    validator = jsonschema.Draft4Validator(strict_schema(schema))
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    name = manifest.get("metadata", {}).get("name", "")
    if not (DNS1123_SUBDOMAIN.match(name) and len(name) <= 63):
        problems.append(f"metadata.name {name!r} is not a DNS-1123 name of at most 63 characters")
    errors, unevaluated = kubernetes_extension_problems(manifest, schema)
    problems += errors
    problems += [f"CEL rule not checked here: {rule}" for rule in unevaluated]
    return problems


# --------------------------------------------------------------------------- KubeRay resources


def cpu_cores(quantity) -> float:
    """Kubernetes CPU quantity in cores ("14", "500m", 2)."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_container(pod_template: dict) -> dict:
    return pod_template["spec"]["containers"][0]


def group_by_name(cluster_spec: dict) -> dict:
    return {group["groupName"]: group for group in cluster_spec["workerGroupSpecs"]}


def is_multiple(total: float, unit: float) -> bool:
    return total >= unit and math.isclose(total / unit, round(total / unit), abs_tol=1e-9)


def kuberay_resource_problems(cluster_spec: dict, asked: dict) -> list[str]:
    """Where the cluster spec cannot serve the pipeline's actors (empty when it can)."""
    problems = []
    if cluster_spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    head = cluster_spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('head must advertise no CPUs (rayStartParams num-cpus: "0")')
    head_limits = ray_container(head["template"])["resources"].get("limits", {})
    if "nvidia.com/gpu" in head_limits or "num-gpus" in head.get("rayStartParams", {}):
        problems.append("head must not hold a GPU")

    groups = group_by_name(cluster_spec)
    if set(groups) != {"gpu", "cpu"}:
        return problems + [f"worker groups must be 'gpu' and 'cpu', got {sorted(groups)}"]
    for name, group in groups.items():
        if group["minReplicas"] != 0:
            problems.append(f"group {name}: minReplicas must be 0 (scale from zero)")
        if not group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]:
            problems.append(f"group {name}: replicas outside [minReplicas, maxReplicas]")
        resources = ray_container(group["template"])["resources"]
        if resources.get("requests") != resources.get("limits"):
            problems.append(f"group {name}: requests must equal limits (Ray counts limits, the scheduler requests)")
        for param in ("num-cpus", "num-gpus", "resources"):
            if param in group.get("rayStartParams", {}):
                problems.append(f"group {name}: rayStartParams {param} overrides what the pod limits say")

    gpu_limits = ray_container(groups["gpu"]["template"])["resources"]["limits"]
    gpus = int(gpu_limits.get("nvidia.com/gpu", 0))
    if gpus != 1:
        problems.append(f"GPU pods must have nvidia.com/gpu: 1, have {gpus}")
    if gpus < asked["extractor_gpus"]:
        problems.append(f"GPU pod offers {gpus} GPU(s) < {asked['extractor_gpus']} per extractor actor")
    if cpu_cores(gpu_limits["cpu"]) < asked["extractor_cpus"]:
        problems.append(f"GPU pod offers {gpu_limits['cpu']} CPUs < {asked['extractor_cpus']} per extractor actor")
    cpu_limits = ray_container(groups["cpu"]["template"])["resources"]["limits"]
    if "nvidia.com/gpu" in cpu_limits:
        problems.append("CPU pods must not take a GPU")
    if not is_multiple(cpu_cores(cpu_limits["cpu"]), asked["ncut_cpus"]):
        problems.append(f"CPU pod CPUs {cpu_limits['cpu']} are not a multiple of {asked['ncut_cpus']} per NCut actor")
    return problems


def pool_size_problems(cluster_spec: dict, args, asked: dict) -> list[str]:
    """The job's actor-pool maxima must fit the worker groups' maxima (else actors wait forever)."""
    groups = group_by_name(cluster_spec)
    gpu_limits = ray_container(groups["gpu"]["template"])["resources"]["limits"]
    cpu_limits = ray_container(groups["cpu"]["template"])["resources"]["limits"]
    gpu_capacity = groups["gpu"]["maxReplicas"] * int(gpu_limits["nvidia.com/gpu"]) // asked["extractor_gpus"]
    ncut_capacity = groups["cpu"]["maxReplicas"] * cpu_cores(cpu_limits["cpu"]) // asked["ncut_cpus"]
    problems = []
    if not 1 <= args.extractor_pool_min <= args.extractor_pool_max <= max(1, gpu_capacity):
        problems.append(
            f"extractor pool [{args.extractor_pool_min}, {args.extractor_pool_max}] "
            f"does not fit {gpu_capacity} actor(s) of the GPU group"
        )
    if not 1 <= args.ncut_pool_min <= args.ncut_pool_max <= max(1, ncut_capacity):
        problems.append(
            f"NCut pool [{args.ncut_pool_min}, {args.ncut_pool_max}] "
            f"does not fit {ncut_capacity} actor(s) of the CPU group"
        )
    return problems


def image_problems(cluster_spec: dict, pyproject: dict) -> list[str]:
    """Images pinned to the Ray version the tests run (inside pyproject's range), CUDA only on GPU pods."""
    problems = []
    ray_version = ray.__version__
    ray_requirement = next(
        Requirement(r) for r in pyproject["project"]["optional-dependencies"]["ray"] if Requirement(r).name == "ray"
    )
    if not ray_requirement.specifier.contains(ray_version):
        problems.append(f"installed ray {ray_version} is outside pyproject's {ray_requirement}")
    if cluster_spec.get("rayVersion") != ray_version:
        problems.append(f"rayVersion {cluster_spec.get('rayVersion')} != ray {ray_version}")
    templates = {
        "head": cluster_spec["headGroupSpec"]["template"],
        **{name: g["template"] for name, g in group_by_name(cluster_spec).items()},
    }
    for name, template in templates.items():
        image = ray_container(template)["image"]
        match = RAY_IMAGE.match(image)
        if not match:
            problems.append(f"{name}: image {image!r} is not a pinned rayproject/ray tag")
            continue
        if match["ray"] != ray_version:
            problems.append(f"{name}: image Ray {match['ray']} != {ray_version}")
        python = f"{match['py'][0]}.{match['py'][1:]}"
        if not SpecifierSet(pyproject["project"]["requires-python"]).contains(python):
            problems.append(f"{name}: image Python {python} outside requires-python")
        if bool(match["gpu"]) != (name == "gpu"):
            problems.append(f"{name}: {'needs' if name == 'gpu' else 'should not use'} the -gpu (CUDA) image")
    return problems


def package_requirement_problems(requirement: str, pyproject: dict) -> list[str]:
    """The package install: diffcut with the ray extra, from a source archive of this version."""
    req = Requirement(requirement)
    version = pyproject["project"]["version"]
    problems = []
    if req.name != pyproject["project"]["name"]:
        problems.append(f"installs {req.name}, not {pyproject['project']['name']}")
    if "ray" not in req.extras:
        problems.append(f"{requirement}: the [ray] extra is needed (s3fs, pandas, ray[data])")
    pinned = (req.url and f"diffcut-{version}" in req.url) or str(req.specifier) == f"=={version}"
    if not pinned:
        problems.append(f"{requirement}: not pinned to version {version}")
    return problems


# --------------------------------------------------------------------------- tests: vendored schemas


def test_vendored_crds_are_the_published_files():
    """The CRDs are byte-for-byte the files SOURCE.md names (an edited schema would prove nothing)."""
    source = (CRDS / "SOURCE.md").read_text()
    recorded = dict((name, digest) for digest, name in re.findall(r"([0-9a-f]{64})\s+(\S+\.yaml)", source))
    assert set(recorded) == {"ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"}
    for name, digest in recorded.items():
        assert hashlib.sha256((CRDS / name).read_bytes()).hexdigest() == digest, name
    assert re.search(r"commit\s+[0-9a-f]{40}", source)


# --------------------------------------------------------------------------- tests: KubeRay


def render(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(RENDER), *args], capture_output=True, text=True, timeout=60, check=True)
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def manifests() -> dict:
    """Every KubeRay manifest the project ships or the render script writes."""
    return {
        "rayjob.yaml": load_yaml(KUBERAY / "rayjob.yaml"),
        "raycluster.yaml": load_yaml(KUBERAY / "raycluster.yaml"),
        "rendered rayjob": render(
            "rayjob",
            "--name",
            "label-coco-2026",
            "--input",
            "s3://in-bucket/coco/",
            "--output",
            "s3://out-bucket/coco-labels/",
            "--max-gpu-workers",
            "32",
            "--max-cpu-workers",
            "10",
            "--source-url",
            "https://example.org/diffcut-0.1.0-src.zip",
            "--service-account",
            "diffcut-s3-reader",
            "--",
            "--refine",
        ),
        "rendered raycluster": render("raycluster", "--max-gpu-workers", "2", "--max-cpu-workers", "1"),
    }


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml", "rendered rayjob", "rendered raycluster"])
def test_kuberay_manifest_validates_against_crd(manifests, name):
    assert crd_problems(manifests[name]) == []


def test_crd_validation_rejects_what_the_api_server_rejects(manifests):
    """The validator has teeth: each of these edits makes a manifest the API server would refuse."""
    job = manifests["rayjob.yaml"]
    assert crd_problems(job) == []

    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # unknown field
    assert any("maxReplica" in p for p in crd_problems(typo))

    number_param = copy.deepcopy(job)
    number_param["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be "0"
    assert any("rayStartParams" in p for p in crd_problems(number_param))

    bad_quantity = copy.deepcopy(job)
    ray_container(bad_quantity["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"])["resources"]["limits"][
        "memory"
    ] = "24 GB"
    assert any("memory" in p for p in crd_problems(bad_quantity))

    same_name = copy.deepcopy(job)
    containers = same_name["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))  # containers are a list-map keyed by name
    assert any("duplicate" in p for p in crd_problems(same_name))

    no_groups_name = copy.deepcopy(job)
    del no_groups_name["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["groupName"]
    assert any("groupName" in p for p in crd_problems(no_groups_name))

    cel = copy.deepcopy(job)
    cel["spec"]["managedBy"] = "someone-else"  # guarded by a CEL rule the test cannot evaluate
    assert any("CEL rule" in p for p in crd_problems(cel))


def test_raycluster_yaml_is_generated_from_the_rayjob():
    out = subprocess.run(
        [sys.executable, str(RENDER), "raycluster"], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout == (KUBERAY / "raycluster.yaml").read_text(), (
        "infra/kuberay/raycluster.yaml is stale; regenerate it: "
        "python infra/kuberay/render.py raycluster > infra/kuberay/raycluster.yaml"
    )


@pytest.mark.parametrize("name", ["rayjob.yaml", "rendered rayjob"])
def test_rayjob_runs_label_py_and_shuts_the_cluster_down(manifests, name, pyproject):
    spec = manifests[name]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("ttlSecondsAfterFinished", 0) >= 0
    args = parse_label_command(spec["entrypoint"])
    assert args.input.startswith("s3://") and args.output.startswith("s3://")

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    working_dir = runtime_env["working_dir"]
    assert working_dir.startswith("https://") and working_dir.endswith(".zip")
    packages = runtime_env["pip"]["packages"] if isinstance(runtime_env["pip"], dict) else runtime_env["pip"]
    (package,) = [p for p in packages if Requirement(p).name == "diffcut"]
    assert package_requirement_problems(package, pyproject) == []
    # One artifact: the package installed is the source the job script comes from.
    assert Requirement(package).url == working_dir


@pytest.mark.parametrize("name", ["rayjob.yaml", "rendered rayjob"])
def test_rayjob_pods_serve_the_pipeline_actors(manifests, name, pipeline_defaults, pyproject):
    spec = manifests[name]["spec"]
    args = parse_label_command(spec["entrypoint"])
    # Explicit: "auto" decides from the GPUs present when the job starts, and a cluster that
    # scales from zero has none then.
    assert args.device.startswith("cuda"), args.device
    asked = requested_resources(args, pipeline_defaults, args.device)
    cluster = spec["rayClusterSpec"]
    assert kuberay_resource_problems(cluster, asked) == []
    assert pool_size_problems(cluster, args, asked) == []
    assert image_problems(cluster, pyproject) == []


def test_raycluster_pods_serve_the_pipeline_defaults(manifests, pipeline_defaults, pyproject):
    for name in ("raycluster.yaml", "rendered raycluster"):
        cluster = manifests[name]["spec"]
        asked = requested_resources(None, pipeline_defaults)
        assert kuberay_resource_problems(cluster, asked) == [], name
        assert image_problems(cluster, pyproject) == [], name


def test_resource_checks_catch_mismatches(manifests, pipeline_defaults, pyproject):
    """The resource checks fail on clusters that could not run the job."""
    cluster = manifests["rayjob.yaml"]["spec"]["rayClusterSpec"]
    asked = requested_resources(None, pipeline_defaults)
    assert kuberay_resource_problems(cluster, asked) == []

    two_gpus_per_actor = dict(asked, extractor_gpus=2.0)
    assert any("GPU" in p for p in kuberay_resource_problems(cluster, two_gpus_per_actor))

    head_works = copy.deepcopy(cluster)
    head_works["headGroupSpec"]["rayStartParams"]["num-cpus"] = "4"
    assert any("head" in p for p in kuberay_resource_problems(head_works, asked))

    odd_cpus = copy.deepcopy(cluster)
    ray_container(group_by_name(odd_cpus)["cpu"]["template"])["resources"]["limits"]["cpu"] = "3"
    assert any("multiple" in p for p in kuberay_resource_problems(odd_cpus, dict(asked, ncut_cpus=2.0)))

    floor_of_one = copy.deepcopy(cluster)
    group_by_name(floor_of_one)["gpu"]["minReplicas"] = 1
    assert any("minReplicas" in p for p in kuberay_resource_problems(floor_of_one, asked))

    unpinned = copy.deepcopy(cluster)
    ray_container(group_by_name(unpinned)["gpu"]["template"])["image"] = "rayproject/ray:latest-gpu"
    assert image_problems(unpinned, pyproject)
    cuda_less = copy.deepcopy(cluster)
    ray_container(group_by_name(cuda_less)["gpu"]["template"])["image"] = f"rayproject/ray:{ray.__version__}-py311"
    assert image_problems(cuda_less, pyproject)


def test_render_keeps_pools_in_step_with_worker_groups(manifests, pipeline_defaults):
    job = manifests["rendered rayjob"]
    cluster = job["spec"]["rayClusterSpec"]
    groups = group_by_name(cluster)
    assert job["metadata"]["name"] == "label-coco-2026"
    assert groups["gpu"]["maxReplicas"] == 32 and groups["cpu"]["maxReplicas"] == 10
    args = parse_label_command(job["spec"]["entrypoint"])
    asked = requested_resources(args, pipeline_defaults, args.device)
    assert (args.input, args.output, args.refine) == ("s3://in-bucket/coco/", "s3://out-bucket/coco-labels/", True)
    gpus_per_pod = int(ray_container(groups["gpu"]["template"])["resources"]["limits"]["nvidia.com/gpu"])
    cpus_per_pod = cpu_cores(ray_container(groups["cpu"]["template"])["resources"]["limits"]["cpu"])
    assert args.extractor_pool_max == int(32 * gpus_per_pod // asked["extractor_gpus"])
    assert args.ncut_pool_max == int(10 * cpus_per_pod // asked["ncut_cpus"])
    # The template itself is untouched by rendering.
    assert group_by_name(manifests["rayjob.yaml"]["spec"]["rayClusterSpec"])["gpu"]["maxReplicas"] != 32

    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    assert {pod["spec"].get("serviceAccountName") for pod in pods} == {"diffcut-s3-reader"}
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "https://example.org/diffcut-0.1.0-src.zip"

    small = manifests["rendered raycluster"]["spec"]
    assert (group_by_name(small)["gpu"]["maxReplicas"], group_by_name(small)["cpu"]["maxReplicas"]) == (2, 1)

    refused = subprocess.run(
        [sys.executable, str(RENDER), "rayjob", "--max-gpu-workers", "-1"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "must be >= 0" in refused.stderr


# --------------------------------------------------------------------------- tests: AWS launcher


@pytest.fixture(scope="module")
def launcher_config() -> dict:
    return load_yaml(AWS_CONFIG)


def prepared(config: dict) -> dict:
    """What ``ray up`` works with: defaults filled in by Ray, then Ray's schema validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def launcher_resource_problems(config: dict, asked: dict) -> list[str]:
    """Where the launcher's node types cannot serve the pipeline's actors (empty when they can)."""
    problems = []
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    if head["resources"].get("CPU") != 0 or head["resources"].get("GPU", 0) != 0:
        problems.append("head node type must advertise CPU 0 and no GPU")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    cpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) == 0}
    if not gpu_types or not cpu_types:
        problems.append("need a GPU node type and a CPU node type")
    for name, t in workers.items():
        if t.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers must be 0 (scale from zero)")
        if t.get("max_workers", 0) < 1:
            problems.append(f"{name}: max_workers must be >= 1")
    for name, t in gpu_types.items():
        if t["resources"]["GPU"] < asked["extractor_gpus"]:
            problems.append(f"{name}: {t['resources']['GPU']} GPU(s) < {asked['extractor_gpus']} per extractor actor")
        if t["resources"].get("CPU", 0) < asked["extractor_cpus"]:
            problems.append(f"{name}: CPUs < {asked['extractor_cpus']} per extractor actor")
    for name, t in cpu_types.items():
        if not is_multiple(t["resources"].get("CPU", 0), asked["ncut_cpus"]):
            problems.append(
                f"{name}: CPU {t['resources'].get('CPU')} not a multiple of {asked['ncut_cpus']} per NCut actor"
            )
    if sum(t.get("max_workers", 0) for t in workers.values()) > config["max_workers"]:
        problems.append("per-type max_workers add up to more than the global max_workers")
    return problems


def test_launcher_config_passes_ray_validation(launcher_config):
    config = prepared(launcher_config)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    # Ray merged the package install into the commands every node runs.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "diffcut" in c for c in config[key]), key
    # The job-submission API is reached through `ray dashboard` (SSH), never over the network.
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in start and "--autoscaling-config" in start


def test_ray_validation_rejects_a_broken_launcher_config(launcher_config):
    """Ray's validation is strict enough to catch typos (so passing it means something)."""
    broken = copy.deepcopy(launcher_config)
    broken["available_node_types"]["gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        prepared(broken)
    fractional = copy.deepcopy(launcher_config)
    fractional["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5  # launcher resources are integers
    with pytest.raises(jsonschema.ValidationError):
        prepared(fractional)
    wrong_head = copy.deepcopy(launcher_config)
    wrong_head["head_node_type"] = "ray.head.default"
    with pytest.raises(ValueError):
        prepared(wrong_head)


def test_launcher_node_types_serve_the_pipeline_actors(launcher_config, pipeline_defaults, pyproject):
    config = prepared(launcher_config)
    asked = requested_resources(None, pipeline_defaults)
    assert launcher_resource_problems(config, asked) == []
    assert any("GPU" in p for p in launcher_resource_problems(config, dict(asked, extractor_gpus=2.0)))

    docker = config["docker"]
    images = {"head": docker.get("head_image", docker["image"])}
    for name, t in config["available_node_types"].items():
        if name != config["head_node_type"]:
            images[name] = t.get("docker", {}).get("worker_image", docker.get("worker_image", docker["image"]))
    for name, image in images.items():
        match = RAY_IMAGE.match(image)
        assert match and match["ray"] == ray.__version__, (name, image)
        has_gpu = config["available_node_types"][name]["resources"].get("GPU", 0) > 0
        assert bool(match["gpu"]) == has_gpu, (name, image)

    installs = [shlex.split(c) for c in launcher_config["setup_commands"] if c.startswith("pip install")]
    assert installs, "setup_commands must install the package"
    (requirement,) = [arg for argv in installs for arg in argv[2:] if not arg.startswith("-")]
    assert package_requirement_problems(requirement, pyproject) == []


@pytest.fixture()
def moto_ec2(monkeypatch):
    """A moto server on 127.0.0.1 standing in for the EC2 API (its instance-type catalog)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield
    finally:
        server.stop()


def test_launcher_resources_match_the_instance_types(launcher_config, moto_ec2):
    """Declared worker resources are what Ray itself detects for the instance types.

    ``AWSNodeProvider.fillout_available_node_types_resources`` is the code ``ray up`` runs to
    learn each instance type's vCPUs and GPUs (DescribeInstanceTypes); given node types without
    ``resources`` it reports what the hardware has, so a worker type that claims more (or a
    changed InstanceType with stale resources) shows up here.
    """
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    config = prepared(launcher_config)
    bare = copy.deepcopy(config)
    for node_type in bare["available_node_types"].values():
        node_type["resources"] = {}
    detected = AWSNodeProvider.fillout_available_node_types_resources(bare)["available_node_types"]
    for name, node_type in config["available_node_types"].items():
        hardware = detected[name]["resources"]
        assert hardware.get("CPU", 0) > 0, (name, hardware)
        declared = node_type["resources"]
        if name == config["head_node_type"]:
            assert declared == {"CPU": 0}
            continue
        assert declared.get("CPU") == hardware["CPU"], (name, declared, hardware)
        assert declared.get("GPU", 0) == hardware.get("GPU", 0), (name, declared, hardware)
