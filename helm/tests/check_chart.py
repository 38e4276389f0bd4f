"""Lints and renders helm/ntm with default and non-default values, and
validates every rendered manifest against the Kubernetes API schemas.

Run by ntm-agent/tests/integration/helm.rs with the Python environment that
`cargo xtask test` prepares (helm-python-sdk embeds Helm 4, no binary or
network needed; kubernetes-validate carries the schemas).
Prints one line per check and "N passed, N failed" last; exits non-zero on
any failure."""

import json
import os
import sys

import helm_python as helm
import kubernetes_validate
import yaml

CHART = os.path.join(os.path.dirname(__file__), "..", "ntm")
DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "grafana", "ntm.json")
KUBE_VERSION = kubernetes_validate.latest_version()

NON_DEFAULT = {
    "interfaces": ["eth0", "veth*"],
    "localNets": ["10.0.0.0/8", "fd00::/8"],
    "labels": ["src", "dst", "service"],
    "maxSeries": 5000,
    "resolveNames": False,
    "port": 9100,
    "metricPrefix": "home",
    "extraArgs": ["--drain-interval", "2s"],
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus"}},
    "dashboard": {"enabled": True, "labels": {"grafana_dashboard": "1"}},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"operator": "Exists"}],
    "priorityClassName": "system-node-critical",
    "user": "",
    "seccompProfile": {"type": "Unconfined"},
    "filter": "not port 22",
}

RULES = yaml.safe_load(
    open(os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "prometheus", "ntm-rules.yml"))
)

passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def render(values):
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name="ntm", namespace="monitoring", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return out, docs


def containers(docs):
    ds = [d for _, d in docs if d["kind"] == "DaemonSet"]
    return ds[0]["spec"]["template"]["spec"], ds[0]["spec"]["template"]["spec"]["containers"][0]


lint = helm.lint(CHART, strict=True)
serious = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
check("helm lint --strict", not lint.get("errors") and not serious, lint)

for label, values in [("default values", {}), ("non-default values", NON_DEFAULT)]:
    out, docs = render(values)
    for path, doc in docs:
        if doc["kind"] == "PrometheusRule":
            # A CRD as well: the rules file's groups, for this release.
            rules = [r for g in doc["spec"]["groups"] for r in g["rules"]]
            exprs = " ".join(r["expr"] for r in rules)
            ok = (
                len(rules) == len(RULES["groups"][0]["rules"])
                and "home_interface_attached" in exprs
                and "ntm_" not in exprs
                and 'job="ntm"' in exprs
                and doc["metadata"]["labels"].get("release") == "kube-prometheus"
            )
            check(f"{label}: {path} (PrometheusRule: the rules, with prefix and job)", ok, exprs)
            continue
        if doc["kind"] == "ServiceMonitor":
            # A CRD: not in the core schemas; check its shape by hand.
            ok = doc["spec"]["endpoints"][0]["port"] == "metrics"
            check(f"{label}: {path} (ServiceMonitor shape)", ok, doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            check(f"{label}: {path} valid against Kubernetes {KUBE_VERSION}", True)
        except Exception as e:  # the validator raises several error types
            check(f"{label}: {path} valid against Kubernetes {KUBE_VERSION}", False, e)
    pod, ctr = containers(docs)
    env = {e["name"]: e["value"] for e in ctr["env"]}
    sc = ctr["securityContext"]
    check(f"{label}: host network", pod.get("hostNetwork") is True)
    check(
        f"{label}: least privilege",
        sc.get("privileged") is False
        and sorted(sc["capabilities"]["add"])
        == (
            ["BPF", "NET_ADMIN", "PERFMON"]
            if values is NON_DEFAULT
            else ["BPF", "CHOWN", "NET_ADMIN", "PERFMON", "SETGID", "SETUID"]
        )
        and sc["capabilities"]["drop"] == ["ALL"]
        and sc.get("allowPrivilegeEscalation") is False,
        sc,
    )
    check(
        f"{label}: seccomp profile",
        sc.get("seccompProfile")
        == ({"type": "Unconfined"} if values is NON_DEFAULT else {"type": "RuntimeDefault"}),
        sc,
    )
    check(
        f"{label}: gives up root after attaching",
        env.get("NTM_USER") == (None if values is NON_DEFAULT else "65534"),
        env,
    )
    check(
        f"{label}: probes on /healthz",
        ctr["readinessProbe"]["httpGet"]["path"] == "/healthz",
    )
    mounts = {m["name"]: m["mountPath"] for m in ctr.get("volumeMounts", [])}
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in pod.get("volumes", [])}
    check(
        f"{label}: pinned state in the node's bpffs",
        mounts.get("bpffs") == "/sys/fs/bpf"
        and volumes.get("bpffs") == "/sys/fs/bpf"
        and env.get("NTM_NO_PIN") == "false",
        (mounts, volumes, env.get("NTM_NO_PIN")),
    )
    check(f"{label}: NOTES.txt", "port-forward" in out["ntm/templates/NOTES.txt"])
    cms = [d for _, d in docs if d["kind"] == "ConfigMap"]
    check(
        f"{label}: dashboard ConfigMap for the sidecar, same as grafana/ntm.json",
        len(cms) == 1
        and cms[0]["metadata"]["labels"].get("grafana_dashboard") == "1"
        and json.loads(cms[0]["data"]["ntm.json"]) == json.load(open(DASHBOARD)),
    )
    if values is NON_DEFAULT:
        check(
            "non-default values reach the agent",
            env.get("NTM_INTERFACE") == "eth0,veth*"
            and env.get("NTM_LOCAL_NETS") == "10.0.0.0/8,fd00::/8"
            and env.get("NTM_NUMERIC") == "true"
            and env.get("NTM_PORT") == "9100"
            and env.get("NTM_METRIC_PREFIX") == "home"
            and env.get("NTM_FILTERS") == "not port 22"
            and ctr["args"] == ["--drain-interval", "2s"]
            and ctr["ports"][0]["containerPort"] == 9100,
            env,
        )
        check("ServiceMonitor rendered", any(d["kind"] == "ServiceMonitor" for _, d in docs))
    else:
        check("no ServiceMonitor by default", not any(d["kind"] == "ServiceMonitor" for _, d in docs))

