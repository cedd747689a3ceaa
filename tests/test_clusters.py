"""Every cluster file in clusters/ passes Ray's own offline validation (the checks `ray up` runs
before any cloud call), the node types match the machines they name, the KubeRay manifests pass
the operator's CRD schemas, and nothing shipped opens Ray's ports without token authentication."""

from __future__ import annotations

import copy
import io
import re
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
KUBERAY = CLUSTERS / "kuberay"
LAUNCHER_FILES = sorted(
    p for p in CLUSTERS.rglob("*.yaml") if p.parent != KUBERAY and p.name != "runtime_env.yaml"
)
# KubeRay v1.7.0's CRDs (Apache-2.0, unchanged copies; see the README there).
CRDS = ROOT / "tests" / "fixtures" / "kuberay-crds" / "v1.7.0"
RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard + job API, Ray Client
AUTH_SECRET = "segdistill-ray-auth"

# vCPUs and GPUs of the machine types the cluster files use (the providers' pages). A type that is
# not here is a warning, not a failure: add its row.
MACHINES = {
    "aws": {
        "m5.2xlarge": (8, 0, None),
        "m5.4xlarge": (16, 0, None),
        "g5.2xlarge": (8, 1, "A10G"),
        "g5.12xlarge": (48, 4, "A10G"),
    },
    "gcp": {
        "n2-standard-8": (8, 0, None),
        "n2-standard-16": (16, 0, None),
        "g2-standard-8": (8, 1, "nvidia-l4"),
        "a2-highgpu-4g": (48, 4, "nvidia-tesla-a100"),
    },
}
# The lowest NVIDIA driver each CUDA build of torch needs (NVIDIA's CUDA toolkit release notes,
# table 3: CUDA 12.6 >= 560.28.03, 13.0 >= 580.65.06).
MIN_DRIVER = {"cu126": 560, "cu128": 570, "cu129": 575, "cu130": 580}
# The driver branch of the images the files name (AWS: the DLAMI release notes of "Deep Learning
# Base AMI with Single CUDA (Ubuntu 24.04)" 20260717: 595.71.05; GCP: the image family's name).
IMAGE_DRIVER = {"Deep Learning Base AMI with Single CUDA (Ubuntu 24.04)": 595}


