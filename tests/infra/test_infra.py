"""infra/ and deployments/: every file parses, and the names they share agree (pools, images, flows, bucket,
versions, credentials). No Docker engine or cluster here: what runs there is checked by reading and rendering."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
COMPOSE = INFRA / "docker-compose.yml"
K8S_TEMPLATE = INFRA / "k8s" / "base-job-template.json"
DOCKERFILE = INFRA / "worker.Dockerfile"
ENV_EXAMPLE = INFRA / ".env.example"
CONSTRAINTS = REPO / "constraints.txt"
LOCK = INFRA / "requirements.lock"
CUDA_LOCK = INFRA / "requirements-cuda.lock"
DIGESTS = ("PYTHON_DIGEST", "POSTGRES_DIGEST", "PREFECT_DIGEST", "MINIO_DIGEST", "MC_DIGEST")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in load_yaml(PREFECT_YAML)["deployments"]}


def pool_name() -> str:
    [name] = {d["work_pool"]["name"] for d in deployments().values()}
    return name


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def pinned() -> dict[str, str]:
    """constraints.txt: package name (normalized) -> version."""
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


def env_example() -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")
    )


def filled_env() -> dict[str, str]:
    """infra/.env.example as a user fills it: the digests set (the credentials' examples are fine here)."""
    return {**env_example(), **{d: "sha256:" + f"{i:x}" * 64 for i, d in enumerate(DIGESTS, 10)}}


def interpolate(node, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default} (and $$), as `docker compose config` resolves them."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name) or (name in env and op != ":?"):  # ${VAR:?} refuses an empty value too
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} is not set: {arg}")

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, node.replace("$$", "\0")).replace("\0", "$")


def test_every_yaml_and_json_file_parses():
    files = sorted(
        [*INFRA.rglob("*.yml"), *INFRA.rglob("*.yaml"), *INFRA.rglob("*.json"), *(REPO / "deployments").glob("*.yaml")]
    )
    assert {COMPOSE, K8S_TEMPLATE, PREFECT_YAML} <= set(files)
    for f in files:
        data = json.loads(f.read_text()) if f.suffix == ".json" else load_yaml(f)
        assert isinstance(data, dict) and data, f"{f} is empty or not a mapping"


def test_deployments_share_one_pool_and_tags_through_anchors():
    def get(node, key):
        return next(v for k, v in node.value if k.value == key)

    root = yaml.compose(PREFECT_YAML.read_text())  # aliases resolve to the very node of their anchor
    definitions = get(root, "definitions")
    pools, tags = [v for _, v in get(definitions, "work_pools").value], get(definitions, "tags")
    deps = get(root, "deployments").value
    assert {get(d, "name").value for d in deps} >= {"nightly", "extract", "partition", "fanout"}
    for d in deps:
        assert get(d, "tags") is tags and any(get(d, "work_pool") is p for p in pools), get(d, "name").value
    assert len({get(p, "name").value for p in pools}) == 1  # one pool
    # GPU workers serve the partitions' queue only, so a waiting parent never holds their single slot.
    queues = {name: d["work_pool"]["work_queue_name"] for name, d in deployments().items()}
    assert queues["fanout"] != queues["partition"] == queues["extract"] == queues["nightly"]


def test_entrypoints_are_flows_in_flows_and_parameters_pass_their_signatures():
    from prefect.flows import load_flow_from_entrypoint

    deps = deployments()
    flow_names = {}
    for name, d in deps.items():
        path, func = d["entrypoint"].split(":")
        assert path.startswith("flows/") and (REPO / path).is_file(), f"{name}: {path} is not in flows/"
        flow = load_flow_from_entrypoint(f"{REPO / path}:{func}")
        flow.validate_parameters(d.get("parameters", {}))  # raises on an unknown option or a bad choice
        flow_names[name] = flow.name
    # The fan-out launches a deployment that exists and runs the extraction flow.
    child = deps["fanout"]["parameters"]["deployment"]
    flow_name, dep_name = child.split("/")
    assert flow_names[dep_name] == flow_name == "extract-activations"


