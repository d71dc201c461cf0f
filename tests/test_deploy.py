"""deploy/: the Dockerfile, the KubeRay manifests, the cluster-launcher configs, the Slurm script.

Nothing here starts a container or a cluster (no Docker daemon, Kubernetes API or cloud is
reachable offline); each file is checked against what can be checked without them:

- Dockerfile: hadolint, plus the facts the other files rely on (base-image tags, non-root
  user, WORKDIR, layer order, MKL_CBWR) and its dependency-extraction step run on pyproject.toml.
- KubeRay: a JSON schema of the RayCluster/RayJob fields used here (written from the ray.io/v1
  CRD: field names, types, enums, required fields), the pod templates and the PVC against the
  Kubernetes OpenAPI schemas (kubernetes-validate, strict), and the security rules of issue 8.
- Cluster launcher: Ray's own ray-schema.json (jsonschema) and Ray's prepare/validate_config.
- Slurm: shellcheck, bash -n, and the steps the script must take.
- All: the same image names, Ray version, paths and entrypoint everywhere.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBERAY = DEPLOY / "kuberay"
LAUNCHER = DEPLOY / "cluster-launcher"
SBATCH = DEPLOY / "slurm" / "ecdist.sbatch"
EXAMPLE = ROOT / "examples" / "recover_on_cluster.py"
SHARED = "/mnt/shared"
IMAGE_REPO = "registry.example.com/ecdist"


def _tool(name: str) -> str:
    """Path of a linter installed by the test extra (its pip package puts it beside python)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' brings it: {name}-py)")
    return found


def _yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def _project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)


def _example_flags() -> set[str]:
    return set(re.findall(r'add_argument\("(--[\w-]+)"', EXAMPLE.read_text()))


def _flags(command: str) -> set[str]:
    return {word.split("=")[0] for word in shlex.split(command) if word.startswith("--")}


# --------------------------------------------------------------------------------------- all files

def test_every_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/shared-pvc.yaml",
        "cluster-launcher/aws.yaml", "cluster-launcher/gcp.yaml",
    }
    for f in files:
        assert _yaml(f), f"{f} holds no YAML document"


def test_readme_walks_through_each_path():
    text = (DEPLOY / "README.md").read_text()
    for path in re.findall(r"deploy/[\w./-]+\w", text):
        assert (ROOT / path).exists(), f"deploy/README.md names {path}, which does not exist"
    for needed in ("docker build", "kubectl apply", "kubectl port-forward", "ray up", "ray dashboard",
                   "sbatch", "ssh -N -L 8265:127.0.0.1:8265", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN",
                   "auth_token", "gpus_per_pack", "0.81", SHARED, "--resume"):
        assert needed in text, f"deploy/README.md does not mention {needed!r}"


# ---------------------------------------------------------------------------------------- Dockerfile

def test_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_structure():
    text = DOCKERFILE.read_text()
    args = _dockerfile_args()
    assert args["FLAVOUR"] == "cpu" and args["TORCH_VERSION"] == "2.13.0"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["RAY_VERSION"]), "pin the Ray base image to a release"
    froms = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert froms == ["rayproject/ray:${RAY_VERSION}-py311-${FLAVOUR}"]
    for flavour in ("cpu", "gpu"):  # both tags that the build arg selects are pinned, neither is latest
        tag = froms[0].replace("${RAY_VERSION}", args["RAY_VERSION"]).replace("${FLAVOUR}", flavour)
        assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py311-(cpu|gpu)", tag) and "latest" not in tag
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert re.search(r"^ENV MKL_CBWR=AVX2\b", text, flags=re.M), "MKL's reproducible mode (ecdist's bit-for-bit runs)"
    assert "RAY_AUTH_MODE=token" in text
    assert "https://download.pytorch.org/whl/cpu" in text and '"torch==${TORCH_VERSION}"' in text
    assert '"faiss-gpu==${FAISS_VERSION}"' in text and '"faiss-cpu==${FAISS_VERSION}"' in text
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M)
    sources = [src for line in copies for src in line.split()]
    assert sources.index("pyproject.toml") < sources.index("ecdist/"), "dependencies before sources (layer cache)"
    assert re.search(r"^WORKDIR /home/ray/ecdist$", text, flags=re.M)


