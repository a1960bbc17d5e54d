#!/usr/bin/env python3
"""Checks the Helm chart: for every values profile in charts/imagegen/ci, `helm lint --strict`,
`helm template`, strict validation of the rendered objects against the Kubernetes schemas
(kubernetes-validate), and assertions on what the objects say. Prints `N passed, M failed`."""

import os
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "..", "imagegen")
HELM = os.environ.get("HELM", "helm")
KUBE_VERSION = "1.35.0"

passed, failed = 0, 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok      {name}")
    except Exception as e:  # noqa: BLE001 - report every failure and go on
        failed += 1
        print(f"FAILED  {name}: {e}")


def run(*args, ok=True):
    p = subprocess.run(args, capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def render(values_file=None, *sets, ok=True):
    args = [HELM, "template", "rel", CHART, "--namespace", "ml"]
    if values_file:
        args += ["-f", values_file]
    for s in sets:
        args += ["--set", s]
    return run(*args, ok=ok)


def objects(text):
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def values_of(path):
    with open(os.path.join(CHART, "values.yaml")) as f:
        base = yaml.safe_load(f)
    with open(path) as f:
        overlay = yaml.safe_load(f) or {}

    def merge(a, b):
        for k, v in b.items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    return merge(base, overlay)


def profile_checks(profile):
    path = os.path.join(CHART, "ci", profile)
    vals = values_of(path)
    rendered = {}

    def lint():
        run(HELM, "lint", "--strict", CHART, "-f", path)

    def template():
        rendered["objs"] = objects(render(path).stdout)
        assert by_kind(rendered["objs"], "Deployment"), "no Deployment rendered"

    def validate():
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(render(path).stdout)
        out = run("kubernetes-validate", "--strict", "-k", KUBE_VERSION, f.name)
        os.unlink(f.name)
        bad = [line for line in out.stdout.splitlines() + out.stderr.splitlines() if line.startswith("ERROR")]
        assert not bad, "\n".join(bad)

    def probes_target_grpc():
        dep = by_kind(rendered["objs"], "Deployment")[0]
        c = dep["spec"]["template"]["spec"]["containers"][0]
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == grpc_port, f"{probe} does not target the grpc port"
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "startup probe too short for model loading"

    def service_ports_named():
        for svc in by_kind(rendered["objs"], "Service"):
            if svc["metadata"]["name"] in ("rel-imagegen", "rel-imagegen-trainer"):
                assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"}

    def no_secret_in_configmap():
        secrets = [k["key"] for k in vals["auth"]["apiKeys"]] + ([vals["auth"]["feedbackSecret"]] if vals["auth"]["feedbackSecret"] else [])
        for cm in by_kind(rendered["objs"], "ConfigMap"):
            text = yaml.safe_dump(cm)
            for s in secrets:
                assert s not in text, "a secret value leaked into a ConfigMap"
            assert not any(k in cm["data"] for k in ("IMAGEGEN_API_KEYS", "IMAGEGEN_FEEDBACK_SECRET"))
        for s in secrets:
            assert any(s in yaml.safe_dump(x) for x in by_kind(rendered["objs"], "Secret")), "a secret value is missing from the Secret"

    def hardened():
        spec = by_kind(rendered["objs"], "Deployment")[0]["spec"]["template"]["spec"]
        c = spec["containers"][0]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert spec["terminationGracePeriodSeconds"] > vals["server"]["drainTimeoutSeconds"] + c["lifecycle"]["preStop"]["sleep"]["seconds"]

    def gpu_resources():
        spec = by_kind(rendered["objs"], "Deployment")[0]["spec"]["template"]["spec"]
        res = spec["containers"][0]["resources"]
        name = vals["gpu"]["resourceName"]
        if vals["gpu"]["enabled"]:
            assert res["limits"][name] == vals["gpu"]["count"] and res["requests"][name] == vals["gpu"]["count"], res
            assert spec.get("runtimeClassName") == vals["gpu"]["runtimeClassName"]
            assert spec.get("tolerations") and spec.get("nodeSelector")
            image = spec["containers"][0]["image"]
            assert image.endswith("-cuda"), image
            cm = by_kind(rendered["objs"], "ConfigMap")[0]
            assert cm["data"]["IMAGEGEN_CUDA"] == "true"
        else:
            assert name not in str(res), "a CPU profile requests a GPU"

    for name, fn in [
        ("lint --strict", lint),
        ("template", template),
        ("kubernetes-validate --strict", validate),
        ("probes target the grpc port", probes_target_grpc),
        ("service ports are named grpc and metrics", service_ports_named),
        ("no secret in a ConfigMap", no_secret_in_configmap),
        ("non-root, read-only root, grace > drain", hardened),
        ("GPU resources match the profile", gpu_resources),
    ]:
        check(f"{profile}: {name}", fn)


def guard_checks():
    def training_with_replicas_fails():
        p = render(None, "d3po.enabled=true", "replicaCount=2", ok=False)
        assert p.returncode != 0, "rendered training with 2 replicas"
        assert "replicaCount=1" in p.stderr and "one trainer per deployment" in p.stderr, p.stderr
        assert "nats.enabled=true" in p.stderr, "the message names the way out"

    def training_with_autoscaling_fails():
        p = render(None, "d3po.enabled=true", "autoscaling.enabled=true", "autoscaling.maxReplicas=3", ok=False)
        assert p.returncode != 0 and "one trainer per deployment" in p.stderr, p.stderr

    def short_grace_fails():
        p = render(None, "terminationGracePeriodSeconds=30", ok=False)
        assert p.returncode != 0 and "terminationGracePeriodSeconds" in p.stderr, p.stderr

    def schema_rejects_bad_values():
        for bad in ("server.dtype=f64", "server.grpcPort=70000", "model.source=s3", "auth.apiKeys[0].roles=root", "unknownKey=1"):
            p = render(None, bad, ok=False)
            assert p.returncode != 0, f"accepted {bad}"

    def training_without_replicas_renders():
        objs = objects(render(None).stdout)
        dep = by_kind(objs, "Deployment")[0]
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
        assert by_kind(objs, "PersistentVolumeClaim"), "no PVC for the adapter store"

    def scale_out_topology():
        objs = objects(render(None, "nats.enabled=true", "nats.url=nats://nats.nats.svc:4222", "replicaCount=3").stdout)
        deps = {d["metadata"]["name"]: d for d in by_kind(objs, "Deployment")}
        serve, trainer = deps["rel-imagegen"], deps["rel-imagegen-trainer"]
        env = lambda d: {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert serve["spec"]["replicas"] == 3 and env(serve)["IMAGEGEN_ROLE"] == "serve"
        assert serve["spec"].get("strategy", {}).get("type") != "Recreate", "serving replicas roll"
        assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"]["type"] == "Recreate"
        assert env(trainer)["IMAGEGEN_ROLE"] == "train"
        cm = by_kind(objs, "ConfigMap")[0]["data"]
        assert cm["IMAGEGEN_NATS_URL"] == "nats://nats.nats.svc:4222"
        # The serving Service must never route Generate to the trainer (it refuses it).
        svc = next(x for x in by_kind(objs, "Service") if x["metadata"]["name"] == "rel-imagegen")
        trainer_labels = trainer["spec"]["template"]["metadata"]["labels"]
        assert not all(trainer_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        serve_labels = serve["spec"]["template"]["metadata"]["labels"]
        assert all(serve_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        # A ReadWriteOnce claim cannot be shared by replicas; everything learned is in NATS.
        assert not by_kind(objs, "PersistentVolumeClaim")
        assert not by_kind(objs, "StatefulSet"), "an external NATS needs no bundled one"

    def nats_without_a_server_fails():
        p = render(None, "nats.enabled=true", ok=False)
        assert p.returncode != 0 and "nats.url" in p.stderr and "nats.deploy.enabled" in p.stderr, p.stderr
        p = render(None, "nats.enabled=true", "nats.url=nats://n:4222", "nats.credsKey=creds", ok=False)
        assert p.returncode != 0 and "nats.existingSecret" in p.stderr, p.stderr
        p = render(None, "nats.url=http://n:4222", ok=False)
        assert p.returncode != 0, "the schema takes only NATS URLs"

    def nats_credentials_from_a_secret():
        objs = objects(render(None, "nats.enabled=true", "nats.existingSecret=nats-auth", "nats.urlKey=url", "nats.credsKey=user.creds").stdout)
        for dep in by_kind(objs, "Deployment"):
            spec = dep["spec"]["template"]["spec"]
            env = {e["name"]: e for e in spec["containers"][0]["env"]}
            assert env["IMAGEGEN_NATS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "nats-auth", "key": "url"}
            assert env["IMAGEGEN_NATS_CREDS"]["value"] == "/etc/imagegen/nats/creds"
            vol = next(v for v in spec["volumes"] if v["name"] == "nats-creds")
            assert vol["secret"]["secretName"] == "nats-auth" and vol["secret"]["items"][0]["key"] == "user.creds"
        assert "IMAGEGEN_NATS_URL" not in by_kind(objs, "ConfigMap")[0]["data"], "the URL with its password stays in the Secret"

    def bundled_nats_and_training_off():
        objs = objects(render(None, "nats.enabled=true", "nats.deploy.enabled=true", "d3po.enabled=false").stdout)
        assert [d["metadata"]["name"] for d in by_kind(objs, "Deployment")] == ["rel-imagegen"], "no trainer without training"
        sts = by_kind(objs, "StatefulSet")[0]
        args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--jetstream" in args and "--store_dir" in args
        assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
        assert by_kind(objs, "ConfigMap")[0]["data"]["IMAGEGEN_NATS_URL"] == "nats://rel-imagegen-nats:4222"

    for name, fn in [
        ("scale-out: serving replicas, one Recreate trainer, Service skips the trainer, no PVC", scale_out_topology),
        ("scale-out: NATS without a server to reach fails with the reason", nats_without_a_server_fails),
        ("scale-out: NATS URL and creds from a Secret, never in the ConfigMap", nats_credentials_from_a_secret),
        ("scale-out: bundled JetStream StatefulSet; no trainer without training", bundled_nats_and_training_off),
        ("guard: training with 2 replicas fails with the reason", training_with_replicas_fails),
        ("guard: training with autoscaling fails", training_with_autoscaling_fails),
        ("guard: grace period below the drain fails", short_grace_fails),
        ("schema rejects bad values", schema_rejects_bad_values),
        ("defaults: one training replica, Recreate, PVC", training_without_replicas_renders),
    ]:
        check(name, fn)


def main():
    profiles = sorted(f for f in os.listdir(os.path.join(CHART, "ci")) if f.endswith(".yaml"))
    assert {"cpu-values.yaml", "gpu-values.yaml"} <= set(profiles), "cpu and gpu profiles are required"
    for profile in profiles:
        profile_checks(profile)
    guard_checks()
    print(f"chart: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