def test_nightly_is_cron_scheduled_and_partitions_are_bounded_by_a_concurrency_limit():
    from prefect.client.schemas.schedules import CronSchedule

    deps = deployments()
    [sched] = deps["nightly"]["schedules"]
    CronSchedule(cron=sched["cron"], timezone=sched.get("timezone"))
    limit = deps["partition"]["concurrency_limit"]
    assert limit["limit"] >= 1 and limit["collision_strategy"] == "ENQUEUE"


def test_compose_wires_server_database_minio_and_workers():
    compose = interpolate(load_yaml(COMPOSE), filled_env())
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "minio-init", "deploy", "worker"} <= set(services)

    pg = services["postgres"]["environment"]
    server = services["prefect-server"]
    db_url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url == (
        f"postgresql+asyncpg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )
    # Partitions waiting for a concurrency slot retry every 5 s, not Prefect's 30 (a freed GPU is taken at once).
    assert float(server["environment"]["PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS"]) <= 5
    # Server image = the Prefect version the deployments were written for.
    assert server["image"].startswith(f"prefecthq/prefect:{load_yaml(PREFECT_YAML)['prefect-version']}-")
    api_port = option(server["command"], "--port")

    worker, deploy = services["worker"], services["deploy"]
    for svc in (worker, deploy):
        assert svc["environment"]["PREFECT_API_URL"] == f"http://prefect-server:{api_port}/api"
    # The image is built once: by `deploy`; the workers run that tag and never build or pull it.
    context = (INFRA / deploy["build"]["context"]).resolve()
    assert context == REPO and (context / deploy["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert deploy["build"]["args"]["BASE_DIGEST"] == filled_env()["PYTHON_DIGEST"]
    assert "build" not in worker and worker["image"] == deploy["image"] and worker["pull_policy"] == "never"
    assert [n for n, svc in services.items() if "build" in svc] == ["deploy"]
    assert option(worker["command"], "--pool") == pool_name()
    assert f"work-pool create {pool_name()} --type process" in deploy["command"][0]
    assert "--prefect-file deployments/prefect.yaml" in deploy["command"][0]
    # `deploy` itself installs the lost-run automation (prefect.yaml's build step): no separate step to forget.
    assert "automations.py" not in deploy["command"][0]
    assert [next(iter(s)) for s in yaml.safe_load(PREFECT_YAML.read_text())["build"]] == [
        "actcache.orchestration.automations.install"
    ]
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"

    # The bucket created at start is the one the scheduled deployment writes to, on the MinIO the workers use.
    bucket = re.search(r"mc mb --ignore-existing local/(\S+)", services["minio-init"]["command"][0]).group(1)
    assert deployments()["nightly"]["parameters"]["config"]["store"].startswith(f"s3://{bucket}/")
    assert worker["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "9000:9000" in services["minio"]["ports"]
    assert worker["environment"]["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]


def lock(path: Path = LOCK) -> dict[str, tuple[str, list[str]]]:
    """infra/requirements.lock (or the CUDA lock): name -> (version, sha256 hashes)."""
    text = path.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            spec, *hashes = line.split()
            name, version = spec.split("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = (version, [h.removeprefix("--hash=") for h in hashes])
    return out


def test_the_image_installs_the_locked_versions_with_hashes_where_the_pull_step_looks():
    [pull] = load_yaml(PREFECT_YAML)["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $ACTCACHE_HOME }}"
    text = DOCKERFILE.read_text()
    home = re.search(r"ACTCACHE_HOME=(\S+)", text).group(1)
    assert f"COPY . {home}" in text and f"WORKDIR {home}" in text
    # Every dependency from the one lock, checked against its hashes; then the project alone, from the context.
    assert re.search(r"^ARG LOCK=infra/requirements.lock$", text, re.M)
    assert "COPY ${LOCK} /tmp/requirements.lock" in text
    assert re.search(r"pip install --require-hashes --no-deps .*-r /tmp/requirements.lock", text)
    assert re.search(rf"pip install --no-deps --no-build-isolation --no-index {re.escape(home)}", text)
    assert "pip check" in text
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert option(cmd, "--pool") == pool_name()
    assert re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", text, re.M).group(1) == "https://download.pytorch.org/whl/cpu"
    assert "--build-arg LOCK=infra/requirements-cuda.lock -t actcache-worker:cuda" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored  # the build context is the repository root
    assert "**/.env" in ignored  # credentials never go into an image


def test_the_lock_pins_constraints_versions_and_the_tested_torch_each_with_a_hash():
    import tomllib

    from packaging.requirements import Requirement

    locked = lock()
    assert all(
        len(hashes) >= 1 and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes)
        for _, hashes in locked.values()
    ), "every package needs its sha256"
    versions = pinned()
    differ = {n: (v, versions[n]) for n, (v, _) in locked.items() if n in versions and v != versions[n]}
    assert not differ, f"lock and constraints.txt disagree: {differ}; rerun python3 infra/lock.py"
    # Beyond constraints.txt: torch (the Makefile's) and setuptools (torch needs it; pip freeze leaves it out).
    assert set(locked) - set(versions) == {"torch", "setuptools"}, "the lock holds only constraints.txt's packages"
    tested = re.search(r"^TORCH\s*\?=\s*torch==(\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert locked["torch"][0] == f"{tested}+cpu"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = project["dependencies"] + project["optional-dependencies"]["extract"]  # what a worker runs
    runtime = {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in needed}
    assert runtime <= set(locked), f"runtime dependencies missing from the lock: {runtime - set(locked)}"
    assert "pytest" not in locked and "moto" not in locked  # what the image needs, not the tests


def test_the_cuda_lock_has_the_cpu_locks_versions_with_hashes_and_pypis_torch():
    """Issue 22: the CUDA image installs from a hashed lock too, with the same versions as the CPU image."""
    cpu, cuda = lock(), lock(CUDA_LOCK)
    assert all(
        hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes) for _, hashes in cuda.values()
    ), "every package needs its sha256"
    tested = re.search(r"^TORCH\s*\?=\s*torch==(\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert cuda["torch"][0] == tested  # PyPI's build of the tested version: CUDA
    differ = {n: (v, cuda[n][0]) for n, (v, _) in cpu.items() if n != "torch" and cuda.get(n, ("",))[0] != v}
    assert not differ, f"the CPU and CUDA locks disagree: {differ}; rerun python3 infra/lock.py [--cuda]"
    extra = set(cuda) - set(cpu)
    assert extra and all(re.match(r"(nvidia-|cuda-|triton$)", n) for n in extra), extra  # only CUDA's own wheels


def test_the_image_runs_as_an_unprivileged_user_and_its_base_is_pinned_by_digest():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    uid = users[-1].split(":")[0]
    assert f"useradd --create-home --uid {uid}" in text and "chown actcache:actcache /cache" in text
    assert re.search(r"^ARG BASE_DIGEST$", text, re.M), "no default digest: an unpinned build must be refused"
    [base] = re.findall(r"^FROM (\S+)", text, re.M)
    assert base == "${BASE_IMAGE}@${BASE_DIGEST}"
    # The pod runs as that user too, and the cache volume is writable by its group.
    spec = json.loads(K8S_TEMPLATE.read_text())["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == spec["securityContext"]["fsGroup"] == int(uid)


def test_compose_refuses_to_start_while_a_digest_is_missing():
    raw = load_yaml(COMPOSE)
    for missing in DIGESTS:
        env = {**filled_env(), missing: ""}
        with pytest.raises(AssertionError, match=missing):
            interpolate(raw, env)


def third_party_images() -> list[str]:
    """Every image not built here, as IMAGE:TAG@DIGEST (the Dockerfile's base from its ARGs)."""
    compose = load_yaml(COMPOSE)["services"]
    images = [svc["image"] for svc in compose.values() if "image" in svc and "pull_policy" not in svc]
    images = [i for i in images if not i.startswith("actcache-")]
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    return images + [f"{base}@${{BASE_DIGEST}}"]


def test_every_image_tag_is_pinned_to_a_release():
    images = third_party_images()
    assert len(images) == 5  # postgres, prefect, minio, mc, python
    for image in images:
        image, _, digest = image.partition("@")
        assert re.fullmatch(r"\$\{\w+_DIGEST(:\?[^}]*)?\}", digest), f"{image}: not pinned by digest"
        name, _, tag = image.partition(":")
        assert tag and "latest" not in tag, f"{image}: no pinned tag"
        # A release, not a moving major/minor tag: three version numbers or a MinIO release timestamp.
        assert re.match(r"(\d+\.\d+\.\d+|\d+\.\d+-alpine$|RELEASE\.\d{4}-\d\d-\d\dT)", tag), image
    [prefect_image] = [i for i in images if i.startswith("prefecthq/prefect:")]
    assert prefect_image.split(":")[1].startswith(pinned()["prefect"] + "-")
    python_image = next(i for i in images if i.startswith("python:"))
    assert python_image.split(":")[1].startswith("3.11.")


def test_pyproject_floors_are_what_the_pinned_stack_needs():
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"] + project["optional-dependencies"]["extract"]:
        req = Requirement(line)
        floors[req.name] = min(Version(s.version) for s in req.specifier if s.operator == ">=")
    versions = pinned()

    def needs(package: str, dependency: str) -> Version:
        [req] = [
            Requirement(r)
            for r in metadata.requires(package) or []
            if Requirement(r).name == dependency and not Requirement(r).marker
        ]
        return min(Version(s.version) for s in req.specifier if s.operator in (">=", "=="))

    # The floor is the highest floor that a pinned package puts on it, and at most the tested version.
    assert floors["torch"] == needs("transformer-lens", "torch") <= Version(metadata.version("torch").split("+")[0])
    assert floors["transformers"] == needs("transformer-lens", "transformers") <= Version(versions["transformers"])
    assert floors["prefect"] >= needs("prefect-aws", "prefect")
    assert floors["prefect"] == Version(versions["prefect"]) == Version(load_yaml(PREFECT_YAML)["prefect-version"])
    assert floors["transformer-lens"] <= Version(versions["transformer-lens"])

    python_floor = Version(project["requires-python"].removeprefix(">="))
    needed = []
    for name in versions:
        try:
            spec = metadata.metadata(name).get("Requires-Python")
        except metadata.PackageNotFoundError:
            continue
        if spec:
            needed += [Version(s.version) for s in SpecifierSet(spec) if s.operator == ">="]
    assert python_floor == max(needed)


@pytest.mark.subprocess
def test_compose_reads_credentials_from_the_env_file_and_puts_the_api_behind_auth():
    raw = COMPOSE.read_text()
    example = env_example()
    used = set(re.findall(r"\$\{(\w+)", raw))
    assert used == set(example), "infra/.env.example must define exactly what the compose file reads"
    assert ":-" not in raw, "no default credentials in the compose file"
    assert not re.search(r"(PASSWORD|SECRET|AUTH_STRING)\w*: (?!\$\{)", raw), "a credential not from the env file"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO).returncode == 0
    assert ignored, "infra/.env (the real credentials) must be ignored by git"

    services = interpolate(load_yaml(COMPOSE), filled_env())["services"]
    auth = services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert auth == example["PREFECT_AUTH"] and ":" in auth  # basic auth, user:password
    for name in ("deploy", "worker"):  # every client of the API sends it
        assert services[name]["environment"]["PREFECT_API_AUTH_STRING"] == auth
    # The health check is the one request Prefect answers without auth.
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])


def valid_job(manifest: dict) -> None:
    """Check a rendered Job against the Kubernetes API's schema as the client's models encode it: field types,
    required fields, enums, and no field unknown to it (the API server drops a misspelt field silently, which is
    how a securityContext that does nothing gets deployed)."""
    from kubernetes_asyncio.client import Configuration, models

    config = Configuration()
    config.client_side_validation = True
    # Quantities (resources) and int-or-strings are "str" in the models; the API takes numbers for them too.
    primitives = {"str": (str, int, float), "int": int, "bool": bool, "float": (int, float), "object": object}

    def build(data, kind: str, path: str):
        if kind.startswith("list["):
            assert isinstance(data, list), f"{path}: not a list"
            return [build(x, kind[5:-1], f"{path}[{i}]") for i, x in enumerate(data)]
        if kind.startswith("dict("):
            assert isinstance(data, dict), f"{path}: not an object"
            inner = kind[5:-1].split(", ", 1)[1]
            return {k: build(v, inner, f"{path}.{k}") for k, v in data.items()}
        if kind in primitives:
            assert isinstance(data, primitives[kind]), f"{path}: {data!r} is not {kind}"
            return data
        cls = getattr(models, kind)
        assert isinstance(data, dict), f"{path}: not an object"
        by_json = {v: k for k, v in cls.attribute_map.items()}
        unknown = set(data) - set(by_json)
        assert not unknown, f"{path}: {sorted(unknown)} not fields of {kind}"
        kwargs = {by_json[k]: build(v, cls.openapi_types[by_json[k]], f"{path}.{k}") for k, v in data.items()}
        return cls(local_vars_configuration=config, **kwargs)  # raises on a missing required field or bad enum

    build(manifest, "V1Job", "job")


def test_kubernetes_template_renders_for_each_deployment_as_the_worker_does():
    """prefect-kubernetes builds each run's Job from the template and the deployment's job variables: partitions
    get a GPU on a GPU node; the parent a small CPU pod off GPU nodes; all share the model cache volume."""
    import asyncio
    from uuid import uuid4

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(K8S_TEMPLATE.read_text())
    # What the server checks on `prefect work-pool create --base-job-template`: every placeholder is declared.
    WorkPoolCreate(name=pool_name(), type="kubernetes", base_job_template=template)
    # The template names no block or variable, so the client is never called (no API needed).
    unused = PrefectClient("http://127.0.0.1:9/api")

    def pod(job_variables: dict) -> dict:
        config = asyncio.run(
            KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables, client=unused)
        )
        config.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="run"))
        valid_job(config.job_manifest)
        return config.job_manifest["spec"]["template"]["spec"]

    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for name, d in deployments().items():
        spec = pod(d["work_pool"].get("job_variables", {}))
        [c] = spec["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", name  # lost pods are detected
        assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule", name  # evicted pods come back
        assert spec["volumes"] == [{"name": "cache", "persistentVolumeClaim": {"claimName": "actcache-cache"}}]
        assert c["volumeMounts"] == [{"name": "cache", "mountPath": "/cache"}]
        if name == "fanout":
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 0 and spec["tolerations"] == []
            assert c["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"}
        else:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and spec["tolerations"] == [gpu_toleration]
            assert c["resources"]["requests"]["memory"] == "32Gi"
    pvc = load_yaml(INFRA / "k8s" / "cache-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "actcache-cache"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on different nodes share it
    assert pod({})["containers"][0]["image"] == "actcache-worker:cuda"  # the tag infra/README.md builds


COMPOSE_SCHEMA = INFRA.parent / "tests" / "infra" / "schemas" / "compose-spec.json"
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"  # schemas/README.md


def compose_errors(compose: dict) -> list[str]:
    """What the Compose Specification's JSON schema says is wrong with a rendered compose file (no engine)."""
    import hashlib

    import jsonschema

    raw = COMPOSE_SCHEMA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == COMPOSE_SCHEMA_SHA256  # the vendored file, unchanged
    schema = json.loads(raw)
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]


def test_the_rendered_compose_file_follows_the_compose_spec_schema():
    compose = interpolate(load_yaml(COMPOSE), filled_env())
    assert compose_errors(compose) == []
    # The check fails on a broken file: a misspelt key, a wrong type, an unknown condition.
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["deploy"]["replicas"] = [2]
    broken["services"]["worker"]["pull_policy"] = "sometimes"
    broken["services"]["prefect-server"]["helthcheck"] = broken["services"]["prefect-server"].pop("healthcheck")
    errors = "\n".join(compose_errors(broken))
    assert "services/worker/deploy/replicas: [2] is not of type 'integer', 'string'" in errors
    assert "services/worker/pull_policy: 'sometimes' does not match" in errors
    assert "('helthcheck' was unexpected)" in errors


def _compose_command() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return cmd
    return None


@pytest.mark.subprocess
def test_docker_compose_config_accepts_the_file():
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here; the checks above still ran")
    res = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "--quiet"],
        env={**os.environ, **filled_env()},
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