_, docs = render({})
hooks = [d for _, d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"]
job = [d for d in hooks if d["kind"] == "Job"]
script = " ".join(job[0]["spec"]["template"]["spec"]["containers"][0]["command"]) if job else ""
check(
    "uninstall: a pre-delete hook rolls NTM_DETACH_ON_STOP out before the DaemonSet goes",
    sorted(d["kind"] for d in hooks) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    and "set env daemonset/ntm NTM_DETACH_ON_STOP=true" in script
    and "rollout status daemonset/ntm" in script,
    script,
)
_, docs = render({"uninstallDetach": {"enabled": False}})
check(
    "uninstall hook can be turned off",
    not any(d["metadata"].get("annotations", {}).get("helm.sh/hook") for _, d in docs),
)

_, docs = render({"pinState": False, "stateDir": ""})
pod, ctr = containers(docs)
env = {e["name"]: e["value"] for e in ctr["env"]}
check(
    "pinState false, stateDir empty: no bpffs, no history on the node",
    env.get("NTM_NO_PIN") == "true"
    and env.get("NTM_NO_HISTORY") == "true"
    and "volumes" not in pod
    and "volumeMounts" not in ctr,
    env,
)

_, docs = render({})
pod, ctr = containers(docs)
env = {e["name"]: e["value"] for e in ctr["env"]}
mounts = {m["name"]: m["mountPath"] for m in ctr.get("volumeMounts", [])}
volumes = {v["name"]: v.get("hostPath", {}) for v in pod.get("volumes", [])}
check(
    "history in the node's /var/lib/ntm by default",
    env.get("NTM_STATE_DIR") == "/var/lib/ntm"
    and mounts.get("state") == "/var/lib/ntm"
    and volumes.get("state") == {"path": "/var/lib/ntm", "type": "DirectoryOrCreate"},
    (env, mounts, volumes),
)

_, docs = render(
    {
        "webConfig": {"secretName": "ntm-web", "tls": True},
        "serviceMonitor": {
            "enabled": True,
            "basicAuth": {"username": {"name": "ntm-auth", "key": "user"}, "password": {"name": "ntm-auth", "key": "password"}},
            "tlsConfig": {"ca": {"configMap": {"name": "ntm-ca", "key": "ca.crt"}}, "serverName": "ntm"},
        },
    }
)
pod, ctr = containers(docs)
env = {e["name"]: e["value"] for e in ctr["env"]}
mounts = {m["name"]: m["mountPath"] for m in ctr.get("volumeMounts", [])}
secrets = {v["name"]: v.get("secret", {}).get("secretName") for v in pod.get("volumes", [])}
monitor = [d for _, d in docs if d["kind"] == "ServiceMonitor"][0]["spec"]["endpoints"][0]
check(
    "webConfig: the Secret mounted and passed, HTTPS probes, the ServiceMonitor over TLS with basic auth",
    env.get("NTM_WEB_CONFIG_FILE") == "/etc/ntm/web/web-config.yml"
    and mounts.get("web-config") == "/etc/ntm/web"
    and secrets.get("web-config") == "ntm-web"
    and ctr["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    and "tcpSocket" in ctr["livenessProbe"]
    and monitor.get("scheme") == "https"
    and monitor["basicAuth"]["password"]["name"] == "ntm-auth"
    and monitor["tlsConfig"]["serverName"] == "ntm",
    (env, mounts, secrets, ctr["readinessProbe"], monitor),
)

_, docs = render({"privileged": True})
_, ctr = containers(docs)
check("privileged only as an opt-in", ctr["securityContext"] == {"privileged": True})

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
