"""Every cluster file in clusters/ passes Ray's own offline validation (the checks `ray up` runs
before any cloud call), and the KubeRay manifests carry what the operator needs."""

from __future__ import annotations

import copy
import io
import re
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
    assert raw["file_mounts"] == {"~/segdistill": "."}
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
    gpus_by_instance = {"g5.2xlarge": 1, "g5.12xlarge": 4, "m5.2xlarge": 0, "m5.4xlarge": 0}
    return gpus_by_instance[node_type["node_config"]["InstanceType"]]


def _preemptible(provider: str, node_type: dict) -> bool:
    config = node_type["node_config"]
    if provider == "gcp":
        return any(s.get("preemptible") for s in config.get("scheduling", []))
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