def test_dockerignore_keeps_what_the_image_copies():
    """Docker's rule: the last matching pattern wins; a leading ! re-includes."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            keep = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/").removeprefix("**/")
            parts = path.split("/")
            if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) or fnmatch.fnmatch(parts[i], pat)
                   for i in range(len(parts))):
                verdict = not keep
        return verdict

    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE.read_text(), flags=re.M)
    for src in (s.rstrip("/") for line in copies for s in line.split()):
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"
        assert not ignored(src), f".dockerignore leaves {src} out of the build context"
    assert not ignored("ecdist/distributed.py") and not ignored("examples/recover_on_cluster.py")
    for kept_out in (".venv/bin/python", ".git/HEAD", "ecdist-demo/report.json", "ecdist/__pycache__/x.pyc"):
        assert ignored(kept_out), f".dockerignore lets {kept_out} into the build context"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the image's step uses tomllib (Python 3.11, as in the image)")
def test_dockerfile_dependency_step_reads_pyproject():
    """The image installs pyproject's dependencies before copying the sources: run that step here."""
    command = re.search(r'python -c "(import tomllib;.+?)"\s*\\?\n', DOCKERFILE.read_text()).group(1)
    result = subprocess.run([sys.executable, "-c", command], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    requirements = result.stdout.split("\n")
    assert any(r.startswith("torch") for r in requirements) and any(r.startswith("ray[default]") for r in requirements)


# ------------------------------------------------------------------------------------------- KubeRay
# Written from KubeRay's ray.io/v1 CRDs (ray-operator/config/crd/bases): the fields these manifests
# use, with their types and enums, and the fields that the CRD or these manifests require. No
# package ships the CRD schemas, and the CRDs themselves (1 MB of OpenAPI each) are not vendored;
# the pod templates inside are checked against Kubernetes' own schema below.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object", "required": ["containers"]}}}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "authOptions": {
            "type": "object", "additionalProperties": False,
            "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
                           "enableK8sTokenAuth": {"type": "boolean"}},
        },
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headServiceAnnotations": _STR_MAP,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "headGroupSpec": {
            "type": "object", "required": ["rayStartParams", "template"], "additionalProperties": False,
            "properties": {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                           "enableIngress": {"type": "boolean"}, "headService": {"type": "object"},
                           "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE},
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object", "required": ["groupName", "rayStartParams", "template"], "additionalProperties": False,
                "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                               "minReplicas": {"type": "integer", "minimum": 0},
                               "maxReplicas": {"type": "integer", "minimum": 0},
                               "numOfHosts": {"type": "integer", "minimum": 1},
                               "idleTimeoutSeconds": {"type": "integer"}, "suspend": {"type": "boolean"},
                               "scaleStrategy": {"type": "object"}, "rayStartParams": _STR_MAP,
                               "template": _POD_TEMPLATE},
            },
        },
    },
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "labels": _STR_MAP}}
KUBERAY_SCHEMAS = {
    "RayCluster": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
                       "metadata": _METADATA, "spec": _CLUSTER_SPEC},
    },
    "RayJob": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _METADATA,
            "spec": {
                "type": "object", "required": ["entrypoint", "rayClusterSpec"], "additionalProperties": False,
                "properties": {
                    "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
                    "entrypointResources": {"type": "string"}, "jobId": {"type": "string"},
                    "metadata": _STR_MAP, "suspend": {"type": "boolean"},
                    "submitterPodTemplate": _POD_TEMPLATE, "submitterConfig": {"type": "object"},
                    "rayClusterSpec": _CLUSTER_SPEC,
                },
            },
        },
    },
}


def _manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _yaml(path):
            found[doc["kind"]] = doc
    assert set(found) == {"RayCluster", "RayJob", "PersistentVolumeClaim"}, set(found)
    return found


def _cluster_specs() -> dict[str, dict]:
    m = _manifests()
    return {"RayCluster": m["RayCluster"]["spec"], "RayJob": m["RayJob"]["spec"]["rayClusterSpec"]}


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifest_matches_crd_schema(kind):
    doc = _manifests()[kind]
    jsonschema.validate(doc, KUBERAY_SCHEMAS[kind])
    broken = copy.deepcopy(doc)  # the schema has teeth: a number where KubeRay wants a string
    spec = broken["spec"] if kind == "RayCluster" else broken["spec"]["rayClusterSpec"]
    spec["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, KUBERAY_SCHEMAS[kind])


def test_kuberay_pod_templates_and_pvc_match_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (in the test extra)")
    version = kv.latest_version()
    for kind, spec in _cluster_specs().items():
        for name, group in _groups(spec):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{kind}-{name}"},
                            "template": group["template"]}
            kv.validate(pod_template, version, strict=True)
    kv.validate(_manifests()["PersistentVolumeClaim"], version, strict=True)