def _dependencies() -> list[str]:
    """pyproject's [project] dependencies, as written (no TOML parser on Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.DOTALL | re.MULTILINE).group(1)
    return re.findall(r'"([^"]+)"', block)


def _pinned_ray() -> str:
    return next(d for d in _dependencies() if d.startswith("ray[")).split("==")[1]


def _project_deps() -> list[str]:
    return [d for d in _dependencies() if not d.startswith("ray[")]


def test_every_cluster_file_is_covered():
    names = {p.relative_to(CLUSTERS).as_posix() for p in CLUSTERS.rglob("*.yaml")}
    assert {"aws-gpu.yaml", "gcp-gpu.yaml"} <= {p.name for p in LAUNCHER_FILES}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names
    assert ray.__version__ == _pinned_ray()


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_yaml_passes_ray_validation(path):
    raw = yaml.safe_load(path.read_text())
    config = prepare_config(copy.deepcopy(raw))  # defaults filled as `ray up` does
    validate_config(config)  # Ray's schema, head type, sum of min_workers <= max_workers
    types = raw["available_node_types"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= raw["max_workers"]

    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no training or data work on the head"
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    for name, t in workers.items():
        assert t.get("min_workers", 0) <= t["max_workers"], name

    provider = raw["provider"]["type"]
    gpu_types = {k: v for k, v in workers.items() if _gpus(provider, v) > 0}
    cpu_types = {k: v for k, v in workers.items() if _gpus(provider, v) == 0}
    assert cpu_types, "a CPU-only type for Ray Data"
    assert {_gpus(provider, v) for v in gpu_types.values()} >= {1, 4}, "1-GPU and multi-GPU"
    spot = {k for k, v in gpu_types.items() if _preemptible(provider, v)}
    on_demand = set(gpu_types) - spot
    assert spot and on_demand, "spot/preemptible GPU types with an on-demand fallback"
    assert max(types[k].get("priority", 0) for k in on_demand) < min(
        types[k].get("priority", 0) for k in spot
    ), "spot is preferred; on-demand is the fallback"
    if provider == "gcp":  # Ray cannot detect GPUs on GCP: declared, and equal to the hardware
        for name, t in gpu_types.items():
            accel = t["node_config"]["guestAccelerators"]
            assert t["resources"]["GPU"] == sum(a["acceleratorCount"] for a in accel), name
            assert t["resources"]["CPU"] > 0, name

    # Installs this project (and so its pinned Ray) on every node; the image has that Ray.
    assert any("pip install" in c and "segdistill" in c for c in raw["setup_commands"])
    assert raw["file_mounts"] == {"~/segdistill": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert f"rayproject/ray:{_pinned_ray()}-" in raw["docker"]["image"]
    # The dashboard is never bound to a public address.
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert raw["idle_timeout_minutes"] > 0


def _gpus(provider: str, node_type: dict) -> int:
    if provider == "gcp":
        return sum(
            a["acceleratorCount"] for a in node_type["node_config"].get("guestAccelerators", [])
        )
    return MACHINES["aws"][node_type["node_config"]["InstanceType"]][1]


def _machine(provider: str, node_type: dict) -> str:
    config = node_type["node_config"]
    return config["machineType"] if provider == "gcp" else config["InstanceType"]


def _preemptible(provider: str, node_type: dict) -> bool:
    config = node_type["node_config"]
    if provider == "gcp":
        return bool(config.get("scheduling", {}).get("preemptible"))
    return config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def _ray_cluster_spec(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifest(name):
    spec = _ray_cluster_spec(KUBERAY / name)
    assert spec["rayVersion"] == _pinned_ray() == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "dashboard not exposed outside"
    pods = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert container["image"].startswith(f"rayproject/ray:{_pinned_ray()}-")
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            claim = next(
                v for v in pod["spec"]["volumes"] if v["name"] == mounts["/mnt/cluster_storage"]
            )
            assert claim["persistentVolumeClaim"]["claimName"] == "segdistill-storage"
    gpu_groups = [
        g for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]  # fmt: skip
    assert gpu_groups
    for g in gpu_groups:
        assert g["minReplicas"] <= g["maxReplicas"]
        assert any(t["key"] == "nvidia.com/gpu" for t in g["template"]["spec"]["tolerations"])
        # above Ray's 30 s drain window, so a preempted worker can drain
        assert g["template"]["spec"]["terminationGracePeriodSeconds"] > 30


def test_rayjob_matches_raycluster_and_runs_distill():
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    assert job["kind"] == "RayJob"
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "pipelines/distill.py"]
    config = entry[entry.index("--config") + 1]
    assert (ROOT / config).is_file(), config
    assert "trainer.storage_path=/mnt/cluster_storage/runs" in entry
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    assert runtime_env["pip"] == _project_deps()


def test_runtime_env_lists_the_project_dependencies():
    runtime_env = yaml.safe_load((CLUSTERS / "runtime_env.yaml").read_text())
    assert runtime_env["pip"] == _project_deps()


def test_pvc_is_read_write_many():
    pvc = yaml.safe_load((KUBERAY / "storage.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["metadata"]["name"] == "segdistill-storage"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_working_dir_upload_leaves_out_data_and_environments(tmp_path):
    """The package `ray job submit --working-dir .` would upload (Ray's own packer, honouring
    .gitignore and .rayignore) holds the code and not the heavy folders, and is far below
    Ray's 100 MiB upload limit."""
    from ray._private.runtime_env.packaging import create_package

    probes = [ROOT / folder / "segdistill-upload-probe.bin" for folder in ("data", "outputs")]
    for probe in probes:  # so each folder exists and has something to leave out
        probe.parent.mkdir(exist_ok=True)
        probe.write_bytes(b"x" * 1024)
    try:
        target = tmp_path / "pkg.zip"
        create_package(str(ROOT), target, include_gitignore=True)
        names = zipfile.ZipFile(io.BytesIO(target.read_bytes())).namelist()
    finally:
        for probe in probes:
            probe.unlink()
    code = [
        p.relative_to(ROOT).as_posix()
        for folder in ("components", "pipelines")
        for p in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    missing = sorted(set(code) - set(names))  # e.g. an unanchored "data/" drops components/data
    assert not missing, missing
    assert "clusters/aws-gpu.yaml" in names and "configs/kd_synthetic.yaml" in names
    heavy = [n for n in names if re.match(r"(data|outputs|\.venv|\.git)/.", n)]
    assert not heavy, heavy[:10]
    assert target.stat().st_size < 10 * 2**20


# ---------------------------------------------------------------------------------------------
# The cloud node types against the machines they name


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_node_types_match_their_machine_types(path):
    raw = yaml.safe_load(path.read_text())
    provider = raw["provider"]["type"]
    for name, t in raw["available_node_types"].items():
        machine = _machine(provider, t)
        if machine not in MACHINES[provider]:
            warnings.warn(f"{path.name}: {name}: {machine} is not in MACHINES; CPUs/GPUs unchecked")
            continue
        cpus, gpus, accelerator = MACHINES[provider][machine]
        declared = t.get("resources", {})
        if name == raw["head_node_type"]:
            assert declared.get("CPU") == 0, name  # deliberately: no work on the head
        elif "CPU" in declared:
            assert declared["CPU"] == cpus, (name, machine, declared)
        if provider == "gcp":
            accel = t["node_config"].get("guestAccelerators", [])
            assert sum(a["acceleratorCount"] for a in accel) == gpus, (name, machine)
            assert {a["acceleratorType"] for a in accel} == ({accelerator} if gpus else set())
            assert declared.get("GPU", 0) == gpus, (name, machine, declared)  # Ray cannot detect
            if name != raw["head_node_type"]:
                assert declared.get("CPU") == cpus, (name, machine, declared)
            if gpus:
                assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name
        else:
            assert declared.get("GPU", gpus) == gpus, (name, machine, declared)


def test_an_unknown_machine_type_is_a_warning_not_a_failure():
    raw = yaml.safe_load((CLUSTERS / "aws-gpu.yaml").read_text())
    raw["available_node_types"]["gpu.1x.spot"]["node_config"]["InstanceType"] = "g7.2xlarge"
    path = CLUSTERS / "aws-gpu.yaml"
    with pytest.warns(UserWarning, match="g7.2xlarge"):
        _check_machines_of(raw, path)


def _check_machines_of(raw, path):
    """test_node_types_match_their_machine_types on an edited config."""

    class _P:
        name = path.name

        @staticmethod
        def read_text():
            return yaml.safe_dump(raw)

    test_node_types_match_their_machine_types(_P)


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_gcp_scheduling_is_one_object(path):
    raw = yaml.safe_load(path.read_text())
    for name, t in raw["available_node_types"].items():
        scheduling = t["node_config"].get("scheduling")
        if scheduling is not None:  # the API's Scheduling is an object (Ray issue #46248)
            assert isinstance(scheduling, dict), name
            if scheduling.get("preemptible"):
                assert scheduling.get("automaticRestart") is False, name


# ---------------------------------------------------------------------------------------------
# Images, drivers and torch


def _torch_pin_of_setup_script() -> str:
    return re.search(r"torch==([0-9.]+)", (ROOT / "scripts" / "setup.sh").read_text()).group(1)


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_torch_is_pinned_to_a_cuda_build_the_image_driver_runs(path):
    raw = yaml.safe_load(path.read_text())
    commands = raw["setup_commands"]
    torch_at = [
        i for i, c in enumerate(commands)
        if re.search(r"pip install .*torch==", c)
    ]  # fmt: skip
    project_at = next(i for i, c in enumerate(commands) if "pip install" in c and "segdistill" in c)
    assert torch_at and torch_at[0] < project_at, "torch pinned before `pip install -e`"
    m = re.search(
        r"torch==(\S+) --index-url https://download\.pytorch\.org/whl/(cu\d+)$",
        commands[torch_at[0]],
    )
    assert m, commands[torch_at[0]]
    version, cuda = m.groups()
    assert version == _torch_pin_of_setup_script()
    provider = raw["provider"]["type"]
    configs = [t["node_config"] for t in raw["available_node_types"].values()]
    if provider == "gcp":
        images = {
            d["initializeParams"]["sourceImage"] for c in configs for d in c["disks"] if d["boot"]
        }
        assert len(images) == 1, images
        (image,) = images
        assert image.startswith("projects/deeplearning-platform-release/global/images/family/")
        driver = int(re.search(r"-nvidia-(\d+)$", image).group(1))
    else:
        # An explicit AMI on every node type: Ray's default AMI is a 2021 DLAMI (CUDA 11.2 driver).
        amis = {c.get("ImageId") for c in configs}
        assert len(amis) == 1 and None not in amis, amis
        named = [n for n in IMAGE_DRIVER if n in path.read_text()]
        assert named, "the AMI's name (and so its driver) is written next to ImageId"
        driver = IMAGE_DRIVER[named[0]]
    assert MIN_DRIVER[cuda] <= driver, (cuda, driver)


def test_aws_docker_comment_matches_ray():
    """Ray's launcher passes `--runtime=nvidia` (when docker lists the NVIDIA runtime), never
    `--gpus all`."""
    from ray.autoscaler._private import command_runner

    source = Path(command_runner.__file__).read_text()
    assert '"--runtime=nvidia"' in source and "--gpus" not in source
    text = (CLUSTERS / "aws-gpu.yaml").read_text()
    assert "--runtime=nvidia" in text
    assert not re.search(r"Ray adds\s+#?\s*`--gpus all`", text)


# ---------------------------------------------------------------------------------------------
# Credentials of the workers


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_workers_have_storage_credentials(path):
    """Ray's launcher gives its instance profile / service account to the head only."""
    raw = yaml.safe_load(path.read_text())
    provider = raw["provider"]["type"]
    for name, t in raw["available_node_types"].items():
        if name == raw["head_node_type"]:
            continue
        config = t["node_config"]
        if provider == "gcp":
            (account,) = config["serviceAccounts"]
            assert account["email"].endswith(".iam.gserviceaccount.com"), name
            assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"], name
        else:
            profile = config["IamInstanceProfile"]
            assert profile.get("Name") or profile.get("Arn"), name


# ---------------------------------------------------------------------------------------------
# What the launcher copies to the nodes


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _rsync_matches(pattern: str, path: str) -> bool:
    """rsync's exclude rule matching (man rsync, "INCLUDE/EXCLUDE PATTERN RULES"), for the
    patterns used here: a leading "/" anchors at the transfer root; a pattern without "/" or
    "**" matches the last component; otherwise it matches at the end of the path."""
    assert "[" not in pattern, "character classes are not modelled"
    anchored = pattern.startswith("/")
    pattern = pattern.strip("/")
    regex = _glob_regex(pattern)
    if anchored:
        return re.fullmatch(regex, path) is not None
    if "/" not in pattern and "**" not in pattern:
        return re.fullmatch(regex, path.rsplit("/", 1)[-1]) is not None
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[k:])) for k in range(len(parts)))