def test_kuberay_security_and_shared_folder():
    manifests = _manifests()
    text = "\n".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert not re.search(r"^\s*[^#\n]*\b(NodePort|LoadBalancer)\b", text, flags=re.M), "no NodePort/LoadBalancer"
    assert not re.search(r"^\s*kind:\s*(Service|Ingress)\b", text, flags=re.M)
    pvc = manifests["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every pod writes the run folder"
    for kind, spec in _cluster_specs().items():
        assert spec["authOptions"] == {"mode": "token", "secretName": "ecdist-ray-token"}, kind
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP" and not spec["headGroupSpec"].get("enableIngress")
        for name, group in _groups(spec):
            pod = group["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v}
            for container in pod["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert claims.get(mounts.get(SHARED)) == pvc["metadata"]["name"], f"{kind}/{name}: {SHARED}"
                res = container["resources"]
                assert set(res["requests"]) >= {"cpu", "memory"} and set(res["limits"]) >= {"cpu", "memory"}


def test_kuberay_gpu_group_and_images():
    args, version = _dockerfile_args(), _project_version()
    for kind, spec in _cluster_specs().items():
        assert spec["rayVersion"] == args["RAY_VERSION"], f"{kind}: rayVersion is the image's Ray"
        groups = dict(_groups(spec))
        gpu = groups["gpu"]["template"]["spec"]["containers"][0]
        assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 == gpu["resources"]["requests"]["nvidia.com/gpu"]
        assert gpu["image"] == f"{IMAGE_REPO}:{version}-gpu"
        for name, group in groups.items():
            image = group["template"]["spec"]["containers"][0]["image"]
            assert image in (f"{IMAGE_REPO}:{version}-cpu", f"{IMAGE_REPO}:{version}-gpu"), f"{kind}/{name}: {image}"
            assert ("nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]) == (
                image.endswith("-gpu")), f"{kind}/{name}: GPU image exactly where a GPU is requested"


def test_rayjob_entrypoint_is_the_example_in_the_image():
    job = _manifests()["RayJob"]["spec"]
    words = shlex.split(job["entrypoint"])
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), flags=re.M).group(1)
    assert words[0] == "python" and words[1] == f"{workdir}/examples/recover_on_cluster.py"
    assert (ROOT / Path(words[1]).relative_to(workdir)).is_file()
    assert words[words.index("--out") + 1] == f"{SHARED}/run"
    assert _flags(job["entrypoint"]) <= _example_flags(), "the entrypoint passes flags the example does not take"
    assert words[words.index("--gpus-per-pack") + 1] == "1"
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]["MKL_CBWR"] == "AVX2"
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"


# ---------------------------------------------------------------------------------- cluster launcher

LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_matches_ray_schema(name):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml(LAUNCHER / name)[0]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before touching the cloud
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["node_confg"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_gpus_security_and_repo(name):
    config = _yaml(LAUNCHER / name)[0]
    ray_version = _dockerfile_args()["RAY_VERSION"]
    docker = config["docker"]
    assert docker["head_image"] == f"rayproject/ray:{ray_version}-py311-cpu"
    assert docker["worker_image"] == f"rayproject/ray:{ray_version}-py311-gpu"
    types = config["available_node_types"]
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "a GPU worker node type"
    if name == "aws.yaml":
        assert {v["node_config"]["InstanceType"] for v in gpu_types.values()} >= {"g5.xlarge", "p4d.24xlarge"}
    else:
        for v in gpu_types.values():
            accelerators = v["node_config"]["guestAccelerators"]
            assert accelerators and accelerators[0]["acceleratorCount"] == v["resources"]["GPU"]
            assert v["node_config"]["scheduling"][0]["onHostMaintenance"] == "TERMINATE"
        assert {v["node_config"]["machineType"] for v in gpu_types.values()} >= {"a2-highgpu-1g"}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in start and "MKL_CBWR=AVX2" in start, key
    assert config["file_mounts"]["~/ecdist"] == "." and "~/.ray/auth_token" in config["file_mounts"]
    assert ".gitignore" in config["rsync_filter"]
    setup = " ".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install ~/ecdist" in setup and f"ray[default]=={ray_version}" in setup


# ------------------------------------------------------------------------------------------- Slurm

def test_sbatch_passes_shellcheck():
    result = subprocess.run([_tool("shellcheck"), "--shell=bash", "--severity=style", str(SBATCH)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def test_sbatch_steps():
    text = SBATCH.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    sbatch = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert sbatch and max(sbatch) < first_command, "sbatch reads #SBATCH lines only before the first command"
    assert "set -euo pipefail" in text and "trap cleanup EXIT" in text
    head = re.search(r"ray start --head[^&]*&", text, flags=re.S).group(0)
    assert "--block" in head and "--dashboard-host=127.0.0.1" in head
    assert re.search(r"srun [^&]*ray start --block --address=", text, flags=re.S), "workers via srun"
    assert "export RAY_AUTH_MODE=token" in text and "export RAY_AUTH_TOKEN" in text
    assert "umask 077" in text, "the token file is private"
    assert "wait_for" in text and "startup_timeout" in text, "node start-up is polled with a timeout"
    assert "export RAY_ADDRESS=" in text and "ray job submit" in text
    assert '"$repo/examples/recover_on_cluster.py" --out "$out"' in text
    defaults = re.search(r"args=\((--[^)]*)\)", text).group(1)
    assert _flags(defaults) <= _example_flags()


# ------------------------------------------------------------------------------ Ray CLI invocations

def test_ray_cli_flags_exist():
    """Every `ray start` / `ray job submit` / `ray status` flag in deploy/ is an option of this Ray's CLI."""
    from ray.dashboard.modules.job.cli import submit
    from ray.scripts.scripts import start, status

    options = {name: {o for p in command.params for o in p.opts}
               for name, command in {"start": start, "job submit": submit, "status": status}.items()}
    texts = [SBATCH.read_text(), (DEPLOY / "README.md").read_text()]
    for name in LAUNCHER_FILES:
        config = _yaml(LAUNCHER / name)[0]
        texts += config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    seen = set()
    for text in texts:
        text = re.sub(r"\\\n", " ", text)
        for name in options:
            for call in re.findall(rf"\bray {name}\b([^;&|\n]*?)(?: -- |;|&|$)", text, flags=re.M):
                flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", call))
                assert flags <= options[name], f"`ray {name}` has no {sorted(flags - options[name])}"
                seen.add(name)
    assert seen == set(options)


# ------------------------------------------------------------------ exposure: a checker, and proof it bites
def _kuberay_exposures(docs: list[dict]) -> list[str]:
    """What in these KubeRay/Kubernetes documents would put Ray's dashboard and job server (which
    run code for whoever reaches them) on a network outside the cluster, or drop token auth.

    Inside a pod the dashboard binds 0.0.0.0 (the pod's own IP: the Service and the operator
    need it), which is safe only while nothing routes outside traffic to the pod: the head
    Service ClusterIP, no Ingress/Route/LoadBalancer/NodePort, no host network or host port.
    """
    found = []
    for doc in docs:
        kind = doc.get("kind")
        if kind in ("Ingress", "Route", "HTTPRoute", "Gateway"):
            found.append(f"a {kind} routes outside traffic into the cluster")
        if kind == "Service" and doc.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            found.append(f"Service {doc['metadata']['name']} is {doc['spec']['type']}")
        spec = doc.get("spec", {})
        spec = spec.get("rayClusterSpec", spec) if kind == "RayJob" else spec
        if kind not in ("RayCluster", "RayJob"):
            continue
        auth = spec.get("authOptions") or {}
        if auth.get("mode") != "token" or not auth.get("secretName"):
            found.append(f"{kind}: token authentication is off ({auth})")
        head = spec["headGroupSpec"]
        if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
            found.append(f"{kind}: the head Service is {head.get('serviceType')}, ingress {head.get('enableIngress')}")
        service = head.get("headService", {}).get("spec", {})
        if service.get("type", "ClusterIP") != "ClusterIP" or service.get("externalIPs"):
            found.append(f"{kind}: headService {service}")
        templates = [g["template"] for _, g in _groups(spec)]
        if kind == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            templates.append(doc["spec"]["submitterPodTemplate"])
        for template in templates:
            pod = template["spec"]
            if pod.get("hostNetwork"):
                found.append(f"{kind}: a pod shares the node's network (hostNetwork)")
            for container in pod.get("containers", []):
                if any("hostPort" in p for p in container.get("ports", [])):
                    found.append(f"{kind}: container {container['name']} publishes a hostPort")
                for env in container.get("env", []):
                    if env.get("name") == "RAY_AUTH_MODE" and env.get("value") != "token":
                        found.append(f"{kind}: container {container['name']} sets RAY_AUTH_MODE={env.get('value')}")
    return found


def _shell_exposures(text: str) -> list[str]:
    """The same for `ray start` lines of the cluster launcher and Slurm: dashboard on 127.0.0.1, token on."""
    text = re.sub(r"\\\n", " ", text)
    found = []
    for call in re.findall(r"\bray start --head\b[^;&|\n]*", text):
        host = re.search(r"--dashboard-host[= ](\S+)", call)
        if host is None or host.group(1).strip("'\"") != "127.0.0.1":
            found.append(f"head dashboard binds {host.group(1) if host else 'the default (0.0.0.0 in a container)'}")
    if "RAY_AUTH_MODE=token" not in text or re.search(r"RAY_AUTH_MODE=(?!token)", text):
        found.append("token authentication is not on for every `ray start`")
    return found


def _launcher_text(name: str) -> str:
    config = _yaml(LAUNCHER / name)[0]
    return "\n".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])


def test_nothing_in_deploy_exposes_the_dashboard_or_drops_token_auth():
    docs = [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in _yaml(path)]
    assert _kuberay_exposures(docs) == []
    for name in LAUNCHER_FILES:
        assert _shell_exposures(_launcher_text(name)) == [], name
    assert _shell_exposures(SBATCH.read_text()) == []
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl port-forward" in readme and "ssh -N -L 8265:127.0.0.1:8265" in readme and "ray dashboard" in readme


def _set(path: str, value):
    """A mutation that sets ``path`` (dots; ``[i]`` for list items) in the RayCluster document."""
    def apply(doc: dict) -> None:
        keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
        for k in keys[:-1]:
            doc = doc[k]
        doc[keys[-1]] = value
    return apply


KUBERAY_MUTATIONS = {
    "LoadBalancer head": _set("spec.headGroupSpec.serviceType", "LoadBalancer"),
    "NodePort head": _set("spec.headGroupSpec.serviceType", "NodePort"),
    "ingress": _set("spec.headGroupSpec.enableIngress", True),
    "headService LoadBalancer": _set("spec.headGroupSpec.headService", {"spec": {"type": "LoadBalancer"}}),
    "auth disabled": _set("spec.authOptions.mode", "disabled"),
    "auth removed": _set("spec.authOptions", None),
    "hostNetwork": _set("spec.headGroupSpec.template.spec.hostNetwork", True),
    "hostPort": _set("spec.headGroupSpec.template.spec.containers[0].ports[1].hostPort", 8265),
    "env disables auth": _set("spec.workerGroupSpecs[0].template.spec.containers[0].env",
                              [{"name": "RAY_AUTH_MODE", "value": "disabled"}]),
}


@pytest.mark.parametrize("mutation", sorted(KUBERAY_MUTATIONS))
def test_the_kuberay_checker_catches_each_exposure(mutation):
    docs = [copy.deepcopy(doc) for doc in _yaml(KUBERAY / "raycluster.yaml")]
    KUBERAY_MUTATIONS[mutation](docs[0])
    assert _kuberay_exposures(docs), mutation


def test_the_kuberay_checker_catches_an_added_public_service():
    docs = _yaml(KUBERAY / "raycluster.yaml") + [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"}, "spec": {"type": "LoadBalancer"}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "dash"}, "spec": {}},
    ]
    assert len(_kuberay_exposures(docs)) == 2


@pytest.mark.parametrize("old,new", [("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
                                     ("--dashboard-host=127.0.0.1", ""),
                                     ("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")])
def test_the_shell_checker_catches_each_exposure(old, new):
    for text in [_launcher_text(name) for name in LAUNCHER_FILES] + [SBATCH.read_text()]:
        assert old in text
        assert _shell_exposures(text.replace(old, new)), (old, new)