def _rsync_excluded(path: str, patterns: list[str]) -> bool:
    """rsync walks down the tree: an excluded directory hides everything below it."""
    parts = path.split("/")
    return any(
        _rsync_matches(p, "/".join(parts[:i])) for i in range(1, len(parts) + 1) for p in patterns
    )


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = []
    if not out:  # not a git checkout (e.g. an sdist): the files on disk
        out = [
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*")
            if p.is_file()
            and not {".git", ".venv", "data", "outputs"} & set(p.relative_to(ROOT).parts[:1])
        ]
    return out


def test_rsync_matcher_follows_rsync():
    assert _rsync_matches("**/data", "components/data")
    assert not _rsync_matches("/data", "components/data")
    assert _rsync_matches("/data", "data")
    assert _rsync_matches("__pycache__", "a/b/__pycache__")
    assert _rsync_matches("*.egg-info", "segdistill.egg-info")
    assert _rsync_excluded("data/x/y.parquet", ["/data"])


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_rsync_exclude_drops_only_top_level_folders(path, tmp_path):
    patterns = yaml.safe_load(path.read_text())["rsync_exclude"]
    tracked = _tracked_files()
    assert any(f.startswith("components/data/") for f in tracked)
    dropped = sorted(f for f in tracked if _rsync_excluded(f, patterns))
    assert not dropped, dropped[:10]  # e.g. "**/data" drops components/data/ and tests/data/
    for heavy in (
        "data/x.parquet",
        "outputs/run/ckpt.pt",
        ".venv/bin/python",
        ".git/HEAD",
        "components/__pycache__/a.pyc",
        "segdistill.egg-info/PKG-INFO",
    ):
        assert _rsync_excluded(heavy, patterns), heavy

    if shutil.which("rsync"):  # the real thing, with the flags Ray passes
        src = tmp_path / "src"
        for rel in ("components/data/a.py", "tests/data/b.py", "data/c.parquet", "outputs/d.pt"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text("x")
        args = [a for p in patterns for a in ("--exclude", p)]
        listed = subprocess.run(
            ["rsync", "-avz", "--dry-run", *args, f"{src}/", str(tmp_path / "dst")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "components/data/a.py" in listed and "tests/data/b.py" in listed
        assert "c.parquet" not in listed and "d.pt" not in listed


# ---------------------------------------------------------------------------------------------
# KubeRay: the operator's CRD schemas, core objects


def _crd_dir() -> Path:
    """The v1.7.0 CRDs, committed with the tests (tests/fixtures/kuberay-crds/README.md)."""
    assert (CRDS / "ray.io_rayclusters.yaml").is_file(), f"KubeRay CRDs missing from {CRDS}"
    return CRDS


def _strict(schema):
    """The CRD schema as `kubectl apply` (strict field validation, the default since kubectl 1.27)
    applies it: an object with listed properties takes no other field."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


_SCHEMAS: dict = {}


def _spec_schema(kind: str) -> dict:
    if kind not in _SCHEMAS:
        crd_file = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load((_crd_dir() / crd_file).read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
        _SCHEMAS[kind] = _strict(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    return _SCHEMAS[kind]


def _validate_spec(doc: dict) -> None:
    import jsonschema

    jsonschema.Draft7Validator(_spec_schema(doc["kind"])).validate(doc["spec"])


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifest_passes_the_crd_schema(name):
    doc = yaml.safe_load((KUBERAY / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    _validate_spec(doc)


def test_crd_schema_check_catches_unknown_fields_and_wrong_types():
    import jsonschema

    doc = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    typo = copy.deepcopy(doc)
    typo["spec"]["autoscalerOptions"]["idleTimeoutSecond"] = 600
    with pytest.raises(jsonschema.ValidationError, match="idleTimeoutSecond"):
        _validate_spec(typo)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    with pytest.raises(jsonschema.ValidationError):
        _validate_spec(wrong)
    mode = copy.deepcopy(doc)
    mode["spec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(jsonschema.ValidationError):
        _validate_spec(mode)


# apiVersion/kind and the fields the API server requires, for the core objects shipped.
_CORE_SCHEMAS = {
    ("v1", "PersistentVolumeClaim"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object",
                "required": ["accessModes", "resources"],
                "properties": {
                    "accessModes": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "enum": [
                                "ReadWriteOnce",
                                "ReadOnlyMany",
                                "ReadWriteMany",
                                "ReadWriteOncePod",
                            ]
                        },
                    },
                    "storageClassName": {"type": "string"},
                    "resources": {
                        "type": "object",
                        "required": ["requests"],
                        "properties": {"requests": {"type": "object", "required": ["storage"]}},
                    },
                },
            },
        },
    },
    ("networking.k8s.io/v1", "NetworkPolicy"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "definitions": {
            "selector": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "matchExpressions": {"type": "array"},
                },
            },
            "peer": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "podSelector": {"$ref": "#/definitions/selector"},
                    "namespaceSelector": {"$ref": "#/definitions/selector"},
                    "ipBlock": {"type": "object", "required": ["cidr"]},
                },
            },
            "port": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "port": {"type": ["integer", "string"]},
                    "endPort": {"type": "integer"},
                    "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                },
            },
        },
        "properties": {
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object",
                "required": ["podSelector"],
                "additionalProperties": False,
                "properties": {
                    "podSelector": {"$ref": "#/definitions/selector"},
                    "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
                    "ingress": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "from": {"type": "array", "items": {"$ref": "#/definitions/peer"}},
                                "ports": {"type": "array", "items": {"$ref": "#/definitions/port"}},
                            },
                        },
                    },
                    "egress": {"type": "array"},
                },
            },
        },
    },
    ("v1", "Secret"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "properties": {
            "metadata": {"type": "object", "required": ["name"]},
            "type": {"type": "string"},
            "data": {"type": "object", "additionalProperties": {"type": "string"}},
            "stringData": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
}


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [
        (p, doc)
        for p in sorted(KUBERAY.glob("*.yaml"))
        for doc in yaml.safe_load_all(p.read_text())
        if doc
    ]


def test_core_kubernetes_objects_are_well_formed():
    import jsonschema

    kinds = set()
    for path, doc in _kuberay_docs():
        if doc["apiVersion"] == "ray.io/v1":
            continue
        key = (doc["apiVersion"], doc["kind"])
        assert key in _CORE_SCHEMAS, f"{path.name}: no structural check for {key}"
        jsonschema.Draft7Validator(_CORE_SCHEMAS[key]).validate(doc)
        kinds.add(doc["kind"])
    assert {"PersistentVolumeClaim", "NetworkPolicy"} <= kinds


# ---------------------------------------------------------------------------------------------
# Who can reach the cluster: token authentication everywhere, the ports closed to outsiders


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_nodes_run_with_token_auth(path):
    raw = yaml.safe_load(path.read_text())
    starts = [
        c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
        if "ray start" in c
    ]  # fmt: skip
    assert len(starts) == 2
    for command in starts:
        before = command[: command.index("ray start")]
        assert re.search(r"(export )?RAY_AUTH_MODE=token\b", before), command
    # Ray reads ~/.ray/auth_token; the launcher copies it from the machine running `ray up`.
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=disabled" not in path.read_text()


def _ray_specs() -> list[tuple[str, dict]]:
    out = []
    for path, doc in _kuberay_docs():
        if doc["kind"] == "RayCluster":
            out.append((path.name, doc["spec"]))
        elif doc["kind"] == "RayJob":
            out.append((path.name, doc["spec"]["rayClusterSpec"]))
    return out


def _pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_kuberay_clusters_run_with_token_auth():
    specs = _ray_specs()
    assert {n for n, _ in specs} >= {"raycluster.yaml", "rayjob.yaml"}
    for name, spec in specs:
        assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}, name
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name
        for pod in _pod_templates(spec):
            for container in pod["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("RAY_AUTH_MODE", "token") == "token", name
    # How to make the Secret is written down, with the key KubeRay reads (auth_token).
    readme = (CLUSTERS / "README.md").read_text()
    assert re.search(
        rf"kubectl create secret generic {AUTH_SECRET}\s*\\?\s*--from-literal=auth_token=", readme
    )


def test_network_policy_admits_only_the_cluster_its_submitter_and_the_operator():
    policies = [d for _, d in _kuberay_docs() if d["kind"] == "NetworkPolicy"]
    assert len(policies) == 1
    policy = policies[0]["spec"]
    selector = policy["podSelector"]["matchLabels"]
    assert selector and "Ingress" in policy["policyTypes"]
    for name, spec in _ray_specs():  # every Ray pod is selected
        for pod in _pod_templates(spec):
            labels = pod.get("metadata", {}).get("labels", {})
            assert selector.items() <= labels.items(), name
    job = next(d for _, d in _kuberay_docs() if d["kind"] == "RayJob")
    for rule in policy["ingress"]:
        peers = rule["from"]  # an empty or missing `from` admits every source
        assert peers, rule
        assert not any("ipBlock" in p for p in peers), rule
        ports = {p["port"] for p in rule.get("ports", [])}
        if not ports:  # all ports: only the cluster's own pods
            assert peers == [{"podSelector": {"matchLabels": selector}}], rule
        else:
            assert ports == {8265}, rule
            for peer in peers:
                labels = peer["podSelector"]["matchLabels"]
                if "namespaceSelector" in peer:
                    assert labels == {"app.kubernetes.io/name": "kuberay-operator"}, peer
                else:
                    assert labels == {"job-name": job["metadata"]["name"]}, peer


def test_no_shipped_file_exposes_ray_ports_without_token_auth():
    """Every file under clusters/ that starts Ray or names its ports is one whose Ray runs with
    token authentication, and nothing publishes the ports outside the cluster."""
    port_re = re.compile(r"\b({})\b".format("|".join(map(str, RAY_PORTS))))
    covered = set()
    for path in sorted(CLUSTERS.rglob("*.yaml")):
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            kind = doc.get("kind")
            assert kind not in ("Service", "Ingress", "Route", "Gateway"), path
            if "provider" in doc:  # a cluster launcher file
                test_launcher_nodes_run_with_token_auth(path)
                covered.add(path)
            elif kind in ("RayCluster", "RayJob"):
                spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
                assert spec["authOptions"]["mode"] == "token", path
                assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
                covered.add(path)
            elif kind == "NetworkPolicy":
                covered.add(path)
        if port_re.search(text) or "ray start" in text:
            assert path in covered, f"{path}: Ray ports without token authentication"


def test_readme_states_the_kuberay_operator_version():
    readme = (CLUSTERS / "README.md").read_text()
    assert re.search(r"KubeRay operator[^\n]*(>=|≥) ?1\.6", readme)
    assert not re.search(r"(>=|≥) ?1\.3\b", readme)
    assert "v1.7.0" in readme
